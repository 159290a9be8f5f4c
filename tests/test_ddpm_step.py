"""Triton noise-schedule kernels (q_sample, ddpm_step, ddim_step) through dxr.ops, against the
reference, and the statistics and layout of their in-kernel Philox noise."""

import math

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from scipy import stats

from dxr import ops
from dxr.diffusion import cosine_schedule, linear_schedule
from dxr.kernels import reference
from dxr.kernels.triton import ddpm_step as steps
from helpers import DEVICE, DTYPES, assert_close, randn

STEPS = 1000
# S = 3·37·41 = 4551 per sample: odd, more than one 4096-element block, the second one ragged
SHAPE = (4, 3, 37, 41)
# per sample: the first step, the second, the last, one in between
T = (0, 1, STEPS - 1, 437)
T_PREV = (-1, 0, STEPS - 21, 417)
LAYOUTS = ("contiguous", "channels_last")
PREDICTIONS = ("eps", "v")
CLIPS = (None, 1.0)


def _schedule(dtype=torch.float64):
    return linear_schedule(STEPS).to(device=DEVICE, dtype=dtype)


def _timesteps(values):
    return torch.tensor(values, dtype=torch.int64, device=DEVICE)


def _tensors(count, dtype=torch.float32, layout="contiguous", shape=SHAPE, seed=0):
    return [randn(*shape, dtype=dtype, seed=seed + i, channels_last=layout == "channels_last") for i in range(count)]


def _f32(*tensors):
    """The same (already rounded) inputs in float32, for the reference the kernel is held against."""
    return [t.float() for t in tensors]


def _check_like(out, x):
    assert out.dtype == x.dtype and out.shape == x.shape
    assert out.stride() == torch.empty_like(x).stride()


# --------------------------------------------------------------------------------------------------
# equal to the reference, with the noise given


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_q_sample_matches_reference(dtype, layout):
    x0, noise = _tensors(2, dtype, layout)
    t, ac = _timesteps(T), _schedule()
    out = ops.q_sample(x0, noise, t, ac, backend="triton")
    _check_like(out, x0)
    assert_close(out, reference.q_sample(*_f32(x0, noise), t, ac), dtype)


@pytest.mark.parametrize("variance", ("small", "large"))
@pytest.mark.parametrize("clip_x0", CLIPS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ddpm_step_matches_reference(dtype, layout, prediction, clip_x0, variance):
    x, m, z = _tensors(3, dtype, layout)
    t, ac = _timesteps(T), _schedule()
    kw = dict(prediction=prediction, clip_x0=clip_x0, variance=variance)
    out = ops.ddpm_step(x, m, t, ac, noise=z, backend="triton", **kw)
    _check_like(out, x)
    xf, mf, zf = _f32(x, m, z)
    assert_close(out, reference.ddpm_step(xf, mf, t, ac, noise=zf, **kw), dtype)


@pytest.mark.parametrize("eta", (0.0, 0.6))
@pytest.mark.parametrize("clip_x0", CLIPS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ddim_step_matches_reference(dtype, layout, prediction, clip_x0, eta):
    x, m, z = _tensors(3, dtype, layout)
    t, t_prev, ac = _timesteps(T), _timesteps(T_PREV), _schedule()
    kw = dict(eta=eta, prediction=prediction, clip_x0=clip_x0)
    out = ops.ddim_step(x, m, t, t_prev, ac, noise=z, backend="triton", **kw)
    _check_like(out, x)
    xf, mf, zf = _f32(x, m, z)
    assert_close(out, reference.ddim_step(xf, mf, t, t_prev, ac, noise=zf, **kw), dtype)


@pytest.mark.parametrize("schedule_dtype", (torch.float32, torch.float16))
def test_steps_with_a_float32_or_float16_schedule(schedule_dtype):
    # the coefficients follow the schedule's precision (float32 for both), as the reference does; in
    # float16 the first ᾱ round to 1 (1 - ᾱ = 0), so that case starts at t = 20 on the linear schedule
    x, m, z = _tensors(3)
    if schedule_dtype == torch.float32:
        t, ac = _timesteps(T), cosine_schedule(STEPS).to(device=DEVICE, dtype=schedule_dtype)
    else:
        t, ac = _timesteps((20, 21, STEPS - 1, 437)), _schedule(schedule_dtype)
    t_prev = _timesteps((-1, t[1].item() - 1, STEPS - 21, 417))
    assert_close(ops.q_sample(x, z, t, ac, backend="triton"), reference.q_sample(x, z, t, ac))
    assert_close(ops.ddpm_step(x, m, t, ac, prediction="v", noise=z, backend="triton"),
                 reference.ddpm_step(x, m, t, ac, prediction="v", noise=z))
    assert_close(ops.ddim_step(x, m, t, t_prev, ac, eta=0.3, clip_x0=1.5, noise=z, backend="triton"),
                 reference.ddim_step(x, m, t, t_prev, ac, eta=0.3, clip_x0=1.5, noise=z))


def _odd_layouts(dtype):
    """Inputs that are not one dense N-outermost layout shared by all: a strided slice, a batch-inner
    permutation, and a channels_last x_t with a contiguous model output and float32 noise."""
    n, c, h, w = SHAPE
    sliced = [randn(n, c, h, w + 5, dtype=dtype, seed=20 + i)[..., 2:w + 2] for i in range(2)]
    batch_inner = [randn(c, n, h, w, dtype=dtype, seed=30 + i).transpose(0, 1) for i in range(2)]
    mixed = [randn(*SHAPE, dtype=dtype, seed=40, channels_last=True), randn(*SHAPE, dtype=dtype, seed=41)]
    noise = randn(*SHAPE, seed=42)
    return [("sliced", *sliced, noise), ("batch_inner", *batch_inner, noise.to(dtype)), ("mixed", *mixed, noise)]


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_any_input_layout_matches_reference(dtype):
    t, t_prev, ac = _timesteps(T), _timesteps(T_PREV), _schedule()
    for name, x, m, z in _odd_layouts(dtype):
        xf, mf, zf = _f32(x, m, z)
        out = ops.q_sample(x, z, t, ac, backend="triton")
        _check_like(out, x)
        assert_close(out, reference.q_sample(xf, zf, t, ac), dtype, msg=f"q_sample, {name}")
        out = ops.ddpm_step(x, m, t, ac, clip_x0=2.0, noise=z, backend="triton")
        _check_like(out, x)
        assert_close(out, reference.ddpm_step(xf, mf, t, ac, clip_x0=2.0, noise=zf), dtype, msg=f"ddpm, {name}")
        out = ops.ddim_step(x, m, t, t_prev, ac, eta=1.0, prediction="v", noise=z, backend="triton")
        _check_like(out, x)
        expected = reference.ddim_step(xf, mf, t, t_prev, ac, eta=1.0, prediction="v", noise=zf)
        assert_close(out, expected, dtype, msg=f"ddim, {name}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_of_one_and_scalar_timesteps(dtype):
    # N = 1 with a ragged 5·7·11 sample; t given as an int and as a 0-d tensor (a stride-0 vector)
    x, m, z = _tensors(3, dtype, shape=(1, 5, 7, 11))
    xf, mf, zf = _f32(x, m, z)
    ac = _schedule()
    one = _timesteps((250,))
    assert_close(ops.q_sample(x, z, 250, ac, backend="triton"), reference.q_sample(xf, zf, one, ac), dtype)
    assert_close(ops.ddpm_step(x, m, torch.tensor(250, device=DEVICE), ac, noise=z, backend="triton"),
                 reference.ddpm_step(xf, mf, one, ac, noise=zf), dtype)
    assert_close(ops.ddim_step(x, m, 250, -1, ac, eta=0.5, noise=z, backend="triton"),
                 reference.ddim_step(xf, mf, one, _timesteps((-1,)), ac, eta=0.5, noise=zf), dtype)
    x, m, z = _tensors(3, dtype, shape=(5, 3))
    t = _timesteps((0, 3, 999, 998, 500))
    assert_close(ops.ddpm_step(x, m, t, ac, variance="large", noise=z, backend="triton"),
                 reference.ddpm_step(*_f32(x, m), t, ac, variance="large", noise=z.float()), dtype)


# --------------------------------------------------------------------------------------------------
# closed forms


@pytest.mark.parametrize("dtype", DTYPES)
def test_ddim_eta0_is_deterministic_and_its_closed_form(dtype):
    x, eps, z = _tensors(3, dtype)
    t, t_prev, ac = _timesteps(T), _timesteps(T_PREV), _schedule()
    first = ops.ddim_step(x, eps, t, t_prev, ac, seed=1, backend="triton")
    assert torch.equal(first, ops.ddim_step(x, eps, t, t_prev, ac, seed=2, backend="triton"))
    assert torch.equal(first, ops.ddim_step(x, eps, t, t_prev, ac, noise=z, backend="triton"))
    # x_prev = √ᾱ_prev · (x_t - √(1-ᾱ_t)·eps) / √ᾱ_t + √(1-ᾱ_prev) · eps, ᾱ_prev = 1 when t_prev = -1
    ab = ac[t].reshape(-1, 1, 1, 1)
    ab_prev = torch.where(t_prev >= 0, ac[t_prev.clamp(min=0)], 1.0).reshape(-1, 1, 1, 1)
    xd, ed = x.double(), eps.double()
    closed = ab_prev.sqrt() * (xd - (1 - ab).sqrt() * ed) / ab.sqrt() + (1 - ab_prev).sqrt() * ed
    assert_close(first, closed, dtype)


def test_q_sample_gradient_matches_reference_autograd():
    for dtype in (torch.float32, torch.bfloat16):
        x0, noise = (v.requires_grad_() for v in _tensors(2, dtype, "channels_last"))
        t, ac = _timesteps(T), _schedule()
        g = randn(*SHAPE, dtype=dtype, seed=9)
        out = ops.q_sample(x0, noise, t, ac, backend="triton")
        got = torch.autograd.grad(out, (x0, noise), g)
        expected = torch.autograd.grad(reference.q_sample(x0, noise, t, ac), (x0, noise), g)
        for a, b in zip(got, expected):
            assert a.dtype == dtype
            assert_close(a, b, dtype)


# --------------------------------------------------------------------------------------------------
# in-kernel noise


NOISE_SHAPE = (4, 1, 97, 89)  # S = 8633: odd, three blocks per sample; 34532 normals in all


def _sigma_large(ac, t):
    """σ_t of the "large" variance, √β_t, per sample (float64)."""
    ab = ac[t].double()
    ab_prev = torch.where(t > 0, ac[(t - 1).clamp(min=0)].double(), 1.0)
    return (1 - ab / ab_prev).sqrt()


def _recovered_ddpm_noise(seed, t, shape=NOISE_SHAPE):
    """z drawn in-kernel, recovered as (out(seed) - out(noise=0)) / σ, float64 (N, S) in memory order."""
    x, m = _tensors(2, shape=shape, seed=50)
    ac = _schedule()
    with_seed = ops.ddpm_step(x, m, t, ac, variance="large", seed=seed, backend="triton")
    without = ops.ddpm_step(x, m, t, ac, variance="large", noise=torch.zeros_like(x), backend="triton")
    sigma = _sigma_large(ac, t).reshape(-1, *[1] * (x.dim() - 1))
    return ((with_seed.double() - without.double()) / sigma).reshape(shape[0], -1).cpu()


def test_in_kernel_noise_is_standard_normal_and_uncorrelated():
    t = _timesteps((10, 300, 600, 999))
    z = _recovered_ddpm_noise(1234, t)
    flat = z.flatten()
    count = flat.numel()
    assert abs(flat.mean().item()) < 5 / math.sqrt(count)
    assert abs(flat.std().item() - 1) < 5 / math.sqrt(2 * count)
    assert stats.kstest(flat.numpy(), "norm").pvalue > 1e-3
    # each of the four normals one Philox counter yields is itself standard normal
    for lane in range(4):
        assert stats.kstest(z[:, lane::4].flatten().numpy(), "norm").pvalue > 1e-3, f"lane {lane}"
    # neighbours in memory (same counter, and the next counters) and samples are uncorrelated
    bound = 5 / math.sqrt(count)
    for lag in range(1, 9):
        r = torch.corrcoef(torch.stack([z[:, :-lag].flatten(), z[:, lag:].flatten()]))[0, 1]
        assert abs(r.item()) < bound, f"lag {lag}: r = {r.item():.4f}"
    r = torch.corrcoef(torch.stack([z[0], z[1]]))[0, 1]
    assert abs(r.item()) < 5 / math.sqrt(z.shape[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_in_kernel_noise_same_seed_bitwise_different_seed_different(dtype):
    x, m = _tensors(2, dtype, "channels_last")
    t, t_prev, ac = _timesteps((5, 300, 600, 999)), _timesteps((0, 280, 580, 979)), _schedule()
    for step in (lambda seed: ops.ddpm_step(x, m, t, ac, seed=seed, backend="triton"),
                 lambda seed: ops.ddim_step(x, m, t, t_prev, ac, eta=1.0, seed=seed, backend="triton")):
        a, b, c = step(7), step(7), step(8)
        assert torch.equal(a, b)
        assert (a != c).float().mean().item() > 0.5


def test_t0_adds_no_noise_with_in_kernel_noise():
    x, m = _tensors(2)
    t, ac = _timesteps((0, 3, 0, 999)), _schedule()
    for variance in ("small", "large"):
        drawn = ops.ddpm_step(x, m, t, ac, variance=variance, seed=99, backend="triton")
        silent = ops.ddpm_step(x, m, t, ac, variance=variance, noise=torch.zeros_like(x), backend="triton")
        assert torch.equal(drawn[t == 0], silent[t == 0])
        assert (drawn[t > 0] != silent[t > 0]).float().mean().item() > 0.99
        expected = reference.ddpm_step(x, m, t, ac, variance=variance, noise=torch.randn_like(x))
        assert_close(drawn[t == 0], expected[t == 0])


@triton.jit
def _philox_normals(out_ptr, seed, counters, BLOCK: tl.constexpr):
    # out[4c + k] = normal k of Philox counter c
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    z0, z1, z2, z3 = tl.randn4x(seed, c)
    mask = c < counters
    tl.store(out_ptr + 4 * c, z0, mask=mask)
    tl.store(out_ptr + 4 * c + 1, z1, mask=mask)
    tl.store(out_ptr + 4 * c + 2, z2, mask=mask)
    tl.store(out_ptr + 4 * c + 3, z3, mask=mask)


def test_in_kernel_noise_follows_the_documented_philox_stream():
    # element i of sample n takes normal i % 4 of counter n·⌈S/4⌉ + ⌊i/4⌋, for DDPM and DDIM alike
    seed, (n, per_sample) = 4321, (NOISE_SHAPE[0], math.prod(NOISE_SHAPE[1:]))
    rows = math.ceil(per_sample / 4)
    table = torch.empty(n * rows * 4, device=DEVICE)
    _philox_normals[(triton.cdiv(n * rows, 1024),)](table, seed, n * rows, BLOCK=1024)
    i = torch.arange(per_sample, device=DEVICE)
    index = (torch.arange(n, device=DEVICE)[:, None] * rows + i // 4) * 4 + i % 4
    expected = table[index].double().cpu()

    t = _timesteps((500, 650, 800, 999))  # σ ≥ 0.1, so the recovered z keeps float32 accuracy
    assert_close(_recovered_ddpm_noise(seed, t), expected, torch.float32)

    x, m = _tensors(2, shape=NOISE_SHAPE, seed=60)
    t_prev, ac = _timesteps((400, 550, 700, 900)), _schedule()
    drawn = ops.ddim_step(x, m, t, t_prev, ac, eta=1.0, seed=seed, backend="triton")
    silent = ops.ddim_step(x, m, t, t_prev, ac, eta=1.0, noise=torch.zeros_like(x), backend="triton")
    ab, ab_prev = ac[t], ac[t_prev]
    sigma = ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt().reshape(-1, 1, 1, 1)
    assert_close(((drawn.double() - silent.double()) / sigma).reshape(n, -1).cpu(), expected, torch.float32)


def test_launcher_rejects_a_seed_outside_the_philox_key():
    x, m = _tensors(2, shape=(2, 8))
    t, ac = _timesteps((1, 2)), _schedule()
    for seed in (-1, 2**63):
        with pytest.raises(ValueError, match="seed must be an int in"):
            steps.ddpm_step(x, m, t, ac, "eps", None, "small", None, seed)


# --------------------------------------------------------------------------------------------------
# the seed in device memory: an int64 (key, offset) tensor


def _state(key, offset=0):
    return torch.tensor([key, offset], dtype=torch.int64, device=DEVICE)


@pytest.mark.slow  # an interpreter sweep: make test runs it, make test-quick leaves it out
@pytest.mark.parametrize("shape", [NOISE_SHAPE, (3, 2, 5, 7)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_seed_tensor_at_offset_zero_is_the_int_seed_bitwise(dtype, shape):
    x, m = _tensors(2, dtype, shape=shape, seed=70)
    t, ac = _timesteps((5, 300, 600, 999)[:shape[0]]), _schedule()
    t_prev = _timesteps((0, 280, 580, 979)[:shape[0]])
    for key in (0, 4321, 2**63 - 1):
        assert torch.equal(ops.ddpm_step(x, m, t, ac, variance="large", seed=_state(key), backend="triton"),
                           ops.ddpm_step(x, m, t, ac, variance="large", seed=key, backend="triton"))
        assert torch.equal(ops.ddim_step(x, m, t, t_prev, ac, eta=0.7, seed=_state(key), backend="triton"),
                           ops.ddim_step(x, m, t, t_prev, ac, eta=0.7, seed=key, backend="triton"))


def test_seed_tensor_noise_is_the_documented_philox_stream_on_every_backend():
    # counter (lo, hi of n·⌈S/4⌉ + ⌊i/4⌋, lo, hi of the offset); reference.philox_normal writes it out
    t = _timesteps((500, 650, 800, 999))  # σ ≥ 0.1, so the recovered z keeps float32 accuracy
    x, m = _tensors(2, shape=NOISE_SHAPE, seed=50)
    for offset in (1, 2**32 + 5):
        state = _state(2**40 + 9, offset)
        expected = reference.philox_normal(x, state).double().reshape(NOISE_SHAPE[0], -1).cpu()
        assert_close(_recovered_ddpm_noise(state, t), expected, torch.float32)
        # the torch backend draws the same normals (exact sine and cosine: within 2e-6 of the kernels')
        assert_close(ops.ddpm_step(x, m, t, _schedule(), variance="large", seed=state, backend="torch"),
                     ops.ddpm_step(x, m, t, _schedule(), variance="large", seed=state, backend="triton"),
                     torch.float32)
    # the stream is Philox4x32-10 itself: the published known-answer vectors (Random123 kat_vectors)
    words = [torch.tensor([w], dtype=torch.int64) for w in (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)]
    key = torch.tensor([0x299F31D0A4093822], dtype=torch.int64)
    assert [int(w) for w in reference.philox4x32(key, *words)] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]
    zero = [torch.zeros(1, dtype=torch.int64)] * 4
    assert [int(w) for w in reference.philox4x32(zero[0], *zero)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    # int64 products of 32-bit words wrap modulo 2**64 and so keep both words exactly, on the device too
    words = torch.tensor([0, 1, 0x7FFFFFFF, 0x80000000, 0xD2511F53, 0xFFFFFFFF], dtype=torch.int64, device=DEVICE)
    for multiplier in (0xD2511F53, 0xCD9E8D57, 0xFFFFFFFF):
        hi, lo = reference._mulhilo(torch.tensor(multiplier, device=DEVICE), words)
        assert [(int(h) << 32) | int(w) for h, w in zip(hi, lo)] == [multiplier * int(w) for w in words]


def test_seed_tensor_noise_is_standard_normal_and_each_offset_a_fresh_stream():
    t = _timesteps((10, 300, 600, 999))
    z = {offset: _recovered_ddpm_noise(_state(1234, offset), t) for offset in (0, 1, 2)}
    for offset, draw in z.items():
        flat = draw.flatten()
        count = flat.numel()
        assert abs(flat.mean().item()) < 5 / math.sqrt(count)
        assert abs(flat.std().item() - 1) < 5 / math.sqrt(2 * count)
        assert stats.kstest(flat.numpy(), "norm").pvalue > 1e-3, f"offset {offset}"
    bound = 5 / math.sqrt(z[0].numel())
    for a, b in ((0, 1), (1, 2), (0, 2)):
        r = torch.corrcoef(torch.stack([z[a].flatten(), z[b].flatten()]))[0, 1]
        assert abs(r.item()) < bound, f"offsets {a} and {b}: r = {r.item():.4f}"
    # the key matters too, and a seed tensor is read when the step runs: advancing it in place changes z
    x, m = _tensors(2, shape=(2, 64))
    t2, ac = _timesteps((400, 900)), _schedule()
    state = _state(1234)
    first = ops.ddpm_step(x, m, t2, ac, seed=state, backend="triton")
    state[1] += 1
    second = ops.ddpm_step(x, m, t2, ac, seed=state, backend="triton")
    assert (first != second).float().mean().item() > 0.99
    assert torch.equal(second, ops.ddpm_step(x, m, t2, ac, seed=_state(1234, 1), backend="triton"))
    assert (ops.ddpm_step(x, m, t2, ac, seed=_state(1235, 1), backend="triton") != second).float().mean() > 0.99


def test_reference_philox_normal_is_standard_normal_in_the_kernels_memory_order():
    like = torch.empty(3, 2, 33, 31, device=DEVICE).to(memory_format=torch.channels_last)
    z = reference.philox_normal(like, _state(77, 3))
    assert z.shape == like.shape and z.dtype == torch.float32 and z.is_contiguous(memory_format=torch.channels_last)
    flat = z.flatten().double().cpu()
    assert abs(flat.mean().item()) < 5 / math.sqrt(flat.numel())
    assert stats.kstest(flat.numpy(), "norm").pvalue > 1e-3
    # channels_last: memory order is NHWC, so the first four channels-last elements are counter 0's normals
    contiguous = reference.philox_normal(like.contiguous(), _state(77, 3))
    assert torch.equal(z.permute(0, 2, 3, 1).reshape(3, -1), contiguous.reshape(3, -1))
    assert reference.philox_normal(torch.empty(0, 4), _state(1)).shape == (0, 4)


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_bad_seed_tensors_raise_naming_seed(backend):
    x, m = _tensors(2, shape=(2, 8))
    t, t_prev, ac = _timesteps((1, 2)), _timesteps((0, 1)), _schedule()
    bad = [torch.tensor([1.0, 0.0], device=DEVICE), torch.tensor([1, 0], dtype=torch.int32, device=DEVICE),
           torch.tensor([1, 0, 0], device=DEVICE), torch.tensor([[1, 0]], device=DEVICE),
           torch.tensor([1, 0], device="meta")]
    for seed in bad:
        with pytest.raises(ValueError, match="seed"):
            ops.ddpm_step(x, m, t, ac, seed=seed, backend=backend)
        with pytest.raises(ValueError, match="seed"):
            ops.ddim_step(x, m, t, t_prev, ac, eta=0.5, seed=seed, backend=backend)
    with pytest.raises(ValueError, match="seed"):
        steps.ddpm_step(x, m, t, ac, "eps", None, "small", None, torch.tensor([1, 0, 5, 0], device=DEVICE)[::2])


def test_a_step_reading_and_advancing_a_device_seed_compiles_to_one_graph():
    x, m = _tensors(2, shape=(2, 1, 8, 8))
    t, ac = _timesteps((3, 700)), _schedule()

    def step(x, state):
        out = ops.ddpm_step(x, m, t, ac, seed=state, backend="triton")
        state[1:].add_(1)
        return out

    eager_state, compiled_state = _state(9), _state(9)
    compiled = torch.compile(step, fullgraph=True)
    for _ in range(2):
        assert torch.equal(compiled(x, compiled_state), step(x, eager_state))
    assert compiled_state.tolist() == eager_state.tolist() == [9, 2]


# --------------------------------------------------------------------------------------------------
# custom-op registration


def test_opcheck_triton_ops():
    x, m, z = _tensors(3, shape=(2, 3, 9, 7))
    t, t_prev, ac = _timesteps((0, 700)), _timesteps((-1, 650)), _schedule()
    x0, noise = (v.clone().requires_grad_() for v in (x, z))
    torch.library.opcheck(torch.ops.dxr.q_sample.default, (x0, noise, t, ac, "triton"))
    state = torch.tensor([17, 3], device=DEVICE)
    torch.library.opcheck(torch.ops.dxr.ddpm_step.default, (x, m, t, ac, "v", 1.0, "large", z, 0, None, "triton"))
    torch.library.opcheck(torch.ops.dxr.ddpm_step.default,
                          (x, m, t, ac, "eps", None, "small", None, 17, None, "triton"))
    torch.library.opcheck(torch.ops.dxr.ddpm_step.default,
                          (x, m, t, ac, "eps", None, "small", None, 0, state, "triton"))
    torch.library.opcheck(torch.ops.dxr.ddim_step.default,
                          (x, m, t, t_prev, ac, 0.0, "eps", 1.0, None, 0, None, "triton"))
    torch.library.opcheck(torch.ops.dxr.ddim_step.default,
                          (x, m, t, t_prev, ac, 0.8, "v", None, None, 5, None, "triton"))
    torch.library.opcheck(torch.ops.dxr.ddim_step.default,
                          (x, m, t, t_prev, ac, 0.8, "v", None, None, 0, state, "triton"))


@triton.jit
def _sincos_table(u_ptr, sin_ptr, cos_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s, c = steps._sincos_turns(tl.load(u_ptr + offs, mask=mask, other=0.0))
    tl.store(sin_ptr + offs, s, mask=mask)
    tl.store(cos_ptr + offs, c, mask=mask)


def test_in_kernel_sine_and_cosine_stay_within_their_error_bound():
    # every float32 u that Philox's uniform conversion can give lies in [0, 1); the polynomial's error is
    # bounded by its first omitted Taylor term (3.2e-7), plus float32 rounding; a wrong quadrant swap or
    # sign would be off by up to 2
    gen = torch.Generator().manual_seed(5)
    u = torch.cat([torch.rand(1 << 16, generator=gen), torch.linspace(0, 1, 4097)[:-1],
                   torch.tensor([0.125, 0.375, 0.625, 0.875, 0.25 - 2**-26, 1 - 2**-24])]).to(DEVICE)
    sin, cos = torch.empty_like(u), torch.empty_like(u)
    _sincos_table[(triton.cdiv(u.numel(), 4096),)](u, sin, cos, u.numel(), BLOCK=4096)
    angle = 2 * math.pi * u.double().cpu()
    assert (sin.double().cpu() - angle.sin()).abs().max().item() < 5e-7
    assert (cos.double().cpu() - angle.cos()).abs().max().item() < 5e-7


@triton.jit
def _float64_table(a_ptr, recip_ptr, sqrt_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=1.0)
    tl.store(recip_ptr + offs, steps._recip64(a), mask=mask)
    tl.store(sqrt_ptr + offs, steps._sqrt64(a), mask=mask)


def test_float64_reciprocal_and_square_root_are_within_one_ulp():
    # the multiply-add forms the kernels use for float64 schedules, over the whole positive normal range
    # (a bad seed constant or too few Newton steps is off by many ulps at some exponent)
    gen = torch.Generator().manual_seed(6)
    a = torch.cat([torch.logspace(-300, 300, 20001, dtype=torch.float64),
                   torch.rand(4096, generator=gen, dtype=torch.float64),
                   1 - torch.rand(4096, generator=gen, dtype=torch.float64) * 1e-12,
                   torch.tensor([1.0, 0.5, 2.0, 1e-4, 0.9999, 2.0**-1022], dtype=torch.float64)]).to(DEVICE)
    recip, root = torch.empty_like(a), torch.empty_like(a)
    _float64_table[(triton.cdiv(a.numel(), 4096),)](a, recip, root, a.numel(), BLOCK=4096)
    a, recip, root = a.cpu(), recip.cpu(), root.cpu()

    def ulps(got, want):
        return ((got - want).abs() / torch.from_numpy(np.spacing(want.abs().numpy()))).max().item()

    assert ulps(recip, 1 / a) <= 1.0
    assert ulps(root, a.sqrt()) <= 1.0
    zero = torch.zeros(1, dtype=torch.float64, device=DEVICE)
    inf, root_of_zero = torch.zeros_like(zero), torch.ones_like(zero)
    with np.errstate(over="ignore", invalid="ignore"):  # the Newton steps of 1/0 overflow on the way to inf
        _float64_table[(1,)](zero, inf, root_of_zero, 1, BLOCK=16)
    assert root_of_zero.item() == 0.0 and inf.item() == math.inf

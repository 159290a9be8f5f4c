"""The CUDA extension backend (dxr._C through dxr.kernels.cuda) against the reference.

Forward and backward of every op, each dtype and layout, ragged sizes, every path of the GroupNorm/AdaIN
planner (on-chip, thread-block cluster, split); the in-kernel noise (its Philox stream, statistics and
reproducibility). These need a CUDA GPU and the built extension and skip, saying which is missing,
elsewhere. Without a GPU, a launch must raise a Python exception that names the op, never crash.
"""

import math

import pytest
import torch

from dxr import ops
from dxr.kernels import cuda, reference
from helpers import DTYPES, assert_close

EPS = 1e-5
BUILT = cuda.extension() is not None
GPU = torch.cuda.is_available()
LAYOUTS = ("contiguous", "channels_last")

needs_cuda_backend = pytest.mark.skipif(
    not (BUILT and GPU and cuda.supports("group_norm_silu")),
    reason="needs a CUDA GPU (compute capability 8.0+) and the built extension dxr._C"
    + ("" if BUILT else " (not built: DXR_BUILD_CUDA=1 pip install -e .)")
    + ("" if GPU else " (no CUDA GPU here)"),
)


def _random(shape, dtype=torch.float32, layout="contiguous", seed=0, offset=0.0):
    gen = torch.Generator().manual_seed(seed)
    t = (torch.randn(*shape, generator=gen, dtype=torch.float64) + offset).to(device="cuda", dtype=dtype)
    if layout == "channels_last":
        t = t.movedim(1, -1).contiguous().movedim(-1, 1)
    return t


# --------------------------------------------------------------------------------------------------
# without a GPU


@pytest.mark.skipif(not BUILT, reason="dxr._C is not built here (no nvcc, or DXR_BUILD_CUDA=0)")
@pytest.mark.skipif(GPU, reason="a CUDA GPU is present: the launch would succeed")
def test_a_launch_without_a_gpu_raises_a_python_exception_naming_the_op():
    ext = cuda.extension()
    assert set(ext.OPS) == set(ops.OPS) and ext.device_count() == 0
    # raw pointers into nothing: the runtime must refuse before any kernel runs
    with pytest.raises(RuntimeError, match=r"dxr\._C\.q_sample: .*cudaError\w+ \(\d+\)"):
        ext.sampler_step(kind=0, n=1, s=4, dtype=0, aligned=True, out=256, x=256, model=0, noise=256, t=256,
                         t_stride=1, t_prev=0, t_prev_stride=0, schedule=256, schedule_stride=1, schedule64=False,
                         num_steps=10, pred_v=False, clip=False, clip_value=0.0, large_var=False, eta=0.0, seed=0,
                         seed_state=0, device=0, stream=0)
    with pytest.raises(RuntimeError, match=r"dxr\._C\.norm_fwd: .*cudaError"):
        ext.norm_plan(n=1, c=4, s=4, groups=2, channels_last=False, dtype=0, aligned=True, per_sample_affine=False,
                      backward=False, device=0)
    with pytest.raises(RuntimeError, match=r"dxr\._C\.attention_fwd: .*cudaError"):
        ext.attention_fwd(q=256, k=256, v=256, o=256, lse=256, b=1, h=1, lq=8, lk=8, d=64, q_strides=(512, 512, 64),
                          k_strides=(512, 512, 64), v_strides=(512, 512, 64), scale=0.125, dtype=1, device=0, stream=0)
    # the tensor wrappers name the op for CPU tensors
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="group_norm_silu: the CUDA kernels take CUDA tensors"):
        cuda.group_norm_silu_fwd(x, None, None, 2, EPS, True)
    with pytest.raises(ValueError, match="q_sample: the CUDA kernels take CUDA tensors"):
        cuda.q_sample(x, x, torch.zeros(2, dtype=torch.int64), torch.rand(10))


@pytest.mark.skipif(not BUILT, reason="dxr._C is not built here (no nvcc, or DXR_BUILD_CUDA=0)")
def test_bad_arguments_are_value_errors_before_any_launch():
    ext = cuda.extension()
    with pytest.raises(ValueError, match=r"dxr\._C\.attention_fwd: head dim D must be a multiple of 8"):
        ext.attention_fwd(q=256, k=256, v=256, o=256, lse=256, b=1, h=1, lq=8, lk=8, d=12, q_strides=(96, 96, 12),
                          k_strides=(96, 96, 12), v_strides=(96, 96, 12), scale=0.3, dtype=1, device=0, stream=0)
    with pytest.raises(ValueError, match="dtype code"):
        ext.attention_fwd(q=256, k=256, v=256, o=256, lse=256, b=1, h=1, lq=8, lk=8, d=64, q_strides=(512, 512, 64),
                          k_strides=(512, 512, 64), v_strides=(512, 512, 64), scale=0.1, dtype=0, device=0, stream=0)


def test_backend_cuda_on_cpu_tensors_names_the_extension():
    with pytest.raises(RuntimeError, match=r"dxr\._C"):
        ops.adain(torch.randn(1, 2, 3, 3), torch.ones(1, 2), torch.zeros(1, 2), backend="cuda")


# --------------------------------------------------------------------------------------------------
# GroupNorm (+ SiLU)


def _gn_reference(x, weight, bias, groups, silu, dy):
    n, c = x.shape[:2]
    x64 = x.detach().double().requires_grad_()
    w64 = (weight.detach().double() if weight is not None else torch.ones(c, dtype=torch.float64, device=x.device))
    b64 = (bias.detach().double() if bias is not None else torch.zeros(c, dtype=torch.float64, device=x.device))
    w64.requires_grad_()
    b64.requires_grad_()
    y = reference.group_norm_silu(x64, groups, w64, b64, EPS, silu=silu)
    y.backward(dy.double())
    var, mean = torch.var_mean(x64.detach().reshape(n, groups, -1), dim=-1, correction=0)
    return y.detach(), mean, torch.rsqrt(var + EPS), x64.grad, w64.grad, b64.grad


def _check_gn(shape, groups, dtype, layout, silu=True, affine=True, offset=0.0):
    x = _random(shape, dtype, layout, offset=offset)
    c = shape[1]
    w = (1 + 0.5 * _random((c,), seed=5)) if affine else None
    b = (0.5 * _random((c,), seed=6)) if affine else None
    dy = _random(shape, dtype, layout, seed=1)
    y, mean, rstd = cuda.group_norm_silu_fwd(x, w, b, groups, EPS, silu)
    dx, dw, db = cuda.group_norm_silu_bwd(dy, x, w, b, mean, rstd, groups, silu)
    want = _gn_reference(x, w, b, groups, silu, dy)
    for name, got, ref in zip(("y", "mean", "rstd", "dx", "dweight", "dbias"), (y, mean, rstd, dx, dw, db), want):
        out_dtype = dtype if name in ("y", "dx") else torch.float32
        assert got.dtype == out_dtype, name
        # dweight/dbias sum over N·S products of half-precision values
        assert_close(got, ref, out_dtype, scale=4.0 if name in ("dweight", "dbias") else 1.0,
                     msg=f"{name} {shape} G={groups} {dtype} {layout}")
    assert y.stride() == torch.empty_like(x).stride() and dx.stride() == x.stride()
    return y, dx, dw


# (shape, groups): ragged sizes (odd S, odd channels per group), batch 1 with few groups (clusters on
# sm_90, the split path on sm_80), one huge group (split path), many groups
GN_CASES = [((2, 12, 5, 7), 4), ((3, 32, 16, 16), 8), ((1, 64, 32, 32), 32), ((1, 4, 61, 67), 1),
            ((8, 128, 16, 16), 32), ((2, 96, 9, 9), 32), ((1, 512, 8, 8), 32), ((2, 3, 1, 1), 3)]


@needs_cuda_backend
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups", GN_CASES)
def test_group_norm_matches_reference(shape, groups, dtype, layout):
    _check_gn(shape, groups, dtype, layout)


@needs_cuda_backend
@pytest.mark.parametrize("silu", (True, False))
@pytest.mark.parametrize("affine", (True, False))
def test_group_norm_without_affine_or_silu(affine, silu):
    _check_gn((2, 16, 7, 9), 4, torch.float32, "channels_last", silu=silu, affine=affine)


@needs_cuda_backend
@pytest.mark.parametrize("shape,groups", [((2, 8, 16, 16), 2), ((1, 4, 150, 150), 1)])
def test_group_norm_keeps_the_noise_of_a_large_offset(shape, groups):
    _check_gn(shape, groups, torch.float32, "contiguous", offset=100.0)


@needs_cuda_backend
def test_group_norm_every_planner_path_is_exercised():
    ext, device = cuda.extension(), torch.cuda.current_device()

    def plan(n, c, s, g, cl=False, backward=False):
        return ext.norm_plan(n=n, c=c, s=s, groups=g, channels_last=cl, dtype=2, aligned=True,
                             per_sample_affine=False, backward=backward, device=device)

    paths = {(p["onchip"], p["cluster"]) for case, g in GN_CASES
             for p in (plan(case[0], case[1], math.prod(case[2:]), g, cl) for cl in (False, True))}
    assert (True, False) in paths and (False, False) in paths
    if torch.cuda.get_device_capability() >= (9, 0):
        assert (True, True) in paths


@needs_cuda_backend
def test_group_norm_backward_is_deterministic():
    x = _random((1, 64, 48, 48), torch.bfloat16)
    w, b, dy = _random((64,), seed=3), _random((64,), seed=4), _random(x.shape, torch.bfloat16, seed=5)
    y, mean, rstd = cuda.group_norm_silu_fwd(x, w, b, 32, EPS, True)
    first = cuda.group_norm_silu_bwd(dy, x, w, b, mean, rstd, 32, True)
    second = cuda.group_norm_silu_bwd(dy, x, w, b, mean, rstd, 32, True)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert torch.equal(y, cuda.group_norm_silu_fwd(x, w, b, 32, EPS, True)[0])


@needs_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_op_and_autograd(dtype):
    x = _random((2, 32, 9, 11), dtype, "channels_last").requires_grad_()
    w = (1 + 0.5 * _random((32,), seed=5)).requires_grad_()
    b = (0.5 * _random((32,), seed=6)).requires_grad_()
    dy = _random(x.shape, dtype, "channels_last", seed=1)
    y = ops.group_norm_silu(x, 8, w, b, EPS, backend="cuda")
    y.backward(dy)
    y_ref, _, _, dx_ref, dw_ref, db_ref = _gn_reference(x, w, b, 8, True, dy)
    assert_close(y, y_ref, dtype, msg="y")
    assert_close(x.grad, dx_ref, dtype, msg="dx")
    assert_close(w.grad, dw_ref, torch.float32, scale=4.0, msg="dweight")
    assert_close(b.grad, db_ref, torch.float32, scale=4.0, msg="dbias")
    assert ops.resolve_backend(None, "group_norm_silu", x) == "cuda"


# --------------------------------------------------------------------------------------------------
# AdaIN


def _adain_reference(x, scale, shift, dy):
    x64, s64, t64 = (t.detach().double().requires_grad_() for t in (x, scale, shift))
    y = reference.adain(x64, s64, t64, EPS)
    y.backward(dy.double())
    var, mean = torch.var_mean(x64.detach().flatten(2), dim=-1, correction=0)
    return y.detach(), mean, torch.rsqrt(var + EPS), x64.grad, s64.grad, t64.grad


ADAIN_SHAPES = [(2, 6, 5, 7), (1, 256, 16, 16), (4, 64, 32, 32), (1, 8, 97, 89), (3, 5, 1, 9)]


@needs_cuda_backend
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ADAIN_SHAPES)
def test_adain_matches_reference(shape, dtype, layout):
    x = _random(shape, dtype, layout)
    scale, shift = 1 + 0.5 * _random(shape[:2], seed=2), 0.5 * _random(shape[:2], seed=3)
    dy = _random(shape, dtype, layout, seed=4)
    y, mean, rstd = cuda.adain_fwd(x, scale, shift, EPS)
    dx, dscale, dshift = cuda.adain_bwd(dy, x, scale, mean, rstd)
    want = _adain_reference(x, scale, shift, dy)
    for name, got, ref in zip(("y", "mean", "rstd", "dx", "dscale", "dshift"), (y, mean, rstd, dx, dscale, dshift),
                              want):
        out_dtype = dtype if name in ("y", "dx") else torch.float32
        assert got.dtype == out_dtype, name
        assert_close(got, ref, out_dtype, scale=4.0 if name in ("dscale", "dshift") else 1.0,
                     msg=f"{name} {shape} {dtype} {layout}")
    assert y.stride() == torch.empty_like(x).stride()


@needs_cuda_backend
def test_adain_op_and_autograd():
    x = _random((2, 16, 12, 12), torch.float16, "channels_last").requires_grad_()
    scale = (1 + 0.5 * _random((2, 16), seed=2)).requires_grad_()
    shift = (0.5 * _random((2, 16), seed=3)).requires_grad_()
    dy = _random(x.shape, torch.float16, "channels_last", seed=4)
    ops.adain(x, scale, shift, EPS, backend="cuda").backward(dy)
    _, _, _, dx_ref, ds_ref, dt_ref = _adain_reference(x, scale, shift, dy)
    assert_close(x.grad, dx_ref, torch.float16, msg="dx")
    assert_close(scale.grad, ds_ref, torch.float32, scale=4.0, msg="dscale")
    assert_close(shift.grad, dt_ref, torch.float32, scale=4.0, msg="dshift")


# --------------------------------------------------------------------------------------------------
# sampler steps

STEPS = 1000
SAMPLER_SHAPE = (4, 3, 37, 41)  # S = 4551: odd, more than one block of a sample, ragged
T = (0, 1, STEPS - 1, 437)
T_PREV = (-1, 0, STEPS - 21, 417)


def _schedule(dtype=torch.float64):
    betas = torch.linspace(1e-4, 0.02, STEPS, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).to(device="cuda", dtype=dtype)


def _steps(values):
    return torch.tensor(values, dtype=torch.int64, device="cuda")


def _inputs(dtype, layout, shape=SAMPLER_SHAPE, count=3):
    return [_random(shape, dtype, layout, seed=10 + i) for i in range(count)]


@needs_cuda_backend
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("schedule_dtype", (torch.float64, torch.float32))
def test_sampler_steps_match_reference(dtype, layout, schedule_dtype):
    x, m, z = _inputs(dtype, layout)
    ac, t, t_prev = _schedule(schedule_dtype), _steps(T), _steps(T_PREV)
    xf, mf, zf = x.float(), m.float(), z.float()
    out = ops.q_sample(x, z, t, ac, backend="cuda")
    assert out.dtype == dtype and out.stride() == torch.empty_like(x).stride()
    assert_close(out, reference.q_sample(xf, zf, t, ac), dtype, msg="q_sample")
    for prediction in ("eps", "v"):
        for clip in (None, 1.0):
            for variance in ("small", "large"):
                kw = dict(prediction=prediction, clip_x0=clip)
                got = ops.ddpm_step(x, m, t, ac, variance=variance, noise=z, backend="cuda", **kw)
                want = reference.ddpm_step(xf, mf, t, ac, variance=variance, noise=zf, **kw)
                assert_close(got, want, dtype, msg=f"ddpm {kw} {variance}")
            for eta in (0.0, 0.7):
                kw = dict(prediction=prediction, clip_x0=clip, eta=eta)
                got = ops.ddim_step(x, m, t, t_prev, ac, noise=z, backend="cuda", **kw)
                want = reference.ddim_step(xf, mf, t, t_prev, ac, noise=zf, **kw)
                assert_close(got, want, dtype, msg=f"ddim {kw}")


@needs_cuda_backend
def test_sampler_mixed_dtypes_and_odd_layouts():
    x = _random((3, 5, 6, 7), torch.bfloat16).permute(0, 2, 1, 3)  # samples not in one run
    m, z = _random(x.shape, torch.float32, seed=2), _random(x.shape, torch.float16, seed=3)
    ac, t = _schedule(torch.float32), _steps((5, 500, 999))
    got = ops.ddpm_step(x, m, t, ac, noise=z, backend="cuda")
    assert got.dtype == torch.bfloat16 and got.stride() == torch.empty_like(x).stride()
    assert_close(got, reference.ddpm_step(x.float(), m, t, ac, noise=z.float()), torch.bfloat16)


def _drawn_noise(seed, t, shape=(4, 3, 33, 35)):
    """z of an in-kernel draw, recovered as (drawn - silent) / σ of a DDPM step (σ > 0 at every t here)."""
    x, m = _random(shape, seed=20), _random(shape, seed=21)
    ac = _schedule()
    drawn = ops.ddpm_step(x, m, t, ac, variance="large", seed=seed, backend="cuda")
    silent = ops.ddpm_step(x, m, t, ac, variance="large", noise=torch.zeros_like(x), backend="cuda")
    sigma = (1 - ac[t] / ac[t - 1]).sqrt().reshape(-1, 1, 1, 1)
    return (drawn.double() - silent.double()) / sigma


@needs_cuda_backend
def test_in_kernel_noise_is_standard_normal_reproducible_and_seeded():
    from scipy import stats

    t = _steps((500, 650, 800, 999))
    z = _drawn_noise(1234, t)
    assert torch.equal(z, _drawn_noise(1234, t))
    assert not torch.equal(z, _drawn_noise(1235, t))
    flat = z.flatten().cpu().numpy()
    assert abs(flat.mean()) < 0.02 and abs(flat.std() - 1) < 0.02
    assert stats.kstest(flat, "norm").pvalue > 1e-3


@needs_cuda_backend
def test_in_kernel_noise_follows_the_triton_stream():
    # the same Philox counters and Box–Muller pairs as dxr.kernels.triton.ddpm_step: equal up to the sine,
    # cosine and logarithm each implementation uses
    pytest.importorskip("triton")
    t = _steps((500, 650, 800, 999))
    shape = (4, 3, 33, 35)
    x, m = _random(shape, seed=20), _random(shape, seed=21)
    ac = _schedule()
    via_cuda = ops.ddpm_step(x, m, t, ac, variance="large", seed=77, backend="cuda")
    via_triton = ops.ddpm_step(x, m, t, ac, variance="large", seed=77, backend="triton")
    torch.testing.assert_close(via_cuda, via_triton, atol=2e-4, rtol=0)


@needs_cuda_backend
def test_ddim_eta0_ignores_the_seed():
    x, m = _random((2, 4, 9, 9), seed=1), _random((2, 4, 9, 9), seed=2)
    ac, t, t_prev = _schedule(), _steps((600, 30)), _steps((580, -1))
    first = ops.ddim_step(x, m, t, t_prev, ac, seed=1, backend="cuda")
    assert torch.equal(first, ops.ddim_step(x, m, t, t_prev, ac, seed=2, backend="cuda"))


@needs_cuda_backend
def test_sampler_steps_capture_in_a_cuda_graph():
    x, m = _random((2, 3, 16, 16), seed=1), _random((2, 3, 16, 16), seed=2)
    ac, t = _schedule(torch.float32), _steps((700, 300))
    ops.ddpm_step(x, m, t, ac, seed=5, backend="cuda")  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.ddpm_step(x, m, t, ac, seed=5, backend="cuda")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ops.ddpm_step(x, m, t, ac, seed=5, backend="cuda"))


@needs_cuda_backend
def test_seed_tensor_is_read_on_the_device_and_offset_zero_is_the_int_seed():
    pytest.importorskip("triton")
    x, m = _random((3, 2, 17, 19), seed=1), _random((3, 2, 17, 19), seed=2)
    ac, t, t_prev = _schedule(), _steps((700, 300, 20)), _steps((680, 280, -1))
    for step in (lambda seed, b: ops.ddpm_step(x, m, t, ac, variance="large", seed=seed, backend=b),
                 lambda seed, b: ops.ddim_step(x, m, t, t_prev, ac, eta=0.8, seed=seed, backend=b)):
        state = torch.tensor([77, 0], device="cuda")
        assert torch.equal(step(state, "cuda"), step(77, "cuda"))
        state[1] = 2**32 + 3
        shifted = step(state, "cuda")
        assert (shifted != step(77, "cuda")).float().mean().item() > 0.99
        # the same (key, offset) stream as the Triton kernels and the torch reference
        torch.testing.assert_close(shifted, step(state, "torch"), atol=2e-4, rtol=0)
        torch.testing.assert_close(shifted, step(state, "triton"), atol=2e-4, rtol=0)


@needs_cuda_backend
def test_seed_tensor_replayed_in_a_cuda_graph_draws_fresh_noise():
    x, m = _random((2, 3, 16, 16), seed=1), _random((2, 3, 16, 16), seed=2)
    ac, t = _schedule(torch.float32), _steps((700, 300))
    state = torch.tensor([5, 0], device="cuda")
    ops.ddpm_step(x, m, t, ac, seed=state, backend="cuda")  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.ddpm_step(x, m, t, ac, seed=state, backend="cuda")
        state[1:].add_(1)
    graph.replay()
    first = out.clone()
    graph.replay()
    torch.cuda.synchronize()
    assert state.tolist() == [5, 2]
    assert torch.equal(first, ops.ddpm_step(x, m, t, ac, seed=5, backend="cuda"))
    assert torch.equal(out, ops.ddpm_step(x, m, t, ac, seed=torch.tensor([5, 1], device="cuda"), backend="cuda"))
    assert (out != first).float().mean().item() > 0.99


# --------------------------------------------------------------------------------------------------
# attention


def _attention_reference(q, k, v, scale, do):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = (q64 @ k64.transpose(-2, -1)) * scale
    o = torch.softmax(s, dim=-1) @ v64
    o.backward(do.double())
    return o.detach(), torch.logsumexp(s.detach(), dim=-1), q64.grad, k64.grad, v64.grad


# (B, H, Lq, Lk, D): the three native head dims, padded ones (40 → 64, 72 → 128, 12 → 16 → 32), ragged lengths
ATTENTION_CASES = [(2, 3, 64, 64, 64), (1, 2, 77, 131, 64), (2, 2, 130, 67, 32), (1, 4, 200, 190, 128),
                   (1, 1, 33, 47, 40), (2, 1, 65, 129, 72), (1, 2, 5, 3, 12), (1, 1, 1, 1, 128)]


@needs_cuda_backend
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_attention_forward_matches_reference(case, dtype):
    b, h, lq, lk, d = case
    q, k, v = (_random(shape, dtype, seed=i) for i, shape in enumerate(((b, h, lq, d), (b, h, lk, d), (b, h, lk, d))))
    scale = d ** -0.5
    o, lse = cuda.attention_fwd(q, k, v, scale)
    o_ref, lse_ref, *_ = _attention_reference(q, k, v, scale, torch.zeros_like(q))
    assert o.dtype == dtype and o.shape == (b, h, lq, d) and o.is_contiguous()
    assert_close(o, o_ref, dtype, scale=2.0, msg=f"o {case}")
    torch.testing.assert_close(lse.double(), lse_ref, atol=1e-3, rtol=1e-4)


@needs_cuda_backend
def test_attention_takes_strided_views_and_float32():
    qkv = _random((2, 50, 3, 4, 64), torch.bfloat16).permute(2, 0, 3, 1, 4)  # a fused projection's views
    q, k, v = qkv[0], qkv[1], qkv[2]
    o, _ = cuda.attention_fwd(q, k, v, 0.125)
    assert_close(o, _attention_reference(q, k, v, 0.125, torch.zeros_like(q))[0], torch.bfloat16, scale=2.0)
    q32, k32, v32 = (t.float() for t in (q, k, v))  # float32 runs the Triton kernel
    o32, _ = cuda.attention_fwd(q32, k32, v32, 0.125)
    assert_close(o32, _attention_reference(q32, k32, v32, 0.125, torch.zeros_like(q32))[0], torch.float32)


@needs_cuda_backend
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_attention_op_and_autograd(dtype):
    # the backward is the Triton kernel on the CUDA forward's lse
    q, k, v = (_random((1, 2, 70, 64), dtype, seed=i).requires_grad_() for i in range(3))
    do = _random((1, 2, 70, 64), dtype, seed=9)
    ops.attention(q, k, v, backend="cuda").backward(do)
    _, _, dq, dk, dv = _attention_reference(q, k, v, 64 ** -0.5, do)
    for name, got, want in (("dq", q.grad, dq), ("dk", k.grad, dk), ("dv", v.grad, dv)):
        assert_close(got, want, dtype, scale=4.0, msg=name)


@needs_cuda_backend
def test_attention_empty_keys():
    q = _random((1, 1, 5, 64), torch.float16)
    k = torch.empty((1, 1, 0, 64), device="cuda", dtype=torch.float16)
    o, lse = cuda.attention_fwd(q, k, k, 0.125)
    assert torch.equal(o, torch.zeros_like(o)) and bool(torch.isneginf(lse).all())

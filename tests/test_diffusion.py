"""dxr.diffusion: the training loss, the DDPM/DDIM samplers, SDEdit and ILVR, held against the equations
written out here with the reference ops, on every dtype; timesteps stay on the device and every step
gets its own seed offset; a CUDA-graph sampler gives the plain loop's samples."""

import pytest
import torch

import dxr.ops as ops
from helpers import DEVICE, DTYPES, assert_close, randn
from dxr import diffusion
from dxr.diffusion import (GaussianDiffusion, ddim_sample, ddim_timesteps, ddpm_sample, ilvr_guide, low_pass,
                           make_schedule, sdedit, seed_state, training_loss)
from dxr.kernels import reference


class Affine(torch.nn.Module):
    """A toy denoiser whose output depends on x, t and cond: enough to test the plumbing exactly."""

    def __init__(self, cond: bool = False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.7))
        self.cond = cond
        self.calls = []

    def forward(self, x, t, cond=None):
        self.calls.append(t)
        out = self.w * x + 1e-3 * t.view(-1, *[1] * (x.dim() - 1)).to(x.dtype)
        return out + 0.1 * cond if self.cond else out


def _schedule(n=40, name="linear"):
    return make_schedule(name, n).to(DEVICE)


def test_make_schedule_rejects_unknown_names_and_sizes():
    assert make_schedule("cosine", 10).dtype == torch.float64
    with pytest.raises(ValueError, match="schedule"):
        make_schedule("quadratic", 10)
    with pytest.raises(ValueError, match="num_steps"):
        make_schedule("linear", 0)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_training_loss_is_the_mse_to_the_eps_or_v_target(prediction, dtype):
    ac = _schedule()
    x0 = randn(3, 1, 6, 5, dtype=dtype, seed=0)
    model = Affine(cond=True).to(DEVICE)
    cond = randn(3, 1, 6, 5, dtype=dtype, seed=1)
    torch.manual_seed(7)
    loss = training_loss(model, x0, ac, cond=cond, prediction=prediction)
    torch.manual_seed(7)
    t = torch.randint(0, 40, (3,), device=DEVICE)
    eps = torch.randn_like(x0)
    ab = ac[t].float().view(-1, 1, 1, 1)
    x_t = (ab.sqrt() * x0.float() + (1 - ab).sqrt() * eps.float()).to(dtype)
    target = eps.float() if prediction == "eps" else ab.sqrt() * eps.float() - (1 - ab).sqrt() * x0.float()
    expected = (model(x_t, t, cond).float() - target).square().mean()
    assert loss.dtype == torch.float32
    assert_close(loss, expected, dtype)
    loss.backward()
    assert model.w.grad is not None


def test_ddim_eta_zero_is_deterministic_and_follows_eq12():
    ac = _schedule()
    x_T = randn(2, 1, 4, 4, seed=2)
    model = Affine().to(DEVICE)
    a = ddim_sample(model, x_T, ac, steps=5, seed=1)
    b = ddim_sample(model, x_T, ac, steps=5, seed=999)
    assert torch.equal(a, b)
    sequence = ddim_timesteps(39, 5)
    x = x_T.float()
    for t, t_prev in zip(sequence, sequence[1:] + [-1]):
        tt = torch.full((2,), t, device=DEVICE)
        x = reference.ddim_step(x, model(x, tt), tt, torch.full((2,), t_prev, device=DEVICE), ac, clip_x0=1.0)
    assert_close(a, x, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ddpm_sampler_is_algorithm_2_with_a_new_seed_offset_each_step(dtype, monkeypatch):
    ac = _schedule(12)
    x_T = randn(2, 1, 4, 4, dtype=dtype, seed=3)
    model = Affine().to(DEVICE, dtype)
    seen = []
    real_step = ops.ddpm_step

    def spy(*args, **kwargs):
        seed = kwargs["seed"]
        assert isinstance(seed, torch.Tensor) and seed.dtype == torch.int64 and seed.device == x_T.device
        seen.append(tuple(seed.tolist()))
        return real_step(*args, **kwargs)

    monkeypatch.setattr(diffusion.ops, "ddpm_step", spy)
    out = ddpm_sample(model, x_T, ac, seed=5)
    # step i reads the device seed (key 5, offset i): a fresh Philox stream at every step
    assert out.dtype == dtype and seen == [(5, i) for i in range(12)]
    x = x_T
    for i, t in enumerate(range(11, -1, -1)):
        tt = torch.full((2,), t, device=DEVICE)
        x = reference.ddpm_step(x, model(x, tt), tt, ac, clip_x0=1.0,
                                seed=torch.tensor([5, i], device=DEVICE))
    assert_close(out, x, dtype)
    assert torch.equal(ddpm_sample(model, x_T, ac, seed=5), out)
    assert not torch.equal(ddpm_sample(model, x_T, ac, seed=6), out)


def test_samplers_keep_timesteps_on_the_device_one_tensor_per_sample():
    ac = _schedule(20)
    model = Affine().to(DEVICE)
    ddim_sample(model, randn(3, 1, 4, 4), ac, steps=4, eta=0.5)
    ddpm_sample(model, randn(3, 1, 4, 4), ac, t_start=5)
    assert len(model.calls) == 4 + 6
    assert all(t.shape == (3,) and t.dtype == torch.int64 and t.device.type == torch.device(DEVICE).type
               for t in model.calls)
    assert [int(t[0]) for t in model.calls] == [19, 13, 6, 0, 5, 4, 3, 2, 1, 0]


def test_ddim_timesteps_span_the_range_without_repeats():
    assert ddim_timesteps(999, 5) == [999, 749, 500, 250, 0]
    assert ddim_timesteps(3, 10) == [3, 2, 1, 0]
    assert ddim_timesteps(7, 1) == [7]
    for t_start in range(1, 60):
        for steps in range(1, 12):
            seq = ddim_timesteps(t_start, steps)
            assert seq[0] == t_start and seq[-1] == (0 if steps > 1 else t_start) and seq == sorted(set(seq))[::-1]
    with pytest.raises(ValueError):
        ddim_timesteps(10, 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sdedit_at_t0_zero_returns_its_input(dtype):
    x = randn(2, 1, 8, 8, dtype=dtype, seed=4)
    out = sdedit(Affine().to(DEVICE), x, _schedule(), 0)
    assert torch.equal(out, x) and out is not x
    with pytest.raises(ValueError, match="t0"):
        sdedit(Affine(), x, _schedule(), 41)


def test_sdedit_noises_to_t0_then_runs_the_reverse_chain_from_there(monkeypatch):
    ac = _schedule()
    x = randn(2, 1, 8, 8, seed=5).clamp(-1, 1)
    model = Affine().to(DEVICE)
    out = sdedit(model, x, ac, 10, seed=3)
    assert [int(t[0]) for t in model.calls] == list(range(9, -1, -1))
    assert torch.equal(out, sdedit(model, x, ac, 10, seed=3))
    model.calls.clear()
    sdedit(model, x, ac, 40, steps=4, seed=3)
    assert [int(t[0]) for t in model.calls] == ddim_timesteps(39, 4)


def test_ilvr_keeps_the_low_frequencies_of_the_reference():
    ac = _schedule()
    x = randn(2, 1, 16, 16, seed=6).clamp(-1, 1)
    model = Affine().to(DEVICE)
    free = sdedit(model, x, ac, 40, seed=1)
    guided = sdedit(model, x, ac, 40, seed=1, ilvr_factor=4)
    error = lambda y: (low_pass(y, 4) - low_pass(x, 4)).abs().mean()  # noqa: E731
    assert error(guided) < 0.2 * error(free)
    with pytest.raises(ValueError, match="ILVR factor"):
        ilvr_guide(x, ac, 3)


def test_ilvr_guide_is_the_update_of_choi_et_al():
    ac = _schedule()
    y, x = randn(1, 1, 8, 8, seed=7), randn(1, 1, 8, 8, seed=8)
    guide = ilvr_guide(y, ac, 2, seed=0)
    assert_close(guide(x, -1), x + low_pass(y, 2) - low_pass(x, 2), torch.float32)
    noise = torch.randn(y.shape, generator=torch.Generator(device=DEVICE).manual_seed(0), device=DEVICE)
    y_t = reference.q_sample(y, noise, torch.tensor([5], device=DEVICE), ac)
    assert_close(ilvr_guide(y, ac, 2, seed=0)(x, 5), x + low_pass(y_t, 2) - low_pass(x, 2), torch.float32)


def test_gaussian_diffusion_keeps_its_schedule_in_float64_and_samples():
    model = GaussianDiffusion(Affine(cond=True), _schedule(30, "cosine"), prediction="v").to(DEVICE)
    model = model.to(torch.bfloat16).float()
    assert model.alphas_cumprod(torch.device(DEVICE)).dtype == torch.float64
    cond = randn(2, 1, 4, 4)
    loss, parts = model(randn(2, 1, 4, 4), cond)
    assert loss.ndim == 0 and parts == {}
    a = model.sample((2, 1, 4, 4), cond=cond, steps=3, seed=4)
    assert torch.equal(a, model.sample((2, 1, 4, 4), cond=cond, steps=3, seed=4))
    assert model.sample((2, 1, 4, 4), cond=cond, seed=4).shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match="part"):
        model(randn(2, 1, 4, 4), cond, "gen")


@pytest.mark.slow
def test_samplers_on_the_triton_kernels_match_the_reference():
    """The noise the ddpm_step kernels draw in-kernel differs from torch.randn, so compare the deterministic paths."""
    ac = _schedule(20)
    model = Affine().to(DEVICE)
    x_T = randn(2, 1, 8, 8, seed=9)
    for prediction in ("eps", "v"):
        expected = ddim_sample(model, x_T, ac, steps=5, prediction=prediction, backend="torch")
        got = ddim_sample(model, x_T, ac, steps=5, prediction=prediction, backend="triton")
        assert_close(got, expected, torch.float32)
    a = ddpm_sample(model, x_T, ac, seed=2, backend="triton")
    assert torch.equal(a, ddpm_sample(model, x_T, ac, seed=2, backend="triton")) and torch.isfinite(a).all()


def test_residual_model_diffuses_hq_minus_lq_and_adds_the_condition_back():
    alphas = diffusion.make_schedule("linear", 20)

    class Zero(torch.nn.Module):
        """ε that makes x̂0 = 0 at every step: a residual model that has learned 'no change'."""

        def forward(self, x, t, cond):
            return x / (1 - alphas.to(x.device)[t].float()).sqrt().view(-1, 1, 1, 1)

    cond = torch.rand(2, 1, 8, 8) * 2 - 1
    residual = GaussianDiffusion(Zero(), alphas, prediction="eps", residual=True)
    plain = GaussianDiffusion(Zero(), alphas, prediction="eps")
    for steps in (None, 4):
        torch.testing.assert_close(residual.sample(tuple(cond.shape), cond=cond, steps=steps, device="cpu"), cond)
        assert plain.sample(tuple(cond.shape), cond=cond, steps=steps, device="cpu").abs().max() < 1e-5
    # the training target is x0 − cond: same draws, same loss as a plain model on the residual
    x0 = torch.rand(2, 1, 8, 8) * 2 - 1
    torch.manual_seed(3)
    a = residual(x0, cond)[0]
    torch.manual_seed(3)
    b = plain(x0 - cond, cond)[0]
    torch.testing.assert_close(a, b)
    assert residual.to_image(x0) is x0  # without a condition there is nothing to add


# --------------------------------------------------------------------------------------------------
# the sampling loop as a CUDA graph


def test_seed_state_is_the_key_at_offset_zero_on_the_device():
    state = seed_state(5, "cpu")
    assert state.dtype == torch.int64 and state.tolist() == [5, 0]
    assert seed_state(-1, "cpu").tolist() == [2**63 - 1, 0]
    assert not diffusion.cuda_graphs_available(state)


def test_cuda_graph_on_a_cpu_runs_the_plain_loop_with_the_same_result():
    ac = make_schedule("linear", 30)
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    model = Affine()
    runs = [
        lambda graph: ddpm_sample(model, x_T, ac, seed=3, cuda_graph=graph),
        lambda graph: ddim_sample(model, x_T, ac, steps=6, eta=0.7, seed=3, cuda_graph=graph),
        lambda graph: sdedit(model, x_T.clamp(-1, 1), ac, 20, seed=3, ilvr_factor=2, cuda_graph=graph),
        lambda graph: sdedit(model, x_T.clamp(-1, 1), ac, 20, steps=5, eta=0.5, seed=3, cuda_graph=graph),
        lambda graph: GaussianDiffusion(model, ac).sample((2, 1, 8, 8), steps=4, eta=1.0, seed=3, device="cpu",
                                                          cuda_graph=graph),
    ]
    for run in runs:
        plain = run(False)
        assert torch.equal(run(True), plain) and torch.isfinite(plain).all()
    # the loop still draws fresh noise at every step: another seed, other samples
    assert not torch.equal(ddpm_sample(model, x_T, ac, seed=4, cuda_graph=True), runs[0](False))


def test_every_sampler_step_is_a_profiled_region():
    ac = make_schedule("linear", 12)
    x_T = torch.randn(2, 1, 4, 4)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ddpm_sample(Affine(), x_T, ac, cuda_graph=True)
        ddim_sample(Affine(), x_T, ac, steps=5)
    assert sum(event.name == "sample.step" for event in prof.events()) == 12 + 5


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA graphs need a CUDA GPU; the CPU fallback is tested above")


class _ConvDenoiser(torch.nn.Module):
    """A small convolutional denoiser of (x, t, cond): cuDNN kernels and a timestep gather in the graph."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        self.embed = torch.nn.Embedding(1000, 1)

    def forward(self, x, t, cond=None):
        return torch.tanh(self.conv(x) + self.embed(t).view(-1, 1, 1, 1))


@needs_cuda
@pytest.mark.parametrize("backend", ("torch", "triton", "cuda"))
def test_cuda_graph_sampler_gives_the_plain_images_for_the_same_seed(backend, monkeypatch):
    if backend == "cuda" and not ops._cuda_extension().supports("ddpm_step"):
        pytest.skip("the CUDA extension dxr._C is not built here")
    torch.manual_seed(0)
    model = _ConvDenoiser().cuda()
    ac = make_schedule("linear", 50).cuda()
    x_T = torch.randn(3, 1, 32, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    for sample in (lambda graph, seed: ddpm_sample(model, x_T, ac, seed=seed, backend=backend, cuda_graph=graph),
                   lambda graph, seed: ddim_sample(model, x_T, ac, steps=10, eta=1.0, seed=seed, backend=backend,
                                                   cuda_graph=graph)):
        plain = sample(False, 7)
        graph = sample(True, 7)
        assert torch.equal(graph, plain), (graph - plain).abs().max()
        assert not torch.equal(sample(True, 8), plain)


@needs_cuda
@pytest.mark.parametrize("backend", ("torch", "triton", "cuda"))
def test_each_replay_of_the_captured_step_draws_fresh_noise(backend):
    if backend == "cuda" and not ops._cuda_extension().supports("ddpm_step"):
        pytest.skip("the CUDA extension dxr._C is not built here")
    ac = make_schedule("linear", 50).cuda()
    zeros = torch.zeros(2, 1, 16, 16, device="cuda")
    t = torch.full((2,), 30, device="cuda")

    def step(x, state):  # x0 = 0 and x_t = 0: the step's output is σ·z alone
        out = ops.ddpm_step(zeros, zeros, t, ac, variance="large", seed=state, backend=backend)
        state[1:].add_(1)
        return out

    draws = {}
    for graph in (False, True):
        seen = []

        def record(x, _t):
            seen.append(x.clone())
            return x

        diffusion._run_chain(step, zeros, seed_state(11, "cuda"), [0, 0, 0, 0], record, graph)
        draws[graph] = seen
    for plain, replayed in zip(draws[False], draws[True]):
        assert torch.equal(plain, replayed)
    for a, b in zip(draws[True], draws[True][1:]):
        assert (a != b).float().mean().item() > 0.99

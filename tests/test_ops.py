"""dxr.ops: validation, backend dispatch, and the float64 references (gradcheck, closed forms)."""

import pytest
import torch
import torch.nn.functional as F

from dxr import ops
from dxr.diffusion import cosine_schedule, linear_schedule
from dxr.kernels import reference
from helpers import randn

# --------------------------------------------------------------------------------------------------
# bad input names the argument


def _gn(**kw):
    args = dict(x=torch.randn(2, 8, 4, 4), num_groups=4)
    args.update(kw)
    return ops.group_norm_silu(**args)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(x=torch.randn(8)), ValueError, "x must have shape (N, C, *)"),
        (dict(num_groups=3), ValueError, "num_groups (3) must divide"),
        (dict(num_groups=0), ValueError, "num_groups must be a positive int"),
        (dict(weight=torch.randn(7)), ValueError, "weight must have shape (8,)"),
        (dict(bias=torch.randn(8, 1)), ValueError, "bias must have shape (8,)"),
        (dict(x=torch.ones(2, 8, 4, 4, dtype=torch.int32)), TypeError, "x must be a floating-point tensor"),
        (dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
        (dict(weight=torch.ones(8, dtype=torch.int64)), TypeError, "weight must be a floating-point"),
        (dict(weight=torch.ones(8, device="meta")), ValueError, "weight is on meta but x is on cpu"),
        (dict(eps=0.0), ValueError, "eps must be positive"),
        (dict(backend="cudnn"), ValueError, "backend must be one of"),
    ],
)
def test_group_norm_silu_rejects_bad_input(kwargs, error, words):
    with pytest.raises(error) as info:
        _gn(**kwargs)
    assert words in str(info.value)


@pytest.mark.parametrize(
    "x, scale, shift, error, words",
    [
        (torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3), ValueError, "at least 3 dims"),
        (torch.randn(2, 3, 5), torch.randn(3), torch.randn(2, 3), ValueError, "scale must have shape (2, 3)"),
        (torch.randn(2, 3, 5), torch.randn(2, 3), torch.randn(3, 2), ValueError, "shift must have shape (2, 3)"),
        (torch.ones(2, 3, 5, dtype=torch.int16), torch.randn(2, 3), torch.randn(2, 3), TypeError, "x must be a floating"),
    ],
)
def test_adain_rejects_bad_input(x, scale, shift, error, words):
    with pytest.raises(error) as info:
        ops.adain(x, scale, shift)
    assert words in str(info.value)


@pytest.mark.parametrize(
    "q, k, v, error, words",
    [
        (torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8), ValueError, "q must have shape (B, H, L, D)"),
        (torch.randn(1, 2, 4, 8), torch.randn(1, 3, 4, 8), torch.randn(1, 3, 4, 8), ValueError, "k must have shape"),
        (torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 6, 8), ValueError, "v must have shape"),
        (torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16), ValueError, "k must have shape"),
        (torch.randn(1, 1, 4, 300), torch.randn(1, 1, 4, 300), torch.randn(1, 1, 4, 300), ValueError, "head dim D"),
        (torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8).half(), torch.randn(1, 1, 4, 8), TypeError, "share one dtype"),
        (torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8, device="meta"), torch.randn(1, 1, 4, 8), ValueError, "k is on meta"),
    ],
)
def test_attention_rejects_bad_input(q, k, v, error, words):
    with pytest.raises(error) as info:
        ops.attention(q, k, v)
    assert words in str(info.value)


def _schedule():
    return linear_schedule(50)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(t=torch.tensor([50, 0])), ValueError, "t must lie in [0, 49]"),
        (dict(t=torch.tensor([-1, 0])), ValueError, "t must lie in [0, 49]"),
        (dict(t=torch.tensor([1.0, 0.0])), TypeError, "t must be an integer tensor"),
        (dict(t=torch.tensor([1, 2, 3])), ValueError, "t must have shape (2,)"),
        (dict(model_out=torch.randn(2, 3, 5)), ValueError, "model_out must have shape (2, 3, 4)"),
        (dict(noise=torch.randn(2, 3)), ValueError, "noise must have shape (2, 3, 4)"),
        (dict(prediction="x0"), ValueError, "prediction must be one of"),
        (dict(variance="learned"), ValueError, "variance must be one of"),
        (dict(clip_x0=-1.0), ValueError, "clip_x0 must be a positive bound"),
        (dict(alphas_cumprod=torch.rand(3, 3)), ValueError, "alphas_cumprod must be a non-empty 1-D tensor"),
        (dict(seed=-3), ValueError, "seed must be an int in [0, 2**63)"),
        (dict(seed=2**63), ValueError, "seed must be an int in [0, 2**63)"),
        (dict(x_t=torch.ones(2, 3, 4, dtype=torch.int64)), TypeError, "x_t must be a floating-point"),
    ],
)
def test_ddpm_step_rejects_bad_input(kwargs, error, words):
    args = dict(x_t=torch.randn(2, 3, 4), model_out=torch.randn(2, 3, 4), t=torch.tensor([3, 0]),
                alphas_cumprod=_schedule())
    args.update(kwargs)
    with pytest.raises(error) as info:
        ops.ddpm_step(**args)
    assert words in str(info.value)


def test_ddim_step_rejects_bad_t_prev_and_eta():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"t_prev must lie in \[-1 \(the final step\), 49\]"):
        ops.ddim_step(x, x, torch.tensor([3, 2]), torch.tensor([-2, 1]), _schedule())
    with pytest.raises(ValueError, match="eta must be >= 0"):
        ops.ddim_step(x, x, torch.tensor([3, 2]), torch.tensor([1, 1]), _schedule(), eta=-0.5)


def test_q_sample_requires_noise():
    with pytest.raises(TypeError, match="noise must be a torch.Tensor"):
        ops.q_sample(torch.randn(2, 3), None, torch.tensor([1, 2]), _schedule())


# --------------------------------------------------------------------------------------------------
# dispatch


def test_auto_on_cpu_is_the_reference():
    x = torch.randn(2, 4, 3, 3)
    assert ops.resolve_backend(None, "group_norm_silu", x) == "torch"
    assert ops.resolve_backend("auto", "group_norm_silu", x) == "torch"


def test_float64_and_empty_fall_back_to_the_reference():
    assert ops.resolve_backend("triton", "group_norm_silu", torch.randn(2, 4, 3, dtype=torch.float64)) == "torch"
    assert ops.resolve_backend("triton", "group_norm_silu", torch.randn(0, 4, 3)) == "torch"
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(ops.group_norm_silu(x, 2, backend="triton"), F.silu(F.group_norm(x, 2)))


def test_empty_tensors_work():
    assert ops.group_norm_silu(torch.randn(0, 4, 3, 3), 2, backend="triton").shape == (0, 4, 3, 3)
    x = torch.randn(0, 3, 4)
    assert ops.adain(x, torch.randn(0, 3), torch.randn(0, 3)).shape == (0, 3, 4)
    assert ops.ddpm_step(x, x, torch.zeros(0, dtype=torch.int64), _schedule()).shape == (0, 3, 4)


def test_environment_sets_the_default_backend(monkeypatch):
    x = torch.randn(2, 4, 3, 3)
    monkeypatch.setenv("DXR_BACKEND", "torch")
    assert ops.resolve_backend(None, "group_norm_silu", x) == "torch"
    monkeypatch.setenv("DXR_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.group_norm_silu(x, 2)


def test_explicit_unavailable_backend_is_a_clear_error(monkeypatch):
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run group_norm_silu on cpu"):
        ops.group_norm_silu(x, 2, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.group_norm_silu(x, 2, backend="triton")


# --------------------------------------------------------------------------------------------------
# the references: float64 gradients and closed forms


def test_reference_group_norm_silu_gradcheck():
    x = torch.randn(2, 6, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    for silu in (True, False):
        assert torch.autograd.gradcheck(lambda *a: reference.group_norm_silu(a[0], 3, a[1], a[2], silu=silu),
                                        (x, w, b))


def test_reference_adain_gradcheck():
    x = torch.randn(2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(reference.adain, (x, s, h))


def test_reference_adain_is_instance_norm_with_per_sample_affine():
    x, s, h = torch.randn(3, 4, 5, 6), torch.randn(3, 4), torch.randn(3, 4)
    expected = F.instance_norm(x, eps=1e-5) * s[:, :, None, None] + h[:, :, None, None]
    torch.testing.assert_close(reference.adain(x, s, h), expected)


def test_reference_attention_gradcheck_and_sdpa():
    q, k, v = (torch.randn(1, 2, n, 5, dtype=torch.float64, requires_grad=True) for n in (3, 4, 4))
    assert torch.autograd.gradcheck(reference.attention, (q, k, v))
    torch.testing.assert_close(reference.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_reference_q_sample_gradcheck():
    x0, noise = (torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    t = torch.tensor([0, 7, 49])
    assert torch.autograd.gradcheck(lambda a, b: reference.q_sample(a, b, t, _schedule()), (x0, noise))


def test_ops_q_sample_gradient_matches_reference():
    x0, noise = randn(3, 2, 4, requires_grad=True), randn(3, 2, 4, requires_grad=True)
    t = torch.tensor([0, 7, 49])
    ac = _schedule()
    g = randn(3, 2, 4)
    ops.q_sample(x0, noise, t, ac, backend="torch").backward(g)
    expected = torch.autograd.grad(reference.q_sample(x0, noise, t, ac), (x0, noise), g)
    torch.testing.assert_close((x0.grad, noise.grad), expected)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_reference_ddpm_step_posterior(prediction):
    """x_{t-1} mean equals the Gaussian posterior q(x_{t-1} | x_t, x0) of Ho et al. eq. 7."""
    ac = linear_schedule(100).float()
    x0, eps = torch.randn(4, 8), torch.randn(4, 8)
    t = torch.tensor([1, 10, 50, 99])
    xt = reference.q_sample(x0, eps, t, ac)
    ab = ac[t][:, None]
    model_out = eps if prediction == "eps" else ab.sqrt() * eps - (1 - ab).sqrt() * x0
    ab_prev = ac[t - 1][:, None]
    beta = 1 - ab / ab_prev
    mean = (ab_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - ab_prev) * xt) / (1 - ab)
    z = torch.randn(4, 8)
    var = beta * (1 - ab_prev) / (1 - ab)
    out = reference.ddpm_step(xt, model_out, t, ac, prediction=prediction, noise=z)
    torch.testing.assert_close(out, mean + var.sqrt() * z, atol=1e-5, rtol=1e-5)


def test_reference_ddpm_step_adds_no_noise_at_t0():
    ac = linear_schedule(10).float()
    x, m = torch.randn(2, 5), torch.randn(2, 5)
    t = torch.tensor([0, 0])
    a = reference.ddpm_step(x, m, t, ac, noise=torch.randn(2, 5))
    b = reference.ddpm_step(x, m, t, ac, noise=torch.randn(2, 5))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, (x - (1 - ac[0]).sqrt() * m) / ac[0].sqrt())


def test_reference_ddim_eta0_recovers_x0_at_the_last_step():
    ac = cosine_schedule(20).float()
    x0, eps = torch.randn(3, 6), torch.randn(3, 6)
    t = torch.tensor([5, 12, 19])
    xt = reference.q_sample(x0, eps, t, ac)
    out = reference.ddim_step(xt, eps, t, torch.full((3,), -1), ac)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)


def test_schedules_are_decreasing_in_0_1():
    for ac in (linear_schedule(1000), cosine_schedule(1000)):
        assert ac.dtype == torch.float64 and ac.shape == (1000,)
        assert bool((ac[1:] < ac[:-1]).all()) and 0 < float(ac[-1]) < float(ac[0]) < 1

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
        (dict(eps=0.0), ValueError, "eps must be a finite number > 0"),
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
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
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


# --------------------------------------------------------------------------------------------------
# autograd: the same on every backend (first and second derivatives), opcheck with inputs that need grad

BACKENDS = ["torch", "triton"]


def _leaf(*shape, seed, dtype=torch.float32):
    return randn(*shape, dtype=dtype, seed=seed, device="cpu").requires_grad_()


def _grads(fn, inputs, seed=99):
    """(output, first derivatives for a random cotangent, second derivatives of their squared sum)."""
    out = fn(*inputs)
    cot = randn(*out.shape, seed=seed, device="cpu")
    first = torch.autograd.grad(out, inputs, cot, create_graph=True, allow_unused=True)
    first = [torch.zeros_like(v) if g is None else g for v, g in zip(inputs, first)]  # unused: a zero gradient
    total = sum(g.square().sum() for g in first)
    # an affine op's gradient does not depend on its inputs: its second derivative is zero
    second = torch.autograd.grad(total, inputs, allow_unused=True) if total.requires_grad else [None] * len(inputs)
    second = [torch.zeros_like(v) if g is None else g for v, g in zip(inputs, second)]
    return out.detach(), [g.detach() for g in first], second


def _assert_backends_agree(make, inputs, atol=2e-4, rtol=2e-4):
    results = {b: _grads(make(b), inputs) for b in BACKENDS}
    (y0, g0, h0), (y1, g1, h1) = results["torch"], results["triton"]
    torch.testing.assert_close(y1, y0, atol=atol, rtol=rtol)
    for name, a, b in [("grad", g1, g0), ("second derivative", h1, h0)]:
        for i, (u, v) in enumerate(zip(a, b)):
            torch.testing.assert_close(u, v, atol=atol, rtol=rtol, msg=f"{name} of input {i}")


_SCHEDULE = cosine_schedule(50)
_T, _T_PREV = torch.tensor([0, 17, 49]), torch.tensor([-1, 9, 30])


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("clip_x0", [None, 1.0])
@pytest.mark.parametrize("variance", ["small", "large"])
def test_ddpm_step_backward_is_the_same_on_every_backend(prediction, clip_x0, variance):
    inputs = (_leaf(3, 2, 5, 4, seed=1), _leaf(3, 2, 5, 4, seed=2), _leaf(3, 2, 5, 4, seed=3))

    def make(backend):
        return lambda x, m, z: ops.ddpm_step(x, m, _T, _SCHEDULE, prediction=prediction, clip_x0=clip_x0,
                                             variance=variance, noise=z, backend=backend)
    _assert_backends_agree(make, inputs)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("clip_x0", [None, 1.0])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_step_backward_is_the_same_on_every_backend(prediction, clip_x0, eta):
    inputs = (_leaf(3, 2, 5, 4, seed=4), _leaf(3, 2, 5, 4, seed=5), _leaf(3, 2, 5, 4, seed=6))

    def make(backend):
        return lambda x, m, z: ops.ddim_step(x, m, _T, _T_PREV, _SCHEDULE, eta=eta, prediction=prediction,
                                             clip_x0=clip_x0, noise=z, backend=backend)
    _assert_backends_agree(make, inputs)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("clip_x0", [None, 0.8])
def test_step_vjps_are_the_derivative_of_the_reference(prediction, clip_x0):
    x, m, z = (randn(3, 2, 4, 4, dtype=torch.float64, seed=s, device="cpu").requires_grad_() for s in (7, 8, 9))
    ac, dout = _SCHEDULE.double(), randn(3, 2, 4, 4, dtype=torch.float64, seed=10, device="cpu")
    for variance in ("small", "large"):
        out = reference.ddpm_step(x, m, _T, ac, prediction=prediction, clip_x0=clip_x0, variance=variance, noise=z)
        expected = torch.autograd.grad(out, (x, m, z), dout)
        got = reference.ddpm_step_vjp(dout, x, m, _T, ac, prediction=prediction, clip_x0=clip_x0, variance=variance)
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-10)
    for eta in (0.0, 0.5):
        out = reference.ddim_step(x, m, _T, _T_PREV, ac, eta=eta, prediction=prediction, clip_x0=clip_x0, noise=z)
        expected = torch.autograd.grad(out, (x, m, z), dout, allow_unused=True)
        got = reference.ddim_step_vjp(dout, x, m, _T, _T_PREV, ac, eta=eta, prediction=prediction, clip_x0=clip_x0)
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, torch.zeros_like(g) if e is None else e, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("affine", ["both", "bias only", "weight only", "none"])
def test_group_norm_silu_autograd_is_the_same_on_every_backend(affine):
    x = _leaf(2, 6, 3, 5, seed=11)
    weight = _leaf(6, seed=12) if affine in ("both", "weight only") else None
    bias = _leaf(6, seed=13) if affine in ("both", "bias only") else None
    params = [p for p in (weight, bias) if p is not None]

    def make(backend):
        def fn(x, *given):
            it = iter(given)
            w = next(it) if weight is not None else None
            b = next(it) if bias is not None else None
            return ops.group_norm_silu(x, 3, w, b, backend=backend)
        return fn
    _assert_backends_agree(make, (x, *params))


@pytest.mark.parametrize("x_dtype, param_dtype", [(torch.float32, torch.float16), (torch.float16, torch.float32),
                                                  (torch.bfloat16, torch.float16)])
def test_group_norm_silu_takes_parameters_of_another_dtype_on_every_backend(x_dtype, param_dtype):
    x = randn(2, 4, 3, 3, dtype=x_dtype, seed=14, device="cpu").requires_grad_()
    w, b = (randn(4, dtype=param_dtype, seed=s, device="cpu").requires_grad_() for s in (15, 16))
    results = {}
    for backend in BACKENDS:
        y = ops.group_norm_silu(x, 2, w, b, backend=backend)
        grads = torch.autograd.grad(y.float().square().sum(), (x, w, b))
        assert y.dtype == x_dtype and [g.dtype for g in grads] == [x_dtype, param_dtype, param_dtype]
        results[backend] = (y, *grads)
    for a, e in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(a.float(), e.float(), atol=2e-2, rtol=2e-2)


def test_adain_and_attention_second_derivatives_are_the_same_on_every_backend():
    x, scale, shift = _leaf(2, 3, 4, 5, seed=17), _leaf(2, 3, seed=18), _leaf(2, 3, seed=19)
    _assert_backends_agree(lambda b: (lambda x, s, h: ops.adain(x, s, h, backend=b)), (x, scale, shift))
    q, k, v = _leaf(1, 2, 5, 16, seed=20), _leaf(1, 2, 7, 16, seed=21), _leaf(1, 2, 7, 16, seed=22)
    _assert_backends_agree(lambda b: (lambda q, k, v: ops.attention(q, k, v, backend=b)), (q, k, v))


@pytest.mark.slow
def test_opcheck_passes_for_every_op_with_inputs_that_require_grad():
    x, m, z = _leaf(2, 4, 3, 5, seed=23), _leaf(2, 4, 3, 5, seed=24), _leaf(2, 4, 3, 5, seed=25)
    w, b = _leaf(4, seed=26), _leaf(4, seed=27)
    t, t_prev = torch.tensor([0, 30]), torch.tensor([-1, 20])
    cases = [
        (torch.ops.dxr.group_norm_silu_fwd.default, (x, w, b, 2, 1e-5, True, "triton")),
        (torch.ops.dxr.group_norm_silu_fwd.default, (x, None, b, 2, 1e-5, False, "triton")),
        (torch.ops.dxr.adain_fwd.default, (x, _leaf(2, 4, seed=28), _leaf(2, 4, seed=29), 1e-5, "triton")),
        (torch.ops.dxr.attention_fwd.default, (_leaf(1, 2, 3, 16, seed=30), _leaf(1, 2, 4, 16, seed=31),
                                               _leaf(1, 2, 4, 16, seed=32), 0.25, "triton")),
        (torch.ops.dxr.q_sample.default, (x, z, t, _SCHEDULE, "triton")),
        (torch.ops.dxr.ddpm_step.default, (x, m, t, _SCHEDULE, "eps", None, "small", z, 0, None, "triton")),
        (torch.ops.dxr.ddpm_step.default, (x, m, t, _SCHEDULE, "v", 1.0, "large", None, 3, None, "triton")),
        (torch.ops.dxr.ddpm_step.default, (x, m, t, _SCHEDULE, "v", 1.0, "large", None, 0, torch.tensor([3, 1]),
                                           "triton")),
        (torch.ops.dxr.ddim_step.default, (x, m, t, t_prev, _SCHEDULE, 0.0, "eps", 1.0, None, 0, None, "triton")),
        (torch.ops.dxr.ddim_step.default, (x, m, t, t_prev, _SCHEDULE, 0.6, "v", None, z, 0, None, "triton")),
        (torch.ops.dxr.ddim_step.default, (x, m, t, t_prev, _SCHEDULE, 0.6, "v", None, None, 0, torch.tensor([3, 1]),
                                           "triton")),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [float("nan"), float("inf"), 0.0, -1e-5])
def test_non_finite_or_non_positive_eps_is_refused_on_every_backend(backend, eps):
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        ops.group_norm_silu(x, 2, eps=eps, backend=backend)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        ops.adain(x, torch.ones(2, 4), torch.zeros(2, 4), eps=eps, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_eta_and_scale_are_refused_on_every_backend(backend):
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        ops.ddim_step(x, x, 3, 2, _SCHEDULE, eta=float("inf"), backend=backend)
    q = torch.randn(1, 1, 3, 8)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        ops.attention(q, q, q, scale=float("nan"), backend=backend)

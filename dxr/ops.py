"""Fused ops for diffusion models: the public functional API.

Every op takes and returns torch tensors, works on CPU and CUDA for float32/float16/bfloat16
(statistics and accumulation in float32), and has a ``backend`` keyword: ``None``/"auto", "torch",
"triton" or "cuda" (the environment variable ``DXR_BACKEND`` sets the default). "auto" picks the
CUDA extension when it is built and the tensors are on a GPU, else Triton on a GPU, else the eager
reference. float64 and empty tensors always take the reference.

The kernel backends are registered as ``torch.ops.dxr.*`` custom ops with fake (meta) kernels and
autograd formulas, so ``torch.library.opcheck`` passes and ``torch.compile(fullgraph=True)`` keeps
them in one graph. The "torch" backend calls ``dxr.kernels.reference`` directly.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Optional, Union

import torch
from torch import Tensor

from dxr.kernels import reference

BACKENDS = ("auto", "torch", "triton", "cuda")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# the ops; each kernel backend (a module of dxr.kernels.triton, or dxr.kernels.cuda) has their launch functions
OPS = ("group_norm_silu", "adain", "attention", "q_sample", "ddpm_step", "ddim_step")


# --------------------------------------------------------------------------------------------------
# validation


def _require_tensor(name: str, value, *, floating: bool = True) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, float16, bfloat16 or float64), got {value.dtype}")
    return value


def _require_same_device(reference_name: str, ref: Tensor, **others: Optional[Tensor]) -> None:
    for name, other in others.items():
        if other is not None and other.device != ref.device:
            raise ValueError(f"{name} is on {other.device} but {reference_name} is on {ref.device}: move them to one device")


def _require_shape(name: str, value: Optional[Tensor], shape: tuple, what: str) -> None:
    if value is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ({what}), got {tuple(value.shape)}")


def _require_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    return float(eps)


def _differentiable_vjp(fn, inputs: tuple, grad_out: Tensor) -> tuple:
    """The gradients of ``fn(*inputs)`` for ``grad_out``, as a graph (``create_graph``): the backward of a
    fused op when a second derivative is asked for, from the reference, so that every backend has one."""
    wanted = [i for i, v in enumerate(inputs) if isinstance(v, Tensor) and v.requires_grad]
    out = fn(*inputs)
    grads = torch.autograd.grad(out, [inputs[i] for i in wanted], grad_out, create_graph=True, allow_unused=True)
    result = [None] * len(inputs)
    for i, grad in zip(wanted, grads):
        result[i] = grad if grad is not None else torch.zeros_like(inputs[i])
    return tuple(result)


def _require_timesteps(name: str, t, batch: int, num_steps: int, device, *, allow_negative: bool = False) -> Tensor:
    """Per-sample timesteps as an int64 tensor (N,) on ``device``; a Python int is broadcast."""
    if isinstance(t, int) and not isinstance(t, bool):
        t = torch.full((batch,), t, dtype=torch.int64, device=device)
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be an int64 tensor of shape ({batch},) or an int, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.dim() == 0:
        t = t.expand(batch)
    if tuple(t.shape) != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) (one timestep per sample), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}: timesteps are read on the device")
    t = t.long()
    low = -1 if allow_negative else 0
    low_text = "-1 (the final step)" if allow_negative else "0"
    if t.device.type == "cpu" and t.numel() and not torch.compiler.is_compiling():
        bad = (t < low) | (t >= num_steps)
        if bool(bad.any()):
            raise ValueError(f"{name} must lie in [{low_text}, {num_steps - 1}] for a schedule of {num_steps} steps, "
                             f"got {t[bad][:4].tolist()}")
    elif t.numel() and not torch.compiler.is_compiling():
        # no host sync on a GPU: the check runs asynchronously on the device
        torch._assert_async(((t >= low) & (t < num_steps)).all(), f"{name} out of range [{low}, {num_steps - 1}]")
    return t


# --------------------------------------------------------------------------------------------------
# backend dispatch


def _triton_runs_on(device: torch.device) -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _cuda_extension():
    from dxr.kernels import cuda

    return cuda


def _requested(backend: Optional[str]) -> str:
    return (backend if backend is not None else os.environ.get("DXR_BACKEND", "auto")).lower()


def resolve_backend(backend: Optional[str], op: str, *tensors: Tensor) -> str:
    """The backend that runs ``op`` on these tensors: "torch", "triton" or "cuda".

    Raises ValueError for an unknown name and RuntimeError when an explicitly requested backend
    cannot run here. float64 and empty inputs always resolve to "torch".
    """
    requested = _requested(backend)
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    lead = tensors[0]
    if requested == "torch" or any(t.dtype not in KERNEL_DTYPES for t in tensors) or lead.numel() == 0:
        return "torch"
    device = lead.device
    if requested == "auto":
        if device.type != "cuda":
            return "torch"
        if _cuda_extension().supports(op):
            return "cuda"
        return "triton" if _triton_runs_on(device) else "torch"
    if requested == "triton" and not _triton_runs_on(device):
        raise RuntimeError(
            f"backend='triton' cannot run {op} on {device}: it needs a CUDA device, or the Triton interpreter "
            "(TRITON_INTERPRET=1 set before dxr is imported) for CPU tensors"
        )
    if requested == "cuda" and not (device.type == "cuda" and _cuda_extension().supports(op)):
        raise RuntimeError(
            f"backend='cuda' cannot run {op} on {device}: it needs CUDA tensors and the compiled extension "
            "dxr._C (build with DXR_BUILD_CUDA=1 pip install -e .)"
        )
    return requested


def _kernels(backend: str, op: str):
    """The module with ``op``'s launch functions on ``backend`` (imported on first use: Triton is optional)."""
    if backend == "cuda":
        return _cuda_extension()
    if op == "group_norm_silu":
        from dxr.kernels.triton import group_norm_silu as kernels
    elif op == "adain":
        from dxr.kernels.triton import adain as kernels
    elif op == "attention":
        from dxr.kernels.triton import attention as kernels
    else:  # q_sample, ddpm_step, ddim_step
        from dxr.kernels.triton import ddpm_step as kernels
    return kernels


# --------------------------------------------------------------------------------------------------
# GroupNorm (+ SiLU)


@torch.library.custom_op("dxr::group_norm_silu_fwd", mutates_args=())
def _group_norm_silu_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int,
                         eps: float, silu: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels(backend, "group_norm_silu").group_norm_silu_fwd(x, weight, bias, num_groups, eps, silu)


@_group_norm_silu_fwd.register_fake
def _(x, weight, bias, num_groups, eps, silu, backend):
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("dxr::group_norm_silu_bwd", mutates_args=())
def _group_norm_silu_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                         rstd: Tensor, num_groups: int, silu: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels(backend, "group_norm_silu").group_norm_silu_bwd(dy, x, weight, bias, mean, rstd, num_groups, silu)


@_group_norm_silu_bwd.register_fake
def _(dy, x, weight, bias, mean, rstd, num_groups, silu, backend):
    c = x.shape[1]
    return torch.empty_like(x), x.new_empty((c,), dtype=torch.float32), x.new_empty((c,), dtype=torch.float32)


def _group_norm_silu_setup(ctx, inputs, output):
    x, weight, bias, num_groups, eps, silu, backend = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.num_groups, ctx.eps, ctx.silu, ctx.backend = num_groups, eps, silu, backend


def _group_norm_silu_grad(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: a backward that is itself differentiable
        def forward(x, weight, bias):
            return reference.group_norm_silu(x, ctx.num_groups, weight, bias, ctx.eps, silu=ctx.silu)
        return (*_differentiable_vjp(forward, (x, weight, bias), dy), None, None, None, None)
    dx, dweight, dbias = _group_norm_silu_bwd(dy, x, weight, bias, mean, rstd, ctx.num_groups, ctx.silu, ctx.backend)
    dweight = dweight.to(weight.dtype) if weight is not None else None
    dbias = dbias.to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias, None, None, None, None


_group_norm_silu_fwd.register_autograd(_group_norm_silu_grad, setup_context=_group_norm_silu_setup)


def group_norm_silu(x: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                    eps: float = 1e-5, *, silu: bool = True, backend: Optional[str] = None) -> Tensor:
    """``silu(group_norm(x, num_groups, weight, bias, eps))``; ``silu=False`` gives plain GroupNorm.

    x: (N, C, *) in NCHW or channels_last layout (kept: the output has x's memory format).
    weight, bias: (C,) or None. Statistics are float32 whatever the input dtype.
    Raises TypeError for non-tensor or integer inputs, ValueError for a bad shape, a C not
    divisible by num_groups, or tensors on different devices.
    """
    _require_tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must have shape (N, C, *) with at least 2 dims, got shape {tuple(x.shape)}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    channels = x.shape[1]
    if channels % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide the channel count C = {channels} of x")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            _require_tensor(name, p)
            _require_shape(name, p, (channels,), "one value per channel of x")
    _require_same_device("x", x, weight=weight, bias=bias)
    eps = _require_eps(eps)
    chosen = resolve_backend(backend, "group_norm_silu", x, *(p for p in (weight, bias) if p is not None))
    if chosen == "torch":
        return reference.group_norm_silu(x, num_groups, weight, bias, eps, silu=silu)
    return _group_norm_silu_fwd(x, weight, bias, num_groups, eps, bool(silu), chosen)[0]


# --------------------------------------------------------------------------------------------------
# AdaIN


@torch.library.custom_op("dxr::adain_fwd", mutates_args=())
def _adain_fwd(x: Tensor, scale: Tensor, shift: Tensor, eps: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels(backend, "adain").adain_fwd(x, scale, shift, eps)


@_adain_fwd.register_fake
def _(x, scale, shift, eps, backend):
    stats = x.new_empty(tuple(x.shape[:2]), dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("dxr::adain_bwd", mutates_args=())
def _adain_bwd(dy: Tensor, x: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor,
               backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels(backend, "adain").adain_bwd(dy, x, scale, mean, rstd)


@_adain_bwd.register_fake
def _(dy, x, scale, mean, rstd, backend):
    stats = x.new_empty(tuple(x.shape[:2]), dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


def _adain_setup(ctx, inputs, output):
    x, scale, shift, eps, backend = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, scale, shift, mean, rstd)
    ctx.eps, ctx.shift_dtype, ctx.backend = eps, shift.dtype, backend


def _adain_grad(ctx, dy, _dmean, _drstd):
    x, scale, shift, mean, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: a backward that is itself differentiable
        def forward(x, scale, shift):
            return reference.adain(x, scale, shift, ctx.eps)
        return (*_differentiable_vjp(forward, (x, scale, shift), dy), None, None)
    dx, dscale, dshift = _adain_bwd(dy, x, scale, mean, rstd, ctx.backend)
    return dx, dscale.to(scale.dtype), dshift.to(ctx.shift_dtype), None, None


_adain_fwd.register_autograd(_adain_grad, setup_context=_adain_setup)


def adain(x: Tensor, scale: Tensor, shift: Tensor, eps: float = 1e-5, *, backend: Optional[str] = None) -> Tensor:
    """Adaptive instance norm: ``(x - mean) / sqrt(var + eps) * scale[n, c] + shift[n, c]``.

    x: (N, C, *spatial) with at least one spatial dim, NCHW or channels_last; mean and the biased
    variance are taken per (n, c) over the spatial dims, in float32. scale, shift: (N, C).
    """
    _require_tensor("x", x)
    if x.dim() < 3:
        raise ValueError(f"x must have shape (N, C, *spatial) with at least 3 dims, got shape {tuple(x.shape)}")
    for name, p in (("scale", scale), ("shift", shift)):
        _require_tensor(name, p)
        _require_shape(name, p, tuple(x.shape[:2]), "one value per (sample, channel) of x")
    _require_same_device("x", x, scale=scale, shift=shift)
    eps = _require_eps(eps)
    chosen = resolve_backend(backend, "adain", x)
    if chosen == "torch":
        return reference.adain(x, scale, shift, eps)
    return _adain_fwd(x, scale, shift, eps, chosen)[0]


# --------------------------------------------------------------------------------------------------
# attention


@torch.library.custom_op("dxr::attention_fwd", mutates_args=())
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float, backend: str) -> tuple[Tensor, Tensor]:
    return _kernels(backend, "attention").attention_fwd(q, k, v, scale)


@_attention_fwd.register_fake
def _(q, k, v, scale, backend):
    return q.new_empty((*q.shape[:3], v.shape[-1])), q.new_empty(tuple(q.shape[:3]), dtype=torch.float32)


@torch.library.custom_op("dxr::attention_bwd", mutates_args=())
def _attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, scale: float,
                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels(backend, "attention").attention_bwd(do, q, k, v, o, lse, scale)


@_attention_bwd.register_fake
def _(do, q, k, v, o, lse, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_setup(ctx, inputs, output):
    q, k, v, scale, backend = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale, ctx.backend = scale, backend


def _attention_grad(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: a backward that is itself differentiable
        def forward(q, k, v):
            return reference.attention(q, k, v, ctx.scale)
        return (*_differentiable_vjp(forward, (q, k, v), do), None, None)
    dq, dk, dv = _attention_bwd(do, q, k, v, o, lse, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None


_attention_fwd.register_autograd(_attention_grad, setup_context=_attention_setup)

MAX_HEAD_DIM = reference.MAX_HEAD_DIM


@torch._dynamo.assume_constant_result
def _attention_served(backend: str, head_dim: int, element_size: int, backward: bool) -> bool:
    # a property of the GPU, head dim and dtype: evaluated once while torch.compile traces
    return _kernels(backend, "attention").attention_supports(head_dim, element_size, backward)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None, *,
              backend: Optional[str] = None) -> Tensor:
    """``softmax(q @ kᵀ · scale) @ v``: q (B, H, Lq, D), k and v (B, H, Lk, D); no mask, non-causal.

    ``scale`` defaults to D^-½. Lq may differ from Lk; D ≤ 256. Softmax statistics are float32. On a GPU
    where the kernel backend has no spill-free tile for the head dim and dtype (see
    ``dxr.kernels.triton.attention``), "auto" runs PyTorch's ``scaled_dot_product_attention`` and an
    explicitly requested kernel backend raises RuntimeError.
    """
    for name, value in (("q", q), ("k", k), ("v", v)):
        _require_tensor(name, value)
        if value.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, L, D), got shape {tuple(value.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _require_same_device("q", q, k=k, v=v)
    b, h, _lq, d = q.shape
    _require_shape("k", k, (b, h, k.shape[2], d), "k must match q in batch, heads and head dim")
    _require_shape("v", v, (b, h, k.shape[2], d), "v must match k in batch, heads, length and head dim")
    if d > MAX_HEAD_DIM or d == 0:
        raise ValueError(f"head dim D of q must lie in [1, {MAX_HEAD_DIM}], got {d}")
    scale = float(d ** -0.5 if scale is None else scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None (D^-1/2), got {scale!r}")
    chosen = resolve_backend(backend, "attention", q)
    if chosen == "torch":
        return reference.attention(q, k, v, scale)
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not _attention_served(chosen, d, q.element_size(), backward):
        # no spill-free kernel tile for this head dim and dtype on this GPU (dxr.kernels.triton.attention_tiles)
        if _requested(backend) != "auto":
            raise RuntimeError(f"backend={chosen!r} does not run attention with head dim {d} in {q.dtype} on this "
                               f"GPU{' with a backward' if backward else ''}; use backend='auto' or 'torch'")
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    return _attention_fwd(q, k, v, scale, chosen)[0]


# --------------------------------------------------------------------------------------------------
# noise-schedule steps


@torch.library.custom_op("dxr::q_sample", mutates_args=())
def _q_sample(x0: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor, backend: str) -> Tensor:
    return _kernels(backend, "q_sample").q_sample(x0, noise, t, alphas_cumprod)


@_q_sample.register_fake
def _(x0, noise, t, alphas_cumprod, backend):
    return torch.empty_like(x0)


def _q_sample_setup(ctx, inputs, output):
    x0, noise, t, alphas_cumprod, _backend = inputs
    ctx.save_for_backward(t, alphas_cumprod)
    ctx.dtypes = (x0.dtype, noise.dtype)


def _q_sample_grad(ctx, dout):
    t, alphas_cumprod = ctx.saved_tensors
    ab = alphas_cumprod.float()[t].reshape(-1, *([1] * (dout.dim() - 1)))
    g = dout.float()
    return (ab.sqrt() * g).to(ctx.dtypes[0]), ((1 - ab).sqrt() * g).to(ctx.dtypes[1]), None, None, None


_q_sample.register_autograd(_q_sample_grad, setup_context=_q_sample_setup)


# the seed reaches the custom ops as an int (``seed``) or, when it lives in device memory, as an int64
# (key, offset) tensor (``seed_state``, which then wins)


@torch.library.custom_op("dxr::ddpm_step", mutates_args=())
def _ddpm_step(x_t: Tensor, model_out: Tensor, t: Tensor, alphas_cumprod: Tensor, prediction: str,
               clip_x0: Optional[float], variance: str, noise: Optional[Tensor], seed: int,
               seed_state: Optional[Tensor], backend: str) -> Tensor:
    return _kernels(backend, "ddpm_step").ddpm_step(x_t, model_out, t, alphas_cumprod, prediction, clip_x0,
                                                     variance, noise, seed if seed_state is None else seed_state)


@_ddpm_step.register_fake
def _(x_t, model_out, t, alphas_cumprod, prediction, clip_x0, variance, noise, seed, seed_state, backend):
    return torch.empty_like(x_t)


def _ddpm_step_setup(ctx, inputs, output):
    x_t, model_out, t, alphas_cumprod, prediction, clip_x0, variance, noise, _seed, _seed_state, _backend = inputs
    ctx.save_for_backward(x_t, model_out, t, alphas_cumprod)
    ctx.options = dict(prediction=prediction, clip_x0=clip_x0, variance=variance)
    ctx.dtypes = (x_t.dtype, model_out.dtype, None if noise is None else noise.dtype)


def _ddpm_step_grad(ctx, dout):
    x_t, model_out, t, alphas_cumprod = ctx.saved_tensors
    dx, dm, dz = reference.ddpm_step_vjp(dout, x_t, model_out, t, alphas_cumprod, **ctx.options)
    dz = dz.to(ctx.dtypes[2]) if ctx.dtypes[2] is not None else None
    return dx.to(ctx.dtypes[0]), dm.to(ctx.dtypes[1]), None, None, None, None, None, dz, None, None, None


_ddpm_step.register_autograd(_ddpm_step_grad, setup_context=_ddpm_step_setup)


@torch.library.custom_op("dxr::ddim_step", mutates_args=())
def _ddim_step(x_t: Tensor, model_out: Tensor, t: Tensor, t_prev: Tensor, alphas_cumprod: Tensor, eta: float,
               prediction: str, clip_x0: Optional[float], noise: Optional[Tensor], seed: int,
               seed_state: Optional[Tensor], backend: str) -> Tensor:
    return _kernels(backend, "ddim_step").ddim_step(x_t, model_out, t, t_prev, alphas_cumprod, eta, prediction,
                                                     clip_x0, noise, seed if seed_state is None else seed_state)


@_ddim_step.register_fake
def _(x_t, model_out, t, t_prev, alphas_cumprod, eta, prediction, clip_x0, noise, seed, seed_state, backend):
    return torch.empty_like(x_t)


def _ddim_step_setup(ctx, inputs, output):
    x_t, model_out, t, t_prev, alphas_cumprod, eta, prediction, clip_x0, noise, _seed, _seed_state, _backend = inputs
    ctx.save_for_backward(x_t, model_out, t, t_prev, alphas_cumprod)
    ctx.options = dict(eta=eta, prediction=prediction, clip_x0=clip_x0)
    ctx.dtypes = (x_t.dtype, model_out.dtype, None if noise is None else noise.dtype)


def _ddim_step_grad(ctx, dout):
    x_t, model_out, t, t_prev, alphas_cumprod = ctx.saved_tensors
    dx, dm, dz = reference.ddim_step_vjp(dout, x_t, model_out, t, t_prev, alphas_cumprod, **ctx.options)
    dz = dz.to(ctx.dtypes[2]) if ctx.dtypes[2] is not None else None
    return dx.to(ctx.dtypes[0]), dm.to(ctx.dtypes[1]), None, None, None, None, None, None, dz, None, None, None


_ddim_step.register_autograd(_ddim_step_grad, setup_context=_ddim_step_setup)


def _require_schedule(alphas_cumprod, x: Tensor) -> Tensor:
    _require_tensor("alphas_cumprod", alphas_cumprod)
    if alphas_cumprod.dim() != 1 or alphas_cumprod.numel() == 0:
        raise ValueError(f"alphas_cumprod must be a non-empty 1-D tensor (ᾱ_t per timestep), got shape "
                         f"{tuple(alphas_cumprod.shape)}")
    _require_same_device("x", x, alphas_cumprod=alphas_cumprod)
    return alphas_cumprod


def _require_pair(x_name: str, x: Tensor, other_name: str, other: Optional[Tensor]) -> None:
    _require_tensor(x_name, x)
    if x.dim() < 1:
        raise ValueError(f"{x_name} must have a leading batch dim (N, ...), got a scalar")
    if other is not None:
        _require_tensor(other_name, other)
        _require_shape(other_name, other, tuple(x.shape), f"the shape of {x_name}")
        _require_same_device(x_name, x, **{other_name: other})


def _require_choice(name: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _require_clip(clip_x0: Optional[float]) -> Optional[float]:
    if clip_x0 is None:
        return None
    if not clip_x0 > 0:
        raise ValueError(f"clip_x0 must be a positive bound or None, got {clip_x0!r}")
    return float(clip_x0)


def _fresh_seed(seed, x: Tensor):
    """The given seed (an int, or an int64 (key, offset) tensor on x's device), or an int drawn from torch's
    default (CPU) generator: no device sync."""
    if seed is not None:
        reference.check_seed(seed, x)
        return seed
    return int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))


def _seed_operands(seed) -> tuple[int, Optional[Tensor]]:
    """``seed`` as the custom ops' (int seed, seed_state) pair."""
    return (0, seed) if isinstance(seed, Tensor) else (seed, None)


def q_sample(x0: Tensor, noise: Tensor, t, alphas_cumprod: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """Forward diffusion ``sqrt(ᾱ[t])·x0 + sqrt(1-ᾱ[t])·noise``; t: int64 (N,) read on the device."""
    _require_pair("x0", x0, "noise", noise)
    if noise is None:
        raise TypeError("noise must be a torch.Tensor of the shape of x0, got None")
    alphas_cumprod = _require_schedule(alphas_cumprod, x0)
    t = _require_timesteps("t", t, x0.shape[0], alphas_cumprod.numel(), x0.device)
    chosen = resolve_backend(backend, "q_sample", x0, noise)
    if chosen == "torch":
        return reference.q_sample(x0, noise, t, alphas_cumprod)
    return _q_sample(x0, noise, t, alphas_cumprod, chosen)


def ddpm_step(x_t: Tensor, model_out: Tensor, t, alphas_cumprod: Tensor, *, prediction: str = "eps",
              clip_x0: Optional[float] = None, variance: str = "small", noise: Optional[Tensor] = None,
              seed: Union[int, Tensor, None] = None, backend: Optional[str] = None) -> Tensor:
    """One ancestral DDPM step x_t → x_{t-1} (see ``reference.ddpm_step`` for the equations).

    ``noise`` is the z of the step; when None the kernels draw it in-kernel (Philox keyed by ``seed``;
    one counter gives four normals for four consecutive elements of a sample, see
    ``dxr.kernels.triton.ddpm_step``), so pass a different seed at every step of a sampling loop.
    Same seed → same result on the same backend. t == 0 adds no noise.

    ``seed`` may also live in device memory: an int64 tensor (key, offset) of shape (2,) on x_t's device,
    read by the kernel (no host sync, so a CUDA graph replays it with whatever it holds then). Offset 0
    draws exactly the noise of the int seed ``key``; each offset is another stream, so a loop that adds 1
    to ``seed[1]`` after each step draws fresh noise. The "torch" backend draws the same Philox normals
    (``reference.philox_normal``, within about 2e-6 of the kernels'). Raises ValueError for a seed tensor
    of another dtype, shape or device.
    """
    _require_pair("x_t", x_t, "model_out", model_out)
    _require_pair("x_t", x_t, "noise", noise)
    _require_choice("prediction", prediction, ("eps", "v"))
    _require_choice("variance", variance, ("small", "large"))
    clip_x0 = _require_clip(clip_x0)
    alphas_cumprod = _require_schedule(alphas_cumprod, x_t)
    t = _require_timesteps("t", t, x_t.shape[0], alphas_cumprod.numel(), x_t.device)
    seed = _fresh_seed(seed, x_t) if noise is None else 0
    chosen = resolve_backend(backend, "ddpm_step", x_t, model_out)
    if chosen == "torch":
        return reference.ddpm_step(x_t, model_out, t, alphas_cumprod, prediction=prediction, clip_x0=clip_x0,
                                   variance=variance, noise=noise, seed=seed)
    return _ddpm_step(x_t, model_out, t, alphas_cumprod, prediction, clip_x0, variance, noise,
                      *_seed_operands(seed), chosen)


def ddim_step(x_t: Tensor, model_out: Tensor, t, t_prev, alphas_cumprod: Tensor, *, eta: float = 0.0,
              prediction: str = "eps", clip_x0: Optional[float] = None, noise: Optional[Tensor] = None,
              seed: Union[int, Tensor, None] = None, backend: Optional[str] = None) -> Tensor:
    """One DDIM step x_t → x_{t_prev}; ``t_prev < 0`` marks the final step (ᾱ_prev = 1).

    ``eta = 0`` is deterministic; ``eta > 0`` adds σ·z with z (and ``seed``, an int or an int64
    (key, offset) tensor on the device) as in :func:`ddpm_step`.
    """
    _require_pair("x_t", x_t, "model_out", model_out)
    _require_pair("x_t", x_t, "noise", noise)
    _require_choice("prediction", prediction, ("eps", "v"))
    clip_x0 = _require_clip(clip_x0)
    if not (eta >= 0 and math.isfinite(eta)):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    alphas_cumprod = _require_schedule(alphas_cumprod, x_t)
    n, steps = x_t.shape[0], alphas_cumprod.numel()
    t = _require_timesteps("t", t, n, steps, x_t.device)
    t_prev = _require_timesteps("t_prev", t_prev, n, steps, x_t.device, allow_negative=True)
    seed = _fresh_seed(seed, x_t) if (noise is None and eta > 0) else 0
    chosen = resolve_backend(backend, "ddim_step", x_t, model_out)
    if chosen == "torch":
        return reference.ddim_step(x_t, model_out, t, t_prev, alphas_cumprod, eta=float(eta), prediction=prediction,
                                   clip_x0=clip_x0, noise=noise, seed=seed)
    return _ddim_step(x_t, model_out, t, t_prev, alphas_cumprod, float(eta), prediction, clip_x0, noise,
                      *_seed_operands(seed), chosen)


__all__ = ["group_norm_silu", "adain", "attention", "q_sample", "ddpm_step", "ddim_step", "resolve_backend",
           "BACKENDS", "OPS"]

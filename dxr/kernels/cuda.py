"""The compiled CUDA extension ``dxr._C``, when built, wrapped to take and return tensors.

The launch functions have the names, signatures, shapes, dtypes and layouts of the Triton modules'
(``dxr.kernels.triton.{group_norm_silu,adain,attention,ddpm_step}``), so ``dxr.ops`` calls either backend
the same way. They allocate outputs and workspaces with torch, pass raw pointers, the device index and the
current stream to the extension, and never synchronise. The extension itself (``csrc/``) does not link
PyTorch.

What runs where:

- GroupNorm(+SiLU) and AdaIN, forward and backward: CUDA kernels for float32/float16/bfloat16, NCHW and
  channels_last in place (other layouts through a contiguous copy); the kernels' planner (``_C.norm_plan``)
  picks the on-chip, thread-block-cluster or split path. A shape it does not take (more than 2048 channels
  per group, a sample of 2³¹ elements or more) runs the Triton kernel instead.
- q_sample, ddpm_step, ddim_step: CUDA kernels, in-kernel Philox noise from ``seed`` (the stream described
  in ``dxr.kernels.triton.ddpm_step``; same seed → bitwise the same result on this backend), the seed an
  int or an int64 (key, offset) tensor the kernel reads on the device.
- attention forward: CUDA tensor-core kernel for float16/bfloat16 with head dims up to 128 (D not a
  multiple of 8 is zero-padded to one); float32 and head dims above 128 run the Triton kernel.
  **The attention backward is the Triton kernel** (``dxr.kernels.triton.attention.attention_bwd``),
  reading the lse this forward writes.

Mixed input dtypes (say a float32 noise tensor with bfloat16 x) run the float32 kernels on upcast copies
and round the result to x's dtype once, as the reference does. Errors of the extension are re-raised as
RuntimeError naming the op; tensors that are not on a CUDA device raise ValueError.
"""

from __future__ import annotations

import functools
import importlib
from typing import Optional, Union

import torch
from torch import Tensor

from dxr.kernels import reference

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# StepKind in csrc/launch.h
_Q_SAMPLE, _DDPM, _DDIM = 0, 1, 2
_MAX_CUDA_HEAD_DIM = 128


@functools.lru_cache(maxsize=None)
def extension():
    """The imported ``dxr._C`` module, or None when it was not built."""
    try:
        return importlib.import_module("dxr._C")
    except ImportError:
        return None


def supports(op: str) -> bool:
    """Whether the built extension implements ``op`` (it lists its ops in ``dxr._C.OPS``) and the current
    GPU, if any, is one it was built for (compute capability 8.0 or newer)."""
    ext = extension()
    if ext is None or op not in getattr(ext, "OPS", ()):
        return False
    return not torch.cuda.is_available() or torch.cuda.get_device_capability() >= (8, 0)


# --------------------------------------------------------------------------------------------------
# plumbing


def _ext():
    ext = extension()
    if ext is None:
        raise RuntimeError("the CUDA extension dxr._C is not built (install with DXR_BUILD_CUDA=1 pip install -e .)")
    return ext


def _on_cuda(op: str, *tensors: Optional[Tensor]) -> torch.device:
    """The CUDA device of the tensors; ValueError naming the op when one is elsewhere."""
    device = None
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cuda":
            raise ValueError(f"{op}: the CUDA kernels take CUDA tensors, got a tensor on {t.device}")
        if device is not None and t.device != device:
            raise ValueError(f"{op}: tensors on {device} and {t.device}: move them to one device")
        device = t.device
    return device


def _launch(op: str, fn, device: torch.device, **kwargs):
    """Call an extension function on ``device`` and the current stream; its errors name the op."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        return fn(**kwargs, device=index, stream=torch.cuda.current_stream(device).cuda_stream)
    except RuntimeError as err:
        raise RuntimeError(f"dxr CUDA backend, {op}: {err}") from err


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _aligned(*tensors: Optional[Tensor]) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in tensors if t is not None)


def _dtype_code(op: str, dtype: torch.dtype) -> int:
    if dtype not in _DTYPE_CODES:
        raise TypeError(f"{op}: x must be float32, float16 or bfloat16, got {dtype}")
    return _DTYPE_CODES[dtype]


def _triton(module: str):
    return importlib.import_module(f"dxr.kernels.triton.{module}")


# --------------------------------------------------------------------------------------------------
# GroupNorm (+ SiLU) and AdaIN: one normalisation, one channel per group and a per-sample affine for AdaIN


def _channels_last(t: Tensor) -> Optional[bool]:
    """How t (N, C, *spatial) is laid out for the kernels: False NCHW-contiguous, True channels-last, None
    neither (either one when S or C is 1)."""
    if t.is_contiguous():
        return False
    if t.movedim(1, -1).is_contiguous():
        return True
    return None


def _norm_operands(x: Tensor, out: Tensor, others: tuple, dtype: torch.dtype):
    """x and ``others`` in dtype ``dtype`` and in the layout of the buffer the kernels write — ``out``
    itself when it has a kernel layout and dtype, else a contiguous buffer — plus that buffer and layout."""
    layout = _channels_last(out)
    if layout is None or out.dtype != dtype:
        work = torch.empty(out.shape, dtype=dtype, device=out.device)
        layout = False if layout is None else layout
        if layout:
            work = work.movedim(1, -1).contiguous().movedim(-1, 1)
    else:
        work = out

    def shaped(t: Tensor) -> Tensor:
        if t.dtype == dtype and _channels_last(t) == layout and t.stride() == work.stride():
            return t
        return torch.empty_like(work).copy_(t)

    return shaped(x), tuple(shaped(t) for t in others), work, layout


def _norm_plan(ext, n, c, s, groups, channels_last, dtype, aligned, affine, backward, device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        return ext.norm_plan(n=n, c=c, s=s, groups=groups, channels_last=channels_last, dtype=_DTYPE_CODES[dtype],
                             aligned=aligned, per_sample_affine=affine, backward=backward, device=index)
    except RuntimeError as err:
        raise RuntimeError(f"dxr CUDA backend, {'adain' if affine else 'group_norm_silu'}: {err}") from err


def _norm_fwd(op: str, x: Tensor, w: Optional[Tensor], b: Optional[Tensor], groups: int, eps: float, silu: bool,
              affine: bool):
    """(y, mean, rstd) of the normalisation, or None when the planner does not take the shape."""
    ext = _ext()
    device = _on_cuda(op, x, w, b)
    n, c = x.shape[:2]
    s = x.numel() // (n * c)
    y = torch.empty_like(x)
    xk, _, work, layout = _norm_operands(x, y, (), x.dtype)
    plan = _norm_plan(ext, n, c, s, groups, layout, x.dtype, _aligned(xk, work), affine, False, device)
    if not plan["supported"]:
        return None
    mean = torch.empty((n, groups), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    partial = None if plan["onchip"] else torch.empty(plan["partial_floats"], device=x.device, dtype=torch.float32)
    _launch(op, ext.norm_fwd, device, n=n, c=c, s=s, groups=groups, channels_last=layout,
            dtype=_DTYPE_CODES[x.dtype], aligned=_aligned(xk, work), per_sample_affine=affine, x=xk.data_ptr(),
            y=work.data_ptr(), weight=_ptr(w), bias=_ptr(b), mean=mean.data_ptr(), rstd=rstd.data_ptr(),
            partial=_ptr(partial), eps=float(eps), silu=bool(silu))
    if work is not y:
        y.copy_(work)
    return y, mean, rstd


def _norm_bwd(op: str, dy: Tensor, x: Tensor, w: Optional[Tensor], b: Optional[Tensor], mean: Tensor, rstd: Tensor,
              groups: int, silu: bool, affine: bool):
    """(dx, per-(sample, split) rows of Σ dz·xhat, of Σ dz, splits) or None when the planner does not take it."""
    ext = _ext()
    device = _on_cuda(op, dy, x, w, b, mean, rstd)
    n, c = x.shape[:2]
    s = x.numel() // (n * c)
    dx = torch.empty_like(x)
    dtype = x.dtype if dy.dtype == x.dtype else torch.float32
    xk, (dyk,), work, layout = _norm_operands(x, dx, (dy,), dtype)
    aligned = _aligned(xk, dyk, work)
    plan = _norm_plan(ext, n, c, s, groups, layout, dtype, aligned, affine, True, device)
    if not plan["supported"]:
        return None
    mean, rstd = mean.float().contiguous(), rstd.float().contiguous()
    splits = plan["splits"]
    dw_rows = torch.empty((n * splits, c), device=x.device, dtype=torch.float32)
    db_rows = torch.empty_like(dw_rows)
    partial = None if plan["onchip"] else torch.empty(plan["partial_floats"], device=x.device, dtype=torch.float32)
    _launch(op, ext.norm_bwd, device, n=n, c=c, s=s, groups=groups, channels_last=layout, dtype=_DTYPE_CODES[dtype],
            aligned=aligned, per_sample_affine=affine, dy=dyk.data_ptr(), x=xk.data_ptr(), dx=work.data_ptr(),
            weight=_ptr(w), bias=_ptr(b), mean=mean.data_ptr(), rstd=rstd.data_ptr(), dw_rows=dw_rows.data_ptr(),
            db_rows=db_rows.data_ptr(), partial=_ptr(partial), silu=bool(silu))
    if work is not dx:
        dx.copy_(work)
    return dx, dw_rows, db_rows, splits


def _param(p: Optional[Tensor]) -> Optional[Tensor]:
    return None if p is None else p.detach().float().contiguous()


def _check_groups(x: Tensor, num_groups: int) -> None:
    if x.dim() < 2 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty (N, C, *spatial) tensor, got shape {tuple(x.shape)}")
    if num_groups <= 0 or x.shape[1] % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must be positive and divide the channel count C = {x.shape[1]}")


def group_norm_silu_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int, eps: float,
                        silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """GroupNorm forward, with the SiLU when ``silu``: as
    ``dxr.kernels.triton.group_norm_silu.group_norm_silu_fwd``.

    x: non-empty (N, C, *spatial) float32/float16/bfloat16 on a GPU; weight, bias: (C,) of any float dtype,
    or None. Returns y (x's shape, dtype and memory format) and float32 (N, num_groups) mean and rstd.
    """
    _check_groups(x, num_groups)
    _dtype_code("group_norm_silu", x.dtype)
    out = _norm_fwd("group_norm_silu", x, _param(weight), _param(bias), num_groups, eps, silu, affine=False)
    if out is None:
        return _triton("group_norm_silu").group_norm_silu_fwd(x, weight, bias, num_groups, eps, silu)
    return out


def group_norm_silu_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                        rstd: Tensor, num_groups: int, silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """GroupNorm (+ SiLU) backward, deterministic: as
    ``dxr.kernels.triton.group_norm_silu.group_norm_silu_bwd``.

    Returns dx (x's shape, dtype and memory format) and float32 (C,) dweight and dbias (the gradients of
    implicit ones and zeros when weight or bias is None).
    """
    _check_groups(x, num_groups)
    _dtype_code("group_norm_silu", x.dtype)
    n = x.shape[0]
    if dy.shape != x.shape:
        raise ValueError(f"dy must have x's shape {tuple(x.shape)}, got {tuple(dy.shape)}")
    for name, stat in (("mean", mean), ("rstd", rstd)):
        if tuple(stat.shape) != (n, num_groups):
            raise ValueError(f"{name} must have shape {(n, num_groups)}, got {tuple(stat.shape)}")
    out = _norm_bwd("group_norm_silu", dy, x, _param(weight), _param(bias), mean, rstd, num_groups, silu,
                    affine=False)
    if out is None:
        return _triton("group_norm_silu").group_norm_silu_bwd(dy, x, weight, bias, mean, rstd, num_groups, silu)
    dx, dw_rows, db_rows, _splits = out
    return dx, dw_rows.sum(0), db_rows.sum(0)


def _check_adain(x: Tensor, *params: Tensor) -> None:
    if x.dim() < 3 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty (N, C, *spatial) tensor with a spatial dim, got {tuple(x.shape)}")
    if x.numel() // x.shape[0] > 2**31 - 1:
        raise ValueError(f"one sample of x must hold fewer than 2**31 elements, got shape {tuple(x.shape)}")
    for p in params:
        if tuple(p.shape) != tuple(x.shape[:2]):
            raise ValueError(f"scale and shift must have shape {tuple(x.shape[:2])}, got {tuple(p.shape)}")


def adain_fwd(x: Tensor, scale: Tensor, shift: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """AdaIN forward: as ``dxr.kernels.triton.adain.adain_fwd`` (y, float32 (N, C) mean and rstd)."""
    _check_adain(x, scale, shift)
    _dtype_code("adain", x.dtype)
    out = _norm_fwd("adain", x, _param(scale), _param(shift), x.shape[1], eps, False, affine=True)
    if out is None:
        return _triton("adain").adain_fwd(x, scale, shift, eps)
    return out


def adain_bwd(dy: Tensor, x: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """AdaIN backward: as ``dxr.kernels.triton.adain.adain_bwd`` (dx, float32 (N, C) dscale and dshift)."""
    _check_adain(x, scale)
    _dtype_code("adain", x.dtype)
    n, c = x.shape[:2]
    out = _norm_bwd("adain", dy, x, _param(scale), None, mean, rstd, c, False, affine=True)
    if out is None:
        return _triton("adain").adain_bwd(dy, x, scale, mean, rstd)
    dx, dw_rows, db_rows, splits = out
    return dx, dw_rows.view(n, splits, c).sum(1), db_rows.view(n, splits, c).sum(1)


# --------------------------------------------------------------------------------------------------
# sampler steps


def _same_offsets(a: Tensor, b: Tensor) -> bool:
    return all(sa == sb for sa, sb, size in zip(a.stride(), b.stride(), a.shape) if size > 1)


def _samples_are_runs(t: Tensor) -> bool:
    """Whether the dense tensor stores each sample as one run of numel / N elements (N outermost)."""
    n = t.shape[0]
    dense = t.is_contiguous() or t.movedim(1, -1).is_contiguous() if t.dim() > 1 else t.is_contiguous()
    return dense and (n == 1 or t.stride(0) == t.numel() // n)


def _step_operands(x: Tensor, *others: Optional[Tensor]):
    """The output ``empty_like(x)``, the buffer the kernel writes, the kernel dtype, and x and ``others``
    in that buffer's layout and dtype (copied only where they differ). Mixed dtypes run in float32."""
    out = torch.empty_like(x)
    dtypes = {t.dtype for t in (x, *others) if t is not None}
    dtype = x.dtype if dtypes == {x.dtype} else torch.float32
    work = out if dtype == x.dtype and _samples_are_runs(out) else torch.empty(x.shape, dtype=dtype, device=x.device)
    inputs = [None if t is None else t if (t.dtype == dtype and _same_offsets(t, work))
              else torch.empty_like(work, dtype=dtype).copy_(t) for t in (x, *others)]
    return out, work, dtype, inputs


def _schedule(alphas_cumprod: Tensor) -> tuple[Tensor, bool]:
    if alphas_cumprod.dtype == torch.float64:
        return alphas_cumprod, True
    return alphas_cumprod if alphas_cumprod.dtype == torch.float32 else alphas_cumprod.float(), False


def _step(op: str, kind: int, x: Tensor, model: Optional[Tensor], noise: Optional[Tensor], t: Tensor,
          t_prev: Optional[Tensor], alphas_cumprod: Tensor, *, pred_v=False, clip_x0=None, large_var=False,
          eta=0.0, seed: Union[int, Tensor] = 0) -> Tensor:
    ext = _ext()
    device = _on_cuda(op, x, model, noise, t, t_prev, alphas_cumprod)
    out, work, dtype, (xk, mk, nk) = _step_operands(x, model, noise)
    if out.numel() == 0:
        return out
    t = t.long()
    t_prev = t_prev.long() if t_prev is not None else None
    schedule, schedule64 = _schedule(alphas_cumprod)
    n = x.shape[0]
    _launch(op, ext.sampler_step, device, kind=kind, n=n, s=x.numel() // n, dtype=_DTYPE_CODES[dtype],
            aligned=_aligned(work, xk, mk, nk), out=work.data_ptr(), x=xk.data_ptr(), model=_ptr(mk), noise=_ptr(nk),
            t=t.data_ptr(), t_stride=t.stride(0), t_prev=_ptr(t_prev),
            t_prev_stride=t_prev.stride(0) if t_prev is not None else 0, schedule=schedule.data_ptr(),
            schedule_stride=schedule.stride(0), schedule64=schedule64, num_steps=schedule.numel(), pred_v=pred_v,
            clip=clip_x0 is not None, clip_value=float(clip_x0 or 0.0), large_var=large_var, eta=float(eta),
            seed=0 if isinstance(seed, Tensor) else int(seed),
            seed_state=seed.data_ptr() if isinstance(seed, Tensor) else 0)
    if work is not out:
        out.copy_(work)
    return out


def q_sample(x0: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Forward diffusion ``sqrt(ᾱ[t])·x0 + sqrt(1-ᾱ[t])·noise`` in one launch: as
    ``dxr.kernels.triton.ddpm_step.q_sample``."""
    return _step("q_sample", _Q_SAMPLE, x0, None, noise, t, None, alphas_cumprod)


def ddpm_step(x_t: Tensor, model_out: Tensor, t: Tensor, alphas_cumprod: Tensor, prediction: str,
              clip_x0: Optional[float], variance: str, noise: Optional[Tensor], seed: Union[int, Tensor]) -> Tensor:
    """One ancestral DDPM step in one launch: as ``dxr.kernels.triton.ddpm_step.ddpm_step`` (noise drawn
    in-kernel from ``seed``, an int key or an int64 (key, offset) tensor on the device, when None)."""
    reference.check_choice("prediction", prediction, ("eps", "v"))
    reference.check_choice("variance", variance, ("small", "large"))
    if noise is None:
        reference.check_seed(seed, x_t)
    return _step("ddpm_step", _DDPM, x_t, model_out, noise, t, None, alphas_cumprod, pred_v=prediction == "v",
                 clip_x0=clip_x0, large_var=variance == "large", seed=seed if noise is None else 0)


def ddim_step(x_t: Tensor, model_out: Tensor, t: Tensor, t_prev: Tensor, alphas_cumprod: Tensor, eta: float,
              prediction: str, clip_x0: Optional[float], noise: Optional[Tensor], seed: Union[int, Tensor]) -> Tensor:
    """One DDIM step in one launch: as ``dxr.kernels.triton.ddpm_step.ddim_step`` (eta = 0 ignores noise and
    seed; eta > 0 draws z in-kernel from ``seed``, an int or an int64 (key, offset) tensor, when noise is None)."""
    reference.check_choice("prediction", prediction, ("eps", "v"))
    add_noise = eta != 0
    if add_noise and noise is None:
        reference.check_seed(seed, x_t)
    return _step("ddim_step", _DDIM, x_t, model_out, noise if add_noise else None, t, t_prev, alphas_cumprod,
                 pred_v=prediction == "v", clip_x0=clip_x0, eta=eta, seed=seed if add_noise and noise is None else 0)


# --------------------------------------------------------------------------------------------------
# attention


def _attention_strides(t: Tensor) -> tuple[int, int, int]:
    """The (batch, head, position) strides the kernel steps by: 0 along a dim of size 1, which it never
    steps along (such a dim may carry any stride, even on a contiguous tensor)."""
    return tuple(st if size > 1 else 0 for st, size in zip(t.stride()[:3], t.shape[:3]))


def _attention_operand(t: Tensor, pad: int) -> Tensor:
    """t with unit stride along D, 16-byte aligned rows and D a multiple of 8 (zero columns added).
    A copy is a fresh allocation: ``contiguous()`` would hand back a contiguous view whose data pointer
    is not 16-byte aligned."""
    if pad:
        return torch.nn.functional.pad(t, (0, pad))
    if t.stride(-1) == 1 and all(st % 8 == 0 for st in _attention_strides(t)) and t.data_ptr() % 16 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def attention_supports(head_dim: int, element_size: int, backward: bool) -> bool:
    """Whether this backend runs attention at ``head_dim`` on inputs of ``element_size`` bytes (the backward
    too when ``backward``): the CUDA forward serves float16/bfloat16 with D ≤ 128; the rest is the Triton
    kernel's (``dxr.kernels.triton.attention.attention_supports``)."""
    native_forward = element_size == 2 and head_dim <= _MAX_CUDA_HEAD_DIM
    triton_attention = _triton("attention")
    return ((native_forward or triton_attention.attention_supports(head_dim, element_size, False))
            and (not backward or triton_attention.attention_supports(head_dim, element_size, True)))


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Attention forward: as ``dxr.kernels.triton.attention.attention_fwd``.

    q: (B, H, Lq, D), k and v: (B, H, Lk, D), one dtype, any strides. Returns o (B, H, Lq, D) contiguous
    in q's dtype and float32 lse (B, H, Lq), the natural-log log-sum-exp of each row of ``scale·q·kᵀ``
    (−inf when Lk is 0, where o is zero). float16/bfloat16 with D ≤ 128 run the CUDA tensor-core kernel;
    float32 and larger head dims the Triton kernel.
    """
    d = q.shape[-1]
    if q.dtype == torch.float32 or d > _MAX_CUDA_HEAD_DIM:
        return _triton("attention").attention_fwd(q, k, v, scale)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B, H, L, D), got shape {tuple(t.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _dtype_code("attention", q.dtype)
    device = _on_cuda("attention", q, k, v)
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    if tuple(k.shape) != (b, h, lk, d) or tuple(v.shape) != (b, h, lk, d):
        raise ValueError(f"k and v must be (B, H, Lk, D) matching q {tuple(q.shape)}, got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    o = q.new_empty((b, h, lq, d))
    lse = q.new_empty((b, h, lq), dtype=torch.float32)
    if lk == 0:
        return o.zero_(), lse.fill_(float("-inf"))
    if o.numel() == 0:
        return o, lse
    pad = (-d) % 8
    qk, kk, vk = (_attention_operand(t, pad) for t in (q, k, v))
    ok = o if not pad else q.new_empty((b, h, lq, d + pad))
    _launch("attention", _ext().attention_fwd, device, q=qk.data_ptr(), k=kk.data_ptr(), v=vk.data_ptr(),
            o=ok.data_ptr(), lse=lse.data_ptr(), b=b, h=h, lq=lq, lk=lk, d=d + pad,
            q_strides=_attention_strides(qk), k_strides=_attention_strides(kk), v_strides=_attention_strides(vk),
            scale=float(scale), dtype=_DTYPE_CODES[q.dtype])
    if pad:
        o.copy_(ok[..., :d])
    return o, lse


def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                  scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Attention backward: the Triton kernel (``dxr.kernels.triton.attention.attention_bwd``), deterministic,
    from the lse of :func:`attention_fwd`. There is no CUDA C++ backward."""
    return _triton("attention").attention_bwd(do, q, k, v, o, lse, scale)


__all__ = ["extension", "supports", "group_norm_silu_fwd", "group_norm_silu_bwd", "adain_fwd", "adain_bwd",
           "q_sample", "ddpm_step", "ddim_step", "attention_fwd", "attention_bwd",
           "attention_supports"]

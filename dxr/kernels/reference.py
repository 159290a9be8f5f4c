"""Eager PyTorch reference of every dxr op: the specification each kernel is tested against,
and the baseline each benchmark compares with.

These functions do no validation (``dxr.ops`` does). Statistics, softmax and the sampler arithmetic
run in float32 for half-precision inputs (float64 stays float64); results come back in the input
dtype, as a careful eager implementation would do. Autograd flows through them natively.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc(x):
    """x in its accumulation dtype: float32 for half types, float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-5, *, silu=True):
    """``silu(group_norm(x))`` for x of shape (N, C, *); ``silu=False`` is plain GroupNorm.

    weight and bias may be None independently and of another dtype than x; the output has x's dtype.
    """
    params = [p for p in (weight, bias) if p is not None]
    if (weight is None and bias is not None) or any(p.dtype != x.dtype for p in params):
        # aten takes a bias only with a weight, and parameters only of x's dtype: apply the affine here
        dtype = torch.float32
        for tensor in (x, *params):
            dtype = torch.promote_types(dtype, tensor.dtype)
        y = F.group_norm(x.to(dtype), num_groups, None, None, eps)
        shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        if weight is not None:
            y = y * weight.to(dtype).reshape(shape)
        y = y + bias.to(dtype).reshape(shape) if bias is not None else y
        return (F.silu(y) if silu else y).to(x.dtype)
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


def adain(x, scale, shift, eps=1e-5):
    """Adaptive instance norm: per (n, c), normalise over the spatial dims with the biased variance,
    then ``* scale[n, c] + shift[n, c]``. x is (N, C, *), scale and shift are (N, C)."""
    dims = tuple(range(2, x.dim()))
    xf = _acc(x)
    var, mean = torch.var_mean(xf, dim=dims, keepdim=True, correction=0)
    y = (xf - mean) * torch.rsqrt(var + eps)
    extra = (1,) * (x.dim() - 2)
    y = y * _acc(scale).reshape(*scale.shape, *extra) + _acc(shift).reshape(*shift.shape, *extra)
    return y.to(x.dtype)


# the widest attention head dxr.ops takes, on every backend
MAX_HEAD_DIM = 256


def attention(q, k, v, scale=None):
    """``softmax(q @ kᵀ · scale) @ v`` with q (B, H, Lq, D), k and v (B, H, Lk, D); no mask, non-causal.
    The softmax runs in float32."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    s = _acc(torch.matmul(q, k.transpose(-2, -1))) * scale
    p = torch.softmax(s, dim=-1).to(v.dtype)
    return torch.matmul(p, v)


def _per_sample(values, t, ndim):
    """Gather ``values[t]`` (at least float32) and shape it to broadcast over a batch of rank ``ndim``."""
    return _acc(values)[t].reshape(-1, *([1] * (ndim - 1)))


def q_sample(x0, noise, t, alphas_cumprod):
    """Forward diffusion: ``sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·noise`` for per-sample timesteps t (N,)."""
    ab = _per_sample(alphas_cumprod, t, x0.dim())
    return (ab.sqrt() * _acc(x0) + (1 - ab).sqrt() * _acc(noise)).to(x0.dtype)


def predict_x0(x_t, model_out, ab, prediction):
    """x0 from the model output, with ᾱ_t broadcast to x_t: eps- or v-parameterisation."""
    if prediction == "eps":
        return (x_t - (1 - ab).sqrt() * model_out) / ab.sqrt()
    return ab.sqrt() * x_t - (1 - ab).sqrt() * model_out


def predict_eps(x_t, model_out, ab, prediction):
    """eps from the model output, with ᾱ_t broadcast to x_t."""
    if prediction == "eps":
        return model_out
    return (1 - ab).sqrt() * x_t + ab.sqrt() * model_out


_PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)
_PHILOX_KEY_STEP = (0x9E3779B9, 0xBB67AE85)
_WORD = 0xFFFFFFFF


def _mulhilo(a, b):
    """(high, low) 32-bit words of the products a·b of 32-bit words held in int64 tensors. The product
    wraps modulo 2⁶⁴ in int64 (two's complement, as torch's integer kernels do), which keeps all 64 bits."""
    p = a * b
    return (p >> 32) & _WORD, p & _WORD


def philox4x32(key, c0, c1, c2, c3):
    """Philox4x32-10 (Salmon et al., SC'11) on int64 tensors holding 32-bit words: counters (c0, c1, c2, c3)
    under the 64-bit ``key`` (an int64 tensor, its bits taken as unsigned). Returns the four output words."""
    k = torch.stack([key & _WORD, (key >> 32) & _WORD]).reshape(2, *[1] * c0.dim())
    step = torch.tensor(_PHILOX_KEY_STEP, dtype=torch.int64, device=c0.device).reshape(k.shape)
    multiplier = torch.tensor(_PHILOX_ROUND, dtype=torch.int64, device=c0.device).reshape(k.shape)
    # the two words each round multiplies, (c0, c2), and the two it only mixes in, (c1, c3), side by side
    mixed, passed = torch.stack([c0, c2]), torch.stack([c1, c3])
    for _ in range(10):
        hi, lo = _mulhilo(multiplier, mixed)
        # (c0, c1, c2, c3) ← (hi(B·c2) ^ c1 ^ k0, lo(B·c2), hi(A·c0) ^ c3 ^ k1, lo(A·c0))
        mixed, passed = hi.flip(0) ^ passed ^ k, lo.flip(0)
        k = (k + step) & _WORD
    return mixed[0], passed[0], mixed[1], passed[1]


def _uniform(word):
    """A 32-bit word to [0, 1) as Triton's ``uint_to_uniform_float``: as int32, negatives folded to -v - 1,
    times 2⁻³¹ (in float32)."""
    v = torch.where(word >= 2**31, word - 2**32, word)
    v = torch.where(v < 0, -v - 1, v)
    return v.to(torch.float32) * 4.6566127342e-10


def philox_normal(like, seed):
    """The standard normals a sampler kernel draws from a seed in device memory, in float32 of like's shape.

    ``seed`` is an int64 tensor (key, offset) of shape (2,) on like's device. Element i (memory order) of
    sample n takes normal ``i % 4`` of Philox counter (lo, hi of ``n·⌈S/4⌉ + ⌊i/4⌋``, lo, hi of offset),
    S = numel / N, each counter's words (w0, w1) and (w2, w3) turned into two normals by Box–Muller
    (r = √(-2 ln max(u, 1e-7)), r·cos 2πu', r·sin 2πu'). The kernels compute sine and cosine in fewer
    instructions, so their z is within about 2e-6 of this one. The memory order is that of
    ``empty_like(like)`` when it stores each sample as one run, else C order (as the kernels' buffer).
    """
    n = like.shape[0]
    per_sample = like.numel() // n if n else 0
    out = torch.empty_like(like, dtype=torch.float32)
    if n > 1 and out.stride(0) != per_sample:
        out = torch.empty(like.shape, dtype=torch.float32, device=like.device)
    if out.numel() == 0:
        return out
    rows = (per_sample + 3) // 4
    counter = (torch.arange(n, dtype=torch.int64, device=like.device)[:, None] * rows
               + torch.arange(rows, dtype=torch.int64, device=like.device)[None, :])
    key, offset = seed[0], seed[1]
    w0, w1, w2, w3 = philox4x32(key, counter & _WORD, (counter >> 32) & _WORD,
                                (offset & _WORD).expand_as(counter), ((offset >> 32) & _WORD).expand_as(counter))
    normals = []
    for a, b in ((w0, w1), (w2, w3)):
        r = torch.sqrt(-2.0 * torch.log(torch.clamp(_uniform(a), min=1.0e-7)))
        theta = 6.283185307179586 * _uniform(b)
        normals += [r * torch.cos(theta), r * torch.sin(theta)]
    z = torch.stack(normals, dim=-1).reshape(n, rows * 4)[:, :per_sample]
    out.as_strided((n, per_sample), (per_sample, 1)).copy_(z)
    return out


def check_seed(seed, x) -> None:
    """The seed contract every sampler backend validates: an int in [0, 2**63) (the 64-bit Philox key), or
    an int64 tensor (key, offset) of shape (2,), contiguous, on x's device. Raises ValueError naming ``seed``."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or tuple(seed.shape) != (2,) or not seed.is_contiguous():
            raise ValueError(f"seed as a tensor must be a contiguous int64 tensor of shape (2,) holding (Philox key, "
                             f"offset), got {seed.dtype} of shape {tuple(seed.shape)}")
        if seed.device != x.device:
            raise ValueError(f"seed is on {seed.device} but x_t is on {x.device}: the kernels read it on the device")
        return
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63) (the 64-bit Philox key) or an int64 tensor (key, offset) "
                         f"of shape (2,) on the device, got {seed!r}")


def check_choice(name: str, value: str, choices: tuple) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is one of ``choices`` (the kernels' string options)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _gaussian(like, noise, seed):
    if noise is not None:
        return _acc(noise)
    if isinstance(seed, torch.Tensor):
        return philox_normal(like, seed)
    gen = torch.Generator(device=like.device)
    gen.manual_seed(int(seed))
    return torch.randn(like.shape, generator=gen, device=like.device, dtype=torch.float32)


def ddpm_step(x_t, model_out, t, alphas_cumprod, *, prediction="eps", clip_x0=None,
              variance="small", noise=None, seed=None):
    """One ancestral DDPM step x_t → x_{t-1} (Ho et al. 2020, eq. 6–7 and Algorithm 2).

    ᾱ_{t-1} is 1 at t = 0, where no noise is added. ``variance`` "small" is the posterior
    variance β̃_t = β_t(1-ᾱ_{t-1})/(1-ᾱ_t), "large" is β_t. ``noise`` (the z of the step) wins over
    ``seed``; an int seed draws z with ``torch.randn`` from a generator seeded with it, an int64 (key, offset)
    tensor the kernels' Philox normals (:func:`philox_normal`, no generator, no host sync); with neither, a
    seed is drawn from torch's default generator.
    """
    x_t32 = _acc(x_t)
    alpha_bar = _per_sample(alphas_cumprod, t, x_t.dim())
    alpha_bar_prev = torch.where(t > 0, _acc(alphas_cumprod)[(t - 1).clamp(min=0)], 1.0).reshape(alpha_bar.shape)
    beta = 1 - alpha_bar / alpha_bar_prev  # β_t = 1 - α_t, α_t = ᾱ_t / ᾱ_{t-1}
    x0 = predict_x0(x_t32, _acc(model_out), alpha_bar, prediction)
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
    # eq. 7: μ̃_t = √ᾱ_{t-1}·β_t/(1-ᾱ_t)·x0 + √α_t·(1-ᾱ_{t-1})/(1-ᾱ_t)·x_t
    coef_x0 = beta * alpha_bar_prev.sqrt() / (1 - alpha_bar)
    coef_xt = (1 - alpha_bar_prev) * (1 - beta).sqrt() / (1 - alpha_bar)
    mean = coef_x0 * x0 + coef_xt * x_t32
    # eq. 7: β̃_t = (1-ᾱ_{t-1})/(1-ᾱ_t)·β_t ("small"), or σ_t² = β_t ("large", §3.2)
    variance_t = beta * (1 - alpha_bar_prev) / (1 - alpha_bar) if variance == "small" else beta
    z = _gaussian(x_t, noise, seed)
    # Algorithm 2: x_{t-1} = μ̃_t + σ_t·z, with z = 0 at t = 0
    nonzero = (t > 0).to(alpha_bar.dtype).reshape(alpha_bar.shape)
    return (mean + nonzero * variance_t.sqrt() * z).to(x_t.dtype)


def ddim_step(x_t, model_out, t, t_prev, alphas_cumprod, *, eta=0.0, prediction="eps", clip_x0=None,
              noise=None, seed=None):
    """One DDIM step x_t → x_{t_prev} (Song et al. 2021, eq. 12 and 16); ``t_prev < 0`` means ᾱ_prev = 1.

    When x0 is clamped, eps is recomputed from the clamped x0 so the step stays on its trajectory.
    """
    x_t32, model_out32 = _acc(x_t), _acc(model_out)
    alpha_bar = _per_sample(alphas_cumprod, t, x_t.dim())
    alpha_bar_prev = torch.where(t_prev >= 0, _acc(alphas_cumprod)[t_prev.clamp(min=0)], 1.0).reshape(alpha_bar.shape)
    x0 = predict_x0(x_t32, model_out32, alpha_bar, prediction)
    eps = predict_eps(x_t32, model_out32, alpha_bar, prediction)
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
        eps = (x_t32 - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
    # eq. 16: σ_t(η) = η·√((1-ᾱ_prev)/(1-ᾱ_t))·√(1-ᾱ_t/ᾱ_prev)
    sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).clamp(min=0).sqrt()
    # eq. 12: x_prev = √ᾱ_prev·x0 ("predicted x0") + √(1-ᾱ_prev-σ_t²)·eps ("direction to x_t") + σ_t·z
    predicted_x0 = alpha_bar_prev.sqrt() * x0
    direction = (1 - alpha_bar_prev - sigma**2).clamp(min=0).sqrt() * eps
    out = predicted_x0 + direction
    if eta != 0:
        out = out + sigma * _gaussian(x_t, noise, seed)
    return out.to(x_t.dtype)


# --------------------------------------------------------------------------------------------------
# the steps' vector-Jacobian products: each step is affine in (x_t, model_out, noise) per sample, with
# the clamp of x0 (when clip_x0 is set) passing gradient where x0 lies in [-clip_x0, clip_x0]


def _x0_coefficients(alpha_bar, prediction):
    """(a, b) with x0 = a·x_t + b·model_out."""
    if prediction == "eps":
        return alpha_bar.rsqrt(), -(1 - alpha_bar).sqrt() * alpha_bar.rsqrt()
    return alpha_bar.sqrt(), -(1 - alpha_bar).sqrt()


def _inside_clip(xf, mf, a, b, clip_x0):
    x0 = a * xf + b * mf
    return ((x0 >= -clip_x0) & (x0 <= clip_x0)).to(x0.dtype)


def ddpm_step_vjp(dout, x_t, model_out, t, alphas_cumprod, *, prediction="eps", clip_x0=None, variance="small"):
    """(d x_t, d model_out, d noise) of :func:`ddpm_step` for the output gradient ``dout``, in the
    accumulation dtype: the closed form of the step's derivative."""
    nd = x_t.dim()
    xf, mf, g = _acc(x_t), _acc(model_out), _acc(dout)
    alpha_bar = _per_sample(alphas_cumprod, t, nd)
    alpha_bar_prev = torch.where(t > 0, _acc(alphas_cumprod)[(t - 1).clamp(min=0)], 1.0).reshape(alpha_bar.shape)
    beta = 1 - alpha_bar / alpha_bar_prev
    to_x0 = beta * alpha_bar_prev.sqrt() / (1 - alpha_bar)  # posterior mean = to_x0·x0 + to_xt·x_t
    to_xt = (1 - alpha_bar_prev) * (1 - beta).sqrt() / (1 - alpha_bar)
    a, b = _x0_coefficients(alpha_bar, prediction)
    g_x0 = to_x0 * g
    if clip_x0 is not None:
        g_x0 = g_x0 * _inside_clip(xf, mf, a, b, clip_x0)
    var = beta * (1 - alpha_bar_prev) / (1 - alpha_bar) if variance == "small" else beta
    nonzero = (t > 0).to(alpha_bar.dtype).reshape(alpha_bar.shape)
    return a * g_x0 + to_xt * g, b * g_x0, nonzero * var.sqrt() * g


def ddim_step_vjp(dout, x_t, model_out, t, t_prev, alphas_cumprod, *, eta=0.0, prediction="eps", clip_x0=None):
    """(d x_t, d model_out, d noise) of :func:`ddim_step` for the output gradient ``dout``, in the
    accumulation dtype: the closed form of the step's derivative."""
    nd = x_t.dim()
    xf, mf, g = _acc(x_t), _acc(model_out), _acc(dout)
    alpha_bar = _per_sample(alphas_cumprod, t, nd)
    alpha_bar_prev = torch.where(t_prev >= 0, _acc(alphas_cumprod)[t_prev.clamp(min=0)], 1.0).reshape(alpha_bar.shape)
    sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).clamp(min=0).sqrt()
    to_eps = (1 - alpha_bar_prev - sigma**2).clamp(min=0).sqrt()  # out = sqrt(ᾱ_prev)·x0 + to_eps·eps + σ·z
    a, b = _x0_coefficients(alpha_bar, prediction)
    if clip_x0 is None:
        if prediction == "eps":
            e1, e2 = torch.zeros_like(alpha_bar), torch.ones_like(alpha_bar)
        else:
            e1, e2 = (1 - alpha_bar).sqrt(), alpha_bar.sqrt()
        g_x0 = alpha_bar_prev.sqrt() * g
        return a * g_x0 + to_eps * e1 * g, b * g_x0 + to_eps * e2 * g, sigma * g
    # eps is recomputed from the clamped x0: eps = (x_t - sqrt(ᾱ)·x0) / sqrt(1 - ᾱ)
    g_x0 = (alpha_bar_prev.sqrt() - to_eps * alpha_bar.sqrt() / (1 - alpha_bar).sqrt()) * g
    g_x0 = g_x0 * _inside_clip(xf, mf, a, b, clip_x0)
    return a * g_x0 + to_eps / (1 - alpha_bar).sqrt() * g, b * g_x0, sigma * g


__all__ = [
    "group_norm_silu", "adain", "attention", "q_sample", "ddpm_step", "ddim_step",
    "predict_x0", "predict_eps", "ddpm_step_vjp", "ddim_step_vjp",
]

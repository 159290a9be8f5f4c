"""Fused noise-schedule kernels: forward diffusion (q_sample), one DDPM step and one DDIM step.

Each op is one launch. A program handles one chunk of one sample: it gathers ᾱ[t] (and ᾱ_prev) for
its sample on the device, computes the per-sample coefficients once, then streams its chunk of
x / model output (/ noise) in float32 and writes the result in x's dtype. Nothing is read back to the
host, so a sampling loop built on these kernels can be captured in a CUDA graph.

Layout. The kernels see each tensor as N runs of S = numel / N elements, sample n starting at
element n·S. The output is ``torch.empty_like(x)`` (x's dtype and strides); when that layout keeps
each sample in one run (contiguous, channels_last, or any dense layout with N outermost) and the
other inputs share it, the kernels read them in place; otherwise the inputs are copied into one
such layout first (and the result copied back into the output).

Coefficient precision. ᾱ is gathered in the precision the reference computes in: float64 for a
float64 schedule, float32 otherwise. The per-sample coefficients (square roots, ratios, σ) are
computed once per program in that precision with IEEE-rounded division and square root, then cast
to float32; the elementwise work is float32 whatever the input dtype.

In-kernel noise. When no noise tensor is given, z is drawn with Philox4x32-10 (``tl.randint4x``)
keyed by ``seed`` and turned into normals by Box–Muller as ``tl.randn4x`` does, with a short polynomial
sine and cosine of 2πu (within 3.2e-7 of the exact ones, so z is within about 2e-6 of
``tl.randn4x``'s) in place of libdevice's exact ones: one Philox counter yields four normals for four
consecutive elements of a sample, so
element i (0 ≤ i < S, in memory order) of sample n takes normal ``i % 4`` of counter
``n·⌈S/4⌉ + ⌊i/4⌋``; when S is a multiple of 4 that is counter ``flat // 4``, lane ``flat % 4``.
The stream is a function of (seed, S) and the element's position only, not of the block size, so
every tuning choice gives the same z: same seed → bitwise the same result. (One Philox call per four elements rather than per
element keeps the generator from becoming the bottleneck of an otherwise memory-bound step.)

Seed in device memory. ``seed`` may instead be an int64 tensor of shape (2,) on x's device, read by the
kernel: ``seed[0]`` is the Philox key and ``seed[1]`` an offset that fills the two upper counter words, so
the counter of a row of four is (lo, hi of the row counter above, lo, hi of the offset). Offset 0 is the
int seed ``seed[0]`` bit for bit; each other offset is a disjoint stream. Nothing is read on the host, so a
captured CUDA graph that advances ``seed[1]`` between steps draws fresh noise on every replay.

Tuning. On a GPU the block size is autotuned per S on the first call; make that call before
capturing a sampling loop in a CUDA graph.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from dxr.kernels import reference
from dxr.kernels.triton import common

def _configs():
    # the interpreter cannot benchmark configs ("0 active drivers"), and a big block keeps it fast
    if common.interpreting():
        return [triton.Config({"BLOCK": 4096}, num_warps=4)]
    return [
        triton.Config({"BLOCK": block}, num_warps=warps)
        # 8192 elements on 16 warps spill the in-kernel noise (ptxas, sm_80 and sm_90), and 2048 on 4
        # warps the float32 DDIM step's (sm_80, ragged S): not offered
        for block, warps in ((1024, 4), (2048, 8), (4096, 8))
    ]


# --------------------------------------------------------------------------------------------------
# shared device helpers


@triton.jit
def _chunk(S, BLOCK: tl.constexpr):
    """This program's sample n, the element offset of its chunk, its (BLOCK // 4, 4) offsets within
    the chunk with their mask, and the Philox counter of the chunk's first row of four elements."""
    pid = tl.program_id(0).to(tl.int64)
    chunks = tl.cdiv(S, BLOCK)
    n = pid // chunks
    start = (pid - n * chunks) * BLOCK
    local = tl.arange(0, BLOCK // 4)[:, None] * 4 + tl.arange(0, 4)[None, :]
    mask = local < tl.minimum(S - start, BLOCK).to(tl.int32)
    counter0 = n * tl.cdiv(S, 4) + start // 4
    return n, n * S + start, local, mask, counter0


@triton.jit
def _load_f32(ptr, offsets, mask):
    # half types become float32 at once: arithmetic on raw bf16 is wrong under the interpreter
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _sincos_turns(u):
    """(sin 2πu, cos 2πu) for u in [0, 1), in a few multiply-adds.

    The angle is reduced to the nearest quarter turn, q = round(4u), leaving φ = 2π(u - q/4) in
    [-π/4, π/4], where the Taylor polynomials of degree 7 (sine) and 8 (cosine) are within 3.2e-7 and
    2.4e-8 of the true values (the first omitted terms, φ⁹/9! and φ¹⁰/10!); the quadrant then swaps
    and negates them. The exact libdevice sin and cos cost several times as many instructions."""
    q = tl.floor(4.0 * u + 0.5)
    phi = (u - 0.25 * q) * 6.283185307179586
    p2 = phi * phi
    sin_phi = phi * (1.0 + p2 * (-1.6666667e-1 + p2 * (8.3333333e-3 + p2 * -1.9841270e-4)))
    cos_phi = 1.0 + p2 * (-0.5 + p2 * (4.1666667e-2 + p2 * (-1.3888889e-3 + p2 * 2.4801587e-5)))
    quadrant = q.to(tl.int32) & 3
    sin_t = tl.where(quadrant == 0, sin_phi, tl.where(quadrant == 1, cos_phi,
                                                      tl.where(quadrant == 2, -sin_phi, -cos_phi)))
    cos_t = tl.where(quadrant == 0, cos_phi, tl.where(quadrant == 1, -sin_phi,
                                                      tl.where(quadrant == 2, -cos_phi, sin_phi)))
    return sin_t, cos_t


@triton.jit
def _box_muller(u1, u2):
    """Two standard normals from two uniforms in [0, 1): ``r·cos θ, r·sin θ``, r = √(-2 ln u1), θ = 2π u2
    (u1 kept ≥ 1e-7, as Triton's ``randn``)."""
    r = tl.sqrt(-2.0 * tl.log(tl.maximum(u1, 1.0e-7)))
    sin_t, cos_t = _sincos_turns(u2)
    return r * cos_t, r * sin_t


@triton.jit
def _gaussian(seed, counter0, ROWS: tl.constexpr):
    """(ROWS, 4) standard normals: row r holds the four normals of Philox counter ``counter0 + r``."""
    i0, i1, i2, i3 = tl.randint4x(seed, counter0 + tl.arange(0, ROWS))
    return _normals4(i0, i1, i2, i3)


@triton.jit
def _gaussian_at(seed_ptr, counter0, ROWS: tl.constexpr):
    """As :func:`_gaussian` with the key ``seed_ptr[0]`` read from memory and the offset ``seed_ptr[1]`` in
    the upper two counter words: row r is Philox counter (lo, hi of ``counter0 + r``, lo, hi of the offset)."""
    key = tl.load(seed_ptr)
    offset = tl.load(seed_ptr + 1)
    counter = counter0 + tl.arange(0, ROWS)
    c0 = counter.to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    c2 = c0 * 0 + (offset & 0xFFFFFFFF).to(tl.uint32)
    c3 = c0 * 0 + (offset >> 32).to(tl.uint32)
    i0, i1, i2, i3 = tl.random.philox(key, c0, c1, c2, c3)
    return _normals4(i0, i1, i2, i3)


@triton.jit
def _normals4(i0, i1, i2, i3):
    """(ROWS, 4) normals from the four (ROWS,) Philox output words: Box–Muller on pairs (0, 1) and (2, 3)."""
    z0, z1 = _box_muller(tl.random.uint_to_uniform_float(i0), tl.random.uint_to_uniform_float(i1))
    z2, z3 = _box_muller(tl.random.uint_to_uniform_float(i2), tl.random.uint_to_uniform_float(i3))
    lane = tl.arange(0, 4)[None, :]
    return tl.where(lane == 0, z0[:, None],
                    tl.where(lane == 1, z1[:, None], tl.where(lane == 2, z2[:, None], z3[:, None])))


@triton.jit
def _alpha_bar(acp_ptr, acp_stride, index):
    """ᾱ[index] in the coefficient precision: float64 for a float64 schedule, float32 otherwise."""
    a = tl.load(acp_ptr + index * acp_stride)
    if a.dtype != tl.float64:
        a = a.to(tl.float32)
    return a


@triton.jit
def _recip64(b):
    """1/b for a positive float64 in multiply-adds: a seed from the bit pattern (within 5.1%), then four
    Newton steps y ← y·(2 − b·y), each squaring the relative error, and a fifth for the rounding of the
    last; within 1 ulp of 1/b, and 1/0 = inf."""
    y = (0x7FDE623822FC16E6 - b.to(tl.int64, bitcast=True)).to(tl.float64, bitcast=True)
    for _ in tl.static_range(5):
        y = y * (2.0 - b * y)
    return tl.where(b == 0.0, float("inf"), y)


@triton.jit
def _sqrt64(a):
    """√a for a float64 a ≥ 0 in multiply-adds: 1/√a seeded from the bit pattern (within 3.5%), four
    Newton steps y ← y·(3 − a·y²)/2, then √a = a·y with one correction; within 1 ulp, and √0 = 0."""
    y = (0x5FE6EB50C7B537A9 - (a.to(tl.int64, bitcast=True) >> 1)).to(tl.float64, bitcast=True)
    for _ in tl.static_range(4):
        y = y * (1.5 - 0.5 * a * y * y)
    r = a * y
    return r + 0.5 * y * (a - r * r)


# ptxas expands float64 division and square root into called subroutines, and code around the calls
# spills registers in the tile kernels (sm_80, half-precision tiles): float64 coefficients take the
# multiply-add forms above instead.


@triton.jit
def _sqrt(a):
    # tl.sqrt is approximate in float32 on a GPU, and near ᾱ = 1 the coefficients amplify any rounding
    if a.dtype == tl.float32:
        r = tl.sqrt_rn(a)
    else:
        r = _sqrt64(a)
    return r


@triton.jit
def _div(a, b):
    # float32 "/" is an approximate division on a GPU; float64 b: a·(1/b), within 2 ulps
    if b.dtype == tl.float32:
        r = tl.div_rn(a, b)
    else:
        r = a * _recip64(b)
    return r


@triton.jit
def _predict_x0(x, m, sqrt_ab, sqrt_1m_ab, inv_sqrt_ab, PRED_V: tl.constexpr):
    """x0 from x_t and the model output: v-prediction, or eps-prediction (x - √(1-ᾱ)·eps) / √ᾱ."""
    if PRED_V:
        x0 = sqrt_ab * x - sqrt_1m_ab * m
    else:
        x0 = (x - sqrt_1m_ab * m) * inv_sqrt_ab
    return x0


# --------------------------------------------------------------------------------------------------
# kernels


@common.autotune(_configs(), ["S"])
@triton.jit
def _q_sample_kernel(
    out_ptr,  # x_t, x0's dtype, N runs of S elements
    x0_ptr,  # clean sample x0, same layout
    noise_ptr,  # noise, same layout (any float dtype)
    t_ptr,  # int64 timestep per sample
    t_stride,  # element stride of t
    acp_ptr,  # ᾱ per timestep (float16 to float64)
    acp_stride,  # element stride of alphas_cumprod
    S,  # elements per sample
    BLOCK: tl.constexpr,  # elements per program
):
    n, base, local, mask, _ = _chunk(S, BLOCK)
    alpha_bar = _alpha_bar(acp_ptr, acp_stride, tl.load(t_ptr + n * t_stride))
    coef_x0 = _sqrt(alpha_bar).to(tl.float32)
    coef_noise = _sqrt(1.0 - alpha_bar).to(tl.float32)
    x0 = _load_f32(x0_ptr + base, local, mask)
    noise = _load_f32(noise_ptr + base, local, mask)
    out = coef_x0 * x0 + coef_noise * noise
    tl.store(out_ptr + base + local, out.to(out_ptr.dtype.element_ty), mask=mask)


@common.autotune(_configs(), ["S"])
@triton.jit(do_not_specialize=["seed"])
def _ddpm_step_kernel(
    out_ptr,  # x_{t-1}, x_t's dtype, N runs of S elements
    x_ptr,  # x_t, same layout
    model_ptr,  # model output (eps or v), same layout
    noise_ptr,  # z of the step, same layout; None when DRAW_NOISE
    t_ptr,  # int64 timestep per sample
    t_stride,  # element stride of t
    acp_ptr,  # ᾱ per timestep (float16 to float64)
    acp_stride,  # element stride of alphas_cumprod
    clip,  # x0 is clamped to [-clip, clip] when CLIP
    seed,  # Philox key of the in-kernel noise, or with SEED_IN_MEMORY a pointer to int64 (key, offset)
    S,  # elements per sample
    PRED_V: tl.constexpr,  # model_out is v (else eps)
    CLIP: tl.constexpr,  # clamp the predicted x0
    LARGE_VAR: tl.constexpr,  # σ² = β_t (else the posterior variance β̃_t)
    DRAW_NOISE: tl.constexpr,  # draw z with Philox instead of reading noise_ptr
    SEED_IN_MEMORY: tl.constexpr,  # seed points to (key, offset) on the device
    BLOCK: tl.constexpr,  # elements per program
):
    n, base, local, mask, counter0 = _chunk(S, BLOCK)
    t = tl.load(t_ptr + n * t_stride)
    alpha_bar = _alpha_bar(acp_ptr, acp_stride, t)
    alpha_bar_prev = tl.where(t > 0, _alpha_bar(acp_ptr, acp_stride, tl.maximum(t - 1, 0)), 1.0)
    beta = 1.0 - _div(alpha_bar, alpha_bar_prev)  # β_t = 1 - α_t, α_t = ᾱ_t / ᾱ_{t-1}
    sqrt_alpha_bar = _sqrt(alpha_bar)
    sqrt_1m_alpha_bar = _sqrt(1.0 - alpha_bar)
    inv_sqrt_alpha_bar = _div(1.0, sqrt_alpha_bar)
    # Ho et al. eq. 7: μ̃_t = √ᾱ_{t-1}·β_t/(1-ᾱ_t)·x0 + √α_t·(1-ᾱ_{t-1})/(1-ᾱ_t)·x_t
    coef_x0 = _div(beta * _sqrt(alpha_bar_prev), 1.0 - alpha_bar)
    coef_xt = _div((1.0 - alpha_bar_prev) * _sqrt(1.0 - beta), 1.0 - alpha_bar)
    # eq. 7: β̃_t = (1-ᾱ_{t-1})/(1-ᾱ_t)·β_t, or β_t for the "large" variance
    if LARGE_VAR:
        variance_t = beta
    else:
        variance_t = _div(beta * (1.0 - alpha_bar_prev), 1.0 - alpha_bar)
    sigma = tl.where(t > 0, _sqrt(variance_t), 0.0).to(tl.float32)

    x = _load_f32(x_ptr + base, local, mask)
    m = _load_f32(model_ptr + base, local, mask)
    x0 = _predict_x0(x, m, sqrt_alpha_bar.to(tl.float32), sqrt_1m_alpha_bar.to(tl.float32),
                     inv_sqrt_alpha_bar.to(tl.float32), PRED_V)
    if CLIP:
        x0 = tl.clamp(x0, -clip, clip)
    mean = coef_x0.to(tl.float32) * x0 + coef_xt.to(tl.float32) * x
    if DRAW_NOISE:
        if SEED_IN_MEMORY:
            z = _gaussian_at(seed, counter0, BLOCK // 4)
        else:
            z = _gaussian(seed, counter0, BLOCK // 4)
    else:
        z = _load_f32(noise_ptr + base, local, mask)
    out = mean + sigma * z
    tl.store(out_ptr + base + local, out.to(out_ptr.dtype.element_ty), mask=mask)


@common.autotune(_configs(), ["S"])
@triton.jit(do_not_specialize=["seed"])
def _ddim_step_kernel(
    out_ptr,  # x_{t_prev}, x_t's dtype, N runs of S elements
    x_ptr,  # x_t, same layout
    model_ptr,  # model output (eps or v), same layout
    noise_ptr,  # z of the step, same layout; None when DRAW_NOISE or not ADD_NOISE
    t_ptr,  # int64 timestep per sample
    t_stride,  # element stride of t
    t_prev_ptr,  # int64 previous timestep per sample, -1 for the last step (ᾱ_prev = 1)
    t_prev_stride,  # element stride of t_prev
    acp_ptr,  # ᾱ per timestep (float16 to float64)
    acp_stride,  # element stride of alphas_cumprod
    eta,  # DDIM η: σ = η·√((1-ᾱ_prev)/(1-ᾱ)·(1-ᾱ/ᾱ_prev))
    clip,  # x0 is clamped to [-clip, clip] when CLIP
    seed,  # Philox key of the in-kernel noise, or with SEED_IN_MEMORY a pointer to int64 (key, offset)
    S,  # elements per sample
    PRED_V: tl.constexpr,  # model_out is v (else eps)
    CLIP: tl.constexpr,  # clamp the predicted x0 and recompute eps from it
    ADD_NOISE: tl.constexpr,  # η > 0: add σ·z
    DRAW_NOISE: tl.constexpr,  # draw z with Philox instead of reading noise_ptr
    SEED_IN_MEMORY: tl.constexpr,  # seed points to (key, offset) on the device
    BLOCK: tl.constexpr,  # elements per program
):
    n, base, local, mask, counter0 = _chunk(S, BLOCK)
    t = tl.load(t_ptr + n * t_stride)
    t_prev = tl.load(t_prev_ptr + n * t_prev_stride)
    alpha_bar = _alpha_bar(acp_ptr, acp_stride, t)
    alpha_bar_prev = tl.where(t_prev >= 0, _alpha_bar(acp_ptr, acp_stride, tl.maximum(t_prev, 0)), 1.0)
    sqrt_alpha_bar = _sqrt(alpha_bar)
    sqrt_1m_alpha_bar = _sqrt(1.0 - alpha_bar)
    inv_sqrt_alpha_bar = _div(1.0, sqrt_alpha_bar)
    # Song et al. eq. 16: σ_t(η) = η·√((1-ᾱ_prev)/(1-ᾱ_t))·√(1-ᾱ_t/ᾱ_prev)
    sigma = eta * _sqrt(tl.maximum(_div(1.0 - alpha_bar_prev, 1.0 - alpha_bar)
                                   * (1.0 - _div(alpha_bar, alpha_bar_prev)), 0.0))
    # eq. 12: x_prev = √ᾱ_prev·x0 + √(1-ᾱ_prev-σ_t²)·eps + σ_t·z
    coef_eps = _sqrt(tl.maximum(1.0 - alpha_bar_prev - sigma * sigma, 0.0))
    coef_x0 = _sqrt(alpha_bar_prev)

    x = _load_f32(x_ptr + base, local, mask)
    m = _load_f32(model_ptr + base, local, mask)
    sqrt_alpha_bar32 = sqrt_alpha_bar.to(tl.float32)
    sqrt_1m_alpha_bar32 = sqrt_1m_alpha_bar.to(tl.float32)
    x0 = _predict_x0(x, m, sqrt_alpha_bar32, sqrt_1m_alpha_bar32, inv_sqrt_alpha_bar.to(tl.float32), PRED_V)
    if CLIP:
        x0 = tl.clamp(x0, -clip, clip)
        # eps recomputed from the clamped x0 keeps the step on the trajectory through it
        eps = (x - sqrt_alpha_bar32 * x0) * _div(1.0, sqrt_1m_alpha_bar).to(tl.float32)
    elif PRED_V:
        eps = sqrt_1m_alpha_bar32 * x + sqrt_alpha_bar32 * m
    else:
        eps = m
    out = coef_x0.to(tl.float32) * x0 + coef_eps.to(tl.float32) * eps
    if ADD_NOISE:
        if DRAW_NOISE:
            if SEED_IN_MEMORY:
                z = _gaussian_at(seed, counter0, BLOCK // 4)
            else:
                z = _gaussian(seed, counter0, BLOCK // 4)
        else:
            z = _load_f32(noise_ptr + base, local, mask)
        out = out + sigma.to(tl.float32) * z
    tl.store(out_ptr + base + local, out.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# launchers


def _same_offsets(a: Tensor, b: Tensor) -> bool:
    """Whether a and b (one shape) place every element at the same offset (size-1 dims never move)."""
    return all(sa == sb for sa, sb, size in zip(a.stride(), b.stride(), a.shape) if size > 1)


def _samples_are_runs(dense: Tensor) -> bool:
    """Whether the dense tensor stores each sample as one run of numel / N elements (N outermost)."""
    n = dense.shape[0]
    return n == 1 or dense.stride(0) == dense.numel() // n


def _prepare(x: Tensor, *others: Optional[Tensor]):
    """The output ``empty_like(x)``, the buffer the kernel writes (the output itself when it keeps each
    sample in one run), and x and ``others`` in that buffer's layout (copied only where they differ)."""
    out = torch.empty_like(x)
    work = out if _samples_are_runs(out) else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    inputs = [None if t is None else t if _same_offsets(t, work) else torch.empty_like(work, dtype=t.dtype).copy_(t)
              for t in (x, *others)]
    return out, work, inputs


def _finish(out: Tensor, work: Tensor) -> Tensor:
    if work is not out:
        out.copy_(work)
    return out


def _on_device(x: Tensor):
    # Triton launches on the current CUDA device, which need not be x's
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def _grid(x: Tensor):
    n = x.shape[0]
    per_sample = x.numel() // n
    return per_sample, lambda meta: (n * triton.cdiv(per_sample, meta["BLOCK"]),)


def q_sample(x0: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Forward diffusion ``sqrt(ᾱ[t])·x0 + sqrt(1-ᾱ[t])·noise`` in one launch.

    x0: (N, *) float32, float16 or bfloat16, any layout; noise: x0's shape, any float dtype;
    t: integer (N,) on x0's device; alphas_cumprod: 1-D float schedule on x0's device (float64 keeps
    float64 coefficients). Returns a tensor with x0's dtype and strides. Validation is dxr.ops'.
    """
    out, work, (x0, noise) = _prepare(x0, noise)
    if out.numel() == 0:
        return out
    per_sample, grid = _grid(out)
    with _on_device(out):
        _q_sample_kernel[grid](work, x0, noise, t, t.stride(0), alphas_cumprod, alphas_cumprod.stride(0), per_sample)
    return _finish(out, work)


def ddpm_step(x_t: Tensor, model_out: Tensor, t: Tensor, alphas_cumprod: Tensor, prediction: str,
              clip_x0: Optional[float], variance: str, noise: Optional[Tensor], seed: Union[int, Tensor]) -> Tensor:
    """One ancestral DDPM step x_t → x_{t-1} in one launch (semantics of ``reference.ddpm_step``).

    x_t, model_out: (N, *) float32, float16 or bfloat16 of one shape, any layout; t: integer (N,) on
    x_t's device; alphas_cumprod: 1-D float schedule on the device; prediction "eps" or "v";
    clip_x0 a positive bound or None; variance "small" (β̃_t) or "large" (β_t). ``noise`` (x_t's shape,
    any float dtype) is the z of the step; when None, z is drawn in-kernel from ``seed``, an int key or an
    int64 (key, offset) tensor on the device (see the module docstring for the stream). No noise where
    t == 0. Returns a tensor with x_t's dtype and strides. Raises ValueError for an unknown prediction or
    variance, or a seed that is neither (see ``reference.check_seed``).
    """
    reference.check_choice("prediction", prediction, ("eps", "v"))
    reference.check_choice("variance", variance, ("small", "large"))
    if noise is None:
        reference.check_seed(seed, x_t)
    out, work, (x_t, model_out, noise) = _prepare(x_t, model_out, noise)
    if out.numel() == 0:
        return out
    per_sample, grid = _grid(out)
    with _on_device(out):
        _ddpm_step_kernel[grid](
            work, x_t, model_out, noise, t, t.stride(0), alphas_cumprod, alphas_cumprod.stride(0),
            0.0 if clip_x0 is None else float(clip_x0), seed if noise is None else 0, per_sample,
            PRED_V=prediction == "v", CLIP=clip_x0 is not None, LARGE_VAR=variance == "large",
            DRAW_NOISE=noise is None, SEED_IN_MEMORY=noise is None and isinstance(seed, Tensor),
        )
    return _finish(out, work)


def ddim_step(x_t: Tensor, model_out: Tensor, t: Tensor, t_prev: Tensor, alphas_cumprod: Tensor, eta: float,
              prediction: str, clip_x0: Optional[float], noise: Optional[Tensor], seed: Union[int, Tensor]) -> Tensor:
    """One DDIM step x_t → x_{t_prev} in one launch (semantics of ``reference.ddim_step``).

    Shapes and dtypes as :func:`ddpm_step`; t_prev: integer (N,), -1 marking the last step (ᾱ_prev = 1);
    eta ≥ 0. With eta == 0 the step is deterministic and ``noise``/``seed`` are ignored; with eta > 0,
    σ·z is added, z being ``noise`` or, when None, drawn in-kernel from ``seed`` (see the module
    docstring). When x0 is clamped, eps is recomputed from the clamped x0. Returns a tensor with x_t's
    dtype and strides. Raises ValueError for an unknown prediction, or a bad seed (see ``reference.check_seed``).
    """
    reference.check_choice("prediction", prediction, ("eps", "v"))
    add_noise = eta != 0
    draw_noise = add_noise and noise is None
    if draw_noise:
        reference.check_seed(seed, x_t)
    out, work, (x_t, model_out, noise) = _prepare(x_t, model_out, noise if add_noise else None)
    if out.numel() == 0:
        return out
    per_sample, grid = _grid(out)
    with _on_device(out):
        _ddim_step_kernel[grid](
            work, x_t, model_out, noise, t, t.stride(0), t_prev, t_prev.stride(0), alphas_cumprod,
            alphas_cumprod.stride(0), float(eta), 0.0 if clip_x0 is None else float(clip_x0),
            seed if draw_noise else 0, per_sample,
            PRED_V=prediction == "v", CLIP=clip_x0 is not None, ADD_NOISE=add_noise, DRAW_NOISE=draw_noise,
            SEED_IN_MEMORY=draw_noise and isinstance(seed, Tensor),
        )
    return _finish(out, work)


__all__ = ["q_sample", "ddpm_step", "ddim_step"]

"""AdaIN in Triton, forward and backward.

x is addressed as (N, C, S), S the flattened spatial dims, with one stride per axis, so NCHW-contiguous
and channels_last tensors run natively (the unit-stride axis is a compile-time flag). A program owns a
tile of BLOCK_C channels of one sample. Two paths:

- **on-chip**: the whole (n, c) row fits in one tile: one read of x, exact two-pass statistics in
  registers, one write of y (the backward reads x and dy once and writes dx).
- **split**: S is cut into ``splits`` chunks, one program per (row block, chunk), each looping over its
  chunk in BLOCK_S steps. A first kernel writes per-chunk partials (mean and M2 by Welford per lane, or
  the sums Σdy and Σdy·x̂); a second kernel combines a row's partials in a fixed order (deterministic, no
  atomics) and applies the normalisation (or the input gradient) to its chunk. With few rows and a large
  S this fills the GPU; with ``splits == 1`` it is the plain loop for rows too long to keep on chip.

Statistics are float32 and shift-invariant (two-pass, Welford and Chan's combine), so inputs with a large
mean keep their variance. The launch functions pick the path and block sizes from the shapes; a
:class:`AdainConfig` passed as ``config`` forces them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from dxr.kernels.triton import common

# elements of one (BLOCK_C, BLOCK_S) tile kept on chip: the forward holds x, the backward x and dy
_ON_CHIP_FWD = 16384
_ON_CHIP_BWD = 8192
# elements of one step of the split path's loop
_LOOP_TILE = 4096
# a program of short rows takes several of them, up to this many elements
_MIN_TILE = 1024
# channels per program in channels_last: 64 contiguous values make full-width memory transactions
_CL_BLOCK_C = 64
# the combine kernel holds a (BLOCK_C, splits) tile of partials
_PARTIALS_TILE = 4096
_MAX_SPLITS = 512
# one sample holds fewer elements than this (its offsets are computed in 64 bits all the same)
_MAX_SAMPLE = 2**31 - 1


def _keep_plausible_warps(configs, named_args, **kwargs):
    """Keep the num_warps that give each thread 4 to 64 elements of a tile (else the smallest)."""
    args = {**named_args, **kwargs}
    tile = args["BLOCK_C"] * args["BLOCK_S"]
    kept = [cfg for cfg in configs if 4 <= tile // (32 * cfg.num_warps) <= 64]
    return kept or [min(configs, key=lambda cfg: cfg.num_warps)]


def _tuned(kernel):
    """num_warps autotuned per tile shape and layout on a GPU; one config under the interpreter."""
    if common.interpreting():
        configs = [triton.Config({}, num_warps=4)]
    else:
        configs = [triton.Config({}, num_warps=w) for w in (2, 4, 8, 16)]
    return common.autotune(configs, ["BLOCK_C", "BLOCK_S", "CHANNELS_LAST"], _keep_plausible_warps)(kernel)


# --------------------------------------------------------------------------------------------------
# shared device helpers


@triton.jit
def _row_block(C, BLOCK_C: tl.constexpr):
    """(sample index, channel indices, channel mask) of this program's row block."""
    pid = tl.program_id(0)
    c_blocks = tl.cdiv(C, BLOCK_C)
    n = pid // c_blocks
    c = (pid % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    return n, c, c < C


@triton.jit
def _tile_offsets(c, s, stride_c, stride_s, CHANNELS_LAST: tl.constexpr):
    """Offsets (int64) of the (channels c, positions s) tile inside one sample.

    64-bit because a layout read in place need not keep N outermost: x = (C, N, S) transposed has a
    channel stride of N·S, so c · stride_c can pass 2³¹ while one sample holds fewer elements."""
    c = c.to(tl.int64)
    s = s.to(tl.int64)
    # the unit stride is a literal, so the compiler sees which axis is contiguous and vectorises it
    if CHANNELS_LAST:
        offs = c[:, None] + s[None, :] * stride_s
    else:
        offs = c[:, None] * stride_c + s[None, :]
    return offs


@triton.jit
def _row_pivot(x_ptr, c, c_ok, stride_c, CHANNELS_LAST: tl.constexpr):
    """The first value of each row (x_ptr at the sample's start), as float32."""
    if CHANNELS_LAST:
        offs = c
    else:
        offs = c.to(tl.int64) * stride_c
    return tl.load(x_ptr + offs, mask=c_ok, other=0.0).to(tl.float32)


@triton.jit
def _combine_stats(part_mean_ptr, part_m2_ptr, rows, S, CHUNK, SPLITS, c_ok, eps,
                   BLOCK_SPLITS: tl.constexpr):
    """(mean, rstd) of each row from its per-chunk (mean, M2) partials, by Chan's parallel formula.

    The mean is of the pivoted values x - pivot, as the partials are."""
    k = tl.arange(0, BLOCK_SPLITS)
    mask = c_ok[:, None] & (k < SPLITS)[None, :]
    offs = rows[:, None] * SPLITS + k[None, :]
    p_mean = tl.load(part_mean_ptr + offs, mask=mask, other=0.0)
    p_m2 = tl.load(part_m2_ptr + offs, mask=mask, other=0.0)
    count = tl.minimum(tl.maximum(S - k * CHUNK, 0), CHUNK).to(tl.float32)[None, :]
    mean = tl.sum(p_mean * count, axis=1) / S
    delta = p_mean - mean[:, None]
    var = tl.sum(p_m2 + count * delta * delta, axis=1) / S
    return mean, tl.rsqrt(var + eps)


# --------------------------------------------------------------------------------------------------
# forward kernels


@triton.jit
def _adain_fwd_on_chip_kernel(
    x_ptr,  # input, (N, C, S) through the strides below
    y_ptr,  # output, strides of x
    scale_ptr,  # (N, C) contiguous, any float dtype
    shift_ptr,  # (N, C) contiguous, any float dtype
    mean_ptr,  # float32 (N, C) out: per-row mean
    rstd_ptr,  # float32 (N, C) out: per-row 1 / sqrt(var + eps)
    C,  # channels
    S,  # spatial size, at most BLOCK_S
    stride_n,  # elements between samples
    stride_c,  # elements between channels (1 when CHANNELS_LAST)
    stride_s,  # elements between spatial positions (1 unless CHANNELS_LAST)
    eps,  # added to the variance
    BLOCK_C: tl.constexpr,  # channels per program
    BLOCK_S: tl.constexpr,  # power of two >= S: the whole row
    CHANNELS_LAST: tl.constexpr,  # channels are the unit-stride axis
):
    n, c, c_ok = _row_block(C, BLOCK_C)
    s = tl.arange(0, BLOCK_S)
    mask = c_ok[:, None] & (s < S)[None, :]
    sample = n.to(tl.int64) * stride_n
    offs = _tile_offsets(c, s, stride_c, stride_s, CHANNELS_LAST)
    # statistics of x - pivot (exact for a large mean): sums of small numbers, then one rounding of the mean
    pivot = _row_pivot(x_ptr + sample, c, c_ok, stride_c, CHANNELS_LAST)
    x = tl.load(x_ptr + sample + offs, mask=mask, other=0.0).to(tl.float32) - pivot[:, None]
    mean = tl.sum(tl.where(mask, x, 0.0), axis=1) / S
    centred = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(centred * centred, axis=1) / S + eps)
    rows = n * C + c
    tl.store(mean_ptr + rows, pivot + mean, mask=c_ok)
    tl.store(rstd_ptr + rows, rstd, mask=c_ok)
    gain = rstd * tl.load(scale_ptr + rows, mask=c_ok, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + rows, mask=c_ok, other=0.0).to(tl.float32)
    y = centred * gain[:, None] + shift[:, None]
    tl.store(y_ptr + sample + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adain_fwd_partial_kernel(
    x_ptr,  # input, (N, C, S) through the strides below
    part_mean_ptr,  # float32 (N·C, SPLITS) out: mean of x - pivot of each row over each chunk
    part_m2_ptr,  # float32 (N·C, SPLITS) out: sum of squared deviations from that mean
    C,  # channels
    S,  # spatial size
    CHUNK,  # positions per chunk, a multiple of BLOCK_S
    SPLITS,  # chunks per row: program_id(1) picks one
    stride_n,  # elements between samples
    stride_c,  # elements between channels (1 when CHANNELS_LAST)
    stride_s,  # elements between spatial positions (1 unless CHANNELS_LAST)
    BLOCK_C: tl.constexpr,  # channels per program
    BLOCK_S: tl.constexpr,  # positions per loop step
    CHANNELS_LAST: tl.constexpr,  # channels are the unit-stride axis
):
    n, c, c_ok = _row_block(C, BLOCK_C)
    split = tl.program_id(1)
    start = split * CHUNK
    length = tl.minimum(CHUNK, S - start)
    sample = n.to(tl.int64) * stride_n
    lane = tl.arange(0, BLOCK_S)
    pivot = _row_pivot(x_ptr + sample, c, c_ok, stride_c, CHANNELS_LAST)[:, None]
    # Welford per lane: every step but the last is full, so after step i each live lane has seen i + 1 values
    mean = tl.zeros((BLOCK_C, BLOCK_S), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C, BLOCK_S), dtype=tl.float32)
    for step in range(0, tl.cdiv(length, BLOCK_S)):
        s = start + step * BLOCK_S + lane
        mask = c_ok[:, None] & (s < start + length)[None, :]
        offs = _tile_offsets(c, s, stride_c, stride_s, CHANNELS_LAST)
        x = tl.load(x_ptr + sample + offs, mask=mask, other=0.0).to(tl.float32) - pivot
        delta = x - mean
        mean += tl.where(mask, delta * (1.0 / (step + 1)), 0.0)
        m2 += tl.where(mask, delta * (x - mean), 0.0)
    # values each lane saw, then Chan's combine of the lanes
    count = ((tl.maximum(length - lane, 0) + BLOCK_S - 1) // BLOCK_S).to(tl.float32)[None, :]
    chunk_mean = tl.sum(mean * count, axis=1) / length
    delta = mean - chunk_mean[:, None]
    chunk_m2 = tl.sum(m2 + count * delta * delta, axis=1)
    out = (n * C + c) * SPLITS + split
    tl.store(part_mean_ptr + out, chunk_mean, mask=c_ok)
    tl.store(part_m2_ptr + out, chunk_m2, mask=c_ok)


@triton.jit
def _adain_fwd_apply_kernel(
    x_ptr,  # input, (N, C, S) through the strides below
    y_ptr,  # output, strides of x
    scale_ptr,  # (N, C) contiguous, any float dtype
    shift_ptr,  # (N, C) contiguous, any float dtype
    part_mean_ptr,  # float32 (N·C, SPLITS): chunk means from the partial kernel
    part_m2_ptr,  # float32 (N·C, SPLITS): chunk M2 from the partial kernel
    mean_ptr,  # float32 (N, C) out, written by the chunk-0 programs
    rstd_ptr,  # float32 (N, C) out, written by the chunk-0 programs
    C,  # channels
    S,  # spatial size
    CHUNK,  # positions per chunk, a multiple of BLOCK_S
    SPLITS,  # chunks per row: program_id(1) picks one
    stride_n,  # elements between samples
    stride_c,  # elements between channels (1 when CHANNELS_LAST)
    stride_s,  # elements between spatial positions (1 unless CHANNELS_LAST)
    eps,  # added to the variance
    BLOCK_C: tl.constexpr,  # channels per program
    BLOCK_S: tl.constexpr,  # positions per loop step
    BLOCK_SPLITS: tl.constexpr,  # power of two >= SPLITS
    CHANNELS_LAST: tl.constexpr,  # channels are the unit-stride axis
):
    n, c, c_ok = _row_block(C, BLOCK_C)
    split = tl.program_id(1)
    rows = n * C + c
    mean, rstd = _combine_stats(part_mean_ptr, part_m2_ptr, rows, S, CHUNK, SPLITS, c_ok, eps, BLOCK_SPLITS)
    sample = n.to(tl.int64) * stride_n
    pivot = _row_pivot(x_ptr + sample, c, c_ok, stride_c, CHANNELS_LAST)
    first = c_ok & (split == 0)
    tl.store(mean_ptr + rows, pivot + mean, mask=first)
    tl.store(rstd_ptr + rows, rstd, mask=first)
    gain = (rstd * tl.load(scale_ptr + rows, mask=c_ok, other=0.0).to(tl.float32))[:, None]
    shift = tl.load(shift_ptr + rows, mask=c_ok, other=0.0).to(tl.float32)[:, None]
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, S)
    for s0 in range(start, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = c_ok[:, None] & (s < end)[None, :]
        offs = _tile_offsets(c, s, stride_c, stride_s, CHANNELS_LAST)
        x = tl.load(x_ptr + sample + offs, mask=mask, other=0.0).to(tl.float32)
        # x - pivot is exact near the mean; subtracting the rounded mean instead would cost digits
        y = ((x - pivot[:, None]) - mean[:, None]) * gain + shift
        tl.store(y_ptr + sample + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# backward kernels


@triton.jit
def _adain_bwd_on_chip_kernel(
    dy_ptr,  # gradient of y, strides of x
    x_ptr,  # forward input, (N, C, S) through the strides below
    dx_ptr,  # out: gradient of x, strides of x
    scale_ptr,  # (N, C) contiguous, any float dtype
    mean_ptr,  # float32 (N, C) from the forward
    rstd_ptr,  # float32 (N, C) from the forward
    dscale_ptr,  # float32 (N, C) out: Σ dy·x̂
    dshift_ptr,  # float32 (N, C) out: Σ dy
    C,  # channels
    S,  # spatial size, at most BLOCK_S
    stride_n,  # elements between samples
    stride_c,  # elements between channels (1 when CHANNELS_LAST)
    stride_s,  # elements between spatial positions (1 unless CHANNELS_LAST)
    BLOCK_C: tl.constexpr,  # channels per program
    BLOCK_S: tl.constexpr,  # power of two >= S: the whole row
    CHANNELS_LAST: tl.constexpr,  # channels are the unit-stride axis
):
    n, c, c_ok = _row_block(C, BLOCK_C)
    s = tl.arange(0, BLOCK_S)
    mask = c_ok[:, None] & (s < S)[None, :]
    sample = n.to(tl.int64) * stride_n
    offs = _tile_offsets(c, s, stride_c, stride_s, CHANNELS_LAST)
    rows = n * C + c
    mean = tl.load(mean_ptr + rows, mask=c_ok, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=c_ok, other=0.0)
    x = tl.load(x_ptr + sample + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + sample + offs, mask=mask, other=0.0).to(tl.float32)
    xhat = (x - mean[:, None]) * rstd[:, None]
    sum_dy = tl.sum(dy, axis=1)
    sum_dy_xhat = tl.sum(dy * xhat, axis=1)
    tl.store(dscale_ptr + rows, sum_dy_xhat, mask=c_ok)
    tl.store(dshift_ptr + rows, sum_dy, mask=c_ok)
    gain = rstd * tl.load(scale_ptr + rows, mask=c_ok, other=0.0).to(tl.float32)
    dx = gain[:, None] * (dy - (sum_dy / S)[:, None] - xhat * (sum_dy_xhat / S)[:, None])
    tl.store(dx_ptr + sample + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adain_bwd_partial_kernel(
    dy_ptr,  # gradient of y, strides of x
    x_ptr,  # forward input, (N, C, S) through the strides below
    mean_ptr,  # float32 (N, C) from the forward
    rstd_ptr,  # float32 (N, C) from the forward
    part_dy_ptr,  # float32 (N·C, SPLITS) out: Σ dy over each chunk
    part_dy_xhat_ptr,  # float32 (N·C, SPLITS) out: Σ dy·x̂ over each chunk
    C,  # channels
    S,  # spatial size
    CHUNK,  # positions per chunk, a multiple of BLOCK_S
    SPLITS,  # chunks per row: program_id(1) picks one
    stride_n,  # elements between samples
    stride_c,  # elements between channels (1 when CHANNELS_LAST)
    stride_s,  # elements between spatial positions (1 unless CHANNELS_LAST)
    BLOCK_C: tl.constexpr,  # channels per program
    BLOCK_S: tl.constexpr,  # positions per loop step
    CHANNELS_LAST: tl.constexpr,  # channels are the unit-stride axis
):
    n, c, c_ok = _row_block(C, BLOCK_C)
    split = tl.program_id(1)
    rows = n * C + c
    mean = tl.load(mean_ptr + rows, mask=c_ok, other=0.0)[:, None]
    rstd = tl.load(rstd_ptr + rows, mask=c_ok, other=0.0)[:, None]
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, S)
    sample = n.to(tl.int64) * stride_n
    # per-lane sums, reduced once after the loop
    acc_dy = tl.zeros((BLOCK_C, BLOCK_S), dtype=tl.float32)
    acc_dy_xhat = tl.zeros((BLOCK_C, BLOCK_S), dtype=tl.float32)
    for s0 in range(start, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = c_ok[:, None] & (s < end)[None, :]
        offs = _tile_offsets(c, s, stride_c, stride_s, CHANNELS_LAST)
        x = tl.load(x_ptr + sample + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + sample + offs, mask=mask, other=0.0).to(tl.float32)
        acc_dy += dy
        acc_dy_xhat += dy * ((x - mean) * rstd)
    out = rows * SPLITS + split
    tl.store(part_dy_ptr + out, tl.sum(acc_dy, axis=1), mask=c_ok)
    tl.store(part_dy_xhat_ptr + out, tl.sum(acc_dy_xhat, axis=1), mask=c_ok)


@triton.jit
def _adain_bwd_apply_kernel(
    dy_ptr,  # gradient of y, strides of x
    x_ptr,  # forward input, (N, C, S) through the strides below
    dx_ptr,  # out: gradient of x, strides of x
    scale_ptr,  # (N, C) contiguous, any float dtype
    mean_ptr,  # float32 (N, C) from the forward
    rstd_ptr,  # float32 (N, C) from the forward
    part_dy_ptr,  # float32 (N·C, SPLITS): chunk sums of dy
    part_dy_xhat_ptr,  # float32 (N·C, SPLITS): chunk sums of dy·x̂
    dscale_ptr,  # float32 (N, C) out, written by the chunk-0 programs
    dshift_ptr,  # float32 (N, C) out, written by the chunk-0 programs
    C,  # channels
    S,  # spatial size
    CHUNK,  # positions per chunk, a multiple of BLOCK_S
    SPLITS,  # chunks per row: program_id(1) picks one
    stride_n,  # elements between samples
    stride_c,  # elements between channels (1 when CHANNELS_LAST)
    stride_s,  # elements between spatial positions (1 unless CHANNELS_LAST)
    BLOCK_C: tl.constexpr,  # channels per program
    BLOCK_S: tl.constexpr,  # positions per loop step
    BLOCK_SPLITS: tl.constexpr,  # power of two >= SPLITS
    CHANNELS_LAST: tl.constexpr,  # channels are the unit-stride axis
):
    n, c, c_ok = _row_block(C, BLOCK_C)
    split = tl.program_id(1)
    rows = n * C + c
    k = tl.arange(0, BLOCK_SPLITS)
    part_mask = c_ok[:, None] & (k < SPLITS)[None, :]
    part_offs = rows[:, None] * SPLITS + k[None, :]
    sum_dy = tl.sum(tl.load(part_dy_ptr + part_offs, mask=part_mask, other=0.0), axis=1)
    sum_dy_xhat = tl.sum(tl.load(part_dy_xhat_ptr + part_offs, mask=part_mask, other=0.0), axis=1)
    first = c_ok & (split == 0)
    tl.store(dscale_ptr + rows, sum_dy_xhat, mask=first)
    tl.store(dshift_ptr + rows, sum_dy, mask=first)
    mean = tl.load(mean_ptr + rows, mask=c_ok, other=0.0)[:, None]
    rstd = tl.load(rstd_ptr + rows, mask=c_ok, other=0.0)[:, None]
    gain = rstd * tl.load(scale_ptr + rows, mask=c_ok, other=0.0).to(tl.float32)[:, None]
    mean_dy = (sum_dy / S)[:, None]
    mean_dy_xhat = (sum_dy_xhat / S)[:, None]
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, S)
    sample = n.to(tl.int64) * stride_n
    for s0 in range(start, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = c_ok[:, None] & (s < end)[None, :]
        offs = _tile_offsets(c, s, stride_c, stride_s, CHANNELS_LAST)
        x = tl.load(x_ptr + sample + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + sample + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean) * rstd
        dx = gain * (dy - mean_dy - xhat * mean_dy_xhat)
        tl.store(dx_ptr + sample + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


_fwd_on_chip = _tuned(_adain_fwd_on_chip_kernel)
_fwd_partial = _tuned(_adain_fwd_partial_kernel)
_fwd_apply = _tuned(_adain_fwd_apply_kernel)
_bwd_on_chip = _tuned(_adain_bwd_on_chip_kernel)
_bwd_partial = _tuned(_adain_bwd_partial_kernel)
_bwd_apply = _tuned(_adain_bwd_apply_kernel)


# --------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class AdainConfig:
    """How a launch tiles the (N, C, S) problem.

    split: False keeps each row on chip (block_s must cover S); True runs partial + apply kernels.
    block_c, block_s: tile of one program (powers of two). splits: chunks per row on the split path
    (the launch uses no more than S needs). Raises ValueError when the values cannot work.
    """

    split: bool
    block_c: int
    block_s: int
    splits: int = 1

    def check(self, spatial: int) -> None:
        """Raise ValueError if this config cannot run rows of ``spatial`` positions."""
        for name in ("block_c", "block_s"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two, got {value}")
        if not self.split and self.block_s < spatial:
            raise ValueError(f"the on-chip path needs block_s >= S = {spatial}, got block_s={self.block_s}")
        if self.splits < 1:
            raise ValueError(f"splits must be >= 1, got {self.splits}")


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    # the interpreter runs programs one after another: fewest programs is fastest
    return 1


def choose_config(n: int, c: int, s: int, channels_last: bool, device: torch.device, *,
                  backward: bool = False) -> AdainConfig:
    """The config the launch functions use for x addressed as (n, c, s) on ``device``.

    On chip when a row fits and there are enough rows to occupy the GPU; otherwise the split path, with
    enough chunks per row for about two programs per multiprocessor.
    """
    sms = _multiprocessors(device)
    s2 = triton.next_power_of_2(s)
    c2 = triton.next_power_of_2(c)
    if channels_last:
        block_c = min(c2, _CL_BLOCK_C)
    else:
        block_c = min(c2, max(1, _MIN_TILE // s2))
    on_chip_rows = n * triton.cdiv(c, block_c)
    fits = block_c * s2 <= (_ON_CHIP_BWD if backward else _ON_CHIP_FWD)
    if channels_last:
        loop_c = min(c2, _CL_BLOCK_C)
        loop_s = min(s2, max(1, _LOOP_TILE // loop_c))
    else:
        loop_s = min(s2, _LOOP_TILE)
        loop_c = min(c2, max(1, _LOOP_TILE // loop_s))
    if fits and (2 * on_chip_rows >= sms or s <= loop_s):
        return AdainConfig(split=False, block_c=block_c, block_s=s2)
    wanted = triton.cdiv(2 * sms, n * triton.cdiv(c, loop_c))
    # shorter loop steps (down to _MIN_TILE elements) when a row has fewer steps than wanted chunks
    while loop_c * loop_s > _MIN_TILE and triton.cdiv(s, loop_s) < wanted:
        loop_s //= 2
    max_splits = min(triton.cdiv(s, loop_s), _MAX_SPLITS, max(1, _PARTIALS_TILE // loop_c))
    return AdainConfig(split=True, block_c=loop_c, block_s=loop_s, splits=min(wanted, max_splits))


# --------------------------------------------------------------------------------------------------
# layout


def _ncs_layout(t: Tensor) -> Optional[tuple]:
    """(channels_last, stride_n, stride_c, stride_s) of t viewed as (N, C, S), or None if no such view.

    channels_last means the channel stride is 1, else the spatial stride is 1; strides of size-1 axes do
    not matter and read 0.
    """
    n, c = t.shape[:2]
    try:
        view = t.view(n, c, -1)
    except RuntimeError:
        return None
    s = view.shape[2]
    sn, sc, ss = (stride if size > 1 else 0 for stride, size in zip(view.stride(), (n, c, s)))
    if ss == 1 or s == 1:
        return False, sn, sc, 0
    if sc == 1 or c == 1:
        return True, sn, 0, ss
    return None


def _kernel_buffers(x: Tensor):
    """(x for the kernels, the output the caller gets, the buffer the kernels write, layout).

    The output is ``empty_like(x)`` (x's memory format, as the fake kernel promises). When x or that
    output cannot be addressed as (N, C, S) with shared strides, the kernels run on a contiguous copy
    and the result is copied into the output.
    """
    out = torch.empty_like(x)
    layout = _ncs_layout(x)
    if layout is not None and _ncs_layout(out) == layout:
        return x, out, out, layout
    x = x.contiguous()
    return x, out, torch.empty_like(x), _ncs_layout(x)


def _like(t: Tensor, work: Tensor, layout: tuple) -> Tensor:
    """t with the (N, C, S) strides of ``work``: itself when it has them, else a copy."""
    if _ncs_layout(t) == layout:
        return t
    return torch.empty_like(work).copy_(t)


def _check_size(x: Tensor) -> None:
    if x.numel() // max(x.shape[0], 1) > _MAX_SAMPLE:
        raise ValueError(f"one sample of x must hold fewer than 2**31 elements, got shape {tuple(x.shape)}")


def _chunking(s: int, cfg: AdainConfig) -> tuple[int, int]:
    """(chunk length, number of chunks): chunks are whole loop steps and none is empty."""
    chunk = triton.cdiv(triton.cdiv(s, cfg.splits), cfg.block_s) * cfg.block_s
    return chunk, triton.cdiv(s, chunk)


# --------------------------------------------------------------------------------------------------
# launch functions


def adain_fwd(x: Tensor, scale: Tensor, shift: Tensor, eps: float,
              config: Optional[AdainConfig] = None) -> tuple[Tensor, Tensor, Tensor]:
    """AdaIN forward: ``y = (x - mean) * rstd * scale + shift`` per (n, c) over the spatial dims.

    x: (N, C, *spatial), at least one spatial dim, float32/float16/bfloat16, NCHW-contiguous or
    channels_last natively (any other layout is made contiguous first). scale, shift: (N, C), any float
    dtype, read as float32. Returns y (x's dtype and memory format) and float32 (N, C) ``mean`` and
    ``rstd = 1 / sqrt(var + eps)``, var biased. ``config`` forces the tiling (see :class:`AdainConfig`).
    Raises ValueError for a config that cannot run or a sample of 2**31 elements or more.
    """
    _check_size(x)
    n, c = x.shape[:2]
    x, y, work, (channels_last, sn, sc, ss) = _kernel_buffers(x)
    s = x.numel() // (n * c)
    cfg = config or choose_config(n, c, s, channels_last, x.device)
    cfg.check(s)
    scale, shift = scale.contiguous(), shift.contiguous()
    mean = torch.empty((n, c), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    row_blocks = n * triton.cdiv(c, cfg.block_c)
    tiles = dict(BLOCK_C=cfg.block_c, BLOCK_S=cfg.block_s, CHANNELS_LAST=channels_last)
    if not cfg.split:
        _fwd_on_chip[(row_blocks,)](x, work, scale, shift, mean, rstd, c, s, sn, sc, ss, eps, **tiles)
    else:
        chunk, splits = _chunking(s, cfg)
        part_mean = torch.empty((n * c, splits), device=x.device, dtype=torch.float32)
        part_m2 = torch.empty_like(part_mean)
        grid = (row_blocks, splits)
        _fwd_partial[grid](x, part_mean, part_m2, c, s, chunk, splits, sn, sc, ss, **tiles)
        _fwd_apply[grid](x, work, scale, shift, part_mean, part_m2, mean, rstd, c, s, chunk, splits, sn, sc, ss,
                         eps, BLOCK_SPLITS=triton.next_power_of_2(splits), **tiles)
    if work is not y:
        y.copy_(work)
    return y, mean, rstd


def adain_bwd(dy: Tensor, x: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor,
              config: Optional[AdainConfig] = None) -> tuple[Tensor, Tensor, Tensor]:
    """AdaIN backward from the forward's float32 (N, C) ``mean`` and ``rstd``.

    With x̂ = (x - mean)·rstd, per (n, c) over the spatial dims:
    ``dx = rstd·scale·(dy - mean(dy) - x̂·mean(dy·x̂))``, ``dscale = Σ dy·x̂``, ``dshift = Σ dy``.
    dy: x's shape, any float dtype and layout (brought to x's layout). x and scale as in
    :func:`adain_fwd`. Returns dx (x's dtype and memory format) and float32 (N, C) dscale, dshift.
    Raises ValueError as :func:`adain_fwd` does.
    """
    _check_size(x)
    n, c = x.shape[:2]
    x, dx, work, layout = _kernel_buffers(x)
    channels_last, sn, sc, ss = layout
    dy = _like(dy, work, layout)
    s = x.numel() // (n * c)
    cfg = config or choose_config(n, c, s, channels_last, x.device, backward=True)
    cfg.check(s)
    scale, mean, rstd = scale.contiguous(), mean.contiguous(), rstd.contiguous()
    dscale = torch.empty((n, c), device=x.device, dtype=torch.float32)
    dshift = torch.empty_like(dscale)
    row_blocks = n * triton.cdiv(c, cfg.block_c)
    tiles = dict(BLOCK_C=cfg.block_c, BLOCK_S=cfg.block_s, CHANNELS_LAST=channels_last)
    if not cfg.split:
        _bwd_on_chip[(row_blocks,)](dy, x, work, scale, mean, rstd, dscale, dshift, c, s, sn, sc, ss, **tiles)
    else:
        chunk, splits = _chunking(s, cfg)
        part_dy = torch.empty((n * c, splits), device=x.device, dtype=torch.float32)
        part_dy_xhat = torch.empty_like(part_dy)
        grid = (row_blocks, splits)
        _bwd_partial[grid](dy, x, mean, rstd, part_dy, part_dy_xhat, c, s, chunk, splits, sn, sc, ss, **tiles)
        _bwd_apply[grid](dy, x, work, scale, mean, rstd, part_dy, part_dy_xhat, dscale, dshift, c, s, chunk, splits,
                         sn, sc, ss, BLOCK_SPLITS=triton.next_power_of_2(splits), **tiles)
    if work is not dx:
        dx.copy_(work)
    return dx, dscale, dshift


__all__ = ["AdainConfig", "choose_config", "adain_fwd", "adain_bwd"]

"""GroupNorm (+ SiLU) in Triton, forward and backward.

``y = silu(xhat · w + b)`` (or without the SiLU) with ``xhat = (x - mean) · rstd`` per (sample, group),
statistics in float32 whatever the input dtype.

Layout. x (N, C, *spatial) is addressed as (N, C, S) with S the product of the spatial dims, through a
batch, a channel and a spatial stride: (C·S, S, 1) for a contiguous tensor, (C·S, 1, C) for a
channels-last one (channels_last, channels_last_3d, or an (N, L, C) tensor transposed to (N, C, L)).
Both run in place and the outputs keep x's strides; any other layout is made contiguous first. A program
works on (channels of one group) × (spatial positions) tiles; Triton specialises a stride equal to 1,
so each tile is read along whichever axis is contiguous in memory. Programs are numbered with the
group fastest, so on channels-last input the groups reading the same pixels run side by side and share
their cache lines.

Two paths, chosen by :func:`choose_plan` from the shapes:

- **on-chip**: a group fits in one tile (channels-per-group × S, rounded up to powers of two, at most
  ``ONCHIP_ELEMENTS``). One program per (sample, group) reads x once, takes the mean and then the
  variance around it from registers, and writes y once. The backward reads x and dy once and writes
  dx once.
- **split**: the group's tiles are shared among ``splits`` programs per (sample, group, channel block),
  enough to fill the GPU at batch 1. Each writes a partial result (forward: count, mean and sum of
  squared deviations, merged tile by tile with Chan's formula; backward: Σ g and Σ g·xhat), then one
  program per tile combines the few partials of its group and normalises (forward) or forms dx
  (backward). The split path reads x (and dy) twice; the tile programs run in the reverse of the
  order in which the statistics programs read their tiles, so the second read starts with what is
  still in L2 and comes from DRAM only for the part of x that L2 could not hold.

Precision. The forward's sums run over x minus the group's first element, and the variance is the sum of
squared deviations from the mean, never E[x²] - E[x]², so an input like 100 + noise keeps the digits
of its noise; y uses the mean in that shifted form. The backward reads the saved float32 mean, whose
rounding (half a unit in its last place) bounds its accuracy when the mean dwarfs the spread.

Backward. With z = xhat·w + b the pre-activation (recomputed from x, mean, rstd, w, b), dz = dy·silu'(z)
(or dy) and g = dz·w: ``dx = rstd · (g - mean(g) - xhat · mean(g · xhat))`` over the group,
``dweight = Σ dz · xhat`` and ``dbias = Σ dz`` over samples and positions. The per-channel sums of a
program go to their own row of a float32 buffer (one row per sample on-chip, per sample and split
otherwise) that a second reduction sums: no atomics, so two runs are bitwise identical. The group sums
Σ g = Σ_c w_c Σ dz and Σ g·xhat = Σ_c w_c Σ dz·xhat come from those per-channel sums.

Tuning. Block sizes follow from the shapes; on a GPU the warps per program (4, 8 or 16, each with a
register cap that leaves room for two programs per SM, so ptxas never spills to reach an occupancy of
its own) are autotuned per shape on the first call; the interpreter runs one configuration.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from dxr.kernels.triton import common

# offsets inside one sample are 32-bit
_MAX_SAMPLE = 2**31 - 1
# largest group tile (elements, powers of two) kept in registers: the backward holds more tiles live
ONCHIP_ELEMENTS = {"forward": 8192, "backward": 4096}
# elements per tile of the split path, and the widest channel block of such a tile
TILE_ELEMENTS = 4096
MAX_BLOCK_C = 64
# programs per SM the split path aims for (the statistics pass is latency bound)
PROGRAMS_PER_SM = 4
# the SM count of the GPU the defaults are tuned for (an H100), used for CPU tensors
DEFAULT_SMS = 132


class Plan(NamedTuple):
    """How the kernels cover the groups of an (N, C, S) tensor."""

    onchip: bool  # one program per (sample, group), the whole group in one tile
    block_c: int  # channels per tile, a power of two
    block_s: int  # spatial positions per tile, a power of two
    splits: int  # split path: programs sharing the tiles of one (sample, group, channel block)
    tiles: int  # split path: spatial tiles per such program


def choose_plan(n: int, c: int, s: int, groups: int, *, backward: bool = False,
                onchip_elements: Optional[int] = None, tile_elements: int = TILE_ELEMENTS,
                target_programs: Optional[int] = None, device: Optional[torch.device] = None) -> Plan:
    """The tiling of x (N, C, S) with ``groups`` groups for the forward (or the backward) kernels.

    The on-chip path is taken when a group's padded tile has at most ``onchip_elements`` elements
    (default ``ONCHIP_ELEMENTS``; 0 forces the split path, a huge value the on-chip path when the
    group fits). The split path cuts a group into tiles of about ``tile_elements`` (a power of two)
    and spreads them over enough programs that N · groups · channel blocks · splits reaches
    ``target_programs`` (default ``PROGRAMS_PER_SM`` × the SM count of ``device``), each program
    holding at least one tile.
    Raises ValueError when a size is not positive, groups does not divide C, or tile_elements is
    not a power of two.
    """
    if min(n, c, s, groups) <= 0 or c % groups:
        raise ValueError(f"need positive N, C, S, groups with groups dividing C, got {(n, c, s, groups)}")
    if tile_elements <= 0 or tile_elements & (tile_elements - 1):
        raise ValueError(f"tile_elements must be a power of two, got {tile_elements}")
    cpg = c // groups
    cpg_p2, s_p2 = triton.next_power_of_2(cpg), triton.next_power_of_2(s)
    limit = ONCHIP_ELEMENTS["backward" if backward else "forward"] if onchip_elements is None else onchip_elements
    if cpg_p2 * s_p2 <= limit:
        return Plan(True, cpg_p2, s_p2, 1, 1)
    block_s = min(s_p2, max(1, tile_elements // min(cpg_p2, MAX_BLOCK_C)))
    block_c = min(cpg_p2, max(1, tile_elements // block_s))
    channel_blocks, spatial_tiles = triton.cdiv(cpg, block_c), triton.cdiv(s, block_s)
    if target_programs is None:
        sms = DEFAULT_SMS
        if device is not None and device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
        target_programs = PROGRAMS_PER_SM * sms
    splits = min(spatial_tiles, max(1, triton.cdiv(target_programs, n * groups * channel_blocks)))
    tiles = triton.cdiv(spatial_tiles, splits)
    return Plan(False, block_c, block_s, triton.cdiv(spatial_tiles, tiles), tiles)


def _configs():
    # several configurations cannot be benchmarked under the interpreter ("0 active drivers")
    if common.interpreting():
        return [triton.Config({}, num_warps=4)]
    # a register cap keeps ptxas from spilling to reach an occupancy of its own choosing
    return [triton.Config({}, num_warps=warps, maxnreg=common.register_cap(warps)) for warps in (4, 8, 16)]


# warps are tuned per shape and tile (the autotuner adds the tensors' dtypes to the key)
_KEY = ["G", "CPG", "S", "BLOCK_C", "BLOCK_S"]


# --------------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _channels(g, c0, CPG, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr):
    """Channels (BLOCK_C,) of group g from its channel c0, and their mask.

    EVEN_C (BLOCK_C divides CPG): every lane is a channel and the first is a multiple of BLOCK_C. The
    mask is then a constant and the start a known multiple, which is what lets a channels-last tile load
    its BLOCK_C neighbouring channels as one vector rather than element by element."""
    if EVEN_C:
        chan = tl.multiple_of(g * CPG + c0, BLOCK_C) + tl.arange(0, BLOCK_C)
        return chan, tl.full((BLOCK_C,), 1, tl.int1)
    cg = c0 + tl.arange(0, BLOCK_C)
    return g * CPG + cg, cg < CPG


@triton.jit
def _offsets(chan, c_mask, s0, S, stride_c, stride_s, BLOCK_S: tl.constexpr):
    """Offsets (BLOCK_C, BLOCK_S) within one sample of positions s0.. of the channels, and their mask."""
    pos = s0 + tl.arange(0, BLOCK_S)
    return chan[:, None] * stride_c + pos[None, :] * stride_s, c_mask[:, None] & (pos < S)[None, :]


@triton.jit
def _load_f32(ptr, offs, mask):
    # half types become float32 at once: arithmetic on raw bf16 is wrong under the interpreter
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _channel_params(w_ptr, b_ptr, chan, c_mask, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """Weight and bias of the channels as float32 (BLOCK_C,): 1 and 0 where absent, 0 on padded lanes."""
    ones = c_mask.to(tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + chan, mask=c_mask, other=0.0).to(tl.float32)
    else:
        w = ones
    if HAS_B:
        b = tl.load(b_ptr + chan, mask=c_mask, other=0.0).to(tl.float32)
    else:
        b = ones * 0.0
    return w, b


@triton.jit
def _activate(xhat, w, b, SILU: tl.constexpr):
    z = xhat * w[:, None] + b[:, None]
    if SILU:
        z = z * tl.sigmoid(z)
    return z


@triton.jit
def _grad_pre(dy, xhat, w, b, SILU: tl.constexpr):
    """The gradient at the pre-activation z = xhat·w + b: dy·silu'(z), or dy without the SiLU."""
    if SILU:
        z = xhat * w[:, None] + b[:, None]
        sig = tl.sigmoid(z)
        dz = dy * sig * (1.0 + z * (1.0 - sig))
    else:
        dz = dy
    return dz


@triton.jit
def _total(tile):
    return tl.sum(tl.sum(tile, axis=1), axis=0)


@triton.jit
def _split_program(G, CPG, SPLITS, BLOCK_C: tl.constexpr):
    """(sample, group, channel block, split) of a split-path statistics program, group fastest."""
    return _split_lane(tl.program_id(0), G, CPG, SPLITS, BLOCK_C)


@triton.jit
def _split_lane(pid, G, CPG, SPLITS, BLOCK_C: tl.constexpr):
    """(sample, group, channel block, split) of statistics program ``pid``."""
    g = pid % G
    rest = pid // G
    blocks = tl.cdiv(CPG, BLOCK_C)
    cb = rest % blocks
    rest = rest // blocks
    return rest // SPLITS, g, cb, rest % SPLITS


@triton.jit
def _apply_program(G, CPG, SPLITS, TILES, BLOCK_C: tl.constexpr):
    """(sample, group, channel block, spatial tile) of a split-path apply program.

    Each statistics program walks its TILES tiles in order, and the programs start in the order of
    their ids, so the tiles read last (the last steps, of the last programs) are the ones still in L2
    when the apply pass starts. The apply programs take the tiles in the reverse of that order: the
    last step of every statistics program first, the last program's first, step 0 of program 0 at the
    very end, so the second read of x comes from L2 for as much of x as L2 holds. A tile past S (in the
    last split of a ragged group) is masked off whole."""
    pid = tl.program_id(0)
    lanes = tl.num_programs(0) // TILES
    step = TILES - 1 - pid // lanes
    n, g, cb, sp = _split_lane(lanes - 1 - pid % lanes, G, CPG, SPLITS, BLOCK_C)
    st = sp * TILES + step
    return n, g, cb, st


# --------------------------------------------------------------------------------------------------
# forward kernels


@common.autotune(_configs(), _KEY)
@triton.jit
def _fwd_onchip_kernel(
    x_ptr,  # input, (N, C, S) through the strides below
    y_ptr,  # output, x's dtype and strides
    w_ptr,  # weight (C,), any float dtype; read only when HAS_W
    b_ptr,  # bias (C,), any float dtype; read only when HAS_B
    mean_ptr,  # float32 (N, G) group means
    rstd_ptr,  # float32 (N, G) reciprocal standard deviations
    G,  # groups
    CPG,  # channels per group
    S,  # spatial positions per channel
    stride_n,  # element stride between samples
    stride_c,  # element stride between channels
    stride_s,  # element stride between spatial positions
    eps,  # added to the variance
    HAS_W: tl.constexpr,  # weight given
    HAS_B: tl.constexpr,  # bias given
    SILU: tl.constexpr,  # apply the SiLU
    BLOCK_C: tl.constexpr,  # channels per tile, ≥ CPG
    EVEN_C: tl.constexpr,  # BLOCK_C divides CPG
    BLOCK_S: tl.constexpr,  # positions per tile, ≥ S
):
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    base = n.to(tl.int64) * stride_n
    chan, c_mask = _channels(g, 0, CPG, BLOCK_C, EVEN_C)
    offs, mask = _offsets(chan, c_mask, 0, S, stride_c, stride_s, BLOCK_S)
    x = _load_f32(x_ptr + base, offs, mask)
    count = CPG * S * 1.0
    # sum around the group's first element: the mean of x = 100 + noise keeps the digits of the noise
    pivot = tl.load(x_ptr + base + g * CPG * stride_c).to(tl.float32)
    shifted = tl.where(mask, x - pivot, 0.0)
    mean = _total(shifted) / count
    d = tl.where(mask, shifted - mean, 0.0)
    rstd = tl.rsqrt(_total(d * d) / count + eps)
    w, b = _channel_params(w_ptr, b_ptr, chan, c_mask, HAS_W, HAS_B)
    y = _activate(d * rstd, w, b, SILU)
    tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + pid, pivot + mean)
    tl.store(rstd_ptr + pid, rstd)


@common.autotune(_configs(), _KEY + ["SPLITS", "TILES"])
@triton.jit
def _fwd_partial_kernel(
    x_ptr,  # input, (N, C, S) through the strides below
    part_ptr,  # float32 (N·G, P, 3): count, mean - pivot, sum of squared deviations per chunk
    G,  # groups
    CPG,  # channels per group
    S,  # spatial positions per channel
    stride_n,  # element stride between samples
    stride_c,  # element stride between channels
    stride_s,  # element stride between spatial positions
    SPLITS,  # programs per (sample, group, channel block)
    TILES,  # consecutive spatial tiles per program
    BLOCK_C: tl.constexpr,  # channels per tile
    EVEN_C: tl.constexpr,  # BLOCK_C divides CPG
    BLOCK_S: tl.constexpr,  # positions per tile
):
    n, g, cb, sp = _split_program(G, CPG, SPLITS, BLOCK_C)
    base = n.to(tl.int64) * stride_n
    c0 = cb * BLOCK_C
    first = sp * TILES * BLOCK_S
    chan, c_mask = _channels(g, c0, CPG, BLOCK_C, EVEN_C)
    valid_c = tl.minimum(CPG - c0, BLOCK_C)
    # deviations from the group's first element keep a large common offset out of the sums
    pivot = tl.load(x_ptr + base + g * CPG * stride_c).to(tl.float32)
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for t in range(0, TILES):
        s0 = first + t * BLOCK_S
        offs, mask = _offsets(chan, c_mask, s0, S, stride_c, stride_s, BLOCK_S)
        x = tl.where(mask, _load_f32(x_ptr + base, offs, mask) - pivot, 0.0)
        k = valid_c * tl.maximum(tl.minimum(S - s0, BLOCK_S), 0) * 1.0
        tile_mean = _total(x) / tl.maximum(k, 1.0)
        d = tl.where(mask, x - tile_mean, 0.0)
        # Chan et al.: merge the tile's (k, mean, M2) into the running ones
        merged = count + k
        delta = tile_mean - mean
        share = k / tl.maximum(merged, 1.0)
        mean += delta * share
        m2 += _total(d * d) + delta * delta * count * share
        count = merged
    out = part_ptr + ((n * G + g) * tl.cdiv(CPG, BLOCK_C) * SPLITS + cb * SPLITS + sp) * 3
    tl.store(out, count)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)


@common.autotune(_configs(), _KEY + ["P"])
@triton.jit
def _fwd_apply_kernel(
    x_ptr,  # input, (N, C, S) through the strides below
    y_ptr,  # output, x's dtype and strides
    w_ptr,  # weight (C,), any float dtype; read only when HAS_W
    b_ptr,  # bias (C,), any float dtype; read only when HAS_B
    part_ptr,  # float32 (N·G, P, 3) partial statistics from _fwd_partial_kernel
    mean_ptr,  # float32 (N, G) group means, written by each group's first tile
    rstd_ptr,  # float32 (N, G) reciprocal standard deviations
    G,  # groups
    CPG,  # channels per group
    S,  # spatial positions per channel
    stride_n,  # element stride between samples
    stride_c,  # element stride between channels
    stride_s,  # element stride between spatial positions
    eps,  # added to the variance
    P,  # partials per group
    SPLITS,  # statistics programs per (sample, group, channel block)
    TILES,  # spatial tiles per statistics program
    HAS_W: tl.constexpr,  # weight given
    HAS_B: tl.constexpr,  # bias given
    SILU: tl.constexpr,  # apply the SiLU
    BLOCK_C: tl.constexpr,  # channels per tile
    EVEN_C: tl.constexpr,  # BLOCK_C divides CPG
    BLOCK_S: tl.constexpr,  # positions per tile
    BLOCK_P: tl.constexpr,  # ≥ P
):
    n, g, cb, st = _apply_program(G, CPG, SPLITS, TILES, BLOCK_C)
    row = n * G + g
    j = tl.arange(0, BLOCK_P)
    parts = part_ptr + (row * P + j) * 3
    cnt = tl.load(parts, mask=j < P, other=0.0)
    mu = tl.load(parts + 1, mask=j < P, other=0.0)
    count = CPG * S * 1.0
    # the partial means are taken around the group's first element, as is this one
    base = n.to(tl.int64) * stride_n
    pivot = tl.load(x_ptr + base + g * CPG * stride_c).to(tl.float32)
    mean = tl.sum(cnt * mu, axis=0) / count
    dev = mu - mean
    m2 = tl.sum(tl.load(parts + 2, mask=j < P, other=0.0) + cnt * dev * dev, axis=0)
    rstd = tl.rsqrt(m2 / count + eps)
    first = (cb == 0) & (st == 0)
    tl.store(mean_ptr + row, pivot + mean, mask=first)
    tl.store(rstd_ptr + row, rstd, mask=first)

    chan, c_mask = _channels(g, cb * BLOCK_C, CPG, BLOCK_C, EVEN_C)
    offs, mask = _offsets(chan, c_mask, st * BLOCK_S, S, stride_c, stride_s, BLOCK_S)
    x = _load_f32(x_ptr + base, offs, mask)
    w, b = _channel_params(w_ptr, b_ptr, chan, c_mask, HAS_W, HAS_B)
    # padded lanes stay at zero rather than at -mean·rstd, which overflows exp for a large mean
    y = _activate(tl.where(mask, (x - pivot - mean) * rstd, 0.0), w, b, SILU)
    tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# backward kernels


@common.autotune(_configs(), _KEY)
@triton.jit
def _bwd_onchip_kernel(
    dy_ptr,  # output gradient, x's strides
    x_ptr,  # input, (N, C, S) through the strides below
    dx_ptr,  # input gradient, x's dtype and strides
    w_ptr,  # weight (C,), any float dtype; read only when HAS_W
    b_ptr,  # bias (C,), any float dtype; read only when HAS_B
    mean_ptr,  # float32 (N, G) group means
    rstd_ptr,  # float32 (N, G) reciprocal standard deviations
    dw_ptr,  # float32 (N, C): Σ over positions of dz·xhat, one row per sample
    db_ptr,  # float32 (N, C): Σ over positions of dz
    G,  # groups
    CPG,  # channels per group
    S,  # spatial positions per channel
    C,  # channels
    stride_n,  # element stride between samples
    stride_c,  # element stride between channels
    stride_s,  # element stride between spatial positions
    HAS_W: tl.constexpr,  # weight given
    HAS_B: tl.constexpr,  # bias given
    SILU: tl.constexpr,  # the forward applied the SiLU
    BLOCK_C: tl.constexpr,  # channels per tile, ≥ CPG
    EVEN_C: tl.constexpr,  # BLOCK_C divides CPG
    BLOCK_S: tl.constexpr,  # positions per tile, ≥ S
):
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    base = n.to(tl.int64) * stride_n
    chan, c_mask = _channels(g, 0, CPG, BLOCK_C, EVEN_C)
    offs, mask = _offsets(chan, c_mask, 0, S, stride_c, stride_s, BLOCK_S)
    mean = tl.load(mean_ptr + pid)
    rstd = tl.load(rstd_ptr + pid)
    x = _load_f32(x_ptr + base, offs, mask)
    dy = _load_f32(dy_ptr + base, offs, mask)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    w, b = _channel_params(w_ptr, b_ptr, chan, c_mask, HAS_W, HAS_B)
    dz = _grad_pre(dy, xhat, w, b, SILU)
    dw = tl.sum(dz * xhat, axis=1)
    db = tl.sum(dz, axis=1)
    tl.store(dw_ptr + n * C + chan, dw, mask=c_mask)
    tl.store(db_ptr + n * C + chan, db, mask=c_mask)
    count = CPG * S * 1.0
    mean_g = tl.sum(w * db, axis=0) / count
    mean_gx = tl.sum(w * dw, axis=0) / count
    dx = rstd * (dz * w[:, None] - mean_g - xhat * mean_gx)
    tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@common.autotune(_configs(), _KEY + ["SPLITS", "TILES"])
@triton.jit
def _bwd_partial_kernel(
    dy_ptr,  # output gradient, x's strides
    x_ptr,  # input, (N, C, S) through the strides below
    w_ptr,  # weight (C,), any float dtype; read only when HAS_W
    b_ptr,  # bias (C,), any float dtype; read only when HAS_B
    mean_ptr,  # float32 (N, G) group means
    rstd_ptr,  # float32 (N, G) reciprocal standard deviations
    dw_ptr,  # float32 (N·SPLITS, C): Σ dz·xhat over each program's positions
    db_ptr,  # float32 (N·SPLITS, C): Σ dz over each program's positions
    part_ptr,  # float32 (N·G, P, 2): Σ g and Σ g·xhat per (channel block, split)
    G,  # groups
    CPG,  # channels per group
    S,  # spatial positions per channel
    C,  # channels
    stride_n,  # element stride between samples
    stride_c,  # element stride between channels
    stride_s,  # element stride between spatial positions
    SPLITS,  # programs per (sample, group, channel block)
    TILES,  # consecutive spatial tiles per program
    HAS_W: tl.constexpr,  # weight given
    HAS_B: tl.constexpr,  # bias given
    SILU: tl.constexpr,  # the forward applied the SiLU
    BLOCK_C: tl.constexpr,  # channels per tile
    EVEN_C: tl.constexpr,  # BLOCK_C divides CPG
    BLOCK_S: tl.constexpr,  # positions per tile
):
    n, g, cb, sp = _split_program(G, CPG, SPLITS, BLOCK_C)
    base = n.to(tl.int64) * stride_n
    c0 = cb * BLOCK_C
    first = sp * TILES * BLOCK_S
    mean = tl.load(mean_ptr + n * G + g)
    rstd = tl.load(rstd_ptr + n * G + g)
    chan, c_mask = _channels(g, c0, CPG, BLOCK_C, EVEN_C)
    w, b = _channel_params(w_ptr, b_ptr, chan, c_mask, HAS_W, HAS_B)
    # tiles summed elementwise in the loop and reduced once after it: a reduction inside the loop makes
    # Triton 3.6's sm_90 pipeline fail (TritonGPUOptimizeThreadLocality) for narrow float32 tiles
    dw_tile = tl.zeros((BLOCK_C, BLOCK_S), dtype=tl.float32)
    db_tile = tl.zeros((BLOCK_C, BLOCK_S), dtype=tl.float32)
    for t in range(0, TILES):
        offs, mask = _offsets(chan, c_mask, first + t * BLOCK_S, S, stride_c, stride_s, BLOCK_S)
        x = _load_f32(x_ptr + base, offs, mask)
        dy = _load_f32(dy_ptr + base, offs, mask)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        dz = _grad_pre(dy, xhat, w, b, SILU)
        dw_tile += dz * xhat
        db_tile += dz
    dw = tl.sum(dw_tile, axis=1)
    db = tl.sum(db_tile, axis=1)
    row = n * SPLITS + sp
    tl.store(dw_ptr + row * C + chan, dw, mask=c_mask)
    tl.store(db_ptr + row * C + chan, db, mask=c_mask)
    out = part_ptr + ((n * G + g) * tl.cdiv(CPG, BLOCK_C) * SPLITS + cb * SPLITS + sp) * 2
    tl.store(out, tl.sum(w * db, axis=0))
    tl.store(out + 1, tl.sum(w * dw, axis=0))


@common.autotune(_configs(), _KEY + ["P"])
@triton.jit
def _bwd_apply_kernel(
    dy_ptr,  # output gradient, x's strides
    x_ptr,  # input, (N, C, S) through the strides below
    dx_ptr,  # input gradient, x's dtype and strides
    w_ptr,  # weight (C,), any float dtype; read only when HAS_W
    b_ptr,  # bias (C,), any float dtype; read only when HAS_B
    mean_ptr,  # float32 (N, G) group means
    rstd_ptr,  # float32 (N, G) reciprocal standard deviations
    part_ptr,  # float32 (N·G, P, 2) partial sums from _bwd_partial_kernel
    G,  # groups
    CPG,  # channels per group
    S,  # spatial positions per channel
    stride_n,  # element stride between samples
    stride_c,  # element stride between channels
    stride_s,  # element stride between spatial positions
    P,  # partials per group
    SPLITS,  # statistics programs per (sample, group, channel block)
    TILES,  # spatial tiles per statistics program
    HAS_W: tl.constexpr,  # weight given
    HAS_B: tl.constexpr,  # bias given
    SILU: tl.constexpr,  # the forward applied the SiLU
    BLOCK_C: tl.constexpr,  # channels per tile
    EVEN_C: tl.constexpr,  # BLOCK_C divides CPG
    BLOCK_S: tl.constexpr,  # positions per tile
    BLOCK_P: tl.constexpr,  # ≥ P
):
    n, g, cb, st = _apply_program(G, CPG, SPLITS, TILES, BLOCK_C)
    row = n * G + g
    j = tl.arange(0, BLOCK_P)
    parts = part_ptr + (row * P + j) * 2
    count = CPG * S * 1.0
    mean_g = tl.sum(tl.load(parts, mask=j < P, other=0.0), axis=0) / count
    mean_gx = tl.sum(tl.load(parts + 1, mask=j < P, other=0.0), axis=0) / count
    mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)

    base = n.to(tl.int64) * stride_n
    chan, c_mask = _channels(g, cb * BLOCK_C, CPG, BLOCK_C, EVEN_C)
    offs, mask = _offsets(chan, c_mask, st * BLOCK_S, S, stride_c, stride_s, BLOCK_S)
    x = _load_f32(x_ptr + base, offs, mask)
    dy = _load_f32(dy_ptr + base, offs, mask)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    w, b = _channel_params(w_ptr, b_ptr, chan, c_mask, HAS_W, HAS_B)
    dz = _grad_pre(dy, xhat, w, b, SILU)
    dx = rstd * (dz * w[:, None] - mean_g - xhat * mean_gx)
    tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# launch functions


def _strides(t: Tensor) -> Optional[tuple[int, int, int]]:
    """(batch, channel, spatial) element strides addressing t (N, C, *spatial) as (N, C, S), when t
    is contiguous or channels-last; None for any other layout."""
    n, c = t.shape[:2]
    s = t.numel() // max(n * c, 1)
    if t.is_contiguous():
        return c * s, s, 1
    if t.movedim(1, -1).is_contiguous():
        return c * s, 1, c
    return None


def _in_layout(t: Tensor, like: Tensor) -> Tensor:
    """t (like's shape) with like's (N, C, S) addressing: t itself when it already has it, else a copy."""
    if _strides(t) == _strides(like):
        return t
    return torch.empty_like(like, dtype=t.dtype).copy_(t)


def _sizes(x: Tensor, num_groups: int) -> tuple[int, int, int, int]:
    if x.dim() < 2 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty (N, C, *spatial) tensor, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    n, c = x.shape[:2]
    if num_groups <= 0 or c % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must be positive and divide the channel count C = {c}")
    s = x.numel() // (n * c)
    if c * s > _MAX_SAMPLE:
        raise ValueError(f"one sample of x holds {c * s} elements, more than 32-bit offsets address")
    return n, c, s, c // num_groups


def _plan_for(plan: Optional[Plan], n: int, c: int, s: int, groups: int, device: torch.device,
              backward: bool) -> Plan:
    """``plan``, checked to cover a group of (C / groups) × S, or the one :func:`choose_plan` picks."""
    if plan is None:
        return choose_plan(n, c, s, groups, backward=backward, device=device)
    if plan.onchip:
        covered = plan.block_c >= c // groups and plan.block_s >= s
    else:
        covered = plan.splits * plan.tiles * plan.block_s >= s
    if not covered:
        raise ValueError(f"{plan} does not cover a group of {c // groups} channels × {s} positions")
    return plan


def _param(p: Optional[Tensor], placeholder: Tensor) -> tuple[Tensor, bool]:
    """A (C,) parameter ready for the kernels (any float dtype, unit stride) and whether it was given;
    a missing one is replaced by ``placeholder``, a pointer the kernels never read."""
    if p is None:
        return placeholder, False
    return p.contiguous(), True


def group_norm_silu_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int, eps: float,
                        silu: bool, *, plan: Optional[Plan] = None) -> tuple[Tensor, Tensor, Tensor]:
    """GroupNorm forward, with the SiLU when ``silu``.

    x: non-empty (N, C, *spatial) float32/float16/bfloat16; weight, bias: (C,) of any float dtype, or
    None. Returns y (x's shape, dtype and memory format) and float32 (N, num_groups) mean and rstd.
    ``plan`` overrides :func:`choose_plan`. Raises ValueError when num_groups does not divide C, x is
    empty, one sample exceeds 2³¹ - 1 elements or the plan does not cover a group, and TypeError for
    another dtype.
    """
    n, c, s, cpg = _sizes(x, num_groups)
    y = torch.empty_like(x)
    strides = _strides(y)
    if strides is None:
        out = group_norm_silu_fwd(x.contiguous(), weight, bias, num_groups, eps, silu, plan=plan)
        return (y.copy_(out[0]), *out[1:])
    x = _in_layout(x, y)
    plan = _plan_for(plan, n, c, s, num_groups, x.device, backward=False)
    mean = x.new_empty((n, num_groups), dtype=torch.float32)
    rstd = torch.empty_like(mean)
    w, has_w = _param(weight, mean)
    b, has_b = _param(bias, mean)
    shape = dict(G=num_groups, CPG=cpg, S=s, stride_n=strides[0], stride_c=strides[1], stride_s=strides[2])
    flags = dict(HAS_W=has_w, HAS_B=has_b, SILU=bool(silu), BLOCK_C=plan.block_c, EVEN_C=cpg % plan.block_c == 0,
                 BLOCK_S=plan.block_s)
    if plan.onchip:
        _fwd_onchip_kernel[(n * num_groups,)](x, y, w, b, mean, rstd, **shape, eps=eps, **flags)
        return y, mean, rstd
    blocks = triton.cdiv(cpg, plan.block_c)
    parts = blocks * plan.splits
    partials = x.new_empty((n * num_groups, parts, 3), dtype=torch.float32)
    _fwd_partial_kernel[(n * num_groups * parts,)](
        x, partials, **shape, SPLITS=plan.splits, TILES=plan.tiles, BLOCK_C=plan.block_c,
        EVEN_C=flags["EVEN_C"], BLOCK_S=plan.block_s)
    _fwd_apply_kernel[(n * num_groups * parts * plan.tiles,)](
        x, y, w, b, partials, mean, rstd, **shape, eps=eps, P=parts, SPLITS=plan.splits, TILES=plan.tiles, **flags,
        BLOCK_P=triton.next_power_of_2(parts))
    return y, mean, rstd


def group_norm_silu_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                        rstd: Tensor, num_groups: int, silu: bool, *,
                        plan: Optional[Plan] = None) -> tuple[Tensor, Tensor, Tensor]:
    """GroupNorm (+ SiLU) backward, deterministic.

    dy: x's shape, any layout; x, weight, bias, num_groups, silu as given to :func:`group_norm_silu_fwd`;
    mean, rstd: its float32 (N, num_groups) statistics. Returns dx (x's shape, dtype and memory format)
    and float32 (C,) dweight and dbias, the gradients for implicit ones and zeros when weight or bias
    is None. ``plan`` overrides :func:`choose_plan`. Raises as :func:`group_norm_silu_fwd`, and
    ValueError when dy, mean or rstd has the wrong shape.
    """
    n, c, s, cpg = _sizes(x, num_groups)
    if dy.shape != x.shape:
        raise ValueError(f"dy must have x's shape {tuple(x.shape)}, got {tuple(dy.shape)}")
    for name, stat in (("mean", mean), ("rstd", rstd)):
        if tuple(stat.shape) != (n, num_groups):
            raise ValueError(f"{name} must have shape {(n, num_groups)}, got {tuple(stat.shape)}")
    dx = torch.empty_like(x)
    strides = _strides(dx)
    if strides is None:
        out = group_norm_silu_bwd(dy.contiguous(), x.contiguous(), weight, bias, mean, rstd, num_groups, silu,
                                  plan=plan)
        return (dx.copy_(out[0]), *out[1:])
    x = _in_layout(x, dx)
    dy = _in_layout(dy, dx)
    mean, rstd = mean.float().contiguous(), rstd.float().contiguous()
    plan = _plan_for(plan, n, c, s, num_groups, x.device, backward=True)
    w, has_w = _param(weight, mean)
    b, has_b = _param(bias, mean)
    # per-program partial sums of dweight and dbias, one row per sample (and split)
    dw_rows = x.new_empty((n * (1 if plan.onchip else plan.splits), c), dtype=torch.float32)
    db_rows = torch.empty_like(dw_rows)
    shape = dict(G=num_groups, CPG=cpg, S=s, stride_n=strides[0], stride_c=strides[1], stride_s=strides[2])
    flags = dict(HAS_W=has_w, HAS_B=has_b, SILU=bool(silu), BLOCK_C=plan.block_c, EVEN_C=cpg % plan.block_c == 0,
                 BLOCK_S=plan.block_s)
    if plan.onchip:
        _bwd_onchip_kernel[(n * num_groups,)](dy, x, dx, w, b, mean, rstd, dw_rows, db_rows, C=c, **shape, **flags)
    else:
        blocks = triton.cdiv(cpg, plan.block_c)
        parts = blocks * plan.splits
        partials = x.new_empty((n * num_groups, parts, 2), dtype=torch.float32)
        _bwd_partial_kernel[(n * num_groups * parts,)](
            dy, x, w, b, mean, rstd, dw_rows, db_rows, partials, C=c, **shape,
            SPLITS=plan.splits, TILES=plan.tiles, **flags)
        _bwd_apply_kernel[(n * num_groups * parts * plan.tiles,)](
            dy, x, dx, w, b, mean, rstd, partials, **shape, P=parts, SPLITS=plan.splits, TILES=plan.tiles, **flags,
            BLOCK_P=triton.next_power_of_2(parts))
    return dx, dw_rows.sum(0), db_rows.sum(0)


__all__ = ["group_norm_silu_fwd", "group_norm_silu_bwd", "choose_plan", "Plan", "ONCHIP_ELEMENTS"]

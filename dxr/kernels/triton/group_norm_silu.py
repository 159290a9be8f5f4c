"""GroupNorm (+ SiLU) in Triton, forward and backward; AdaIN runs on the same kernels.

``y = silu(xhat · w + b)`` (or without the SiLU) with ``xhat = (x - mean) · rstd`` per (sample, group),
statistics in float32 whatever the input dtype. AdaIN (:mod:`dxr.kernels.triton.adain`) is this
normalisation with one channel per group and a per-sample affine: the kernels take the affine's sample
stride (0 for GroupNorm's (C,) weight and bias, C for AdaIN's (N, C) scale and shift), and the per-sample
rows of Σ dz·xhat and Σ dz that the backward writes are AdaIN's dscale and dshift before GroupNorm sums
them over the batch.

Layout. x (N, C, *spatial) is addressed as (N, C, S) with S the product of the spatial dims, through a
batch, a channel and a spatial stride; either the channel or the spatial stride is 1 and the kernels know
which (``CHANNELS_LAST``), so the unit stride is a literal the compiler vectorises along. That covers
contiguous tensors, channels_last and channels_last_3d, an (N, L, C) tensor transposed to (N, C, L), and
any other view whose (N, C, S) form has a unit channel or spatial stride; those run in place and the
outputs keep x's strides, any other layout is made contiguous first. Offsets are 64-bit, since a layout
read in place need not keep N outermost.

Tiles. A program works on a (channels) × (spatial positions) tile. The channels are ``block_c`` of one
group, or, when ``block_g`` > 1, ``block_g`` whole neighbouring groups (``block_c`` then covers a group):
on channels-last input a group of four channels is 8 bytes of every pixel, and a tile of sixteen such
groups reads 128 contiguous bytes instead. Per-channel sums over the positions are reduced group by group
inside the tile. Programs are numbered with the group (block) fastest, so on channels-last input the
programs reading the same pixels run side by side and share their cache lines.

Two paths, chosen by :func:`choose_plan` from the shapes:

- **on-chip**: a group fits in one tile (channels-per-group × S, rounded up to powers of two, at most
  ``ONCHIP_ELEMENTS``). One program per (sample, group block) reads x once, takes the mean and then the
  variance around it from registers, and writes y once. The backward reads x and dy once and writes
  dx once.
- **split**: the group's tiles are shared among ``splits`` programs per (sample, group block, channel
  block), enough to fill the GPU at batch 1. Each writes a partial result per group (forward: count, mean
  and sum of squared deviations, merged tile by tile with Chan's formula; backward: Σ g and Σ g·xhat),
  then one program per statistics program combines the few partials of its groups once and normalises
  (forward) or forms dx (backward) over the same tiles. The split path reads x (and dy) twice; the apply
  programs run in the reverse of the order in which the statistics programs read their tiles, so the
  second read starts with what is still in L2 and comes from DRAM only for the part of x that L2 could
  not hold.

Precision. The forward's sums run over x minus the group's first element, and the variance is the sum of
squared deviations from the mean, never E[x²] - E[x]², so an input like 100 + noise keeps the digits
of its noise; y uses the mean in that shifted form. The backward reads the saved float32 mean, whose
rounding (half a unit in its last place) bounds its accuracy when the mean dwarfs the spread.

Backward. With z = xhat·w + b the pre-activation (recomputed from x, mean, rstd, w, b), dz = dy·silu'(z)
(or dy) and g = dz·w: ``dx = rstd · (g - mean(g) - xhat · mean(g · xhat))`` over the group,
``dweight = Σ dz · xhat`` and ``dbias = Σ dz`` over positions (and, for GroupNorm, samples). The
per-channel sums of a program go to their own row of a float32 buffer (one row per sample on-chip, per
sample and split otherwise) that a second reduction sums: no atomics, so two runs are bitwise identical.
The group sums Σ g = Σ_c w_c Σ dz and Σ g·xhat = Σ_c w_c Σ dz·xhat come from those per-channel sums.

Tuning. Block sizes follow from the shapes; on a GPU the warps per program (4, 8 or 16, those that give
each thread 4 to 64 elements of a tile, each with a register cap that leaves room for two programs per SM, so
ptxas never spills to reach an occupancy of its own) are autotuned per shape and layout on the first call;
the interpreter runs one configuration.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from dxr.kernels.triton import common

# a group's element count and the sample's channel and row indices are 32-bit
_MAX_SAMPLE = 2**31 - 1
# largest group tile (elements, powers of two) kept in registers: the backward holds more tiles live
ONCHIP_ELEMENTS = {"forward": 8192, "backward": 4096}
# elements per tile of the split path, and the widest channel block of such a tile
TILE_ELEMENTS = 4096
MAX_BLOCK_C = 64
# channels a channels-last tile spans when groups are narrower: several whole groups side by side
CL_CHANNELS = 64
# programs per SM the split path aims for (the statistics pass is latency bound)
PROGRAMS_PER_SM = 4
# the SM count of the GPU the defaults are tuned for (an H100), used for CPU tensors
DEFAULT_SMS = 132


class Plan(NamedTuple):
    """How the kernels cover the groups of an (N, C, S) tensor."""

    onchip: bool  # one program per (sample, group block), the whole group in one tile
    block_c: int  # channels of one group per tile, a power of two
    block_s: int  # spatial positions per tile, a power of two
    splits: int  # split path: programs sharing the tiles of one (sample, group block, channel block)
    tiles: int  # split path: spatial tiles per such program
    block_g: int = 1  # whole groups per tile, a power of two; above 1, block_c covers a group


def _sms(device: Optional[torch.device]) -> int:
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS


def choose_plan(n: int, c: int, s: int, groups: int, *, backward: bool = False, channels_last: bool = False,
                onchip_elements: Optional[int] = None, tile_elements: int = TILE_ELEMENTS,
                target_programs: Optional[int] = None, device: Optional[torch.device] = None) -> Plan:
    """The tiling of x (N, C, S) with ``groups`` groups for the forward (or the backward) kernels.

    The on-chip path is taken when a group's padded tile has at most ``onchip_elements`` elements
    (default ``ONCHIP_ELEMENTS``; 0 forces the split path, a huge value the on-chip path when the
    group fits). The split path cuts a group into tiles of about ``tile_elements`` (a power of two)
    and spreads them over enough programs that N · group blocks · channel blocks · splits reaches
    ``target_programs`` (default ``PROGRAMS_PER_SM`` × the SM count of ``device``), each program
    holding at least one tile. On ``channels_last`` input, groups narrower than ``CL_CHANNELS`` share a
    tile with their neighbours, up to that many channels; on-chip, only while N · group blocks stays at
    or above ``target_programs`` / ``PROGRAMS_PER_SM`` (one program per SM).
    Raises ValueError when a size is not positive, groups does not divide C, or tile_elements is
    not a power of two.
    """
    if min(n, c, s, groups) <= 0 or c % groups:
        raise ValueError(f"need positive N, C, S, groups with groups dividing C, got {(n, c, s, groups)}")
    if tile_elements <= 0 or tile_elements & (tile_elements - 1):
        raise ValueError(f"tile_elements must be a power of two, got {tile_elements}")
    cpg = c // groups
    cpg_p2, s_p2 = triton.next_power_of_2(cpg), triton.next_power_of_2(s)
    block_g = min(triton.next_power_of_2(groups), max(1, CL_CHANNELS // cpg_p2)) if channels_last else 1
    limit = ONCHIP_ELEMENTS["backward" if backward else "forward"] if onchip_elements is None else onchip_elements
    if target_programs is None:
        target_programs = PROGRAMS_PER_SM * _sms(device)
    if cpg_p2 * s_p2 <= limit:
        block_g = min(block_g, max(1, limit // (cpg_p2 * s_p2)))
        # wider tiles, but not at the cost of SMs left without a program
        while block_g > 1 and n * triton.cdiv(groups, block_g) * PROGRAMS_PER_SM < target_programs:
            block_g //= 2
        return Plan(True, cpg_p2, s_p2, 1, 1, block_g)
    if block_g > 1:
        block_c = cpg_p2
        block_s = min(s_p2, max(1, tile_elements // (block_g * block_c)))
    else:
        block_s = min(s_p2, max(1, tile_elements // min(cpg_p2, MAX_BLOCK_C)))
        block_c = min(cpg_p2, max(1, tile_elements // block_s))
    channel_blocks, spatial_tiles = triton.cdiv(cpg, block_c), triton.cdiv(s, block_s)
    lanes = n * triton.cdiv(groups, block_g) * channel_blocks
    splits = min(spatial_tiles, max(1, triton.cdiv(target_programs, lanes)))
    tiles = triton.cdiv(spatial_tiles, splits)
    return Plan(False, block_c, block_s, triton.cdiv(spatial_tiles, tiles), tiles, block_g)


def _plausible_warps(configs, named_args, **kwargs):
    """The warp counts that give each thread 4 to 64 elements of a tile (else the fewest warps)."""
    args = {**named_args, **kwargs}
    tile = args["BLOCK_G"] * args["BLOCK_C"] * args["BLOCK_S"]
    kept = [cfg for cfg in configs if 4 <= tile // (32 * cfg.num_warps) <= 64]
    return kept or [min(configs, key=lambda cfg: cfg.num_warps)]


def _tuned(key):
    """Warps autotuned per ``key`` (plus the tensors' dtypes) on a GPU; one config under the interpreter
    (several cannot be benchmarked there: "0 active drivers")."""
    if common.interpreting():
        configs = [triton.Config({}, num_warps=4)]
    else:
        # a register cap keeps ptxas from spilling to reach an occupancy of its own choosing
        configs = [triton.Config({}, num_warps=w, maxnreg=common.register_cap(w)) for w in (4, 8, 16)]
    return common.autotune(configs, ["G", "CPG", "S", "BLOCK_G", "BLOCK_C", "BLOCK_S", "CHANNELS_LAST", *key],
                           _plausible_warps)


# --------------------------------------------------------------------------------------------------
# device helpers


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
def _channel_offsets(c, stride_c, CHANNELS_LAST: tl.constexpr):
    """Offsets (int64) of position 0 of channels c inside one sample."""
    if CHANNELS_LAST:
        offs = c.to(tl.int64)
    else:
        offs = c.to(tl.int64) * stride_c
    return offs


@triton.jit
def _channels(g0, c0, G, CPG, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr):
    """Channels (BLOCK_G·BLOCK_C,) of the tile: channels c0.. of each of the groups g0.., and their mask.

    EVEN_C (every lane a channel, consecutive: BLOCK_C divides CPG, BLOCK_G divides G, and BLOCK_C == CPG
    when BLOCK_G > 1): the mask is then a constant and the first channel a known multiple of the tile's
    width, which is what lets a channels-last tile load its neighbouring channels as one vector."""
    if EVEN_C:
        chan = tl.multiple_of(g0 * CPG + c0, BLOCK_G * BLOCK_C) + tl.arange(0, BLOCK_G * BLOCK_C)
        return chan, tl.full((BLOCK_G * BLOCK_C,), 1, tl.int1)
    lane = tl.arange(0, BLOCK_G * BLOCK_C)
    g = g0 + lane // BLOCK_C
    cg = c0 + lane % BLOCK_C
    return g * CPG + cg, (cg < CPG) & (g < G)


@triton.jit
def _groups(g0, G, BLOCK_G: tl.constexpr):
    """The groups (BLOCK_G,) of the tile and their mask."""
    g = g0 + tl.arange(0, BLOCK_G)
    return g, g < G


@triton.jit
def _group_sum(v, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    """(BLOCK_G,) sums of a per-channel (BLOCK_G·BLOCK_C,) vector, group by group."""
    return tl.sum(tl.reshape(v, (BLOCK_G, BLOCK_C)), axis=1)


@triton.jit
def _spread(v, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    """A per-group (BLOCK_G,) vector repeated for each channel of its group: (BLOCK_G·BLOCK_C,)."""
    return tl.reshape(tl.broadcast_to(v[:, None], (BLOCK_G, BLOCK_C)), (BLOCK_G * BLOCK_C,))


@triton.jit
def _pivots(x_ptr, g, g_mask, CPG, stride_c, CHANNELS_LAST: tl.constexpr):
    """The first element (channel g·CPG, position 0) of each group g, as float32."""
    return common.load_f32(x_ptr + _channel_offsets(g * CPG, stride_c, CHANNELS_LAST), g_mask)


@triton.jit
def _saved_stats(mean_ptr, rstd_ptr, rows, g_mask, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    """The forward's mean and rstd of the tile's groups (rows of the (N, G) buffers), per channel (·, 1)."""
    mean = tl.load(mean_ptr + rows, mask=g_mask, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=g_mask, other=0.0)
    return _spread(mean, BLOCK_G, BLOCK_C)[:, None], _spread(rstd, BLOCK_G, BLOCK_C)[:, None]


@triton.jit
def _channel_params(w_ptr, b_ptr, chan, c_mask, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """Weight and bias of the channels as float32: 1 and 0 where absent, 0 on padded lanes."""
    ones = c_mask.to(tl.float32)
    if HAS_W:
        w = common.load_f32(w_ptr + chan, c_mask)
    else:
        w = ones
    if HAS_B:
        b = common.load_f32(b_ptr + chan, c_mask)
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
def _onchip_program(G, BLOCK_G: tl.constexpr):
    """(sample, first group) of an on-chip program, group blocks fastest."""
    pid = tl.program_id(0)
    blocks = tl.cdiv(G, BLOCK_G)
    return pid // blocks, (pid % blocks) * BLOCK_G


@triton.jit
def _split_lane(pid, G, CPG, SPLITS, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    """(sample, first group, channel block, split) of statistics program ``pid``, group blocks fastest."""
    group_blocks = tl.cdiv(G, BLOCK_G)
    gb = pid % group_blocks
    rest = pid // group_blocks
    channel_blocks = tl.cdiv(CPG, BLOCK_C)
    cb = rest % channel_blocks
    rest = rest // channel_blocks
    return rest // SPLITS, gb * BLOCK_G, cb, rest % SPLITS


@triton.jit
def _apply_program(G, CPG, SPLITS, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    """(sample, first group, channel block, split) of a split-path apply program.

    Each statistics program walks its tiles in order, and the programs start in the order of their ids,
    so the tiles read last (the last tiles of the last programs) are the ones still in L2 when the apply
    pass starts. The apply programs take the statistics programs in reverse order, and each walks its
    tiles last first, so the second read of x comes from L2 for as much of x as L2 holds."""
    return _split_lane(tl.num_programs(0) - 1 - tl.program_id(0), G, CPG, SPLITS, BLOCK_G, BLOCK_C)


@triton.jit
def _partials(part_ptr, row, P, g_mask, FIELDS: tl.constexpr, BLOCK_P: tl.constexpr):
    """Pointers (BLOCK_G, BLOCK_P) to field 0 of the P partials of each group row, and their mask."""
    j = tl.arange(0, BLOCK_P)
    return part_ptr + (row[:, None] * P + j[None, :]) * FIELDS, g_mask[:, None] & (j < P)[None, :]


# --------------------------------------------------------------------------------------------------
# forward kernels


@_tuned([])
@triton.jit
def _fwd_onchip_kernel(
    x_ptr,  # input, (N, C, S) through the strides below
    y_ptr,  # output, x's dtype and strides
    w_ptr,  # weight, any float dtype, C per sample (stride_wn apart); read only when HAS_W
    b_ptr,  # bias, as the weight; read only when HAS_B
    mean_ptr,  # float32 (N, G) group means
    rstd_ptr,  # float32 (N, G) reciprocal standard deviations
    G,  # groups
    CPG,  # channels per group
    S,  # spatial positions per channel
    stride_n,  # element stride between samples
    stride_c,  # element stride between channels (unused when CHANNELS_LAST: 1)
    stride_s,  # element stride between spatial positions (unused unless CHANNELS_LAST: 1)
    stride_wn,  # element stride between the samples' weights and biases: 0 when shared
    eps,  # added to the variance
    HAS_W: tl.constexpr,  # weight given
    HAS_B: tl.constexpr,  # bias given
    SILU: tl.constexpr,  # apply the SiLU
    CHANNELS_LAST: tl.constexpr,  # channels are the unit-stride axis
    BLOCK_G: tl.constexpr,  # groups per tile
    BLOCK_C: tl.constexpr,  # channels per group and tile, ≥ CPG
    EVEN_C: tl.constexpr,  # every lane of the tile is a channel (see _channels)
    BLOCK_S: tl.constexpr,  # positions per tile, ≥ S
):
    n, g0 = _onchip_program(G, BLOCK_G)
    sample = x_ptr + n.to(tl.int64) * stride_n
    chan, c_mask = _channels(g0, 0, G, CPG, BLOCK_G, BLOCK_C, EVEN_C)
    g, g_mask = _groups(g0, G, BLOCK_G)
    s = tl.arange(0, BLOCK_S)
    offs = _tile_offsets(chan, s, stride_c, stride_s, CHANNELS_LAST)
    mask = c_mask[:, None] & (s < S)[None, :]
    x = common.load_f32(sample + offs, mask)
    count = CPG * S * 1.0
    # sum around the group's first element: the mean of x = 100 + noise keeps the digits of the noise
    pivot = _pivots(sample, g, g_mask, CPG, stride_c, CHANNELS_LAST)
    shifted = tl.where(mask, x - _spread(pivot, BLOCK_G, BLOCK_C)[:, None], 0.0)
    mean = _group_sum(tl.sum(shifted, axis=1), BLOCK_G, BLOCK_C) / count
    d = tl.where(mask, shifted - _spread(mean, BLOCK_G, BLOCK_C)[:, None], 0.0)
    rstd = tl.rsqrt(_group_sum(tl.sum(d * d, axis=1), BLOCK_G, BLOCK_C) / count + eps)
    w, b = _channel_params(w_ptr + n * stride_wn, b_ptr + n * stride_wn, chan, c_mask, HAS_W, HAS_B)
    y = _activate(d * _spread(rstd, BLOCK_G, BLOCK_C)[:, None], w, b, SILU)
    tl.store(y_ptr + n.to(tl.int64) * stride_n + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + n * G + g, pivot + mean, mask=g_mask)
    tl.store(rstd_ptr + n * G + g, rstd, mask=g_mask)


@_tuned(["SPLITS", "TILES"])
@triton.jit
def _fwd_partial_kernel(
    x_ptr,  # input, (N, C, S) through the strides below
    part_ptr,  # float32 (N·G, P, 3): count, mean - pivot, sum of squared deviations per chunk
    G,  # groups
    CPG,  # channels per group
    S,  # spatial positions per channel
    stride_n,  # element stride between samples
    stride_c,  # element stride between channels (unused when CHANNELS_LAST: 1)
    stride_s,  # element stride between spatial positions (unused unless CHANNELS_LAST: 1)
    SPLITS,  # programs per (sample, group block, channel block)
    TILES,  # consecutive spatial tiles per program
    CHANNELS_LAST: tl.constexpr,  # channels are the unit-stride axis
    BLOCK_G: tl.constexpr,  # groups per tile
    BLOCK_C: tl.constexpr,  # channels per group and tile
    EVEN_C: tl.constexpr,  # every lane of the tile is a channel (see _channels)
    BLOCK_S: tl.constexpr,  # positions per tile
):
    n, g0, cb, sp = _split_lane(tl.program_id(0), G, CPG, SPLITS, BLOCK_G, BLOCK_C)
    sample = x_ptr + n.to(tl.int64) * stride_n
    c0 = cb * BLOCK_C
    first = sp * TILES * BLOCK_S
    chan, c_mask = _channels(g0, c0, G, CPG, BLOCK_G, BLOCK_C, EVEN_C)
    g, g_mask = _groups(g0, G, BLOCK_G)
    # deviations from the group's first element keep a large common offset out of the sums
    pivot = _pivots(sample, g, g_mask, CPG, stride_c, CHANNELS_LAST)
    pivot_c = _spread(pivot, BLOCK_G, BLOCK_C)[:, None]
    # per channel: positions so far (the same for every channel), mean and sum of squared deviations
    count = 0.0
    mean = tl.zeros((BLOCK_G * BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_G * BLOCK_C,), dtype=tl.float32)
    for t in range(0, TILES):
        s0 = first + t * BLOCK_S
        s = s0 + tl.arange(0, BLOCK_S)
        mask = c_mask[:, None] & (s < S)[None, :]
        x = tl.where(mask, common.load_f32(sample + _tile_offsets(chan, s, stride_c, stride_s, CHANNELS_LAST),
                                           mask) - pivot_c, 0.0)
        k = tl.maximum(tl.minimum(S - s0, BLOCK_S), 0) * 1.0
        tile_mean = tl.sum(x, axis=1) / tl.maximum(k, 1.0)
        d = tl.where(mask, x - tile_mean[:, None], 0.0)
        # Chan et al.: merge the tile's (k, mean, M2) into the running ones
        merged = count + k
        delta = tile_mean - mean
        share = k / tl.maximum(merged, 1.0)
        mean += delta * share
        m2 += tl.sum(d * d, axis=1) + delta * delta * count * share
        count = merged
    # the block's channels of a group have equal counts: merge them into the group's partial
    valid_c = tl.minimum(CPG - c0, BLOCK_C) * 1.0
    on = c_mask.to(tl.float32)
    group_mean = _group_sum(mean * on, BLOCK_G, BLOCK_C) / valid_c
    dev = (mean - _spread(group_mean, BLOCK_G, BLOCK_C)) * on
    group_m2 = _group_sum(m2 + count * dev * dev, BLOCK_G, BLOCK_C)
    out = part_ptr + ((n * G + g) * (tl.cdiv(CPG, BLOCK_C) * SPLITS) + cb * SPLITS + sp) * 3
    tl.store(out, count * valid_c, mask=g_mask)
    tl.store(out + 1, group_mean, mask=g_mask)
    tl.store(out + 2, group_m2, mask=g_mask)


@_tuned(["P", "TILES"])
@triton.jit
def _fwd_apply_kernel(
    x_ptr,  # input, (N, C, S) through the strides below
    y_ptr,  # output, x's dtype and strides
    w_ptr,  # weight, any float dtype, C per sample (stride_wn apart); read only when HAS_W
    b_ptr,  # bias, as the weight; read only when HAS_B
    part_ptr,  # float32 (N·G, P, 3) partial statistics from _fwd_partial_kernel
    mean_ptr,  # float32 (N, G) group means, written by each group's first tile
    rstd_ptr,  # float32 (N, G) reciprocal standard deviations
    G,  # groups
    CPG,  # channels per group
    S,  # spatial positions per channel
    stride_n,  # element stride between samples
    stride_c,  # element stride between channels (unused when CHANNELS_LAST: 1)
    stride_s,  # element stride between spatial positions (unused unless CHANNELS_LAST: 1)
    stride_wn,  # element stride between the samples' weights and biases: 0 when shared
    eps,  # added to the variance
    P,  # partials per group
    SPLITS,  # statistics programs per (sample, group block, channel block)
    TILES,  # spatial tiles per statistics program
    HAS_W: tl.constexpr,  # weight given
    HAS_B: tl.constexpr,  # bias given
    SILU: tl.constexpr,  # apply the SiLU
    CHANNELS_LAST: tl.constexpr,  # channels are the unit-stride axis
    BLOCK_G: tl.constexpr,  # groups per tile
    BLOCK_C: tl.constexpr,  # channels per group and tile
    EVEN_C: tl.constexpr,  # every lane of the tile is a channel (see _channels)
    BLOCK_S: tl.constexpr,  # positions per tile
    BLOCK_P: tl.constexpr,  # ≥ P
):
    n, g0, cb, sp = _apply_program(G, CPG, SPLITS, BLOCK_G, BLOCK_C)
    g, g_mask = _groups(g0, G, BLOCK_G)
    parts, p_mask = _partials(part_ptr, n * G + g, P, g_mask, 3, BLOCK_P)
    cnt = tl.load(parts, mask=p_mask, other=0.0)
    mu = tl.load(parts + 1, mask=p_mask, other=0.0)
    count = CPG * S * 1.0
    mean = tl.sum(cnt * mu, axis=1) / count
    dev = mu - mean[:, None]
    m2 = tl.sum(tl.load(parts + 2, mask=p_mask, other=0.0) + cnt * dev * dev, axis=1)
    rstd = tl.rsqrt(m2 / count + eps)
    # the partial means are taken around the group's first element, as is this one
    sample = x_ptr + n.to(tl.int64) * stride_n
    pivot = _pivots(sample, g, g_mask, CPG, stride_c, CHANNELS_LAST)
    first = g_mask & (cb == 0) & (sp == 0)
    tl.store(mean_ptr + n * G + g, pivot + mean, mask=first)
    tl.store(rstd_ptr + n * G + g, rstd, mask=first)

    chan, c_mask = _channels(g0, cb * BLOCK_C, G, CPG, BLOCK_G, BLOCK_C, EVEN_C)
    w, b = _channel_params(w_ptr + n * stride_wn, b_ptr + n * stride_wn, chan, c_mask, HAS_W, HAS_B)
    pivot_c = _spread(pivot, BLOCK_G, BLOCK_C)[:, None]
    mean_c = _spread(mean, BLOCK_G, BLOCK_C)[:, None]
    rstd_c = _spread(rstd, BLOCK_G, BLOCK_C)[:, None]
    out = y_ptr + n.to(tl.int64) * stride_n
    for t in range(0, TILES):
        s = (sp * TILES + TILES - 1 - t) * BLOCK_S + tl.arange(0, BLOCK_S)
        offs = _tile_offsets(chan, s, stride_c, stride_s, CHANNELS_LAST)
        mask = c_mask[:, None] & (s < S)[None, :]
        x = common.load_f32(sample + offs, mask)
        # padded lanes stay at zero rather than at -mean·rstd, which overflows exp for a large mean
        y = _activate(tl.where(mask, (x - pivot_c - mean_c) * rstd_c, 0.0), w, b, SILU)
        tl.store(out + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# backward kernels


@_tuned([])
@triton.jit
def _bwd_onchip_kernel(
    dy_ptr,  # output gradient, x's strides
    x_ptr,  # input, (N, C, S) through the strides below
    dx_ptr,  # input gradient, x's dtype and strides
    w_ptr,  # weight, any float dtype, C per sample (stride_wn apart); read only when HAS_W
    b_ptr,  # bias, as the weight; read only when HAS_B
    mean_ptr,  # float32 (N, G) group means
    rstd_ptr,  # float32 (N, G) reciprocal standard deviations
    dw_ptr,  # float32 (N, C): Σ over positions of dz·xhat, one row per sample
    db_ptr,  # float32 (N, C): Σ over positions of dz
    G,  # groups
    CPG,  # channels per group
    S,  # spatial positions per channel
    C,  # channels
    stride_n,  # element stride between samples
    stride_c,  # element stride between channels (unused when CHANNELS_LAST: 1)
    stride_s,  # element stride between spatial positions (unused unless CHANNELS_LAST: 1)
    stride_wn,  # element stride between the samples' weights and biases: 0 when shared
    HAS_W: tl.constexpr,  # weight given
    HAS_B: tl.constexpr,  # bias given
    SILU: tl.constexpr,  # the forward applied the SiLU
    CHANNELS_LAST: tl.constexpr,  # channels are the unit-stride axis
    BLOCK_G: tl.constexpr,  # groups per tile
    BLOCK_C: tl.constexpr,  # channels per group and tile, ≥ CPG
    EVEN_C: tl.constexpr,  # every lane of the tile is a channel (see _channels)
    BLOCK_S: tl.constexpr,  # positions per tile, ≥ S
):
    n, g0 = _onchip_program(G, BLOCK_G)
    base = n.to(tl.int64) * stride_n
    chan, c_mask = _channels(g0, 0, G, CPG, BLOCK_G, BLOCK_C, EVEN_C)
    g, g_mask = _groups(g0, G, BLOCK_G)
    s = tl.arange(0, BLOCK_S)
    offs = _tile_offsets(chan, s, stride_c, stride_s, CHANNELS_LAST)
    mask = c_mask[:, None] & (s < S)[None, :]
    mean, rstd = _saved_stats(mean_ptr, rstd_ptr, n * G + g, g_mask, BLOCK_G, BLOCK_C)
    x = common.load_f32(x_ptr + base + offs, mask)
    dy = common.load_f32(dy_ptr + base + offs, mask)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    w, b = _channel_params(w_ptr + n * stride_wn, b_ptr + n * stride_wn, chan, c_mask, HAS_W, HAS_B)
    dz = _grad_pre(dy, xhat, w, b, SILU)
    dw = tl.sum(dz * xhat, axis=1)
    db = tl.sum(dz, axis=1)
    tl.store(dw_ptr + n * C + chan, dw, mask=c_mask)
    tl.store(db_ptr + n * C + chan, db, mask=c_mask)
    count = CPG * S * 1.0
    mean_g = _spread(_group_sum(w * db, BLOCK_G, BLOCK_C) / count, BLOCK_G, BLOCK_C)[:, None]
    mean_gx = _spread(_group_sum(w * dw, BLOCK_G, BLOCK_C) / count, BLOCK_G, BLOCK_C)[:, None]
    dx = rstd * (dz * w[:, None] - mean_g - xhat * mean_gx)
    tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@_tuned(["SPLITS", "TILES"])
@triton.jit
def _bwd_partial_kernel(
    dy_ptr,  # output gradient, x's strides
    x_ptr,  # input, (N, C, S) through the strides below
    w_ptr,  # weight, any float dtype, C per sample (stride_wn apart); read only when HAS_W
    b_ptr,  # bias, as the weight; read only when HAS_B
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
    stride_c,  # element stride between channels (unused when CHANNELS_LAST: 1)
    stride_s,  # element stride between spatial positions (unused unless CHANNELS_LAST: 1)
    stride_wn,  # element stride between the samples' weights and biases: 0 when shared
    SPLITS,  # programs per (sample, group block, channel block)
    TILES,  # consecutive spatial tiles per program
    HAS_W: tl.constexpr,  # weight given
    HAS_B: tl.constexpr,  # bias given
    SILU: tl.constexpr,  # the forward applied the SiLU
    CHANNELS_LAST: tl.constexpr,  # channels are the unit-stride axis
    BLOCK_G: tl.constexpr,  # groups per tile
    BLOCK_C: tl.constexpr,  # channels per group and tile
    EVEN_C: tl.constexpr,  # every lane of the tile is a channel (see _channels)
    BLOCK_S: tl.constexpr,  # positions per tile
):
    n, g0, cb, sp = _split_lane(tl.program_id(0), G, CPG, SPLITS, BLOCK_G, BLOCK_C)
    base = n.to(tl.int64) * stride_n
    first = sp * TILES * BLOCK_S
    chan, c_mask = _channels(g0, cb * BLOCK_C, G, CPG, BLOCK_G, BLOCK_C, EVEN_C)
    g, g_mask = _groups(g0, G, BLOCK_G)
    mean, rstd = _saved_stats(mean_ptr, rstd_ptr, n * G + g, g_mask, BLOCK_G, BLOCK_C)
    w, b = _channel_params(w_ptr + n * stride_wn, b_ptr + n * stride_wn, chan, c_mask, HAS_W, HAS_B)
    # tiles summed elementwise in the loop and reduced once after it: a reduction inside the loop makes
    # Triton 3.6's sm_90 pipeline fail (TritonGPUOptimizeThreadLocality) for narrow float32 tiles
    dw_tile = tl.zeros((BLOCK_G * BLOCK_C, BLOCK_S), dtype=tl.float32)
    db_tile = tl.zeros((BLOCK_G * BLOCK_C, BLOCK_S), dtype=tl.float32)
    for t in range(0, TILES):
        s = first + t * BLOCK_S + tl.arange(0, BLOCK_S)
        offs = _tile_offsets(chan, s, stride_c, stride_s, CHANNELS_LAST)
        mask = c_mask[:, None] & (s < S)[None, :]
        x = common.load_f32(x_ptr + base + offs, mask)
        dy = common.load_f32(dy_ptr + base + offs, mask)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        dz = _grad_pre(dy, xhat, w, b, SILU)
        dw_tile += dz * xhat
        db_tile += dz
    dw = tl.sum(dw_tile, axis=1)
    db = tl.sum(db_tile, axis=1)
    row = n * SPLITS + sp
    tl.store(dw_ptr + row * C + chan, dw, mask=c_mask)
    tl.store(db_ptr + row * C + chan, db, mask=c_mask)
    out = part_ptr + ((n * G + g) * (tl.cdiv(CPG, BLOCK_C) * SPLITS) + cb * SPLITS + sp) * 2
    tl.store(out, _group_sum(w * db, BLOCK_G, BLOCK_C), mask=g_mask)
    tl.store(out + 1, _group_sum(w * dw, BLOCK_G, BLOCK_C), mask=g_mask)


@_tuned(["P", "TILES"])
@triton.jit
def _bwd_apply_kernel(
    dy_ptr,  # output gradient, x's strides
    x_ptr,  # input, (N, C, S) through the strides below
    dx_ptr,  # input gradient, x's dtype and strides
    w_ptr,  # weight, any float dtype, C per sample (stride_wn apart); read only when HAS_W
    b_ptr,  # bias, as the weight; read only when HAS_B
    mean_ptr,  # float32 (N, G) group means
    rstd_ptr,  # float32 (N, G) reciprocal standard deviations
    part_ptr,  # float32 (N·G, P, 2) partial sums from _bwd_partial_kernel
    G,  # groups
    CPG,  # channels per group
    S,  # spatial positions per channel
    stride_n,  # element stride between samples
    stride_c,  # element stride between channels (unused when CHANNELS_LAST: 1)
    stride_s,  # element stride between spatial positions (unused unless CHANNELS_LAST: 1)
    stride_wn,  # element stride between the samples' weights and biases: 0 when shared
    P,  # partials per group
    SPLITS,  # statistics programs per (sample, group block, channel block)
    TILES,  # spatial tiles per statistics program
    HAS_W: tl.constexpr,  # weight given
    HAS_B: tl.constexpr,  # bias given
    SILU: tl.constexpr,  # the forward applied the SiLU
    CHANNELS_LAST: tl.constexpr,  # channels are the unit-stride axis
    BLOCK_G: tl.constexpr,  # groups per tile
    BLOCK_C: tl.constexpr,  # channels per group and tile
    EVEN_C: tl.constexpr,  # every lane of the tile is a channel (see _channels)
    BLOCK_S: tl.constexpr,  # positions per tile
    BLOCK_P: tl.constexpr,  # ≥ P
):
    n, g0, cb, sp = _apply_program(G, CPG, SPLITS, BLOCK_G, BLOCK_C)
    g, g_mask = _groups(g0, G, BLOCK_G)
    parts, p_mask = _partials(part_ptr, n * G + g, P, g_mask, 2, BLOCK_P)
    count = CPG * S * 1.0
    mean_g = _spread(tl.sum(tl.load(parts, mask=p_mask, other=0.0), axis=1) / count, BLOCK_G, BLOCK_C)[:, None]
    mean_gx = _spread(tl.sum(tl.load(parts + 1, mask=p_mask, other=0.0), axis=1) / count, BLOCK_G,
                      BLOCK_C)[:, None]
    mean, rstd = _saved_stats(mean_ptr, rstd_ptr, n * G + g, g_mask, BLOCK_G, BLOCK_C)

    base = n.to(tl.int64) * stride_n
    chan, c_mask = _channels(g0, cb * BLOCK_C, G, CPG, BLOCK_G, BLOCK_C, EVEN_C)
    w, b = _channel_params(w_ptr + n * stride_wn, b_ptr + n * stride_wn, chan, c_mask, HAS_W, HAS_B)
    for t in range(0, TILES):
        s = (sp * TILES + TILES - 1 - t) * BLOCK_S + tl.arange(0, BLOCK_S)
        offs = _tile_offsets(chan, s, stride_c, stride_s, CHANNELS_LAST)
        mask = c_mask[:, None] & (s < S)[None, :]
        x = common.load_f32(x_ptr + base + offs, mask)
        dy = common.load_f32(dy_ptr + base + offs, mask)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        dz = _grad_pre(dy, xhat, w, b, SILU)
        dx = rstd * (dz * w[:, None] - mean_g - xhat * mean_gx)
        tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# layout


def ncs_layout(t: Tensor) -> Optional[tuple[bool, int, int, int]]:
    """(channels_last, stride_n, stride_c, stride_s) of t (N, C, *spatial) viewed as (N, C, S), or None
    when there is no such view with a unit channel or spatial stride.

    channels_last means the channel stride is 1 (and is reported as 0), else the spatial stride is 1
    (reported as 0); strides of size-1 axes do not matter and read 0."""
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


def kernel_buffers(x: Tensor) -> tuple[Tensor, Tensor, Tensor, tuple]:
    """(x for the kernels, the output the caller gets, the buffer the kernels write, their layout).

    The output is ``empty_like(x)`` (x's memory format, as the ops' fake kernels promise). When x or that
    output cannot be addressed as (N, C, S) with shared strides, the kernels run on a contiguous copy
    and the result is copied into the output."""
    out = torch.empty_like(x)
    layout = ncs_layout(x)
    if layout is not None and ncs_layout(out) == layout:
        return x, out, out, layout
    x = x.contiguous()
    return x, out, torch.empty_like(x), ncs_layout(x)


def in_layout(t: Tensor, work: Tensor, layout: tuple) -> Tensor:
    """t with the (N, C, S) strides of ``work``: itself when it has them, else a copy."""
    if ncs_layout(t) == layout:
        return t
    return torch.empty_like(work).copy_(t)


# --------------------------------------------------------------------------------------------------
# launch functions


def check_x(x: Tensor, num_groups: int) -> tuple[int, int, int]:
    """(N, C, S) of x, checked for the kernels."""
    if x.dim() < 2 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty (N, C, *spatial) tensor, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    n, c = x.shape[:2]
    if num_groups <= 0 or c % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must be positive and divide the channel count C = {c}")
    s = x.numel() // (n * c)
    if c * s > _MAX_SAMPLE:
        raise ValueError(f"one sample of x holds {c * s} elements, more than 32-bit indices address")
    return n, c, s


def _plan_for(plan: Optional[Plan], n: int, c: int, s: int, groups: int, channels_last: bool,
              device: torch.device, backward: bool) -> Plan:
    """``plan``, checked to cover a group of (C / groups) × S, or the one :func:`choose_plan` picks."""
    if plan is None:
        return choose_plan(n, c, s, groups, backward=backward, channels_last=channels_last, device=device)
    cpg = c // groups
    for name in ("block_c", "block_s", "block_g"):
        value = getattr(plan, name)
        if value < 1 or value & (value - 1):
            raise ValueError(f"plan.{name} must be a power of two, got {value}")
    if plan.block_g > 1 and plan.block_c < cpg:
        raise ValueError(f"{plan} puts several groups in a tile, so block_c must cover a group of {cpg} channels")
    if plan.onchip:
        covered = plan.block_c >= cpg and plan.block_s >= s
    else:
        covered = plan.splits >= 1 and plan.tiles >= 1 and plan.splits * plan.tiles * plan.block_s >= s
    if not covered:
        raise ValueError(f"{plan} does not cover a group of {cpg} channels × {s} positions")
    return plan


def _param(p: Optional[Tensor], placeholder: Tensor) -> tuple[Tensor, bool]:
    """A parameter ready for the kernels (any float dtype, unit channel stride) and whether it was given;
    a missing one is replaced by ``placeholder``, a pointer the kernels never read."""
    if p is None:
        return placeholder, False
    return p.contiguous(), True


def _tiles(plan: Plan, cpg: int, groups: int, channels_last: bool) -> dict:
    """The tile constants of the kernels for ``plan``."""
    even = cpg % plan.block_c == 0 and groups % plan.block_g == 0 and (plan.block_g == 1 or plan.block_c == cpg)
    return dict(CHANNELS_LAST=channels_last, BLOCK_G=plan.block_g, BLOCK_C=plan.block_c, EVEN_C=even,
                BLOCK_S=plan.block_s)


def normalize_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int, eps: float,
                  silu: bool, plan: Optional[Plan] = None, *, per_sample: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """The forward kernels: y, float32 (N, num_groups) mean and rstd.

    ``per_sample``: weight and bias are (N, C), one row per sample (AdaIN), else (C,). Checks x as
    :func:`group_norm_silu_fwd` does; the caller checks the parameters' shapes."""
    n, c, s = check_x(x, num_groups)
    cpg = c // num_groups
    x, y, work, (channels_last, sn, sc, ss) = kernel_buffers(x)
    plan = _plan_for(plan, n, c, s, num_groups, channels_last, x.device, backward=False)
    mean = x.new_empty((n, num_groups), dtype=torch.float32)
    rstd = torch.empty_like(mean)
    w, has_w = _param(weight, mean)
    b, has_b = _param(bias, mean)
    shape = dict(G=num_groups, CPG=cpg, S=s, stride_n=sn, stride_c=sc, stride_s=ss)
    tiles = _tiles(plan, cpg, num_groups, channels_last)
    flags = dict(HAS_W=has_w, HAS_B=has_b, SILU=bool(silu), **tiles)
    stride_wn = c if per_sample else 0
    group_blocks = triton.cdiv(num_groups, plan.block_g)
    if plan.onchip:
        _fwd_onchip_kernel[(n * group_blocks,)](x, work, w, b, mean, rstd, **shape, stride_wn=stride_wn, eps=eps,
                                                **flags)
    else:
        parts = triton.cdiv(cpg, plan.block_c) * plan.splits
        partials = x.new_empty((n * num_groups, parts, 3), dtype=torch.float32)
        lanes = n * group_blocks * parts
        _fwd_partial_kernel[(lanes,)](x, partials, **shape, SPLITS=plan.splits, TILES=plan.tiles, **tiles)
        _fwd_apply_kernel[(lanes,)](
            x, work, w, b, partials, mean, rstd, **shape, stride_wn=stride_wn, eps=eps, P=parts, SPLITS=plan.splits,
            TILES=plan.tiles, **flags, BLOCK_P=triton.next_power_of_2(parts))
    if work is not y:
        y.copy_(work)
    return y, mean, rstd


def normalize_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                  rstd: Tensor, num_groups: int, silu: bool, plan: Optional[Plan] = None, *,
                  per_sample: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """The backward kernels: dx and float32 (N, C) per-sample Σ dz·xhat and Σ dz (the gradients of a
    per-sample weight and bias; GroupNorm's are their sums over N).

    ``per_sample`` as for :func:`normalize_fwd`. Checks as :func:`group_norm_silu_bwd` does."""
    n, c, s = check_x(x, num_groups)
    cpg = c // num_groups
    if dy.shape != x.shape:
        raise ValueError(f"dy must have x's shape {tuple(x.shape)}, got {tuple(dy.shape)}")
    for name, stat in (("mean", mean), ("rstd", rstd)):
        if tuple(stat.shape) != (n, num_groups):
            raise ValueError(f"{name} must have shape {(n, num_groups)}, got {tuple(stat.shape)}")
    x, dx, work, layout = kernel_buffers(x)
    channels_last, sn, sc, ss = layout
    dy = in_layout(dy, work, layout)
    mean, rstd = mean.float().contiguous(), rstd.float().contiguous()
    plan = _plan_for(plan, n, c, s, num_groups, channels_last, x.device, backward=True)
    w, has_w = _param(weight, mean)
    b, has_b = _param(bias, mean)
    # per-program partial sums of dweight and dbias, one row per sample (and split)
    rows = 1 if plan.onchip else plan.splits
    dw_rows = x.new_empty((n * rows, c), dtype=torch.float32)
    db_rows = torch.empty_like(dw_rows)
    shape = dict(G=num_groups, CPG=cpg, S=s, stride_n=sn, stride_c=sc, stride_s=ss, stride_wn=c if per_sample else 0)
    flags = dict(HAS_W=has_w, HAS_B=has_b, SILU=bool(silu), **_tiles(plan, cpg, num_groups, channels_last))
    group_blocks = triton.cdiv(num_groups, plan.block_g)
    if plan.onchip:
        _bwd_onchip_kernel[(n * group_blocks,)](dy, x, work, w, b, mean, rstd, dw_rows, db_rows, C=c, **shape,
                                                **flags)
    else:
        parts = triton.cdiv(cpg, plan.block_c) * plan.splits
        partials = x.new_empty((n * num_groups, parts, 2), dtype=torch.float32)
        lanes = n * group_blocks * parts
        _bwd_partial_kernel[(lanes,)](
            dy, x, w, b, mean, rstd, dw_rows, db_rows, partials, C=c, **shape,
            SPLITS=plan.splits, TILES=plan.tiles, **flags)
        _bwd_apply_kernel[(lanes,)](
            dy, x, work, w, b, mean, rstd, partials, **shape, P=parts, SPLITS=plan.splits, TILES=plan.tiles, **flags,
            BLOCK_P=triton.next_power_of_2(parts))
    if work is not dx:
        dx.copy_(work)
    if rows > 1:
        return dx, dw_rows.view(n, rows, c).sum(1), db_rows.view(n, rows, c).sum(1)
    return dx, dw_rows, db_rows


def group_norm_silu_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int, eps: float,
                        silu: bool, *, plan: Optional[Plan] = None) -> tuple[Tensor, Tensor, Tensor]:
    """GroupNorm forward, with the SiLU when ``silu``.

    x: non-empty (N, C, *spatial) float32/float16/bfloat16; weight, bias: (C,) of any float dtype, or
    None. Returns y (x's shape, dtype and memory format) and float32 (N, num_groups) mean and rstd.
    ``plan`` overrides :func:`choose_plan`. Raises ValueError when num_groups does not divide C, x is
    empty, one sample exceeds 2³¹ - 1 elements or the plan does not cover a group, and TypeError for
    another dtype.
    """
    return normalize_fwd(x, weight, bias, num_groups, eps, silu, plan)


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
    dx, dw, db = normalize_bwd(dy, x, weight, bias, mean, rstd, num_groups, silu, plan)
    return dx, dw.sum(0), db.sum(0)


__all__ = ["group_norm_silu_fwd", "group_norm_silu_bwd", "choose_plan", "Plan", "ONCHIP_ELEMENTS",
           "normalize_fwd", "normalize_bwd"]

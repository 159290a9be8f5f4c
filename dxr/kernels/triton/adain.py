"""AdaIN in Triton, forward and backward, on the GroupNorm kernels.

AdaIN normalises each (sample, channel) row over the spatial dims and applies a per-sample affine:
``y = (x - mean) · rstd · scale + shift`` with scale and shift (N, C). That is GroupNorm with one channel
per group and an affine that changes from sample to sample, so it runs on the kernels of
:mod:`dxr.kernels.triton.group_norm_silu` (their layouts, their on-chip and split paths, statistics around
each row's first element, deterministic partial sums); the per-sample Σ dy·x̂ and Σ dy rows the GroupNorm
backward builds are dscale and dshift. What is AdaIN's own is the choice of tiles for rows, which are
short and many where a GroupNorm group is long and few: :class:`AdainConfig` and :func:`choose_config`.
A program takes ``block_c`` rows (channels) of one sample: on channels-last input 64 neighbouring
channels, so every pixel is read as one 128-byte run for half types.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
from torch import Tensor

from dxr.kernels.triton import group_norm_silu as norm
# the kernels' tile addressing, 64-bit (see its docstring)
from dxr.kernels.triton.group_norm_silu import _tile_offsets  # noqa: F401

# elements of one (BLOCK_C, BLOCK_S) tile kept on chip: GroupNorm's limits (the same kernels), within which
# every warp count the autotuner keeps compiles without a spill
_ON_CHIP_FWD = norm.ONCHIP_ELEMENTS["forward"]
_ON_CHIP_BWD = norm.ONCHIP_ELEMENTS["backward"]
# elements of one step of the split path's loop
_LOOP_TILE = 4096
# a program of short rows takes several of them, up to this many elements
_MIN_TILE = 1024
# channels per program in channels_last: 64 contiguous values make full-width memory transactions; an
# on-chip tile of long rows takes fewer, down to 16 (32 bytes of half precision per pixel)
_CL_BLOCK_C = 64
_CL_MIN_BLOCK_C = 16
# the apply kernels hold a (BLOCK_C, splits) tile of partials
_PARTIALS_TILE = 4096
_MAX_SPLITS = 512
# one sample holds fewer elements than this
_MAX_SAMPLE = 2**31 - 1


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
    limit = _ON_CHIP_BWD if backward else _ON_CHIP_FWD
    if channels_last:
        block_c = min(c2, _CL_BLOCK_C)
        while block_c > _CL_MIN_BLOCK_C and block_c * s2 > limit:
            block_c //= 2
    else:
        block_c = min(c2, max(1, _MIN_TILE // s2))
    on_chip_rows = n * triton.cdiv(c, block_c)
    fits = block_c * s2 <= limit
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


def _check_size(x: Tensor) -> None:
    if x.numel() // max(x.shape[0], 1) > _MAX_SAMPLE:
        raise ValueError(f"one sample of x must hold fewer than 2**31 elements, got shape {tuple(x.shape)}")


def _chunking(s: int, cfg: AdainConfig) -> tuple[int, int]:
    """(chunk length, number of chunks): chunks are whole loop steps and none is empty."""
    chunk = triton.cdiv(triton.cdiv(s, cfg.splits), cfg.block_s) * cfg.block_s
    return chunk, triton.cdiv(s, chunk)


def _plan(s: int, cfg: AdainConfig) -> norm.Plan:
    """The GroupNorm kernels' plan for ``cfg``: one channel per group, ``block_c`` groups per tile."""
    if not cfg.split:
        return norm.Plan(True, 1, cfg.block_s, 1, 1, block_g=cfg.block_c)
    chunk, splits = _chunking(s, cfg)
    return norm.Plan(False, 1, cfg.block_s, splits, chunk // cfg.block_s, block_g=cfg.block_c)


def _launch_plan(x: Tensor, config: Optional[AdainConfig], backward: bool) -> norm.Plan:
    if x.dim() < 3:
        raise ValueError(f"x must be (N, C, *spatial) with at least one spatial dim, got shape {tuple(x.shape)}")
    _check_size(x)
    n, c, s = norm.check_x(x, x.shape[1])
    layout = norm.ncs_layout(x)
    channels_last = bool(layout and layout[0])
    cfg = config or choose_config(n, c, s, channels_last, x.device, backward=backward)
    cfg.check(s)
    return _plan(s, cfg)


def adain_fwd(x: Tensor, scale: Tensor, shift: Tensor, eps: float,
              config: Optional[AdainConfig] = None) -> tuple[Tensor, Tensor, Tensor]:
    """AdaIN forward: ``y = (x - mean) * rstd * scale + shift`` per (n, c) over the spatial dims.

    x: (N, C, *spatial), at least one spatial dim, float32/float16/bfloat16, NCHW-contiguous or
    channels_last natively (any other layout is made contiguous first). scale, shift: (N, C), any float
    dtype, read as float32. Returns y (x's dtype and memory format) and float32 (N, C) ``mean`` and
    ``rstd = 1 / sqrt(var + eps)``, var biased. ``config`` forces the tiling (see :class:`AdainConfig`).
    Raises ValueError for a config that cannot run or a sample of 2**31 elements or more.
    """
    plan = _launch_plan(x, config, backward=False)
    return norm.normalize_fwd(x, scale, shift, x.shape[1], eps, False, plan, per_sample=True)


def adain_bwd(dy: Tensor, x: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor,
              config: Optional[AdainConfig] = None) -> tuple[Tensor, Tensor, Tensor]:
    """AdaIN backward from the forward's float32 (N, C) ``mean`` and ``rstd``.

    With x̂ = (x - mean)·rstd, per (n, c) over the spatial dims:
    ``dx = rstd·scale·(dy - mean(dy) - x̂·mean(dy·x̂))``, ``dscale = Σ dy·x̂``, ``dshift = Σ dy``.
    dy: x's shape, any float dtype and layout (brought to x's layout). x and scale as in
    :func:`adain_fwd`. Returns dx (x's dtype and memory format) and float32 (N, C) dscale, dshift.
    Raises ValueError as :func:`adain_fwd` does.
    """
    plan = _launch_plan(x, config, backward=True)
    return norm.normalize_bwd(dy, x, scale, None, mean, rstd, x.shape[1], False, plan, per_sample=True)


__all__ = ["AdainConfig", "choose_config", "adain_fwd", "adain_bwd"]

"""The denoising UNet of DDPM-LQ (unconditional) and DDPM-HQ / bicubic-DDPM (conditional, SR3-style).

A timestep-conditioned UNet in the layout of Ho et al. 2020 and Dhariwal & Nichol 2021: a sinusoidal
embedding of t through a two-layer MLP; at each resolution ``num_res_blocks`` residual blocks (optionally
followed by self-attention) and a stride-2 convolution down, a middle of residual–attention–residual,
then the mirror path up with skip connections. The conditional model takes the low-quality image
concatenated to x_t on the channel axis (``cond_channels``), as SR3 does.

Every normalisation is a ``dxr.nn`` module and every attention ``dxr.nn.SelfAttention2d``, so the fused
GroupNorm+SiLU and attention kernels are chosen by one ``backend`` argument.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dxr.nn import GroupNorm, GroupNormSiLU, SelfAttention2d


@dataclass
class UNetConfig:
    """Architecture of :class:`UNet`; ``asdict`` of it is what checkpoints record."""

    in_channels: int = 1
    out_channels: Optional[int] = None  # None: same as in_channels
    cond_channels: int = 0  # channels of the conditioning image concatenated to x_t (0: unconditional)
    base_channels: int = 64
    channel_mult: tuple = (1, 2, 2, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple = (16,)  # feature-map sizes (pixels) that get self-attention
    image_size: int = 64
    dropout: float = 0.0
    num_head_channels: int = 64
    num_groups: int = 32
    scale_shift: bool = True  # time embedding as GroupNorm scale and shift (else added to the features)

    def __post_init__(self):
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.attention_resolutions = tuple(int(r) for r in self.attention_resolutions)

    @property
    def size_multiple(self) -> int:
        """Image height and width must be multiples of this: each level below the first halves them."""
        return 2 ** (len(self.channel_mult) - 1)

    def validate(self) -> None:
        """Raise ValueError, naming the setting, for an architecture that cannot be built."""
        for name in ("in_channels", "base_channels", "num_res_blocks", "num_groups", "num_head_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"unet.{name} must be >= 1, got {getattr(self, name)}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"unet.channel_mult must be one or more multipliers >= 1, got {self.channel_mult}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"unet.dropout must be in [0, 1), got {self.dropout}")
        widths = [self.base_channels * m for m in self.channel_mult]
        for width in widths:
            if width % self.num_groups:
                raise ValueError(f"unet.num_groups ({self.num_groups}) must divide every level's channel count "
                                 f"(unet.base_channels x unet.channel_mult = {widths})")
        # self-attention runs at the listed resolutions and in the middle (the last level)
        attended = [w for level, w in enumerate(widths) if self.image_size // 2 ** level in self.attention_resolutions]
        for width in attended + widths[-1:]:
            if width % self.num_head_channels:
                raise ValueError(f"unet.num_head_channels ({self.num_head_channels}) must divide the channel count "
                                 f"{width} of every level with self-attention")


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (N, dim) float32 of timesteps t (N,): cosines then sines of t·ω_k,
    with ω_k spaced geometrically from 1 down to 1/max_period."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(embedding, (0, dim % 2))


class ResBlock(nn.Module):
    """GroupNorm+SiLU → conv → (time embedding) → GroupNorm(+SiLU) → dropout → conv, plus a skip."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *, dropout: float, num_groups: int,
                 scale_shift: bool, backend: Optional[str]):
        super().__init__()
        self.scale_shift = scale_shift
        self.in_norm = GroupNormSiLU(num_groups, in_channels, backend=backend)
        self.in_conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_channels, 2 * out_channels if scale_shift else out_channels)
        # with scale-shift the SiLU must follow the modulation, so the norm cannot fuse it
        self.out_norm = (GroupNorm if scale_shift else GroupNormSiLU)(num_groups, out_channels, backend=backend)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)  # a new block starts as its skip path
        nn.init.zeros_(self.out_conv.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_conv(self.in_norm(x))
        e = self.emb(emb)[:, :, None, None].to(h.dtype)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = F.silu(self.out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_norm(h + e)
        return self.skip(x) + self.out_conv(self.dropout(h))


class ResAttentionBlock(nn.Module):
    """A :class:`ResBlock`, followed by self-attention when ``attention``."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *, attention: bool,
                 num_head_channels: int, dropout: float, num_groups: int, scale_shift: bool, backend: Optional[str]):
        super().__init__()
        self.res = ResBlock(in_channels, out_channels, emb_channels, dropout=dropout, num_groups=num_groups,
                            scale_shift=scale_shift, backend=backend)
        self.attention = (SelfAttention2d(out_channels, num_head_channels, num_groups, backend=backend)
                          if attention else nn.Identity())

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.attention(self.res(x, emb))


class Downsample(nn.Module):
    """Stride-2 3×3 convolution (the time embedding is not used)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2 then a 3×3 convolution (the time embedding is not used)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """Timestep-conditioned UNet: ``forward(x, t, cond=None)`` → a tensor of x's shape with out_channels.

    x: (N, in_channels, H, W) with H and W divisible by 2^(len(channel_mult) - 1); t: (N,) integer or
    float timesteps on x's device; cond: (N, cond_channels, H, W) when ``cond_channels > 0`` (the SR3
    conditioning image), else None. float32/float16/bfloat16 parameters (or autocast). ``backend``
    picks the kernels of every GroupNorm(+SiLU) and attention in the network.

    Raises ValueError at construction for channel counts that ``num_groups`` or ``num_head_channels``
    do not divide, and at call time for a wrong channel count, a missing or unexpected ``cond``, or a
    spatial size the down-sampling path cannot halve.
    """

    def __init__(self, config: Optional[UNetConfig] = None, *, backend: Optional[str] = None, **overrides):
        super().__init__()
        config = UNetConfig(**{**(asdict(config) if config else {}), **overrides})
        self.config, self.backend = config, backend
        c = config
        c.validate()
        widths = [c.base_channels * m for m in c.channel_mult]
        block = dict(num_head_channels=c.num_head_channels, dropout=c.dropout, num_groups=c.num_groups,
                     scale_shift=c.scale_shift, backend=backend)
        emb_channels = 4 * c.base_channels
        self.time_embed = nn.Sequential(nn.Linear(c.base_channels, emb_channels), nn.SiLU(),
                                        nn.Linear(emb_channels, emb_channels))
        self.input = nn.Conv2d(c.in_channels + c.cond_channels, c.base_channels, 3, padding=1)

        channels, resolution, skips = c.base_channels, c.image_size, [c.base_channels]
        self.down = nn.ModuleList()
        for level, width in enumerate(widths):
            for _ in range(c.num_res_blocks):
                self.down.append(ResAttentionBlock(channels, width, emb_channels,
                                                   attention=resolution in c.attention_resolutions, **block))
                channels = width
                skips.append(channels)
            if level < len(widths) - 1:
                self.down.append(Downsample(channels))
                skips.append(channels)
                resolution //= 2
        self.middle = nn.ModuleList([
            ResAttentionBlock(channels, channels, emb_channels, attention=True, **block),
            ResAttentionBlock(channels, channels, emb_channels, attention=False, **block),
        ])
        self.up = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            for _ in range(c.num_res_blocks + 1):
                self.up.append(ResAttentionBlock(channels + skips.pop(), width, emb_channels,
                                                 attention=resolution in c.attention_resolutions, **block))
                channels = width
            if level > 0:
                self.up.append(Upsample(channels))
                resolution *= 2
        self.out_norm = GroupNormSiLU(c.num_groups, channels, backend=backend)
        self.out = nn.Conv2d(channels, c.out_channels or c.in_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)  # the untrained model predicts zero noise
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        c = self.config
        if x.dim() != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"x must have shape (N, {c.in_channels}, H, W), got {tuple(x.shape)}")
        factor = 2 ** (len(c.channel_mult) - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"x's height and width must be multiples of {factor} for {len(c.channel_mult)} "
                             f"levels, got {tuple(x.shape[2:])}")
        if c.cond_channels:
            if cond is None or tuple(cond.shape) != (x.shape[0], c.cond_channels, *x.shape[2:]):
                got = None if cond is None else tuple(cond.shape)
                raise ValueError(f"cond must have shape {(x.shape[0], c.cond_channels, *x.shape[2:])}, got {got}")
            x = torch.cat([x, cond.to(x.dtype)], dim=1)
        elif cond is not None:
            raise ValueError("cond was given to an unconditional UNet (cond_channels=0)")
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        emb = F.silu(self.time_embed(timestep_embedding(t, c.base_channels).to(self.input.weight.dtype)))

        h = self.input(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        for block in self.middle:
            h = block(h, emb)
        for block in self.up:
            if isinstance(block, ResAttentionBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb)
        return self.out(self.out_norm(h))


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__ = ["UNet", "UNetConfig", "timestep_embedding", "count_parameters"]

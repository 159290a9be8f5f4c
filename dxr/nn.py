"""Modules on the fused ops: drop-in GroupNorm, GroupNorm+SiLU, AdaIN and SelfAttention2d.

``GroupNorm`` has the constructor and state_dict keys of ``torch.nn.GroupNorm``, so checkpoints load
interchangeably between the two.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from dxr import ops


class GroupNorm(nn.GroupNorm):
    """``torch.nn.GroupNorm`` computed by the fused kernel (same arguments, parameters and state_dict)."""

    fuse_silu = False

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None, *, backend: Optional[str] = None):
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        return ops.group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps, silu=self.fuse_silu,
                                   backend=self.backend)

    def extra_repr(self) -> str:
        backend = f", backend={self.backend!r}" if self.backend else ""
        return super().extra_repr() + backend


class GroupNormSiLU(GroupNorm):
    """``SiLU(GroupNorm(x))`` in one pass; parameters and state_dict as ``torch.nn.GroupNorm``."""

    fuse_silu = True


class AdaIN(nn.Module):
    """Adaptive instance norm with the per-sample affine parameters given at call time.

    ``forward(x, scale, shift)``: x (N, C, *spatial), scale and shift (N, C).
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, *, backend: Optional[str] = None):
        super().__init__()
        self.num_channels, self.eps, self.backend = num_channels, eps, backend

    def forward(self, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        if x.dim() >= 2 and x.shape[1] != self.num_channels:
            raise ValueError(f"x has {x.shape[1]} channels but this AdaIN was built for {self.num_channels}")
        return ops.adain(x, scale, shift, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}"


class SelfAttention2d(nn.Module):
    """Self-attention over the pixels of a feature map, as diffusion UNets use it.

    ``x + proj(attention(qkv(GroupNorm(x))))``: GroupNorm → 1×1 conv to q, k, v (channels ordered
    [q | k | v], each split into heads of ``num_head_channels``) → ``dxr.ops.attention`` over the H·W
    positions → 1×1 conv ``proj``, zero-initialised so a new block is the identity → residual.

    x: (N, channels, H, W) float32/float16/bfloat16 (float64 takes the reference); the output has x's
    shape and dtype. Raises ValueError when ``num_head_channels`` does not divide ``channels`` or
    ``num_groups`` does not divide ``channels``, and when x's channel count differs from ``channels``.
    """

    def __init__(self, channels: int, num_head_channels: int = 64, num_groups: int = 32,
                 backend: Optional[str] = None):
        super().__init__()
        if num_head_channels <= 0 or channels % num_head_channels:
            raise ValueError(f"num_head_channels ({num_head_channels}) must be positive and divide "
                             f"channels ({channels})")
        if num_groups <= 0 or channels % num_groups:
            raise ValueError(f"num_groups ({num_groups}) must be positive and divide channels ({channels})")
        self.channels, self.num_heads, self.backend = channels, channels // num_head_channels, backend
        self.norm = GroupNorm(num_groups, channels, backend=backend)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must have shape (N, {self.channels}, H, W), got {tuple(x.shape)}")
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x))
        # (N, 3, heads, head_dim, H·W) → three (N, heads, H·W, head_dim) views
        q, k, v = qkv.reshape(n, 3, self.num_heads, c // self.num_heads, h * w).transpose(-1, -2).unbind(1)
        out = ops.attention(q, k, v, backend=self.backend)
        return x + self.proj(out.transpose(-1, -2).reshape(n, c, h, w))

    def extra_repr(self) -> str:
        backend = f", backend={self.backend!r}" if self.backend else ""
        return f"{self.channels}, num_heads={self.num_heads}{backend}"


__all__ = ["GroupNorm", "GroupNormSiLU", "AdaIN", "SelfAttention2d"]

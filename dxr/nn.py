"""Modules on the fused ops: drop-in GroupNorm, GroupNorm+SiLU and AdaIN.

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


__all__ = ["GroupNorm", "GroupNormSiLU", "AdaIN"]

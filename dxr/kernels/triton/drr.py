"""Fused DRR ray marching in Triton: every ray walks the plane stack with one bilinear lookup per plane.

One program owns ``BLOCK`` rays (consecutive detector pixels of one row, so neighbouring lanes read
neighbouring voxels); the line integral stays in registers and is written once. Attenuation planes
may be float32, float16 or bfloat16; they are loaded and converted to float32 at once.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl
from torch import Tensor

from dxr.kernels.triton import common

_MAX_RAYS = 1 << 28

if common.interpreting():
    _CONFIGS = [triton.Config({"BLOCK": 256}, num_warps=4)]
else:
    _CONFIGS = [
        triton.Config({"BLOCK": block}, num_warps=warps)
        for block in (64, 128, 256)
        for warps in (2, 4, 8)
        if block // (32 * warps) >= 1
    ]


@common.autotune(_CONFIGS, ["n_planes", "n_b", "n_c"])
# a plane dimension of 1 would be specialised to a constant, which has no .to(): keep them runtime ints
@triton.jit(do_not_specialize=["n_b", "n_c"])
def drr_march_kernel(
    planes_ptr,  # (n_planes, n_b, n_c) contiguous attenuation planes, 1/mm
    rays_ptr,  # (6, n_rays) float32 rows: b0, db, c0, dc, k_min, k_max
    step_ptr,  # (n_rays,) float32 path length per sample, mm
    out_ptr,  # (n_rays,) float32 line integrals
    n_rays,  # number of rays (B·H·W)
    n_planes,  # planes swept per ray
    n_b,  # plane rows (the strided in-plane axis)
    n_c,  # plane columns (the contiguous in-plane axis)
    BLOCK: tl.constexpr,  # rays per program
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    live = offs < n_rays
    b0 = tl.load(rays_ptr + offs, mask=live, other=0.0)
    db = tl.load(rays_ptr + n_rays + offs, mask=live, other=0.0)
    c0 = tl.load(rays_ptr + 2 * n_rays + offs, mask=live, other=0.0)
    dc = tl.load(rays_ptr + 3 * n_rays + offs, mask=live, other=0.0)
    k_min = tl.load(rays_ptr + 4 * n_rays + offs, mask=live, other=0.0)
    k_max = tl.load(rays_ptr + 5 * n_rays + offs, mask=live, other=-1.0)
    hi_b = n_b.to(tl.float32)
    hi_c = n_c.to(tl.float32)
    plane_size = n_b.to(tl.int64) * n_c
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, n_planes):
        kf = k * 1.0
        # clamping keeps the int conversion defined; clamped taps fall outside and are masked
        b = tl.minimum(tl.maximum(b0 + kf * db, -2.0), hi_b + 1.0)
        c = tl.minimum(tl.maximum(c0 + kf * dc, -2.0), hi_c + 1.0)
        on_ray = live & (kf >= k_min) & (kf <= k_max)
        b_floor = tl.floor(b)
        c_floor = tl.floor(c)
        fb = b - b_floor
        fc = c - c_floor
        ib = b_floor.to(tl.int32)
        ic = c_floor.to(tl.int32)
        ok_b0 = (ib >= 0) & (ib < n_b)
        ok_b1 = (ib >= -1) & (ib < n_b - 1)
        ok_c0 = (ic >= 0) & (ic < n_c)
        ok_c1 = (ic >= -1) & (ic < n_c - 1)
        base = planes_ptr + k * plane_size + ib.to(tl.int64) * n_c + ic
        v00 = tl.load(base, mask=on_ray & ok_b0 & ok_c0, other=0.0).to(tl.float32)
        v01 = tl.load(base + 1, mask=on_ray & ok_b0 & ok_c1, other=0.0).to(tl.float32)
        v10 = tl.load(base + n_c, mask=on_ray & ok_b1 & ok_c0, other=0.0).to(tl.float32)
        v11 = tl.load(base + n_c + 1, mask=on_ray & ok_b1 & ok_c1, other=0.0).to(tl.float32)
        top = v00 + fc * (v01 - v00)
        bottom = v10 + fc * (v11 - v10)
        acc += top + fb * (bottom - top)
    step = tl.load(step_ptr + offs, mask=live, other=0.0)
    tl.store(out_ptr + offs, acc * step, mask=live)


def march_planes(planes: Tensor, rays: Tensor, step: Tensor) -> Tensor:
    """Line integrals (n_rays,) float32 of rays (6, n_rays) through planes (n, N_b, N_c).

    ``planes`` float32/float16/bfloat16, contiguous; ``rays`` and ``step`` float32 on the same device
    (see :class:`dxr.data.drr.RayPlanes`). Raises ``ValueError`` on a shape or device mismatch.
    """
    if planes.dim() != 3:
        raise ValueError(f"planes must be (n, N_b, N_c), got shape {tuple(planes.shape)}")
    if planes.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"planes must be float32, float16 or bfloat16, got {planes.dtype}")
    if rays.dim() != 2 or rays.shape[0] != 6 or step.shape != (rays.shape[1],):
        raise ValueError(f"rays must be (6, R) and step (R,), got {tuple(rays.shape)} and {tuple(step.shape)}")
    if not (planes.device == rays.device == step.device):
        raise ValueError(f"planes ({planes.device}), rays ({rays.device}) and step ({step.device}) must share a device")
    planes = planes.contiguous()
    rays = rays.to(torch.float32).contiguous()
    step = step.to(torch.float32).contiguous()
    total = rays.shape[1]
    out = torch.empty(total, dtype=torch.float32, device=planes.device)
    n_planes, n_b, n_c = planes.shape
    # ray offsets (up to 6·n_rays) stay within int32
    for start in range(0, total, _MAX_RAYS):
        chunk = rays[:, start : start + _MAX_RAYS].contiguous()
        n_rays = chunk.shape[1]
        grid = lambda meta: (triton.cdiv(n_rays, meta["BLOCK"]),)  # noqa: E731
        drr_march_kernel[grid](planes, chunk, step[start : start + n_rays], out[start : start + n_rays], n_rays, n_planes, n_b, n_c)
    return out

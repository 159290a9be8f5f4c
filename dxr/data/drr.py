"""Digitally reconstructed radiographs (DRRs): cone-beam or parallel-beam projection of a CT volume.

Frames (all in mm):

- **volume**: the CT in RAS+ array order (see :mod:`dxr.data.io`), origin at the centre of the voxel grid;
  voxel index ``i`` sits at ``(i - (N - 1) / 2) · spacing`` on each axis.
- **camera**: the imaging system for a PA chest film: the source behind the patient at
  ``(0, -sod, 0)``, the detector plane ``y = sdd - sod`` in front, the ray through the isocentre along +y.
  Image rows run from superior (top) to inferior; image columns from the patient's right (left of the
  image) to the patient's left, as a PA film is read.
- **pose**: ``world = R · camera + t`` with ``R = Rz(rz) · Ry(ry) · Rx(rx)`` (degrees, about the volume
  axes: rx tilts cranio-caudally, ry rolls in the image plane, rz turns the patient LAO/RAO) and
  ``t`` the isocentre in the volume frame.

Rendering is trilinear ray marching with ``n_samples`` samples per ray, placed where each ray crosses
``n_samples`` equally spaced planes across the volume along the axis closest to the central ray. Trilinear
interpolation at a point on such a plane is bilinear interpolation in the plane after linear interpolation
between slices, so the volume is resampled once into planes and every sample is a bilinear lookup (a 2-D
``grid_sample`` on CPU, a fused Triton kernel on a GPU). Outside the volume attenuation is zero.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

MU_WATER_PER_MM = 0.02  # linear attenuation of water near 70 keV, 1/mm
HU_FLOOR = -1024.0  # below air: scanner padding outside the reconstruction circle

# TotalSegmentator labels (the embedded CT's mask): bones, and the vessels that carry contrast agent.
BONE_LABELS = tuple(range(25, 51)) + tuple(range(69, 79)) + (91,) + tuple(range(92, 119))
VESSEL_LABELS = tuple(range(51, 69))


@dataclass(frozen=True)
class Geometry:
    """Imaging geometry: distances in mm, detector size in pixels, pixel spacing in mm (rows, columns).

    ``parallel=True`` gives a parallel-beam projection along +y (``sdd``/``sod`` unused, no magnification).
    """

    sdd: float = 1800.0  # source-to-detector distance
    sod: float = 1650.0  # source-to-isocentre distance
    height: int = 256  # detector rows
    width: int = 256  # detector columns
    pixel_spacing: tuple[float, float] = (1.5, 1.5)  # (row, column) pixel pitch at the detector
    parallel: bool = False

    def __post_init__(self):
        if self.height < 1 or self.width < 1:
            raise ValueError(f"detector size must be >= 1 pixel, got {self.height}×{self.width}")
        if min(self.pixel_spacing) <= 0:
            raise ValueError(f"pixel_spacing must be > 0, got {self.pixel_spacing}")
        if not self.parallel and not 0 < self.sod < self.sdd:
            raise ValueError(f"cone beam needs 0 < sod < sdd, got sod={self.sod}, sdd={self.sdd}")

    @property
    def magnification(self) -> float:
        """Detector size of an object at the isocentre divided by its true size."""
        return 1.0 if self.parallel else self.sdd / self.sod

    @classmethod
    def framing(cls, field_of_view: float, size: int, **kwargs) -> "Geometry":
        """A square detector of ``size`` pixels whose field of view at the isocentre is ``field_of_view`` mm."""
        probe = cls(height=size, width=size, **kwargs)
        pitch = field_of_view * probe.magnification / size
        return cls(height=size, width=size, pixel_spacing=(pitch, pitch), **kwargs)

    def to_dict(self) -> dict:
        return {**asdict(self), "pixel_spacing": list(self.pixel_spacing), "magnification": self.magnification}


# --------------------------------------------------------------------------------------------------
# CT preparation


def suppress_contrast(hu: np.ndarray, labels: np.ndarray, *, blood_hu: float = 40.0, dense_hu: float = 150.0, max_bone_hu: float = 1800.0) -> np.ndarray:
    """Undo iodinated contrast: labelled vessels, dense voxels outside bone, and anything denser than
    cortical bone (``max_bone_hu``: undiluted contrast next to a rib) are reset to ``blood_hu``.

    ``hu`` and ``labels`` (TotalSegmentator ids) have one shape (X, Y, Z). The bone mask is widened by a
    voxel so that the partial-volume rim of bone stays. Returns a new float32 array.
    """
    from scipy import ndimage

    if hu.shape != labels.shape:
        raise ValueError(f"hu {hu.shape} and labels {labels.shape} must have one shape")
    bone = ndimage.maximum_filter(np.isin(labels, BONE_LABELS), size=3)
    vessel = np.isin(labels, VESSEL_LABELS)
    out = np.array(hu, dtype=np.float32, copy=True)
    out[(vessel & (out > blood_hu)) | ((out > dense_hu) & ~bone) | (out > max_bone_hu)] = blood_hu
    return out


def hu_to_mu(hu: Union[np.ndarray, Tensor], mu_water: float = MU_WATER_PER_MM, *, bone_scale: float = 1.0) -> Tensor:
    """Linear attenuation (1/mm) from HU as a float32 tensor, clipped at zero.

    ``mu_water · (1 + HU/1000)``; above 0 HU the slope is multiplied by ``bone_scale`` (> 1 mimics the
    stronger bone contrast at radiographic tube voltages than at CT's).
    """
    hu = torch.as_tensor(hu, dtype=torch.float32).clamp_min(HU_FLOOR)
    if bone_scale != 1.0:
        hu = torch.where(hu > 0, hu * bone_scale, hu)
    return (mu_water * (1.0 + hu / 1000.0)).clamp_min(0.0)


def chest_framing(lung_mask: np.ndarray, spacing: Sequence[float], *, margin: float = 1.3, clearance_mm: float = 15.0) -> tuple[tuple[float, float, float], float]:
    """Isocentre (mm, volume frame) and field of view (mm at the isocentre) that frame a PA chest film.

    The lungs (``lung_mask`` (X, Y, Z)) are centred and fill ``1/margin`` of the view, which is made
    smaller and moved when needed so that its top and bottom stay ``clearance_mm`` inside the scanned
    volume (a CT ends where a film does not). Raises ``ValueError`` for an empty mask.
    """
    where = np.argwhere(lung_mask)
    if len(where) == 0:
        raise ValueError("lung_mask is empty: cannot frame the chest")
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    centre_index = (np.asarray(lung_mask.shape) - 1) / 2
    low, high = where.min(0), where.max(0)
    middle = ((low + high) / 2 - centre_index) * spacing_arr
    extent = (high - low + 1) * spacing_arr
    half_height = lung_mask.shape[2] / 2 * spacing_arr[2] - clearance_mm
    fov = float(min(max(extent[0], extent[2]) * margin, 2 * half_height))
    z = float(np.clip(middle[2], -half_height + fov / 2, half_height - fov / 2))
    return (float(middle[0]), float(middle[1]), z), fov


# --------------------------------------------------------------------------------------------------
# poses and projection


def rotation_matrices(rotations: Tensor) -> Tensor:
    """(B, 3) angles in degrees (rx, ry, rz) → (B, 3, 3) matrices ``Rz · Ry · Rx`` (float64)."""
    angles = torch.deg2rad(rotations.to(torch.float64))
    cx, cy, cz = torch.cos(angles).unbind(-1)
    sx, sy, sz = torch.sin(angles).unbind(-1)
    one, zero = torch.ones_like(cx), torch.zeros_like(cx)
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], -1).view(-1, 3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).view(-1, 3, 3)
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], -1).view(-1, 3, 3)
    return rz @ ry @ rx


def _poses(rotations, translations, batch: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Validate and broadcast poses to float64 (B, 3) rotations (degrees) and translations (mm)."""
    def as_rows(name, value):
        if value is None:
            return None
        value = torch.as_tensor(value, dtype=torch.float64).cpu()
        if value.dim() == 1:
            value = value.unsqueeze(0)
        if value.dim() != 2 or value.shape[-1] != 3:
            raise ValueError(f"{name} must have shape (B, 3) or (3,), got {tuple(value.shape)}")
        if not torch.isfinite(value).all():
            raise ValueError(f"{name} holds NaN or infinity")
        return value

    rotations, translations = as_rows("rotations", rotations), as_rows("translations", translations)
    sizes = {v.shape[0] for v in (rotations, translations) if v is not None}
    if batch is not None:
        sizes.add(batch)
    sizes.discard(1)
    if len(sizes) > 1:
        raise ValueError(f"rotations and translations disagree on the batch size: {sorted(sizes)}")
    size = sizes.pop() if sizes else 1
    if rotations is None:
        rotations = torch.zeros(1, 3, dtype=torch.float64)
    if translations is None:
        translations = torch.zeros(1, 3, dtype=torch.float64)
    return rotations.expand(size, 3), translations.expand(size, 3)


def random_poses(
    count: int,
    generator: Optional[torch.Generator] = None,
    *,
    max_rotation: Sequence[float] = (6.0, 3.0, 8.0),
    max_translation: Sequence[float] = (15.0, 30.0, 15.0),
) -> tuple[Tensor, Tensor]:
    """``count`` poses drawn uniformly within ±``max_rotation`` degrees and ±``max_translation`` mm."""
    rot = (torch.rand(count, 3, generator=generator, dtype=torch.float64) * 2 - 1) * torch.tensor(max_rotation, dtype=torch.float64)
    shift = (torch.rand(count, 3, generator=generator, dtype=torch.float64) * 2 - 1) * torch.tensor(max_translation, dtype=torch.float64)
    return rot, shift


def _detector_camera(geometry: Geometry, device=None) -> tuple[Tensor, Tensor]:
    """Camera-frame x and z (mm) of every detector pixel centre, each (H, W) float64."""
    rows = (geometry.height - 1) / 2.0 - torch.arange(geometry.height, dtype=torch.float64, device=device)
    cols = (geometry.width - 1) / 2.0 - torch.arange(geometry.width, dtype=torch.float64, device=device)
    z = (rows * geometry.pixel_spacing[0]).view(-1, 1).expand(geometry.height, geometry.width)
    x = (cols * geometry.pixel_spacing[1]).view(1, -1).expand(geometry.height, geometry.width)
    return x, z


def project_points(points: Tensor, geometry: Geometry, rotations=None, translations=None) -> Tensor:
    """Detector position of volume-frame points: (P, 3) mm → (B, P, 2) as (column, row) pixel coordinates.

    Pixel centres are at integer coordinates, (0, 0) the top-left pixel. A point behind the source
    projects to NaN.
    """
    rot, shift = _poses(rotations, translations)
    points = torch.as_tensor(points, dtype=torch.float64).cpu().reshape(-1, 3)
    camera = torch.einsum("bji,bpj->bpi", rotation_matrices(rot), points.unsqueeze(0) - shift.unsqueeze(1))
    if geometry.parallel:
        scale = torch.ones_like(camera[..., 1])
    else:
        depth = camera[..., 1] + geometry.sod
        scale = torch.where(depth > 0, geometry.sdd / depth, torch.full_like(depth, float("nan")))
    col = (geometry.width - 1) / 2.0 - camera[..., 0] * scale / geometry.pixel_spacing[1]
    row = (geometry.height - 1) / 2.0 - camera[..., 2] * scale / geometry.pixel_spacing[0]
    return torch.stack([col, row], -1)


# --------------------------------------------------------------------------------------------------
# rendering


@dataclass
class RayPlanes:
    """Rays in a plane stack's index frame: at plane ``k`` ray ``r`` samples ``(b0 + k·db, c0 + k·dc)``.

    ``rays`` (6, B·H·W) float32 rows b0, db, c0, dc, k_min, k_max (samples outside [k_min, k_max] lie
    behind the source or beyond the detector); ``step`` (B·H·W,) float32: the path length per sample, mm.
    """

    rays: Tensor
    step: Tensor


class DRRRenderer:
    """Render DRRs of one attenuation volume for batches of poses.

    ``mu``: (X, Y, Z) attenuation in 1/mm (float32, float16 or bfloat16; CPU or CUDA), RAS+ order;
    ``spacing``: voxel size (mm) per axis. Samples are accumulated in float32 and images returned as
    float32 line integrals (B, H, W). ``backend``: None/"auto" (Triton on CUDA, else torch), "torch" or
    "triton" (on CPU only under ``TRITON_INTERPRET=1``). The resampled planes are cached per axis.
    """

    def __init__(self, mu: Tensor, spacing: Sequence[float], geometry: Geometry, *, n_samples: int = 256, backend: Optional[str] = None):
        if not isinstance(mu, Tensor):
            raise TypeError(f"mu must be a torch.Tensor, got {type(mu).__name__}")
        if mu.dim() != 3 or min(mu.shape) < 2:
            raise ValueError(f"mu must be a 3-D volume (X, Y, Z) with every side >= 2, got shape {tuple(mu.shape)}")
        if mu.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"mu must be float32, float16 or bfloat16, got {mu.dtype}")
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"spacing must be three positive voxel sizes (mm), got {spacing}")
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        if backend not in (None, "auto", "torch", "triton"):
            raise ValueError(f"backend must be None, 'auto', 'torch' or 'triton', got {backend!r}")
        if backend == "triton" and mu.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 for the interpreter)")
        self.mu = mu.contiguous()
        self.spacing = tuple(float(s) for s in spacing)
        self.geometry = geometry
        self.n_samples = int(n_samples)
        self.backend = backend if backend in ("torch", "triton") else ("triton" if mu.device.type == "cuda" else "torch")
        self._planes: dict[tuple[int, int, int], Tensor] = {}

    # the plane stack --------------------------------------------------------------------------------

    def _axes(self, rotation: Tensor) -> tuple[int, int, int]:
        """(a, b, c): sweep axis a nearest the central ray; c (contiguous) nearest the detector rows."""
        ray = rotation[:, 1].abs() / torch.tensor(self.spacing, dtype=torch.float64)
        a = int(torch.argmax(ray))
        rest = [axis for axis in range(3) if axis != a]
        across = rotation[:, 0].abs() / torch.tensor(self.spacing, dtype=torch.float64)
        c = rest[0] if across[rest[0]] >= across[rest[1]] else rest[1]
        b = rest[1] if c == rest[0] else rest[0]
        return a, b, c

    def _plane_positions(self, n_a: int) -> tuple[Tensor, Tensor]:
        """Index of the slice below each plane (−1 before the first) and the linear weight of the next."""
        centres = (torch.arange(self.n_samples, dtype=torch.float64) + 0.5) * (n_a / self.n_samples) - 0.5
        low = torch.floor(centres)
        return low.long(), (centres - low).to(torch.float32)

    def _resample(self, axes: tuple[int, int, int], which: Tensor) -> Tensor:
        """Planes ``which`` (int64 indices) of the stack for ``axes``, in the volume's dtype."""
        a, b, c = axes
        volume = self.mu.permute(a, b, c)
        low, frac = self._plane_positions(volume.shape[0])
        low, frac = low[which], frac[which].to(self.mu.device).view(-1, 1, 1)
        below = low.clamp_min(0).to(self.mu.device)
        above = (low + 1).clamp_max(volume.shape[0] - 1).to(self.mu.device)
        # zero outside the volume: a plane before the first slice or after the last fades to air
        w_below = ((1 - frac) * (low >= 0).view(-1, 1, 1).to(frac))
        w_above = frac * (low + 1 <= volume.shape[0] - 1).view(-1, 1, 1).to(frac)
        stack = volume[below].float() * w_below + volume[above].float() * w_above
        return stack.to(self.mu.dtype)

    def planes(self, axes: tuple[int, int, int]) -> Tensor:
        """(n_samples, N_b, N_c) attenuation on the sweep planes: linear along axis a, zero beyond the volume."""
        if axes not in self._planes:
            self._planes[axes] = self._resample(axes, torch.arange(self.n_samples)).contiguous()
        return self._planes[axes]

    def update(self, box: tuple[slice, slice, slice], values: Tensor) -> None:
        """Write ``values`` into ``mu[box]`` and refresh only the cached planes that the box reaches.

        ``box``: three slices with unit step (e.g. from :func:`dxr.data.nodules.insert_nodule`).
        """
        self.mu[box] = values.to(device=self.mu.device, dtype=self.mu.dtype)
        for axes, stack in self._planes.items():
            a = axes[0]
            start, stop, _ = box[a].indices(self.mu.shape[a])
            low, _ = self._plane_positions(self.mu.shape[a])
            which = torch.nonzero((low + 1 >= start) & (low <= stop - 1)).view(-1)
            if which.numel():
                stack[which.to(stack.device)] = self._resample(axes, which)

    # rays --------------------------------------------------------------------------------------------

    def rays(self, axes: tuple[int, int, int], rotation: Tensor, translation: Tensor) -> RayPlanes:
        """The per-ray plane parameters for poses (B, 3, 3), (B, 3) that share ``axes``."""
        geometry = self.geometry
        a, b, c = axes
        device = self.mu.device  # built where they are used: no host work per ray on a GPU
        spacing = torch.tensor(self.spacing, dtype=torch.float64, device=device)
        centre = (torch.tensor(self.mu.shape, dtype=torch.float64, device=device) - 1) / 2
        rotation, translation = rotation.to(device), translation.to(device)
        x, z = _detector_camera(geometry, device)
        batch = rotation.shape[0]
        detector = torch.stack([x, torch.full_like(x, geometry.sdd - geometry.sod), z], -1).view(1, -1, 3).expand(batch, -1, 3)
        if geometry.parallel:
            direction_cam = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64, device=device).expand_as(detector)
            origin_cam = detector - direction_cam
        else:
            origin_cam = torch.tensor([0.0, -geometry.sod, 0.0], dtype=torch.float64, device=device).expand_as(detector)
            direction_cam = detector - origin_cam
        origin = (torch.einsum("bij,bpj->bpi", rotation, origin_cam) + translation.unsqueeze(1)) / spacing + centre
        direction_mm = torch.einsum("bij,bpj->bpi", rotation, direction_cam)
        direction = direction_mm / spacing
        n_a = self.mu.shape[a]
        step_index = n_a / self.n_samples
        first = step_index / 2 - 0.5
        per_plane = step_index / direction[..., a]  # ray parameter advanced per plane
        t0 = (first - origin[..., a]) / direction[..., a]
        b0 = origin[..., b] + t0 * direction[..., b]
        c0 = origin[..., c] + t0 * direction[..., c]
        if geometry.parallel:
            k_min = torch.full_like(t0, -1.0)
            k_max = torch.full_like(t0, float(self.n_samples))
        else:
            # the segment source (t = 0) → detector (t = 1) is all that attenuates
            k_a, k_b = (0 - t0) / per_plane, (1 - t0) / per_plane
            k_min = torch.minimum(k_a, k_b).clamp(-1.0, self.n_samples)
            k_max = torch.maximum(k_a, k_b).clamp(-1.0, self.n_samples)
        rays = torch.stack([b0, per_plane * direction[..., b], c0, per_plane * direction[..., c], k_min, k_max])
        step = per_plane.abs() * direction_mm.norm(dim=-1)
        return RayPlanes(rays.reshape(6, -1).to(torch.float32), step.reshape(-1).to(torch.float32))

    # marching ------------------------------------------------------------------------------------------

    def _march_torch(self, planes: Tensor, ray: RayPlanes, chunk_rays: int = 1 << 17, chunk_planes: int = 32) -> Tensor:
        n, n_b, n_c = planes.shape
        b0, db, c0, dc, k_min, k_max = ray.rays
        # grid_sample's normalized (x, y) = (c, b) with align_corners=True; a sample is start + k·delta
        scale = torch.tensor([2.0 / (n_c - 1), 2.0 / (n_b - 1)], device=planes.device)
        start = torch.stack([c0, b0], -1) * scale - 1
        delta = torch.stack([dc, db], -1) * scale
        total = torch.empty(b0.shape[0], dtype=torch.float32, device=planes.device)
        for r0 in range(0, b0.shape[0], chunk_rays):
            r1 = min(r0 + chunk_rays, b0.shape[0])
            # planes every ray of the chunk keeps, and the span any ray keeps (host values: one sync per chunk)
            all_lo, all_hi, any_lo, any_hi = (float(v) for v in torch.stack([k_min[r0:r1].max(), k_max[r0:r1].min(), k_min[r0:r1].min(), k_max[r0:r1].max()]).tolist())
            acc = torch.zeros(r1 - r0, dtype=torch.float32, device=planes.device)
            for k0 in range(max(0, math.ceil(any_lo)), min(n, math.floor(any_hi) + 1), chunk_planes):
                k1 = min(k0 + chunk_planes, n, math.floor(any_hi) + 1)
                k = torch.arange(k0, k1, device=planes.device, dtype=torch.float32).view(-1, 1, 1)
                grid = torch.addcmul(start[r0:r1], k, delta[r0:r1])
                if k0 < all_lo or k1 - 1 > all_hi:
                    outside = (k[..., 0] < k_min[r0:r1]) | (k[..., 0] > k_max[r0:r1])
                    grid.masked_fill_(outside.unsqueeze(-1), -4.0)  # far outside [-1, 1]: zero padding
                samples = F.grid_sample(planes[k0:k1].float().unsqueeze(1), grid.unsqueeze(1), mode="bilinear", padding_mode="zeros", align_corners=True)
                acc += samples.sum(0).view(-1)
            total[r0:r1] = acc
        return total * ray.step

    def render(self, rotations=None, translations=None) -> Tensor:
        """Line integrals (B, H, W) float32 for poses: rotations (B, 3) degrees, translations (B, 3) mm."""
        rot, shift = _poses(rotations, translations)
        matrices = rotation_matrices(rot)
        h, w = self.geometry.height, self.geometry.width
        out = torch.empty(rot.shape[0], h * w, dtype=torch.float32, device=self.mu.device)
        groups: dict[tuple[int, int, int], list[int]] = {}
        for i in range(rot.shape[0]):
            groups.setdefault(self._axes(matrices[i]), []).append(i)
        for axes, members in groups.items():
            index = torch.tensor(members)
            ray = self.rays(axes, matrices[index], shift[index])
            planes = self.planes(axes)
            if self.backend == "triton":
                from dxr.kernels.triton.drr import march_planes

                values = march_planes(planes, ray.rays, ray.step)
            else:
                values = self._march_torch(planes, ray)
            out[index.to(out.device)] = values.view(len(members), h * w)
        return out.view(-1, h, w)

    __call__ = render


def render_drr(mu: Tensor, spacing: Sequence[float], geometry: Geometry, rotations=None, translations=None, *, n_samples: int = 256, backend: Optional[str] = None) -> Tensor:
    """One-shot :class:`DRRRenderer` call: line integrals (B, H, W) float32."""
    return DRRRenderer(mu, spacing, geometry, n_samples=n_samples, backend=backend).render(rotations, translations)


# --------------------------------------------------------------------------------------------------
# display


def display_window(line_integrals: Tensor, *, low: float = 1.0, high: float = 99.7, gamma: float = 1.0, reference: Optional[tuple[float, float]] = None) -> Tensor:
    """Map line integrals (…, H, W) to a radiograph-like [0, 1] image, bright = attenuating (bone white).

    The window spans the ``low``..``high`` percentiles of each image (or the fixed ``reference`` pair of
    line-integral values), then a ``gamma`` curve. Returns float32 of the input's shape.
    """
    values = line_integrals.float()
    flat = values.flatten(-2)
    if reference is None:
        lo = torch.quantile(flat, low / 100.0, dim=-1, keepdim=True).unsqueeze(-1)
        hi = torch.quantile(flat, high / 100.0, dim=-1, keepdim=True).unsqueeze(-1)
    else:
        lo = torch.tensor(reference[0], dtype=torch.float32)
        hi = torch.tensor(reference[1], dtype=torch.float32)
    out = ((values - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    return out.pow(gamma) if gamma != 1.0 else out

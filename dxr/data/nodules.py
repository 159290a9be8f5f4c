"""Synthetic lung nodules: lung masks, nodule sites, insertion into a CT, and where each lands in a DRR.

A nodule is a lobulated ellipsoid of soft-tissue HU with a soft edge, placed wholly inside the lungs
(the lung mask from lobe labels when the CT has them, else :func:`segment_lungs`). Positions are in the
volume frame of :mod:`dxr.data.drr` (mm, origin at the centre of the voxel grid, RAS+ axes).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from dxr.data.drr import Geometry, project_points

# Unit directions on which a nodule's surface is evaluated to find its projected box.
_SURFACE_POINTS = 256


@dataclass
class Nodule:
    """One nodule: ``center_mm`` (volume frame), nominal ``radius_mm``, ``semi_axes_mm`` of the ellipsoid
    before lobulation, its ``rotation`` (3×3, ellipsoid → volume axes), ``hu`` of its core, lobulation
    bumps ``(amplitude, frequency, direction)``, ``bound_mm`` (no surface point lies farther from the
    centre) and the ``lobe`` it sits in (None without labels)."""

    center_mm: tuple[float, float, float]
    radius_mm: float
    semi_axes_mm: tuple[float, float, float]
    rotation: list[list[float]]
    hu: float
    lobulation: list[tuple[float, int, tuple[float, float, float]]] = field(default_factory=list)
    bound_mm: float = 0.0
    lobe: Optional[str] = None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["lobulation"] = [{"amplitude": a, "frequency": f, "direction": list(d)} for a, f, d in self.lobulation]
        return out

    def surface_factor(self, directions: np.ndarray) -> np.ndarray:
        """Lobulation factor (≥ 0) of unit directions (…, 3) in the ellipsoid frame."""
        factor = np.ones(directions.shape[:-1])
        for amplitude, frequency, direction in self.lobulation:
            angle = np.arccos(np.clip(directions @ np.asarray(direction), -1.0, 1.0))
            factor = factor + amplitude * np.cos(frequency * angle)
        return np.maximum(factor, 0.05)

    def surface_points(self, count: int = _SURFACE_POINTS) -> np.ndarray:
        """(count, 3) points on the nodule's surface in the volume frame (mm)."""
        index = np.arange(count) + 0.5
        polar = np.arccos(1 - 2 * index / count)
        azimuth = math.pi * (1 + 5**0.5) * index
        n = np.stack([np.sin(polar) * np.cos(azimuth), np.sin(polar) * np.sin(azimuth), np.cos(polar)], -1)
        axes = np.asarray(self.semi_axes_mm)
        reach = self.surface_factor(n) / np.linalg.norm(n / axes, axis=-1)
        return (n * reach[:, None]) @ np.asarray(self.rotation).T + np.asarray(self.center_mm)


# --------------------------------------------------------------------------------------------------
# lung masks


def segment_lungs(hu: np.ndarray, spacing: Sequence[float], *, air_hu: float = -400.0, min_fraction: float = 0.1) -> np.ndarray:
    """Threshold lung segmentation of a CT (X, Y, Z) in HU → boolean mask.

    Air below ``air_hu`` enclosed by the body (holes filled slice by slice) is split into connected parts;
    the (at most two) largest parts holding at least ``min_fraction`` of the largest are the lungs, and
    vessels inside them are filled in slice by slice. Raises ``ValueError`` if no enclosed air is found.
    """
    from scipy import ndimage

    if hu.ndim != 3:
        raise ValueError(f"hu must be 3-D (X, Y, Z), got shape {hu.shape}")
    body = hu > air_hu
    labelled, count = ndimage.label(body)
    if count == 0:
        raise ValueError("no body found: every voxel is below air_hu")
    sizes = np.bincount(labelled.ravel())[1:]
    body = labelled == (int(np.argmax(sizes)) + 1)
    inside = np.zeros_like(body)
    for z in range(hu.shape[2]):
        inside[:, :, z] = ndimage.binary_fill_holes(body[:, :, z])
    air = inside & ~body
    labelled, count = ndimage.label(air)
    if count == 0:
        raise ValueError("no air enclosed by the body: cannot find the lungs")
    sizes = np.bincount(labelled.ravel())[1:]
    order = np.argsort(sizes)[::-1][:2]
    keep = [int(i) + 1 for i in order if sizes[i] >= min_fraction * sizes[order[0]]]
    lungs = np.isin(labelled, keep)
    for z in range(hu.shape[2]):
        lungs[:, :, z] = ndimage.binary_fill_holes(lungs[:, :, z])
    return lungs


# --------------------------------------------------------------------------------------------------
# sites and shapes


class NoduleSites:
    """Where nodules fit: lung voxels ranked by their distance (mm) to the lung's edge.

    ``lung_mask`` (X, Y, Z) bool, ``spacing`` mm; ``lobes``: optional integer label map of the same shape
    with ``lobe_names`` {label: name} to record the lobe of each nodule.
    """

    def __init__(self, lung_mask: np.ndarray, spacing: Sequence[float], lobes: Optional[np.ndarray] = None, lobe_names: Optional[dict[int, str]] = None):
        from scipy import ndimage

        if lung_mask.ndim != 3:
            raise ValueError(f"lung_mask must be 3-D (X, Y, Z), got shape {lung_mask.shape}")
        if not lung_mask.any():
            raise ValueError("lung_mask is empty: no site for a nodule")
        self.shape = lung_mask.shape
        self.spacing = tuple(float(s) for s in spacing)
        self.lobes = lobes
        self.lobe_names = lobe_names or {}
        where = np.argwhere(lung_mask)
        self.low = where.min(0)
        high = where.max(0) + 1
        box = lung_mask[self.low[0] : high[0], self.low[1] : high[1], self.low[2] : high[2]]
        # pad so that the box's border counts as outside the lung
        distance = ndimage.distance_transform_edt(np.pad(box, 1), sampling=self.spacing)[1:-1, 1:-1, 1:-1]
        inside = np.flatnonzero(distance)
        order = np.argsort(-distance.ravel()[inside], kind="stable")
        self._box_shape = distance.shape
        self._voxels = inside[order]  # lung voxels, deepest first
        self._depth = -distance.ravel()[self._voxels]  # ascending, for searchsorted

    def centre_mm(self, index: np.ndarray) -> np.ndarray:
        """Volume-frame position (mm) of voxel indices (…, 3)."""
        return (np.asarray(index, dtype=np.float64) - (np.asarray(self.shape) - 1) / 2) * np.asarray(self.spacing)

    def draw(self, rng: np.random.Generator, clearance_mm: float, avoid: Sequence[Nodule] = ()) -> Optional[np.ndarray]:
        """A voxel index (3,) at least ``clearance_mm`` inside the lung and clear of ``avoid``; None if none."""
        count = int(np.searchsorted(self._depth, -clearance_mm, side="right"))
        if count == 0:
            return None
        for _ in range(64):
            index = np.asarray(np.unravel_index(self._voxels[rng.integers(count)], self._box_shape)) + self.low
            centre = self.centre_mm(index)
            if all(np.linalg.norm(centre - np.asarray(n.center_mm)) > clearance_mm + n.bound_mm for n in avoid):
                return index
        return None

    def lobe_at(self, index: np.ndarray) -> Optional[str]:
        if self.lobes is None:
            return None
        label = int(self.lobes[tuple(int(i) for i in index)])
        return self.lobe_names.get(label, str(label))


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def random_nodules(
    sites: NoduleSites,
    count: int,
    rng: np.random.Generator,
    *,
    radius_mm: tuple[float, float] = (3.0, 15.0),
    hu: tuple[float, float] = (20.0, 60.0),
    edge_mm: float = 1.0,
) -> list[Nodule]:
    """``count`` non-overlapping nodules inside the lungs: radius log-uniform in ``radius_mm``, core HU
    uniform in ``hu``, up to three lobulation bumps. A nodule that does not fit is drawn smaller (down to
    the lower radius); raises ``ValueError`` when even that does not fit."""
    low, high = radius_mm
    if not 0 < low <= high:
        raise ValueError(f"radius_mm must satisfy 0 < low <= high, got {radius_mm}")
    nodules: list[Nodule] = []
    for _ in range(count):
        radius = float(math.exp(rng.uniform(math.log(low), math.log(high))))
        while True:
            stretch = rng.uniform(0.8, 1.2, size=3)
            axes = radius * stretch / np.prod(stretch) ** (1 / 3)
            bumps = [
                (float(rng.uniform(0.03, 0.07)), int(rng.integers(2, 6)), tuple(float(v) for v in _unit(rng.normal(size=3))))
                for _ in range(int(rng.integers(0, 4)))
            ]
            bound = float(axes.max() * (1 + sum(a for a, _, _ in bumps)))
            index = sites.draw(rng, bound + edge_mm, nodules)
            if index is not None:
                break
            if radius <= low:
                raise ValueError(f"no room in the lungs for a nodule of radius {low} mm next to {len(nodules)} others")
            radius = max(low, radius * 0.8)
        nodules.append(
            Nodule(
                center_mm=tuple(float(v) for v in sites.centre_mm(index)),
                radius_mm=radius,
                semi_axes_mm=tuple(float(v) for v in axes),
                rotation=_random_rotation(rng).tolist(),
                hu=float(rng.uniform(*hu)),
                lobulation=bumps,
                bound_mm=bound,
                lobe=sites.lobe_at(index),
            )
        )
    return nodules


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


# --------------------------------------------------------------------------------------------------
# insertion and projection


def insert_nodule(hu: np.ndarray, spacing: Sequence[float], nodule: Nodule, *, edge_mm: float = 1.0) -> tuple[tuple[slice, ...], np.ndarray]:
    """Write ``nodule`` into ``hu`` (X, Y, Z) in place; returns (box, the box's previous values) to undo it.

    Inside the surface the CT takes the nodule's HU, with a ``tanh`` edge ``edge_mm`` wide (nothing changes
    beyond 1.5 ``edge_mm`` outside); voxels already denser than the blend keep their value.
    """
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    centre_index = np.asarray(nodule.center_mm) / spacing_arr + (np.asarray(hu.shape) - 1) / 2
    reach = (nodule.bound_mm + 3 * edge_mm) / spacing_arr
    low = np.maximum(np.floor(centre_index - reach).astype(int), 0)
    high = np.minimum(np.ceil(centre_index + reach).astype(int) + 1, hu.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
    grids = np.meshgrid(*[np.arange(a, b) for a, b in zip(low, high)], indexing="ij")
    offset = np.stack([(g - c) * s for g, c, s in zip(grids, centre_index, spacing_arr)], -1)
    local = offset @ np.asarray(nodule.rotation)  # ellipsoid frame
    length = np.linalg.norm(local, axis=-1)
    direction = np.where(length[..., None] > 1e-9, local / np.maximum(length, 1e-9)[..., None], np.array([1.0, 0.0, 0.0]))
    axes = np.asarray(nodule.semi_axes_mm)
    surface = nodule.surface_factor(direction) / np.linalg.norm(direction / axes, axis=-1)
    depth = surface - length  # mm inside the surface
    inside = np.where(depth > -1.5 * edge_mm, 0.5 * (1 + np.tanh(depth / (0.5 * edge_mm))), 0.0)  # no tail past the edge
    before = hu[box].copy()
    blended = before + inside * (nodule.hu - before)
    hu[box] = np.maximum(before, blended)
    return box, before


def insert_nodules(hu: np.ndarray, spacing: Sequence[float], nodules: Sequence[Nodule], *, edge_mm: float = 1.0) -> np.ndarray:
    """A copy of ``hu`` with every nodule inserted."""
    out = np.array(hu, dtype=np.float32, copy=True)
    for nodule in nodules:
        insert_nodule(out, spacing, nodule, edge_mm=edge_mm)
    return out


def project_nodules(nodules: Sequence[Nodule], geometry: Geometry, rotations=None, translations=None) -> list[list[dict]]:
    """Where each nodule lands in each DRR: one list per pose of dicts with ``center_px`` (column, row) of
    the projected 3-D centre, ``box_px`` [x0, y0, x1, y1] around the projected surface, and ``in_view``
    (the centre falls on the detector)."""
    if not nodules:
        count = project_points(torch.zeros(1, 3), geometry, rotations, translations).shape[0]
        return [[] for _ in range(count)]
    centres = torch.tensor([n.center_mm for n in nodules], dtype=torch.float64)
    surfaces = torch.from_numpy(np.concatenate([n.surface_points() for n in nodules]))
    centre_px = project_points(centres, geometry, rotations, translations)
    surface_px = project_points(surfaces, geometry, rotations, translations).view(centre_px.shape[0], len(nodules), -1, 2)
    records = []
    for pose in range(centre_px.shape[0]):
        per_pose = []
        for i, nodule in enumerate(nodules):
            col, row = (float(v) for v in centre_px[pose, i])
            low = surface_px[pose, i].amin(0)
            high = surface_px[pose, i].amax(0)
            per_pose.append(
                {
                    "id": i,
                    **nodule.to_dict(),
                    "center_px": [col, row],
                    "box_px": [float(low[0]), float(low[1]), float(high[0]), float(high[1])],
                    "in_view": bool(-0.5 <= col <= geometry.width - 0.5 and -0.5 <= row <= geometry.height - 0.5),
                }
            )
        records.append(per_pose)
    return records

"""Crops of a real radiograph: collimation detection, train/test regions, augmented resampled crops."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

# RG1_UNCR.dcm stores PixelSpacing "0.000"; its collimator edges put the pitch near 0.2 mm.
EMBEDDED_RADIOGRAPH_PIXEL_MM = 0.2


def collimation_bounds(image: np.ndarray, *, search: float = 0.08, ratio: float = 3.0, margin: float = 0.01) -> tuple[int, int, int, int]:
    """The exposed field ``(top, bottom, left, right)`` of a radiograph (2-D, [0, 1]): image[top:bottom, left:right].

    A collimator leaves a straight edge across the whole image near a border: within the outer ``search``
    fraction of each side, a line whose median gradient (across the middle 80 % of the line) exceeds
    ``ratio`` times the image's typical value marks one; the band runs to where that gradient falls below
    half its peak, plus ``margin`` of the side. A side without such an edge keeps its border.
    """
    from scipy import ndimage

    if image.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {image.shape}")
    smooth = ndimage.gaussian_filter(np.asarray(image, dtype=np.float32), 2.0)

    def band(view: np.ndarray) -> int:
        gradient = np.abs(np.diff(view, axis=0))
        inner = view.shape[1] // 10
        profile = np.median(gradient[:, inner : view.shape[1] - inner], axis=1)
        reach = max(2, int(search * view.shape[0]))
        peak = int(np.argmax(profile[:reach]))
        typical = float(np.median(profile)) + 1e-12
        if profile[peak] < ratio * typical:
            return 0
        end = peak
        while end + 1 < reach and profile[end + 1] >= 0.5 * profile[peak]:
            end += 1
        return end + 1 + int(margin * view.shape[0])

    top = band(smooth)
    bottom = smooth.shape[0] - band(smooth[::-1])
    left = band(smooth.T)
    right = smooth.shape[1] - band(smooth.T[::-1])
    if bottom - top < smooth.shape[0] // 2 or right - left < smooth.shape[1] // 2:
        raise ValueError(f"collimation leaves too little of the image: rows {top}:{bottom}, columns {left}:{right}")
    return top, bottom, left, right


def split_regions(bounds: tuple[int, int, int, int], test_fraction: float, gap: int) -> dict[str, tuple[int, int, int, int]]:
    """Split the exposed field into a ``train`` and a held-out ``test`` region (the image's right-hand
    ``test_fraction`` of the columns), ``gap`` pixels apart, each as (top, bottom, left, right)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    top, bottom, left, right = bounds
    cut = right - int(round(test_fraction * (right - left)))
    return {"train": (top, bottom, left, cut - gap // 2), "test": (top, bottom, cut + (gap - gap // 2), right)}


@dataclass
class CropSpec:
    """One crop: centre (row, column) and side in source pixels, rotation in degrees, gamma."""

    row: float
    col: float
    side: float
    angle: float
    gamma: float

    def to_dict(self, pixel_mm: float, size: int) -> dict:
        return {
            "center_px": [self.col, self.row],
            "side_px": self.side,
            "field_of_view_mm": self.side * pixel_mm,
            "pixel_mm": self.side * pixel_mm / size,
            "rotation_deg": self.angle,
            "gamma": self.gamma,
        }


class RadiographCropper:
    """Square crops of ``image`` (2-D, [0, 1], bright = attenuating) inside ``region`` (top, bottom, left,
    right): field of view ``fov_mm`` × U(1 − ``fov_jitter``, 1 + ``fov_jitter``) (shrunk to fit), rotation
    U(±``max_angle``) degrees, gamma log-uniform in 1/``max_gamma``..``max_gamma``, resampled with
    anti-aliasing to ``size``² float32 in [0, 1]."""

    def __init__(self, image: np.ndarray, pixel_mm: float, region: tuple[int, int, int, int], size: int, *, fov_mm: float = 150.0, fov_jitter: float = 0.15, max_angle: float = 5.0, max_gamma: float = 1.2):
        self.image = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        self.pixel_mm = float(pixel_mm)
        self.region = region
        self.size = int(size)
        self.fov_mm = float(fov_mm)
        self.fov_jitter = float(fov_jitter)
        self.max_angle = float(max_angle)
        self.max_gamma = float(max_gamma)
        top, bottom, left, right = region
        if bottom - top < 8 or right - left < 8:
            raise ValueError(f"region {region} is too small to crop from")

    def draw(self, rng: np.random.Generator) -> CropSpec:
        top, bottom, left, right = self.region
        angle = float(rng.uniform(-self.max_angle, self.max_angle))
        reach = abs(math.cos(math.radians(angle))) + abs(math.sin(math.radians(angle)))  # bounding box / side
        side = self.fov_mm * float(rng.uniform(1 - self.fov_jitter, 1 + self.fov_jitter)) / self.pixel_mm
        side = min(side, (bottom - top - 2) / reach, (right - left - 2) / reach)
        half = side * reach / 2
        row = float(rng.uniform(top + half, bottom - half))
        col = float(rng.uniform(left + half, right - half))
        gamma = float(math.exp(rng.uniform(-math.log(self.max_gamma), math.log(self.max_gamma))))
        return CropSpec(row, col, side, angle, gamma)

    def crop(self, spec: CropSpec) -> np.ndarray:
        """The ``size``² crop that ``spec`` describes."""
        reach = abs(math.cos(math.radians(spec.angle))) + abs(math.sin(math.radians(spec.angle)))
        half = spec.side * reach / 2 + 2
        r0, r1 = max(0, int(math.floor(spec.row - half))), min(self.image.shape[0], int(math.ceil(spec.row + half)) + 1)
        c0, c1 = max(0, int(math.floor(spec.col - half))), min(self.image.shape[1], int(math.ceil(spec.col + half)) + 1)
        window = self.image[r0:r1, c0:c1][None, None]
        scale = self.size / spec.side  # output pixels per source pixel
        shrunk = F.interpolate(window, size=(max(2, round((r1 - r0) * scale)), max(2, round((c1 - c0) * scale))), mode="bilinear", antialias=True, align_corners=False)
        # affine_grid maps output [-1, 1]² to the window's [-1, 1]² (x = columns, y = rows)
        cos, sin = math.cos(math.radians(spec.angle)), math.sin(math.radians(spec.angle))
        sx, sy = spec.side / (c1 - c0), spec.side / (r1 - r0)
        tx = (2 * (spec.col - c0) + 1) / (c1 - c0) - 1
        ty = (2 * (spec.row - r0) + 1) / (r1 - r0) - 1
        theta = torch.tensor([[[cos * sx, -sin * sx, tx], [sin * sy, cos * sy, ty]]], dtype=torch.float32)
        grid = F.affine_grid(theta, [1, 1, self.size, self.size], align_corners=False)
        out = F.grid_sample(shrunk, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, 0]
        return out.clamp(0, 1).pow(spec.gamma).numpy()


def display_normalize(image: np.ndarray, region: Optional[tuple[int, int, int, int]] = None, *, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Stretch a radiograph so that the ``low``..``high`` percentiles of ``region`` span [0, 1] (clipped)."""
    view = image if region is None else image[region[0] : region[1], region[2] : region[3]]
    lo, hi = np.percentile(view, [low, high])
    return np.clip((image - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)

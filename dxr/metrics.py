"""The measures of a restoration, each on (H, W) float images in [0, 1].

- :func:`image_metrics`: PSNR and SSIM against a target, from scikit-image (data range 1).
- :func:`noise_measure`: the high-frequency residual in flat regions (image − its Gaussian blur).
- :func:`sharpness`: a no-reference figure, the mean Sobel gradient magnitude per pixel.
- :func:`nodule_cnr`: a nodule's contrast-to-noise ratio against a ring around it.
- :func:`summary`: mean ± sample standard deviation (and the rest) of per-image values.

Bad input raises ``ValueError`` naming ``pred``/``target``/``image`` and what was expected.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from dxr.cli import CommandError

PSNR_CAP_DB = 100.0  # PSNR of identical images (infinite) in means and standard deviations
CNR_KEPT = 0.95  # a nodule's CNR "fell" when after < CNR_KEPT × before, else it was kept
NOISE_SIGMA = 1.5  # px: the Gaussian blur whose residual is the noise of noise_measure
FLAT_PERCENTILE = 50.0  # pixels whose local gradient is at most this percentile count as flat
CNR_STD_FLOOR = 1e-4  # the background standard deviation of nodule_cnr is at least this
RANGE_SLACK = 1e-4  # image values may exceed [0, 1] by this much (rounding) before they are refused


def skimage_metrics():
    try:
        from skimage import metrics
    except ModuleNotFoundError:
        raise CommandError("PSNR/SSIM need scikit-image: pip install 'scikit-image>=0.22' "
                           "(or pip install -e '.[eval]')") from None
    return metrics


def _ndimage():
    try:
        from scipy import ndimage
    except ModuleNotFoundError:
        raise CommandError("the noise, sharpness and CNR measures need scipy: pip install 'scipy>=1.10'") from None
    return ndimage


def _plane(name: str, array, *, unit: bool = True) -> np.ndarray:
    """``array`` as a finite 2-D float64 array (in [0, 1] when ``unit``), else ValueError naming ``name``."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) image, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must be finite, got {int((~np.isfinite(array)).sum())} NaN or infinite values")
    if unit:
        low, high = float(array.min()), float(array.max())
        if low < -RANGE_SLACK or high > 1 + RANGE_SLACK:
            raise ValueError(f"{name} must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]")
        array = np.clip(array, 0.0, 1.0)
    return array


def ssim_window(height: int, width: int) -> int:
    """The SSIM window side for an image: 7, or the largest odd side that fits a smaller image (at least 3)."""
    side = min(height, width)
    if side < 3:
        raise ValueError(f"pred and target must be at least 3×3 pixels for SSIM (its window), got {width}×{height}")
    return min(7, side if side % 2 else side - 1)


def image_metrics(pred, target) -> dict:
    """``{"psnr": dB, "ssim": ...}`` of ``pred`` against ``target``, two (H, W) images in [0, 1].

    PSNR and SSIM are scikit-image's (``data_range=1``); SSIM uses a 7×7 window, or the largest odd
    window that fits an image smaller than 7 pixels (see :func:`ssim_window`). Identical images give a
    PSNR of ``inf`` (and SSIM 1). Raises ValueError naming ``pred`` or ``target`` for an image that is not
    2-D, finite and in [0, 1], or when their shapes differ.
    """
    pred = _plane("pred", pred)
    target = _plane("target", target)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got pred {pred.shape} and target {target.shape}")
    win_size = ssim_window(*target.shape)
    metrics = skimage_metrics()
    mse = float(np.mean((pred - target) ** 2))
    psnr = math.inf if mse == 0 else float(metrics.peak_signal_noise_ratio(target, pred, data_range=1.0))
    ssim = float(metrics.structural_similarity(target, pred, data_range=1.0, win_size=win_size))
    return {"psnr": psnr, "ssim": ssim}


def _local_gradient(image: np.ndarray, sigma: float) -> np.ndarray:
    ndimage = _ndimage()
    smooth = ndimage.gaussian_filter(image, sigma, mode="reflect")
    rows, cols = np.gradient(smooth)
    return np.hypot(rows, cols)


def noise_measure(image, reference=None, mask=None, *, sigma: float = NOISE_SIGMA) -> float:
    """The noise of ``image``: the standard deviation of its high-frequency residual over flat regions.

    The residual is ``image`` minus its Gaussian blur (``sigma`` px, 1.5 by default). Flat pixels are those
    where the gradient magnitude of the blurred ``reference`` (``image`` itself when None) is at most its
    median, among the pixels of ``mask`` (a boolean (H, W) array; all pixels when None). Structure is
    excluded this way, so what remains is mostly noise. Give two images the same ``reference`` (e.g. a
    restored image and its HQ target both with the HQ reference) to measure them over the same pixels.
    Images in any range are accepted (the figure is in the image's units).
    """
    image = _plane("image", image, unit=False)
    ref = image if reference is None else _plane("reference", reference, unit=False)
    if ref.shape != image.shape:
        raise ValueError(f"reference must have the shape of image {image.shape}, got {ref.shape}")
    if mask is None:
        region = np.ones(image.shape, dtype=bool)
    else:
        region = np.asarray(mask, dtype=bool)
        if region.shape != image.shape:
            raise ValueError(f"mask must have the shape of image {image.shape}, got {region.shape}")
        if not region.any():
            raise ValueError("mask selects no pixel")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0 px, got {sigma}")
    residual = image - _ndimage().gaussian_filter(image, sigma, mode="reflect")
    gradient = _local_gradient(ref, sigma)
    flat = region & (gradient <= np.percentile(gradient[region], FLAT_PERCENTILE))
    return float(residual[flat].std())


def sharpness(image) -> float:
    """A no-reference sharpness figure: the mean magnitude of the Sobel gradient of ``image``, divided by
    8 so that a ramp rising by d per pixel scores d (image units per pixel). Blurring lowers it."""
    image = _plane("image", image, unit=False)
    ndimage = _ndimage()
    rows = ndimage.sobel(image, axis=0, mode="reflect") / 8
    cols = ndimage.sobel(image, axis=1, mode="reflect") / 8
    return float(np.hypot(rows, cols).mean())


def nodule_geometry(nodule: Mapping) -> tuple[float, float, float, float, float, float, float]:
    """(cx, cy, r_in, bx, by, half_w, half_h) of a sidecar nodule record, in pixel index coordinates."""
    try:
        cx, cy = (float(v) for v in nodule["center_px"])
        x0, y0, x1, y1 = (float(v) for v in nodule["box_px"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"nodule must hold center_px [col, row] and box_px [x0, y0, x1, y1], got {dict(nodule)}") from None
    if not all(math.isfinite(v) for v in (cx, cy, x0, y0, x1, y1)):
        raise ValueError(f"nodule center_px and box_px must be finite, got {nodule['center_px']} and {nodule['box_px']}")
    width, height = abs(x1 - x0), abs(y1 - y0)
    r_in = max(0.35 * min(width, height), 1.5)
    return cx, cy, r_in, (x0 + x1) / 2, (y0 + y1) / 2, max(width / 2, r_in), max(height / 2, r_in)


def nodule_regions(shape: tuple[int, int], nodule: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """(inside, background) boolean masks of a nodule in an image of ``shape``; see :func:`nodule_cnr`."""
    cx, cy, r_in, bx, by, half_w, half_h = nodule_geometry(nodule)
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    inside = (cols - cx) ** 2 + (rows - cy) ** 2 <= r_in ** 2
    box_distance = np.maximum(np.abs(cols - bx) / half_w, np.abs(rows - by) / half_h)
    background = (box_distance >= 1.2) & (box_distance <= 2.0)
    return inside, background


def nodule_cnr(image, nodule: Mapping) -> float:
    """The contrast-to-noise ratio of one nodule (a sidecar record with ``center_px`` [col, row] and
    ``box_px`` [x0, y0, x1, y1] in pixels of ``image``, a 2-D array).

    Inside: the disc around ``center_px`` of radius 0.35 × the box's shorter side (at least 1.5 px).
    Background: the square ring between 1.2 and 2 times the box's half-size around the box centre
    (half-sizes at least the disc radius), clipped to the image. CNR = (mean inside − mean background) /
    std of the background, the std floored at :data:`CNR_STD_FLOOR`. Nodules are denser (brighter) than
    lung, so the sign is kept: a brighter nodule raises its CNR, one blurred into the background lowers
    it. NaN when the disc holds no pixel or the ring fewer than 8 (a nodule at the border).
    """
    image = _plane("image", image, unit=False)
    inside, background = nodule_regions(image.shape, nodule)
    if inside.sum() < 1 or background.sum() < 8:
        return math.nan
    ring = image[background]
    return float((image[inside].mean() - ring.mean()) / max(float(ring.std()), CNR_STD_FLOOR))


def summary(values: Sequence[float], *, cap: Optional[float] = None) -> dict:
    """``{"mean", "std", "median", "min", "max", "n"}`` of the finite values (NaN left out; with ``cap``,
    infinities count as ±cap). ``std`` is the sample standard deviation (0 for one value); None when empty."""
    array = np.asarray([float(v) for v in values], dtype=np.float64)
    if cap is not None:
        array = np.where(np.isposinf(array), cap, np.where(np.isneginf(array), -cap, array))
    array = array[np.isfinite(array)]
    if array.size == 0:
        return {"mean": None, "std": None, "median": None, "min": None, "max": None, "n": 0}
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if array.size > 1 else 0.0,
            "median": float(np.median(array)), "min": float(array.min()), "max": float(array.max()),
            "n": int(array.size)}

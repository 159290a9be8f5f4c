"""Measure restorations: ``python -m dxr.evaluate --pairs NAME=DIR ... [--model NAME=CKPT ...] [--drrs DIR] --out DIR``.

Two kinds of test data:

- ``--pairs NAME=DIR``: a paired folder of ``dxr.synth`` (``DIR/lq/<name>.png`` and ``DIR/hq/<name>.png``,
  equal names and sizes). Every method restores the LQ image and is scored against HQ: PSNR and SSIM
  (scikit-image, data range 1) and the noise figure of :func:`noise_measure` (HQ's own noise is the
  reference: a good restoration is no noisier than HQ). The row ``identity`` is the LQ input itself.
- ``--drrs DIR``: real DRRs (``drr_NNNNN.png``) with ``drr_NNNNN.json`` sidecars listing their nodules.
  There is no HQ truth, so each in-view nodule's contrast-to-noise ratio (:func:`nodule_cnr`) is
  measured before and after restoration — a restoration should keep nodules visible — together with
  the no-reference :func:`sharpness` of the whole image.

Each ``--model NAME=CKPT`` (an ``hq-ddpm`` or ``bicubic-ddpm`` run folder or checkpoint) is a method,
sampled by DDIM with ``--steps`` steps. Output::

    out/figures/pairs_<set>.png   LQ | each method | HQ for a few test images of each set
    out/figures/drrs.png          DRR before | after each method, nodule boxes drawn, a nodule enlarged
    out/report.md                 the tables, the settings, links to the figures
    out/metrics.json              every number (JSON-safe), written last: its presence marks the folder complete

Conventions: means come with the sample standard deviation over images (0 for one image). The PSNR
of an image identical to its target is infinite: per image it is ``"inf"`` in metrics.json, and it
counts as :data:`PSNR_CAP_DB` (100 dB) in means and standard deviations. A value that cannot be
measured (a nodule too close to the border) is ``null`` and left out of the summaries.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from dxr.cli import CommandError, run
from dxr.inference import PathLike, batches, read_grayscale, resize

PSNR_CAP_DB = 100.0  # PSNR of identical images (infinite) in means and standard deviations
CNR_KEPT = 0.95  # a nodule's CNR "fell" when after < CNR_KEPT × before, else it was kept
NOISE_SIGMA = 1.5  # px: the Gaussian blur whose residual is the noise of noise_measure
FLAT_PERCENTILE = 50.0  # pixels whose local gradient is at most this percentile count as flat
CNR_STD_FLOOR = 1e-4  # the background standard deviation of nodule_cnr is at least this
RANGE_SLACK = 1e-4  # image values may exceed [0, 1] by this much (rounding) before they are refused
IDENTITY = "identity"
IDENTITY_LABEL = "identity (LQ input)"


# --------------------------------------------------------------------------------------------------
# measures


def _skimage_metrics():
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
    metrics = _skimage_metrics()
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


def _nodule_geometry(nodule: Mapping) -> tuple[float, float, float, float, float, float, float]:
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
    cx, cy, r_in, bx, by, half_w, half_h = _nodule_geometry(nodule)
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


# --------------------------------------------------------------------------------------------------
# files


def _name(path: Path, root: Path) -> str:
    return path.relative_to(root).with_suffix("").as_posix()


def _listing(sample: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(sample[:limit])
    return shown + (f" (and {len(sample) - limit} more)" if len(sample) > limit else "")


def paired_files(folder: PathLike) -> list[tuple[Path, Path]]:
    """(lq, hq) file pairs of a paired folder (``lq/`` and ``hq/`` holding images of equal names), in name
    order. CommandError when the folder or either side is missing, holds no image, or the names differ.
    Sizes are checked when the images are read."""
    from dxr.data.io import image_files

    folder = Path(folder)
    if not folder.is_dir():
        raise CommandError(f"{folder}: no such folder (a paired folder holds lq/ and hq/ images of equal names)")
    sides = {}
    for side in ("lq", "hq"):
        if not (folder / side).is_dir():
            raise CommandError(f"{folder}: missing {side}/ (a paired folder holds lq/ and hq/ images of equal names)")
        files = image_files(folder / side)
        names = [_name(f, folder / side) for f in files]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise CommandError(f"{folder / side}: two images share a name: {_listing(twice)}")
        sides[side] = dict(zip(names, files))
    if not sides["lq"] and not sides["hq"]:
        raise CommandError(f"{folder}: lq/ and hq/ hold no PNG, JPEG, TIFF or DICOM image")
    only_lq = sorted(set(sides["lq"]) - set(sides["hq"]))
    only_hq = sorted(set(sides["hq"]) - set(sides["lq"]))
    if only_lq or only_hq:
        parts = ([f"only in lq/: {_listing(only_lq)}"] if only_lq else []) + \
                ([f"only in hq/: {_listing(only_hq)}"] if only_hq else [])
        raise CommandError(f"{folder}: lq/ and hq/ must hold the same image names; {'; '.join(parts)}")
    return [(sides["lq"][n], sides["hq"][n]) for n in sorted(sides["lq"])]


def drr_files(folder: PathLike) -> list[tuple[Path, list[dict]]]:
    """Each image of a DRR folder with its in-view nodules from its ``.json`` sidecar (no sidecar: no
    nodules), in name order. CommandError when the folder is missing or holds no image, or a sidecar
    is unreadable."""
    from dxr.data.io import image_files

    folder = Path(folder)
    if not folder.is_dir():
        raise CommandError(f"--drrs {folder}: no such folder")
    files = image_files(folder)
    if not files:
        raise CommandError(f"--drrs {folder}: holds no PNG, JPEG, TIFF or DICOM image")
    found = []
    for path in files:
        sidecar = path.with_suffix(".json")
        nodules: list[dict] = []
        if sidecar.is_file():
            try:
                record = json.loads(sidecar.read_text())
                listed = record.get("nodules", []) if isinstance(record, dict) else None
                if not isinstance(listed, list) or not all(isinstance(n, dict) for n in listed):
                    raise ValueError("its 'nodules' must be a list of records")
                nodules = [n for n in listed if n.get("in_view", True)]
                for nodule in nodules:
                    _nodule_geometry(nodule)
            except (OSError, ValueError) as err:
                raise CommandError(f"{sidecar}: not a readable DRR sidecar ({err})") from None
        found.append((path, nodules))
    return found


def _read_pair(lq_path: Path, hq_path: Path) -> tuple[np.ndarray, np.ndarray]:
    lq, hq = read_grayscale(lq_path), read_grayscale(hq_path)
    if lq.shape != hq.shape:
        raise CommandError(f"{lq_path} is {lq.shape[1]}×{lq.shape[0]} pixels but {hq_path} is "
                           f"{hq.shape[1]}×{hq.shape[0]}: a pair must have one size")
    return lq, hq


# --------------------------------------------------------------------------------------------------
# restoring


def load_restorers(models: Mapping[str, PathLike], *, steps: int = 25, device=None, seed: int = 0,
                   batch_size: int = 8, progress: bool = False) -> dict:
    """``{name: Restorer}`` of each ``hq-ddpm`` / ``bicubic-ddpm`` checkpoint or run folder in ``models``,
    sampling with DDIM in ``steps`` steps (0: every DDPM step). CommandError names the ``--model``."""
    from dxr.enhance import Restorer

    restorers = {}
    for name, path in models.items():
        if not Path(path).exists():
            raise CommandError(f"--model {name}={path}: no such checkpoint file or run folder")
        try:
            restorers[name] = Restorer.from_checkpoint(path, device=device, steps=steps, seed=seed,
                                                       batch_size=batch_size, progress=progress)
        except CommandError as err:
            raise CommandError(f"--model {name}: {err}") from None
    return restorers


def _restore(restorer, images: Sequence[np.ndarray], first: int) -> list[np.ndarray]:
    """(H', W') float32 outputs of ``restorer`` for each (H, W) image; image i is the ``first + i``-th."""
    tensors = [torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None] for image in images]
    if hasattr(restorer, "restore"):
        outputs = restorer.restore(tensors, first=first)
    else:
        outputs = [restorer(t) for t in tensors]
    return [out.detach().float().cpu() for out in outputs]


def _fit(output: torch.Tensor, size: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """An output (1, 1, H', W') as an (H, W) array of ``size`` (resized when it differs) and whether it was."""
    if output.dim() == 2:
        output = output[None, None]
    resized = tuple(output.shape[-2:]) != tuple(size)
    return resize(output.reshape(1, 1, *output.shape[-2:]), size)[0, 0].numpy().astype(np.float32), resized


def _settings_of(restorer) -> dict:
    try:
        return dict(restorer.settings())
    except AttributeError:
        return {}


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled)


def evaluate_pairs(restorers: Mapping[str, object], test_sets: Mapping[str, PathLike], *, batch_size: int = 8,
                   max_images: Optional[int] = None, progress: bool = False, samples: int = 4) -> dict:
    """PSNR, SSIM and noise of every method on every paired test set.

    ``restorers`` ``{name: Restorer}`` (a None value is skipped); the method ``identity`` (the LQ input
    itself) always comes first. ``test_sets`` ``{name: paired folder}``; at most ``max_images`` pairs each,
    read and restored ``batch_size`` at a time. Outputs of another size than HQ (a ×2 restorer) are
    resized to HQ's size, and the set records it. Returns ``{"methods": [...], "sets": {name: {"folder",
    "n", "metrics": {method: {"psnr", "ssim", "noise": summary}}, "hq_noise": summary, "resized":
    {method: bool}, "images": [per-image values]}}, "samples": {name: [{"name", "lq", "hq", "outputs"}]}}``
    where ``samples`` holds the first ``samples`` images of each set as arrays (for the figures).
    """
    active = {name: r for name, r in restorers.items() if r is not None}
    methods = [IDENTITY] + list(active)
    result: dict = {"methods": methods, "sets": {}, "samples": {}}
    for set_name, folder in test_sets.items():
        pairs = paired_files(folder)[:max_images or None]
        images, kept = [], []
        resized = {m: False for m in methods}
        bar = _progress(len(pairs) * len(methods), f"evaluate {set_name}", progress)
        for first, chunk in zip(range(0, len(pairs), batch_size), batches(pairs, batch_size)):
            read = [_read_pair(lq_path, hq_path) for lq_path, hq_path in chunk]
            outputs = {IDENTITY: [lq for lq, _ in read]}
            bar.update(len(chunk))
            for name, restorer in active.items():
                fitted = [_fit(out, hq.shape) for out, (_, hq) in zip(_restore(restorer, [lq for lq, _ in read], first), read)]
                outputs[name] = [image for image, _ in fitted]
                resized[name] |= any(flag for _, flag in fitted)
                bar.update(len(chunk))
            for i, ((lq_path, hq_path), (lq, hq)) in enumerate(zip(chunk, read)):
                record = {"name": _name(lq_path, Path(folder) / "lq"), "hq_noise": noise_measure(hq, reference=hq),
                          "psnr": {}, "ssim": {}, "noise": {}}
                for method in methods:
                    scores = image_metrics(outputs[method][i], hq)
                    record["psnr"][method] = scores["psnr"]
                    record["ssim"][method] = scores["ssim"]
                    record["noise"][method] = noise_measure(outputs[method][i], reference=hq)
                images.append(record)
                if len(kept) < samples:
                    kept.append({"name": record["name"], "lq": lq, "hq": hq,
                                 "outputs": {m: outputs[m][i] for m in methods if m != IDENTITY}})
        bar.close()
        result["sets"][set_name] = {
            "folder": str(Path(folder)),
            "n": len(images),
            "metrics": {m: {"psnr": summary([r["psnr"][m] for r in images], cap=PSNR_CAP_DB),
                            "psnr_infinite": sum(math.isinf(r["psnr"][m]) for r in images),
                            "ssim": summary([r["ssim"][m] for r in images]),
                            "noise": summary([r["noise"][m] for r in images])} for m in methods},
            "hq_noise": summary([r["hq_noise"] for r in images]),
            "resized": resized,
            "images": images,
        }
        result["samples"][set_name] = kept
    return result


def _prefer_nodules(files: list[tuple[Path, list[dict]]], limit: Optional[int]) -> list[tuple[Path, list[dict]]]:
    """At most ``limit`` images, those with nodules first (name order kept within each group)."""
    if not limit or limit >= len(files):
        return files
    chosen = ([f for f in files if f[1]] + [f for f in files if not f[1]])[:limit]
    order = {path: i for i, (path, _) in enumerate(files)}
    return sorted(chosen, key=lambda f: order[f[0]])


def evaluate_drrs(restorers: Mapping[str, object], folder: PathLike, *, batch_size: int = 8,
                  max_images: Optional[int] = None, progress: bool = False, samples: int = 3) -> dict:
    """Nodule CNR and sharpness of real DRRs before and after each restorer (there is no HQ truth).

    ``folder`` holds DRRs with ``.json`` sidecars (see :func:`drr_files`); with ``max_images`` at most that
    many, images with nodules first. For each in-view nodule: :func:`nodule_cnr` before and after each
    method (outputs of another size are resized back to the DRR's), and per method the share of
    measurable nodules whose CNR fell (after < 0.95 × before) or was kept (after ≥ 0.95 × before), and
    the ratio after / before. Returns ``{"folder", "n_images", "n_nodules", "n_measurable", "before":
    {"cnr", "sharpness"}, "methods": {name: {"cnr", "sharpness", "cnr_ratio": summary, "cnr_fell",
    "cnr_kept": share or None, "n_nodules": measurable}}, "nodules": [...], "images": [...], "samples":
    [{"name", "image", "outputs", "nodules"}]}`` (``samples``: up to ``samples`` images with nodules, else
    any, as arrays for the figure).
    """
    active = {name: r for name, r in restorers.items() if r is not None}
    files = _prefer_nodules(drr_files(folder), max_images)
    with_nodules = {path for path, nodules in files if nodules}
    sample_paths = set(([p for p, _ in files if p in with_nodules] + [p for p, _ in files if p not in with_nodules])[:samples])
    nodule_rows, image_rows, kept = [], [], []
    bar = _progress(len(files) * (1 + len(active)), "evaluate DRRs", progress)
    for first, chunk in zip(range(0, len(files), batch_size), batches(files, batch_size)):
        images = [read_grayscale(path) for path, _ in chunk]
        bar.update(len(chunk))
        outputs = {}
        for name, restorer in active.items():
            outputs[name] = [_fit(out, image.shape)[0] for out, image in zip(_restore(restorer, images, first), images)]
            bar.update(len(chunk))
        for i, ((path, nodules), image) in enumerate(zip(chunk, images)):
            image_rows.append({"name": path.stem, "nodules": len(nodules), "sharpness_before": sharpness(image),
                               "sharpness_after": {m: sharpness(outputs[m][i]) for m in active}})
            for nodule in nodules:
                nodule_rows.append({"image": path.stem, "id": nodule.get("id"), "diameter_mm": nodule.get("diameter_mm"),
                                    "center_px": list(nodule["center_px"]), "box_px": list(nodule["box_px"]),
                                    "cnr_before": nodule_cnr(image, nodule),
                                    "cnr_after": {m: nodule_cnr(outputs[m][i], nodule) for m in active}})
            if path in sample_paths:
                kept.append({"name": path.stem, "image": image, "outputs": {m: outputs[m][i] for m in active},
                             "nodules": nodules})
    bar.close()
    methods = {}
    for name in active:
        pairs = [(r["cnr_before"], r["cnr_after"][name]) for r in nodule_rows]
        pairs = [(b, a) for b, a in pairs if math.isfinite(b) and math.isfinite(a)]
        fell = sum(a < CNR_KEPT * b for b, a in pairs)
        methods[name] = {
            "cnr": summary([a for _, a in pairs]),
            "cnr_ratio": summary([a / b for b, a in pairs if b != 0]),
            "cnr_fell": fell / len(pairs) if pairs else None,
            "cnr_kept": (len(pairs) - fell) / len(pairs) if pairs else None,
            "n_nodules": len(pairs),
            "sharpness": summary([r["sharpness_after"][name] for r in image_rows]),
        }
    return {
        "folder": str(Path(folder)),
        "n_images": len(image_rows),
        "n_with_nodules": len(with_nodules),
        "n_nodules": len(nodule_rows),
        "n_measurable": sum(math.isfinite(r["cnr_before"]) for r in nodule_rows),
        "before": {"cnr": summary([r["cnr_before"] for r in nodule_rows]),
                   "sharpness": summary([r["sharpness_before"] for r in image_rows])},
        "methods": methods,
        "nodules": nodule_rows,
        "images": image_rows,
        "samples": kept,
    }


# --------------------------------------------------------------------------------------------------
# report


def json_safe(value):
    """``value`` with NumPy scalars as Python numbers, tuples as lists, NaN as None and ±infinity as the
    strings ``"inf"`` / ``"-inf"``, so that ``json.dumps(..., allow_nan=False)`` takes it."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, Path):
        return str(value)
    return value


def _without_samples(result: Optional[dict]) -> Optional[dict]:
    return None if result is None else {k: v for k, v in result.items() if k != "samples"}


def slug(name: str) -> str:
    """A file-name-safe form of a test set's name: lower case, runs of other characters as one '-'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "set"


def _figure_names(sets: Sequence[str]) -> dict[str, str]:
    names, used = {}, set()
    for name in sets:
        base = candidate = f"pairs_{slug(name)}.png"
        count = 2
        while candidate in used:
            candidate = base.replace(".png", f"-{count}.png")
            count += 1
        used.add(candidate)
        names[name] = candidate
    return names


def _label(name: str) -> str:
    return IDENTITY_LABEL if name == IDENTITY else name


def _cell(stats: dict, digits: int) -> str:
    if stats["mean"] is None:
        return "—"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _share(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:.0f} %"


@dataclass
class Evaluation:
    """The results of one evaluation: ``pairs`` (of :func:`evaluate_pairs`) and ``drrs`` (of
    :func:`evaluate_drrs`), either None when not run, and the ``settings`` it ran with."""

    pairs: Optional[dict]
    drrs: Optional[dict]
    settings: dict = field(default_factory=dict)

    def metrics(self) -> dict:
        """Every number, JSON-safe (see :func:`json_safe`), without the sample images."""
        return json_safe({
            "name": "dxr-evaluation",
            "conventions": {"psnr_cap_db": PSNR_CAP_DB, "psnr_identical": "inf per image, the cap in summaries",
                            "std": "sample standard deviation over images", "cnr_kept_ratio": CNR_KEPT,
                            "noise_sigma_px": NOISE_SIGMA, "unmeasurable": None},
            "settings": self.settings,
            "pairs": _without_samples(self.pairs),
            "drrs": _without_samples(self.drrs),
        })

    def pair_table(self) -> list[str]:
        """The markdown table of PSNR / SSIM: a row per method, a column per test set."""
        if not self.pairs or not self.pairs["sets"]:
            return []
        sets = self.pairs["sets"]
        header = ["Method"] + [f"{name} (n={s['n']})" for name, s in sets.items()]
        rows = [[_label(m)] + [f"{_cell(s['metrics'][m]['psnr'], 2)} / {_cell(s['metrics'][m]['ssim'], 3)}"
                               for s in sets.values()] for m in self.pairs["methods"]]
        return _table(header, rows)

    def noise_table(self) -> list[str]:
        """The markdown table of the noise figure, with HQ's own as the last row."""
        if not self.pairs or not self.pairs["sets"]:
            return []
        sets = self.pairs["sets"]
        header = ["Method"] + [f"{name} (n={s['n']})" for name, s in sets.items()]
        rows = [[_label(m)] + [_cell(s["metrics"][m]["noise"], 4) for s in sets.values()]
                for m in self.pairs["methods"]]
        rows.append(["HQ (reference)"] + [_cell(s["hq_noise"], 4) for s in sets.values()])
        return _table(header, rows)

    def drr_table(self) -> list[str]:
        """The markdown table of nodule CNR and sharpness on the real DRRs."""
        if not self.drrs:
            return []
        d = self.drrs
        header = ["Method", "nodule CNR", "CNR after / before (median)", "CNR fell > 5 %", "CNR kept (≥ 95 %)",
                  "sharpness"]
        rows = [["before (DRR as is)", _cell(d["before"]["cnr"], 2), "—", "—", "—", _cell(d["before"]["sharpness"], 4)]]
        for name, m in d["methods"].items():
            ratio = m["cnr_ratio"]["median"]
            rows.append([name, _cell(m["cnr"], 2), "—" if ratio is None else f"{ratio:.2f}", _share(m["cnr_fell"]),
                         _share(m["cnr_kept"]), _cell(m["sharpness"], 4)])
        return _table(header, rows)

    def tables(self) -> str:
        """Every table, as printed at the end of ``python -m dxr.evaluate``."""
        parts = []
        if self.pair_table():
            parts += ["PSNR (dB) / SSIM against HQ, mean ± std", *self.pair_table(), "",
                      "Noise (lower is less; HQ is the reference)", *self.noise_table(), ""]
        if self.drr_table():
            parts += [f"Real DRRs: {_count(self.drrs['n_images'], 'image')}, {_count(self.drrs['n_nodules'], 'nodule')} "
                      f"in view ({self.drrs['n_measurable']} measurable)", *self.drr_table(), ""]
        return "\n".join(parts).rstrip() + "\n"

    def markdown(self, figures: Mapping[str, str]) -> str:
        """The text of report.md; ``figures`` maps a caption to a path relative to the report."""
        lines = ["# DiffusionXRay evaluation", ""]
        if self.pair_table():
            lines += ["## Test pairs: PSNR (dB) / SSIM against HQ", "", *self.pair_table(), "",
                      "Mean ± sample standard deviation over the n test images of each set; PSNR and SSIM by "
                      "scikit-image with data range 1. The identity row scores the LQ input itself. An image "
                      f"identical to HQ has infinite PSNR; it counts as {PSNR_CAP_DB:.0f} dB in the means.", ""]
            for name, s in self.pairs["sets"].items():
                grown = [m for m, flag in s["resized"].items() if flag]
                if grown:
                    lines += [f"- {name}: outputs of {', '.join(grown)} were resized (bicubic) to the HQ size.", ""]
            lines += ["## Noise", "", *self.noise_table(), "",
                      f"Standard deviation of the high-frequency residual (image − its Gaussian blur, σ = {NOISE_SIGMA} "
                      f"px) over the flattest half of each HQ image (local gradient of the blurred HQ at most its "
                      "median). Lower is less noise; a restoration should be no noisier than HQ.", ""]
        if self.drr_table():
            d = self.drrs
            lines += ["## Real DRRs: nodule contrast-to-noise ratio", "",
                      f"{d['folder']}: {_count(d['n_images'], 'image')} ({d['n_with_nodules']} with nodules), "
                      f"{_count(d['n_nodules'], 'nodule')} in view, {d['n_measurable']} measurable.", "",
                      *self.drr_table(), "",
                      "CNR = (mean inside − mean of a ring around the nodule box) / std of the ring; nodules are "
                      f"brighter, so a positive CNR. A nodule's CNR fell when after < {CNR_KEPT} × before, and was kept "
                      "otherwise (shares of measurable nodules). Smoothing the background noise alone raises CNR, so "
                      "read it together with the sharpness (mean Sobel gradient magnitude per pixel, higher is "
                      "sharper) and the noise table.", ""]
        lines += ["## Settings", "", "```json", json.dumps(json_safe(self.settings), indent=1), "```", ""]
        if figures:
            lines += ["## Figures", ""]
            for caption, path in figures.items():
                lines += [f"### {caption}", "", f"![{caption}]({path})", ""]
        lines += ["Every number is in [metrics.json](metrics.json).", ""]
        return "\n".join(lines)

    def write(self, out: PathLike) -> Path:
        """Write the figures, report.md and — last — metrics.json into ``out``; returns report.md's path.

        Every file is written to a temporary name and renamed, and a previous metrics.json is removed
        first, so metrics.json exists only once everything of this evaluation is in place."""
        from dxr.training.checkpoint import atomic_write

        out = Path(out)
        if out.exists() and not out.is_dir():
            raise CommandError(f"--out {out}: exists and is not a folder")
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").unlink(missing_ok=True)
        figures: dict[str, str] = {}

        def save(picture, relative: str, caption: str) -> None:
            atomic_write(out / relative, lambda tmp: picture.save(tmp, format="PNG"))
            figures[caption] = relative

        if self.pairs:
            names = _figure_names(list(self.pairs["sets"]))
            for set_name, kept in self.pairs.get("samples", {}).items():
                if kept:
                    methods = [m for m in self.pairs["methods"] if m != IDENTITY]
                    save(pairs_figure(kept, methods), f"figures/{names[set_name]}", f"Test pairs: {set_name}")
        if self.drrs and self.drrs.get("samples"):
            save(drrs_figure(self.drrs["samples"], list(self.drrs["methods"])), "figures/drrs.png",
                 "Real DRRs before and after restoration")
        report = atomic_write(out / "report.md", lambda tmp: tmp.write_text(self.markdown(figures)))
        text = json.dumps(self.metrics(), indent=1, allow_nan=False)
        atomic_write(out / "metrics.json", lambda tmp: tmp.write_text(text))
        return report


def write_report(out: PathLike, pairs_result: Optional[dict], drrs_result: Optional[dict], settings: dict) -> Path:
    """Write ``out/figures/*.png``, ``out/report.md`` and, last, ``out/metrics.json`` (see
    :meth:`Evaluation.write`); returns the path of report.md."""
    return Evaluation(pairs_result, drrs_result, dict(settings)).write(out)


# --------------------------------------------------------------------------------------------------
# figures

TILE = 192  # px: side of each image in the figures
HEADER = 32  # px: the label band above each column
GAP = 2  # px: the gutter between images
PITCH = TILE + GAP


def _picture(image: np.ndarray, side: int = TILE):
    from PIL import Image

    array = (np.clip(np.asarray(image, dtype=np.float64), 0, 1) * 255 + 0.5).astype(np.uint8)
    height, width = array.shape
    scale = side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    method = Image.NEAREST if scale >= 4 else Image.BILINEAR
    return Image.fromarray(array, mode="L").resize(size, method).convert("RGB"), scale


def _header(draw, left: int, top: int, width: int, text: str) -> None:
    lines = textwrap.wrap(text, max(4, width // 6))[:2] or [""]
    for k, line in enumerate(lines):
        draw.text((left + 4, top + 3 + 13 * k), line, fill=(255, 255, 0))


def pairs_figure(samples: Sequence[dict], methods: Sequence[str]):
    """A PIL image: a row per sample of :func:`evaluate_pairs`, columns LQ | each method | HQ, labelled."""
    from PIL import Image, ImageDraw

    columns = ["LQ input", *methods, "HQ (target)"]
    sheet = Image.new("RGB", (len(columns) * PITCH - GAP, HEADER + len(samples) * PITCH - GAP), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for col, label in enumerate(columns):
        _header(draw, col * PITCH, 0, TILE, label)
    for row, sample in enumerate(samples):
        images = [sample["lq"], *(sample["outputs"][m] for m in methods), sample["hq"]]
        for col, image in enumerate(images):
            picture, _ = _picture(image)
            sheet.paste(picture, (col * PITCH, HEADER + row * PITCH))
        draw.text((4, HEADER + row * PITCH + TILE - 14), sample["name"][:TILE // 6], fill=(0, 255, 255))
    return sheet


def _crop_box(nodule: dict, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """A square (x0, y0, x1, y1) around a nodule, three times its box, inside an image of ``shape``."""
    cx, cy, r_in, bx, by, half_w, half_h = _nodule_geometry(nodule)
    half = int(math.ceil(3 * max(half_w, half_h, 4)))
    side = min(2 * half, shape[0], shape[1])
    x0 = int(min(max(round(bx) - side // 2, 0), shape[1] - side))
    y0 = int(min(max(round(by) - side // 2, 0), shape[0] - side))
    return x0, y0, x0 + side, y0 + side


def drrs_figure(samples: Sequence[dict], methods: Sequence[str]):
    """A PIL image: per sample of :func:`evaluate_drrs` a row of the DRR before | after each method with
    nodule boxes drawn, and beneath it the first nodule's neighbourhood enlarged (when it has nodules)."""
    from PIL import Image, ImageDraw

    columns = ["DRR (before)", *methods]
    heights = [PITCH * (2 if s["nodules"] else 1) for s in samples]
    sheet = Image.new("RGB", (len(columns) * PITCH - GAP, HEADER + sum(heights) - GAP), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for col, label in enumerate(columns):
        _header(draw, col * PITCH, 0, TILE, label)
    top = HEADER
    for sample, height in zip(samples, heights):
        images = [sample["image"], *(sample["outputs"][m] for m in methods)]
        crop = _crop_box(sample["nodules"][0], images[0].shape) if sample["nodules"] else None
        for col, image in enumerate(images):
            picture, scale = _picture(image)
            left = col * PITCH
            sheet.paste(picture, (left, top))
            for nodule in sample["nodules"]:
                x0, y0, x1, y1 = (float(v) * scale for v in nodule["box_px"])
                draw.rectangle([left + x0 - 2, top + y0 - 2, left + x1 + 2, top + y1 + 2], outline=(255, 64, 64))
            if crop is not None:
                cx0, cy0, cx1, cy1 = crop
                draw.rectangle([left + cx0 * scale, top + cy0 * scale, left + cx1 * scale - 1, top + cy1 * scale - 1],
                               outline=(255, 220, 0))
                close, zoom = _picture(image[cy0:cy1, cx0:cx1])
                sheet.paste(close, (left, top + PITCH))
                x0, y0, x1, y1 = (float(v) for v in sample["nodules"][0]["box_px"])
                draw.rectangle([left + (x0 - cx0) * zoom - 2, top + PITCH + (y0 - cy0) * zoom - 2,
                                left + (x1 - cx0) * zoom + 2, top + PITCH + (y1 - cy0) * zoom + 2], outline=(255, 64, 64))
        draw.text((4, top + TILE - 14), sample["name"][:TILE // 6], fill=(0, 255, 255))
        top += height
    return sheet


# --------------------------------------------------------------------------------------------------
# command line


def parse_assignment(text: str, flag: str, what: str = "DIR") -> tuple[str, str]:
    """``NAME=VALUE`` of a repeatable flag as (name, value); CommandError naming ``flag`` when malformed."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise CommandError(f"{flag} expects NAME={what}, got {text!r}")
    return name.strip(), value.strip()


def _assignments(texts: Sequence[str], flag: str, what: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for text in texts:
        name, value = parse_assignment(text, flag, what)
        if name in found:
            raise CommandError(f"{flag}: the name {name!r} is given twice")
        found[name] = value
    return found


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dxr.evaluate", description=__doc__.split("\n\n")[0].replace("``", ""),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pairs", action="append", default=[], metavar="NAME=DIR",
                   help="a paired test folder (lq/ and hq/), repeatable; at least one unless --drrs")
    p.add_argument("--model", action="append", default=[], metavar="NAME=CKPT",
                   help="an hq-ddpm or bicubic-ddpm checkpoint file or run folder, repeatable")
    p.add_argument("--drrs", default=None, metavar="DIR", help="a folder of real DRRs with .json nodule sidecars")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for report.md, metrics.json and figures/")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps of the restorers (0: every DDPM step)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=8, help="images per restoring call (and tiles per network call)")
    p.add_argument("--max-images", type=int, default=None, help="at most this many images per test set and of --drrs")
    p.add_argument("--seed", type=int, default=0, help="seed of the restorers' noise")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _main(argv: Optional[Sequence[str]] = None) -> int:
    from dxr.inference import default_device

    args = _parser().parse_args(argv)
    test_sets = _assignments(args.pairs, "--pairs", "DIR")
    models = _assignments(args.model, "--model", "CKPT")
    if not test_sets and args.drrs is None:
        raise CommandError("give at least one --pairs NAME=DIR (or --drrs DIR)")
    if IDENTITY in models:
        raise CommandError(f"--model: the name {IDENTITY!r} is the LQ input's row; choose another")
    if args.steps < 0:
        raise CommandError(f"--steps must be >= 0 (0: every DDPM step), got {args.steps}")
    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_images is not None and args.max_images < 1:
        raise CommandError(f"--max-images must be >= 1, got {args.max_images}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out}: exists and is not a folder")
    for name, folder in test_sets.items():  # every input checked before any model is loaded
        try:
            paired_files(folder)
        except CommandError as err:
            raise CommandError(f"--pairs {name}: {err}") from None
    if args.drrs is not None:
        drr_files(args.drrs)
    _skimage_metrics()
    device = default_device(args.device)
    progress = not args.no_progress
    restorers = load_restorers(models, steps=args.steps, device=device, seed=args.seed, batch_size=args.batch_size,
                               progress=False)
    pairs = evaluate_pairs(restorers, test_sets, batch_size=args.batch_size, max_images=args.max_images,
                           progress=progress) if test_sets else None
    drrs = evaluate_drrs(restorers, args.drrs, batch_size=args.batch_size, max_images=args.max_images,
                         progress=progress) if args.drrs is not None else None
    settings = {
        "steps": args.steps, "seed": args.seed, "device": str(device), "batch_size": args.batch_size,
        "max_images": args.max_images,
        "pairs": {name: str(Path(folder).absolute()) for name, folder in test_sets.items()},
        "drrs": None if args.drrs is None else str(Path(args.drrs).absolute()),
        "models": {name: {"checkpoint": str(Path(models[name]).absolute()), **_settings_of(r)}
                   for name, r in restorers.items()},
    }
    evaluation = Evaluation(pairs, drrs, settings)
    report = evaluation.write(out)
    print(evaluation.tables(), end="")
    print(f"report: {report}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m dxr.evaluate`` with ``argv``; returns the exit status (0, 2 for an expected error, 130 on Ctrl-C)."""
    return run(_main, argv, prog="python -m dxr.evaluate")


__all__ = ["image_metrics", "ssim_window", "noise_measure", "sharpness", "nodule_cnr", "nodule_regions", "summary",
           "paired_files", "drr_files", "load_restorers", "evaluate_pairs", "evaluate_drrs", "Evaluation",
           "write_report", "pairs_figure", "drrs_figure", "json_safe", "slug", "parse_assignment", "main",
           "PSNR_CAP_DB", "CNR_KEPT"]


if __name__ == "__main__":
    sys.exit(main())

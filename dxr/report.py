"""The evaluation's outputs: ``report.md`` (tables of mean ± std and n), ``metrics.json`` (every
number, JSON-safe, written last) and the figures (test pairs side by side; DRRs before and after with
a nodule enlarged). :class:`Evaluation` holds the results of :func:`dxr.evaluate.evaluate_pairs` and
:func:`dxr.evaluate.evaluate_drrs` and writes them.
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from dxr.cli import CommandError
from dxr.inference import PathLike
from dxr.metrics import CNR_KEPT, NOISE_SIGMA, PSNR_CAP_DB, nodule_geometry

IDENTITY = "identity"
IDENTITY_LABEL = "identity (LQ input)"


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
    cx, cy, r_in, bx, by, half_w, half_h = nodule_geometry(nodule)
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

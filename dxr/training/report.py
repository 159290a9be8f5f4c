"""What a run leaves to look at: ``metrics.jsonl``, sample grids and a loss curve, as PNG via Pillow."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from dxr.training.checkpoint import atomic_write

METRICS = "metrics.jsonl"


class MetricsLog:
    """Appends one JSON record per line to ``folder/metrics.jsonl`` and keeps the loss history.

    ``resume_step``: records after it (logged after the checkpoint a run resumes from) are dropped,
    so the file reads as one uninterrupted run; None starts a new file. A last line cut short by a crash
    is dropped too, with a line in :attr:`notes`; an unreadable line before the last raises ValueError
    naming the file and line.

    The logging window: :meth:`add` sums each step's losses (on their device, no host sync) and
    :meth:`write_window` appends their means over the steps since the last record, with the steps per
    second; :attr:`images_per_s` is that rate times ``images_per_step``. :meth:`window_state` is what a
    checkpoint keeps of an open window, so that a resumed run logs what an uninterrupted one does.
    """

    def __init__(self, folder: Path, resume_step: Optional[int] = None, *, images_per_step: int = 1):
        self.path = Path(folder) / METRICS
        self.records: list[dict] = []
        self.notes: list[str] = []
        self.images_per_step = images_per_step
        self.images_per_s: Optional[float] = None
        self.open_window(resume_step or 0)
        if resume_step is not None and self.path.is_file():
            lines = self.path.read_text(errors="replace").splitlines()
            for number, line in enumerate(lines, 1):
                try:
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise ValueError("not a JSON object")
                except ValueError as err:
                    if number == len(lines):
                        self.notes.append(f"{self.path}: dropped its last line, cut short by an interrupted write "
                                          f"({len(line)} characters)")
                        break
                    raise ValueError(f"{self.path}, line {number}: not a metrics record ({err}); "
                                     "repair or delete the file to resume") from None
                if record.get("step", 0) <= resume_step:
                    self.records.append(record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records)))

    def append(self, record: dict) -> None:
        self.records.append(record)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def open_window(self, start: int, sums: Optional[dict[str, float]] = None, *, device=None) -> None:
        """Start a window at step ``start``, now; ``sums`` (a checkpoint's, as floats) continue one left open."""
        self.window_start = start
        self.sums = {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in (sums or {}).items()}
        self.window_time = time.perf_counter()

    def add(self, losses: dict[str, Tensor]) -> None:
        """Add one step's losses to the window."""
        for key, value in losses.items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    def write_window(self, step: int, **extra) -> dict:
        """Append the record of the window ending after ``step``: the mean of every loss, ``extra``
        (e.g. ``lr``), ``steps_per_s``; then open the next window. Returns the record."""
        now = time.perf_counter()
        window = step - self.window_start
        steps_per_s = window / (now - self.window_time)
        record = {"step": step, **{k: round(float(v) / window, 6) for k, v in self.sums.items()}, **extra,
                  "steps_per_s": round(steps_per_s, 3)}
        self.append(record)
        self.images_per_s = steps_per_s * self.images_per_step
        self.window_start, self.window_time, self.sums = step, now, {}
        return record

    def window_state(self) -> dict:
        """The open window as a checkpoint keeps it: its first step and its sums as floats."""
        return {"start": self.window_start, "sums": {k: float(v) for k, v in self.sums.items()}}

    def series(self) -> dict[str, list[tuple[int, float]]]:
        """(step, value) per loss name: every logged key without a "/" except bookkeeping ones."""
        skip = {"step", "lr", "steps_per_s", "time", "grad_norm"}
        out: dict[str, list[tuple[int, float]]] = {}
        for record in self.records:
            for key, value in record.items():
                if key not in skip and "/" not in key and isinstance(value, (int, float)):
                    out.setdefault(key, []).append((record["step"], float(value)))
        return out


def to_uint8(images: Tensor) -> np.ndarray:
    """(N, 1, H, W) in [-1, 1] → (N, H, W) uint8."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].cpu().numpy()


def save_grid(rows: Sequence[tuple[str, Tensor]], path: Path, *, columns: int = 8, title: str = "") -> Path:
    """A grayscale PNG grid: each (label, images (N, 1, H, W) in [-1, 1]) fills ⌈N / columns⌉ rows
    under its label."""
    from PIL import Image, ImageDraw

    gap, label_height = 2, 12
    height, width = rows[0][1].shape[-2:]
    columns = min(columns, max(r[1].shape[0] for r in rows))
    lines = [(label, to_uint8(images[i:i + columns])) for label, images in rows
             for i in range(0, images.shape[0], columns)]
    top = label_height if title else 0
    canvas = Image.new("L", (columns * (width + gap) + gap, top + len(lines) * (height + label_height + gap) + gap), 0)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((gap, 0), title, fill=255)
    y = top
    previous = None
    for label, tiles in lines:
        if label != previous:
            draw.text((gap, y), label, fill=200)
        previous = label
        y += label_height
        for j, tile in enumerate(tiles):
            canvas.paste(Image.fromarray(tile, mode="L"), (gap + j * (width + gap), y))
        y += height + gap
    return atomic_write(Path(path), lambda tmp: canvas.save(tmp, format="PNG"))


def save_loss_curve(series: dict[str, list[tuple[int, float]]], path: Path, *, size=(640, 360)) -> Optional[Path]:
    """Each loss against the step on a log scale (raw points faint, a running mean solid), as PNG;
    None when there is nothing to plot yet."""
    from PIL import Image, ImageDraw

    series = {k: v for k, v in series.items() if any(value > 0 for _, value in v)}
    if not series:
        return None
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
    width, height = size
    left, right, top, bottom = 60, 16, 24, 36
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    points = [(s, v) for values in series.values() for s, v in values if v > 0]
    s_min, s_max = min(p[0] for p in points), max(p[0] for p in points)
    lo, hi = math.log10(min(p[1] for p in points)), math.log10(max(p[1] for p in points))
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5

    def xy(step: float, value: float) -> tuple[float, float]:
        x = left + (step - s_min) / max(s_max - s_min, 1) * (width - left - right)
        y = top + (hi - math.log10(value)) / (hi - lo) * (height - top - bottom)
        return x, y

    draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
    for decade in range(math.floor(lo), math.ceil(hi) + 1):
        for mantissa in (1, 2, 5):
            value = mantissa * 10.0**decade
            if lo <= math.log10(value) <= hi:
                _, y = xy(s_min, value)
                draw.line([left, y, width - right, y], fill=(225, 225, 225))
                draw.text((4, y - 6), f"{value:.3g}", fill=(0, 0, 0))
    for i in range(5):
        step = s_min + (s_max - s_min) * i / 4
        x, _ = xy(step, 10**lo)
        draw.text((x - 12, height - bottom + 6), f"{step:.0f}", fill=(0, 0, 0))
    draw.text((width // 2 - 12, height - 16), "step", fill=(0, 0, 0))
    for i, (name, values) in enumerate(series.items()):
        colour = colours[i % len(colours)]
        faint = tuple(int(c + (255 - c) * 0.7) for c in colour)
        values = [(s, v) for s, v in values if v > 0]
        draw.line([xy(s, v) for s, v in values] if len(values) > 1 else [xy(*values[0])] * 2, fill=faint)
        window = max(1, len(values) // 20)
        smooth = [(values[j][0], float(np.mean([v for _, v in values[max(0, j - window + 1):j + 1]])))
                  for j in range(len(values))]
        draw.line([xy(s, v) for s, v in smooth] if len(smooth) > 1 else [xy(*smooth[0])] * 2, fill=colour, width=2)
        draw.text((left + 8 + 90 * i, 6), name, fill=colour)
    return atomic_write(Path(path), lambda tmp: image.save(tmp, format="PNG"))


__all__ = ["MetricsLog", "save_grid", "save_loss_curve", "to_uint8", "METRICS"]

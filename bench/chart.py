"""A bar chart of speedups over eager, per op case and per end-to-end case, from measured runs (drawn with
Pillow, which the project already needs for its images).

    python bench/chart.py RUN.json [RUN.json ...] --out bench/results/speedups.png

Each RUN.json is a pytest-benchmark record (``pytest bench --benchmark-only --benchmark-json=RUN.json``)
or a ``bench/gpu_check.py`` record (``bench/results/<device>-<date>.json``). Bars:

- fused ops: every backend of an op, case and mode against the eager reference of the same
  (``x_eager``: eager's median over the backend's);
- end to end: every variant of a case against eager in the same layout (``e2e.derive``), and for eager
  in channels_last, channels_last against NCHW.

The title names the device and the date of the run (the first file's, when several are given).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import e2e  # noqa: E402


@dataclass(frozen=True)
class Bar:
    section: str  # "ops" or "e2e"
    group: str  # "group_norm_silu 1x512x32x32 num_groups=32 fwd", "unet_train cpu-demo b16"
    variant: str  # "compile", "triton channels_last", "eager channels_last (× NCHW)"
    speedup: float


@dataclass
class Chart:
    device: str
    date: str  # YYYY-MM-DD
    bars: list


def _op_bars(rows: list) -> list:
    """rows: dicts with op, case, mode, backend, ms."""
    eager = {(r["op"], r["case"], r["mode"]): r["ms"] for r in rows if r["backend"] == "eager" and r.get("ms")}
    bars = []
    for r in rows:
        base = eager.get((r["op"], r["case"], r["mode"]))
        if r["backend"] != "eager" and r.get("ms") and base:
            bars.append(Bar("ops", f"{r['op']} {r['case']} {r['mode']}", r["backend"], base / r["ms"]))
    return bars


def _e2e_bars(rows: list) -> list:
    """rows: dicts with case, backend, layout, cuda_graph, ms (x_eager / x_nchw derived here)."""
    rows = [dict(r) for r in rows if r.get("ms")]
    e2e.derive(rows)
    bars = []
    for r in rows:
        if r["backend"] == "eager" and not r.get("cuda_graph"):
            if r["layout"] == "channels_last" and r.get("x_nchw"):
                bars.append(Bar("e2e", r["case"], "eager channels_last (× NCHW)", r["x_nchw"]))
        elif r.get("x_eager"):
            bars.append(Bar("e2e", r["case"], e2e.variant_label(r), r["x_eager"]))
    return bars


def _from_pytest_benchmark(record: dict) -> Chart:
    ops, ends = [], []
    for bench in record["benchmarks"]:
        if not bench.get("stats"):  # a case run with --benchmark-disable: untimed
            continue
        info, ms = bench.get("extra_info", {}), bench["stats"]["median"] * 1e3
        if "op" in info:
            ops.append({"op": info["op"], "case": info["case"], "mode": info["mode"], "backend": info["backend"],
                        "ms": ms})
        elif "workload" in info:
            ends.append({"case": info["case"], "backend": info["backend"], "layout": info["layout"],
                         "cuda_graph": info.get("cuda_graph", False), "ms": ms})
    machine = record.get("machine_info", {})
    device = machine.get("gpu") or "cpu " + (machine.get("cpu", {}).get("brand_raw") or machine.get("machine", "?"))
    return Chart(device, record.get("datetime", "")[:10], _op_bars(ops) + _e2e_bars(ends))


def _from_gpu_check(record: dict) -> Chart:
    ops = [r for r in record.get("timings", []) if r.get("ms")]
    meta = record["meta"]
    return Chart(meta["device"], meta["date"][:10], _op_bars(ops) + _e2e_bars(record.get("e2e", [])))


def load(path) -> Chart:
    """The bars of one run record (pytest-benchmark or gpu_check JSON). Raises ValueError for another file."""
    record = json.loads(Path(path).read_text())
    if "benchmarks" in record:
        return _from_pytest_benchmark(record)
    if "meta" in record and "timings" in record:
        return _from_gpu_check(record)
    raise ValueError(f"{path}: neither a pytest-benchmark record (benchmarks) nor a gpu_check one (meta, timings)")


ROW, LABEL_W, PLOT_W, MARGIN = 16, 560, 480, 12  # pixels
GREEN, RED, GRID, INK = (44, 160, 44), (214, 39, 40), (225, 225, 225), (0, 0, 0)


def _plain(text: str) -> str:
    """Pillow's built-in font has no × or ²."""
    return text.replace("×", "x").replace("²", "^2")


def _ticks(lo: float, hi: float) -> list:
    """1-2-5 ticks between 10**lo and 10**hi."""
    return [m * 10.0**d for d in range(math.floor(lo), math.ceil(hi) + 1) for m in (1, 2, 5)
            if lo <= math.log10(m * 10.0**d) <= hi]


def plot(chart: Chart, out, title: Optional[str] = None) -> Path:
    """Horizontal bars on a log scale (green at or above 1×, red below), fused ops above, end to end below,
    written as PNG to ``out``. Raises ValueError when there is no bar."""
    from PIL import Image, ImageDraw, ImageFont

    sections = [(name, [b for b in chart.bars if b.section == key])
                for key, name in (("ops", "Fused ops: × eager (same op, case and mode)"),
                                  ("e2e", "End to end: × eager in the same layout; eager channels_last: × NCHW"))]
    sections = [(name, bars) for name, bars in sections if bars]
    if not sections:
        raise ValueError("no bar to draw: the runs hold no timed variant beside its eager baseline")
    values = [b.speedup for _, bars in sections for b in bars]
    lo, hi = math.log10(min(0.5, min(values) / 1.3)), math.log10(max(2.0, max(values) * 1.6))
    font = ImageFont.load_default(size=11)
    heading = ImageFont.load_default(size=14)
    height = MARGIN + 28 + sum(ROW * (len(bars) + 3) for _, bars in sections) + MARGIN
    image = Image.new("RGB", (MARGIN + LABEL_W + PLOT_W + 4 * MARGIN, height), (255, 255, 255))  # room for "100x"
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, MARGIN), _plain(title or f"Speedups over eager: {chart.device}, {chart.date}"), fill=INK,
              font=heading)

    def x_of(value: float) -> float:
        return MARGIN + LABEL_W + (math.log10(value) - lo) / (hi - lo) * PLOT_W

    y = MARGIN + 28
    for name, bars in sections:
        draw.text((MARGIN, y), _plain(name), fill=INK, font=font)
        top, bottom = y + ROW, y + ROW * (len(bars) + 1)
        for tick in _ticks(lo, hi):
            draw.line([x_of(tick), top, x_of(tick), bottom], fill=INK if tick == 1 else GRID)
            draw.text((x_of(tick) - 8, bottom + 2), f"{tick:g}x", fill=INK, font=font)
        for i, bar in enumerate(bars):
            row_y = top + i * ROW
            draw.text((MARGIN, row_y + 2), _plain(f"{bar.group} | {bar.variant}")[:95], fill=INK, font=font)
            x0, x1 = sorted((x_of(1.0), x_of(bar.speedup)))
            draw.rectangle([x0, row_y + 3, max(x1, x0 + 1), row_y + ROW - 3], fill=GREEN if bar.speedup >= 1 else RED)
            draw.text((x_of(max(bar.speedup, 1.0)) + 3, row_y + 2), f"{bar.speedup:.2f}x", fill=INK, font=font)
        y = bottom + ROW * 2
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG")
    return out


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/chart.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="pytest-benchmark or gpu_check JSON records")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--title", help="instead of 'Speedups over eager: <device>, <date>'")
    args = parser.parse_args(argv)
    try:
        charts = [load(path) for path in args.runs]
        merged = Chart(charts[0].device, charts[0].date, [bar for chart in charts for bar in chart.bars])
        path = plot(merged, args.out, args.title)
    except (OSError, ValueError) as err:
        print(f"chart: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}: {len(merged.bars)} bars ({merged.device}, {merged.date})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""bench/chart.py on synthetic records, and the end-to-end part of bench/gpu_check.py on the CPU at a tiny case."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"


def _module(monkeypatch, name):
    monkeypatch.setattr(sys, "path", [str(BENCH), *sys.path])
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def chart(monkeypatch):
    return _module(monkeypatch, "chart")


def _bench(extra: dict, median_s: float) -> dict:
    return {"group": "g", "name": "n", "extra_info": extra, "stats": {"median": median_s}}


def _pytest_benchmark_record() -> dict:
    op = {"op": "group_norm_silu", "case": "1x512x32x32 num_groups=32", "mode": "fwd"}
    train = {"workload": "unet_train", "case": "unet_train cpu-demo b4", "cuda_graph": False}
    return {
        "machine_info": {"cpu": {"brand_raw": "Test CPU 9000"}, "machine": "x86_64"},
        "datetime": "2026-12-03T15:18:25.121961+00:00",
        "benchmarks": [
            _bench({**op, "backend": "eager"}, 0.004),
            _bench({**op, "backend": "compile"}, 0.002),
            _bench({**op, "backend": "triton"}, 0.008),
            _bench({**train, "backend": "eager", "layout": "nchw"}, 2.0),
            _bench({**train, "backend": "eager", "layout": "channels_last"}, 1.0),
            _bench({**train, "backend": "compile", "layout": "channels_last"}, 0.25),
            _bench({"drrs_per_second": 3.0}, 1.0),  # neither an op nor an end-to-end case: no bar
        ],
    }


def test_pytest_benchmark_record_gives_speedups_over_eager(chart, tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(_pytest_benchmark_record()))
    loaded = chart.load(path)
    assert loaded.device == "cpu Test CPU 9000" and loaded.date == "2026-12-03"
    bars = {(b.section, b.group, b.variant): b.speedup for b in loaded.bars}
    assert bars == {
        ("ops", "group_norm_silu 1x512x32x32 num_groups=32 fwd", "compile"): pytest.approx(2.0),
        ("ops", "group_norm_silu 1x512x32x32 num_groups=32 fwd", "triton"): pytest.approx(0.5),
        # channels_last eager against NCHW eager; compile against eager in its own layout
        ("e2e", "unet_train cpu-demo b4", "eager channels_last (× NCHW)"): pytest.approx(2.0),
        ("e2e", "unet_train cpu-demo b4", "compile channels_last"): pytest.approx(4.0),
    }

    png = tmp_path / "speedups.png"
    assert chart.main([str(path), "--out", str(png)]) == 0
    image = Image.open(png)
    # two section headings, a title and four bars, each a row of 16 px
    assert image.format == "PNG" and image.width > 1000 and image.height >= 16 * (4 + 6)
    pixels = image.convert("RGB").getdata()
    assert chart.GREEN in pixels and chart.RED in pixels  # 2× and 4× bars, and the 0.5× one


def test_a_file_without_runs_is_refused(chart, tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    assert chart.main([str(other), "--out", str(tmp_path / "x.png")]) == 2
    assert "neither a pytest-benchmark record" in capsys.readouterr().err
    lonely = tmp_path / "eager_only.json"
    record = _pytest_benchmark_record()
    record["benchmarks"] = record["benchmarks"][:1]
    lonely.write_text(json.dumps(record))
    assert chart.main([str(lonely), "--out", str(tmp_path / "y.png")]) == 2
    assert "no bar to draw" in capsys.readouterr().err and not (tmp_path / "y.png").exists()


def test_derived_end_to_end_figures(monkeypatch):
    e2e = _module(monkeypatch, "e2e")
    case = "ddim_sample cpu-demo b1 50 steps"
    rows = [{"case": case, "backend": b, "layout": layout, "cuda_graph": graph, "ms": ms, "peak_mib": peak}
            for b, layout, graph, ms, peak in (("eager", "nchw", False, 100.0, 400.0),
                                               ("compile", "nchw", False, 50.0, 300.0),
                                               ("triton", "nchw", False, 40.0, 200.0),
                                               ("triton", "nchw", True, 20.0, 220.0),
                                               ("eager", "channels_last", False, 80.0, None))]
    rows.append({"case": case, "backend": "cuda", "layout": "nchw", "cuda_graph": False, "skipped": "no GPU"})
    e2e.derive(rows)
    triton, graph, last = rows[2], rows[3], rows[4]
    assert triton["x_eager"] == pytest.approx(2.5) and triton["x_compile"] == pytest.approx(1.25)
    assert triton["mem_vs_eager"] == pytest.approx(0.5) and triton["x_nchw"] is None
    assert graph["x_eager"] == pytest.approx(5.0)  # against eager without a graph
    assert last["x_eager"] == pytest.approx(1.0) and last["x_nchw"] == pytest.approx(1.25)
    assert last["mem_vs_eager"] is None and "x_eager" not in rows[5]


def test_gpu_check_end_to_end_on_the_cpu(monkeypatch, tmp_path, chart):
    gpu_check = _module(monkeypatch, "gpu_check")
    e2e = gpu_check.e2e
    tiny = e2e.Case("ddim_sample", "cpu-demo", 1, steps=2)
    monkeypatch.setattr(e2e, "cases", lambda device_type, quick=False: [e2e.Entry(tiny.id, tiny.workload, tiny)])
    precision = torch.get_float32_matmul_precision()
    try:
        status = gpu_check.main(["--device", "cpu", "--quick", "--e2e", "only", "--backends", "eager,triton",
                                 "--out", str(tmp_path)])
    finally:
        torch.set_float32_matmul_precision(precision)
    assert status == 0
    record_path = next(tmp_path.glob("*.json"))
    record = json.loads(record_path.read_text())
    assert not record["timings"] and not record["checks"]  # "only": no op checks or timings
    rows = {(r["backend"], r["layout"], r["cuda_graph"]): r for r in record["e2e"]}
    assert set(rows) == {(b, layout, g) for b in ("eager", "triton") for layout in e2e.LAYOUTS for g in (False, True)}
    for layout in e2e.LAYOUTS:
        eager = rows[("eager", layout, False)]
        assert eager["ms"] > 0 and eager["steps"] == 2 and eager["batch"] == 1 and eager["peak_mib"] is None
        assert math.isclose(eager["images_per_s"], 1e3 / eager["ms"]) and eager["x_eager"] == 1.0
        assert "needs a CUDA GPU" in rows[("triton", layout, False)]["skipped"]
        assert rows[("eager", layout, True)]["skipped"] == "CUDA graphs need a GPU"
    last = rows[("eager", "channels_last", False)]
    assert math.isclose(last["x_nchw"], rows[("eager", "nchw", False)]["ms"] / last["ms"])
    markdown = record_path.with_suffix(".md").read_text()
    assert "## End to end" in markdown and f"| {tiny} | eager channels_last |" in markdown
    assert "CUDA graphs need a GPU: 2 variant(s)" in markdown

    loaded = chart.load(record_path)
    assert [(b.group, b.variant) for b in loaded.bars] == [(str(tiny), "eager channels_last (× NCHW)")]
    assert loaded.device == record["meta"]["device"]


def test_end_to_end_suites(monkeypatch):
    e2e = _module(monkeypatch, "e2e")
    gpu = {str(case) for case, _ in e2e.SUITE}
    assert set(e2e.QUICK) <= gpu and len(e2e.cases("cuda", quick=True)) == len(e2e.QUICK)
    for device in ("cuda", "cpu"):
        entries = e2e.cases(device)
        assert len(entries) == len(e2e.SUITE) and len({e.id for e in entries}) == len(entries)
        assert {e.workload for e in entries} == set(e2e.WORKLOADS)
    for entry in e2e.cases("cpu"):
        # a CPU runs the small preset, or says why the case is GPU-only
        assert (entry.case is not None and entry.case.preset == "cpu-demo") or entry.skip.startswith("GPU only")
    case = e2e.Case("unet_train", "cpu-demo", 4)
    cpu = torch.device("cpu")
    assert "needs a CUDA GPU" in e2e.why_not(case, "triton", "nchw", cpu)
    assert e2e.why_not(case, "eager", "channels_last", cpu) is None
    graph = e2e.why_not(case, "eager", "nchw", cpu, cuda_graph=True)
    assert graph == "cuda_graph is an option of the samplers and the restorer"
    with pytest.raises(ValueError, match="layout one of"):
        e2e.why_not(case, "eager", "nhwc", cpu)

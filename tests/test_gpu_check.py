"""bench/gpu_check.py on the CPU at tiny sizes: the path a GPU machine runs, and the record it writes.

The Triton kernels run in the interpreter (TRITON_INTERPRET=1, set by conftest.py); the CUDA extension
cannot run on a CPU and must be reported missing, not crash the run.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dxr import ops

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.py"


def _written(out: Path) -> tuple:
    """The one JSON record and its Markdown twin under ``out``."""
    records = sorted(out.glob("*.json"))
    assert len(records) == 1, f"expected one JSON record in {out}, found {records}"
    markdown = records[0].with_suffix(".md")
    assert markdown.exists()
    return json.loads(records[0].read_text()), markdown.read_text(), records[0]


def _rows(result, **match):
    return [r for r in result["timings"] if all(r[k] == v for k, v in match.items())]


@pytest.mark.slow
def test_cpu_quick_run_checks_times_and_writes_the_record(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--ops", "ddpm_step,attention",
                           "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result, markdown, path = _written(tmp_path)
    assert path.name.startswith("cpu-") and path.name.endswith("-quick.json")

    meta, peaks = result["meta"], result["peaks"]
    assert meta["device_type"] == "cpu" and meta["quick"] is True
    assert meta["command"].endswith(f"--ops ddpm_step,attention --out {tmp_path}")
    assert peaks["copy_gbps"] > 0 and peaks["matmul_tflops"] > 0
    assert result["timing_dtype"] == "float32" and not result["errors"]

    # every dtype of the first case checked on Triton, each gradient of attention, the steps' own noise
    checks = result["checks"]
    assert checks and all(c["passed"] for c in checks)
    for dtype in ("bfloat16", "float16", "float32"):
        assert {c["quantity"] for c in checks if c["op"] == "attention" and c["dtype"] == dtype} == {
            "out", "dq", "dk", "dv"}
        assert any(c["op"] == "ddpm_step" and c["dtype"] == dtype and c["quantity"] == "out" for c in checks)
    assert {"noise mean", "noise std", "same seed, same result"} <= {c["quantity"] for c in checks
                                                                       if c["op"] == "ddpm_step"}
    assert all(c["backend"] == "triton" for c in checks)

    missing = {(m["op"], m["backend"]): m["reason"] for m in result["missing"]}
    assert "dxr._C" in missing[("ddpm_step", "cuda")] and "dxr._C" in missing[("attention", "cuda")]
    assert ("attention", "sdpa_efficient") in missing
    assert not any(b == "triton" for _, b in missing)

    # every mode of every backend that runs here is timed, and the derived figures follow from the times
    assert {(r["mode"], r["backend"]) for r in _rows(result, op="attention")} == {
        (m, b) for m in ("fwd", "bwd", "fwd+bwd") for b in ("eager", "compile", "sdpa_flash", "triton")}
    assert {r["backend"] for r in _rows(result, op="ddpm_step")} == {"eager", "compile", "triton"}
    for r in result["timings"]:
        assert r["ms"] > 0 and "error" not in r
        eager = _rows(result, op=r["op"], case=r["case"], mode=r["mode"], backend="eager")[0]
        assert math.isclose(r["x_eager"], eager["ms"] / r["ms"], rel_tol=1e-9)
    ddpm = _rows(result, op="ddpm_step", backend="triton")[0]
    assert ddpm["bytes"] == 3 * 2 * 3 * 16 * 16 * 4  # x_t, model output, result; float32
    assert math.isclose(ddpm["gbps"], ddpm["bytes"] / ddpm["ms"] / 1e6)
    assert math.isclose(ddpm["pct_peak"], 100 * ddpm["gbps"] / peaks["copy_gbps"])
    fwd = _rows(result, op="attention", mode="fwd", backend="triton")[0]
    assert fwd["flops"] == 4 * 1 * 2 * 40 * 72 * 32
    assert _rows(result, op="attention", mode="bwd", backend="triton")[0]["flops"] == fwd["flops"] * 5 // 2
    assert math.isclose(fwd["x_sdpa_flash"], _rows(result, op="attention", mode="fwd", backend="sdpa_flash")[0]["ms"]
                        / fwd["ms"])

    goals = {(g["goal"], g["backend"]) for g in result["goals"]}
    assert ("DDPM step ≥ 5× eager (its randn included)", "triton") in goals
    assert all(g["met"] == (g["value"] >= g["target"]) for g in result["goals"])
    assert not any("attention" in g for g, _ in goals)  # those goals are for L ≥ 1024

    assert f"{len(checks)} of {len(checks)} checks passed" in markdown
    assert markdown.count("| attention | B1 H2 Lq40 Lk72 D32 |") >= len(_rows(result, op="attention"))
    assert "## Performance goals" in markdown and "dxr._C" in markdown


@pytest.fixture
def gpu_check(monkeypatch):
    """bench/gpu_check.py imported in this process; what it changes (sys.path, matmul precision) is undone."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    precision = torch.get_float32_matmul_precision()
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)
    spec.loader.exec_module(module)
    yield module
    torch.set_float32_matmul_precision(precision)


def test_a_wrong_kernel_fails_the_run_and_a_missing_one_is_reported(gpu_check, tmp_path, monkeypatch):
    q_sample = ops.q_sample

    def off_by_half(*args, **kwargs):
        return q_sample(*args, **kwargs) + 0.5

    def not_built(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'dxr.kernels.triton.ddpm_step'", name="dxr.kernels.triton.ddpm_step")

    monkeypatch.setattr(ops, "q_sample", off_by_half)
    monkeypatch.setattr(ops, "ddpm_step", not_built)
    status = gpu_check.main(["--device", "cpu", "--quick", "--ops", "q_sample,ddpm_step", "--backends",
                             "eager,triton", "--out", str(tmp_path)])
    assert status == 1
    result, markdown, _ = _written(tmp_path)

    failed = [c for c in result["checks"] if not c["passed"]]
    assert {(c["op"], c["backend"], c["quantity"]) for c in failed} == {("q_sample", "triton", "out")}
    assert {c["dtype"] for c in failed} == {"bfloat16", "float16", "float32"}
    assert all(c["max_abs_err"] >= 0.5 - 1e-2 for c in failed)
    assert "not in this tree" in {(m["op"], m["backend"]): m["reason"] for m in result["missing"]}[
        ("ddpm_step", "triton")]
    # the other backends of both ops still ran
    assert {(r["op"], r["backend"]) for r in result["timings"]} == {
        ("q_sample", "eager"), ("q_sample", "triton"), ("ddpm_step", "eager")}
    assert f"{len(result['checks']) - 3} of {len(result['checks'])} checks passed" in markdown


def test_bad_command_lines_are_refused(gpu_check, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(["--device", "cpu", "--ops", "group_norm,adain"])
    assert exit_info.value.code == 2 and "--ops must be a comma-separated list of" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert gpu_check.main([]) == 2 and "no CUDA device" in capsys.readouterr().err


def test_every_op_has_cases_for_every_run(gpu_check):
    workloads = gpu_check.wl
    for op in workloads.OPS:
        for device in ("cuda", "cpu"):
            for quick in (False, True):
                assert workloads.cases(op, device, quick), (op, device, quick)
        # the quick GPU run is a subset of the full one
        full = {c.shape for c in workloads.cases(op, "cuda")}
        assert {c.shape for c in workloads.cases(op, "cuda", quick=True)} <= full


def test_planned_traffic_counts_the_split_paths_second_read(gpu_check):
    wl = gpu_check.wl
    gpu = torch.device("cpu")
    batch1 = wl.Case("group_norm_silu", (1, 320, 64, 64), options=(("num_groups", 32),))
    e, n, params = 2, 320 * 64 * 64, 320
    # batch 1 with 10 channels per group of 4096 positions takes the split path both ways (H100 plan)
    assert wl.planned_bytes(batch1, torch.bfloat16, wl.FWD, gpu) == (3 * n + 2 * params) * e
    assert wl.planned_bytes(batch1, torch.bfloat16, wl.BWD, gpu) == (5 * n + 4 * params) * e
    assert wl.planned_bytes(batch1, torch.bfloat16, wl.FWD_BWD, gpu) == (8 * n + 6 * params) * e
    # a group that fits on chip moves the minimum, as do the steps with in-kernel noise
    small = wl.Case("group_norm_silu", (16, 64, 16, 16), options=(("num_groups", 32),))
    for mode in (wl.FWD, wl.BWD):
        assert wl.planned_bytes(small, torch.float32, mode, gpu) == wl.traffic_bytes(small, torch.float32, mode)
    step = wl.Case("ddpm_step", (16, 3, 64, 64))
    assert wl.planned_bytes(step, torch.bfloat16, wl.FWD, gpu) == wl.traffic_bytes(step, torch.bfloat16, wl.FWD)
    assert wl.planned_bytes(wl.Case("attention", (1, 2, 40, 72, 32)), torch.bfloat16, wl.FWD, gpu) is None


def test_expected_traffic_lets_l2_serve_the_group_norm_second_read(gpu_check):
    wl = gpu_check.wl
    cpu = torch.device("cpu")
    # 2.6 MB of x fits the H100's L2: the split path's second read is all L2, the minimum is left
    small = wl.Case("group_norm_silu", (1, 320, 64, 64), options=(("num_groups", 32),))
    for mode in (wl.FWD, wl.BWD, wl.FWD_BWD):
        assert wl.planned_bytes(small, torch.bfloat16, mode, cpu) > wl.traffic_bytes(small, torch.bfloat16, mode)
        assert wl.expected_bytes(small, torch.bfloat16, mode, cpu) == wl.traffic_bytes(small, torch.bfloat16, mode)
    # 8 x 128 x 128 x 128 float32 is 67 MB, more than L2: it serves 50 MiB of the forward's second read,
    # and of the backward's (x and dy, 134 MB)
    big = wl.Case("group_norm_silu", (8, 128, 128, 128), options=(("num_groups", 32),))
    for mode in (wl.FWD, wl.BWD):
        planned = wl.planned_bytes(big, torch.float32, mode, cpu)
        assert planned > wl.traffic_bytes(big, torch.float32, mode)
        assert wl.expected_bytes(big, torch.float32, mode, cpu) == planned - wl.DEFAULT_L2_BYTES
    # AdaIN's split path has no such order: counted as planned
    adain = wl.Case("adain", (1, 256, 64, 64))
    assert wl.expected_bytes(adain, torch.bfloat16, wl.FWD, cpu) == wl.planned_bytes(adain, torch.bfloat16, wl.FWD, cpu)
    assert wl.expected_bytes(wl.Case("attention", (1, 2, 40, 72, 32)), torch.bfloat16, wl.FWD, cpu) is None


def test_step_instructions_are_counted_per_element_and_timed_at_the_issue_rate(gpu_check):
    from types import SimpleNamespace

    listing = "\n".join(f"        /*{8 * i:04x}*/                   FADD R{i}, R{i}, 1 ;" for i in range(300))
    kernel = SimpleNamespace(metadata=SimpleNamespace(num_warps=4), asm={"sass": listing})
    # 2048 elements over 128 threads: 16 each, so 300 instructions are 18.75 per element
    assert gpu_check.instructions_per_element(kernel, {"BLOCK": 2048}) == 300 / 16

    class NoDisassembler(dict):
        def __getitem__(self, key):
            raise RuntimeError("cuobjdump not found")

    assert gpu_check.instructions_per_element(SimpleNamespace(metadata=kernel.metadata, asm=NoDisassembler()),
                                              {"BLOCK": 2048}) is None
    assert gpu_check.warp_issue_rate(torch.device("cpu")) is None
    row = {"op": "ddpm_step", "case": "c", "mode": "fwd", "backend": "triton", "shape": [4, 1024],
           "bytes": 3 * 4096 * 2, "flops": None, "ms": 0.5, "instructions_per_element": 20.0}
    gpu_check.derive([row], {"copy_gbps": 100.0, "matmul_tflops": 1.0, "warp_instructions_per_s": 1e9})
    # 4096 elements · 20 instructions / 32 lanes = 2560 warp instructions at 1e9 per second
    assert row["issue_ms"] == pytest.approx(2.56e-3)

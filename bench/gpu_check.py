"""One command for a GPU machine: check every fused op on every available backend, time it, keep the record.

    python bench/gpu_check.py                         # every op, UNet-sized cases, bfloat16
    python bench/gpu_check.py --quick                 # fewer cases, for a short lease
    python bench/gpu_check.py --ops attention,adain --backends eager,compile,triton --out /tmp/r
    python bench/gpu_check.py --e2e only --quick      # the end-to-end cases alone, six of them
    python bench/gpu_check.py --device cpu --quick    # the same path on a CPU at tiny sizes (Triton via its
                                                      # interpreter when TRITON_INTERPRET=1, else skipped)

1. Peaks of this device, measured in the same run: copy bandwidth (a 1 GiB device-to-device copy) and a
   bfloat16 8192³ matmul.
2. Correctness: for every op, case and kernel backend ("triton", "cuda"), the output and every gradient
   against the reference in float32 on the same inputs, at the tolerances of tests/helpers.py;
   bfloat16 at every case, float16 and float32 at the first case of each op; channels_last outputs
   keep their layout; noise drawn in-kernel has mean 0, std 1 and repeats with its seed.
3. Timing: the median over repetitions (CUDA events, L2 flushed before each, after warm-up) of every
   backend — eager reference, torch.compile of it, SDPA flash / memory-efficient for attention, the
   kernels — forward, backward and both, in bfloat16; GB/s (minimal traffic, see workloads.py) or
   TFLOP/s with their share of the measured copy bandwidth or matmul peak; speedups over eager,
   torch.compile and (attention) SDPA flash; peak memory of attention.
4. The performance goals of the kernels, reported as met or not met.
5. End to end (``bench/e2e.py``, on by default on a GPU, ``--e2e on`` on a CPU, ``--e2e only`` for this part
   alone): UNet and MUNIT training steps, DDPM 1000 / DDIM 50 sampling at batch 1 and 16, one 2048²
   radiograph restored, on every backend in NCHW and channels_last (samplers and restorer also with
   ``cuda_graph=True`` where they take it): median ms, images/s, peak memory, speedups over eager and
   torch.compile in the same layout, channels_last over NCHW, peak memory over eager's. The record of
   steps 1–4 is written before this part starts, and again with it when it ends.

Writes ``<out>/<device>-<date>.json`` and ``.md`` (``-quick`` added with --quick) and prints the tables.
Each op and backend stands alone: a backend that cannot run here (no extension built, a kernel module
not there yet) is listed as missing with the reason. Exit status 1 when a correctness check failed or
a kernel raised (the results are written all the same), 2 for a bad command line or no GPU. Every case and
step sits in an NVTX range, so ``nsys profile python bench/gpu_check.py`` shows them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import math
import platform
import re
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
# workloads.py sits beside this file; the tolerances live with the tests
for _path in (BENCH, REPO / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import e2e  # noqa: E402
import workloads as wl  # noqa: E402
from helpers import assert_close, tol  # noqa: E402

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ALL_BACKENDS = ("eager", "compile", *wl.SDPA_BACKENDS, *wl.KERNEL_BACKENDS)
E2E_CHOICES = ("auto", "on", "off", "only")


@dataclass(frozen=True)
class Goal:
    """A performance goal: ``metric`` of a kernel backend's timing row ≥ ``target``, on the rows it applies to."""

    text: str
    op: str
    mode: str
    metric: str  # "x_eager", "x_compile", "x_sdpa_flash" or "pct_peak"
    target: float
    applies: Callable[[dict], bool] = lambda row: True


def _batch_1_or_16(row):
    return row["shape"][0] in (1, 16)


def _long(row):
    return row["shape"][2] >= 1024


GOALS = (
    Goal("GroupNorm+SiLU fwd ≥ 3× eager", "group_norm_silu", wl.FWD, "x_eager", 3.0),
    Goal("GroupNorm+SiLU fwd ≥ 1.3× torch.compile", "group_norm_silu", wl.FWD, "x_compile", 1.3),
    Goal("GroupNorm+SiLU fwd ≥ 80% of copy bandwidth at batch 1 and 16", "group_norm_silu", wl.FWD, "pct_peak",
         80.0, _batch_1_or_16),
    Goal("GroupNorm+SiLU bwd ≥ 2× eager", "group_norm_silu", wl.BWD, "x_eager", 2.0),
    Goal("AdaIN fwd+bwd ≥ 3× eager", "adain", wl.FWD_BWD, "x_eager", 3.0),
    Goal("DDPM step ≥ 5× eager (its randn included)", "ddpm_step", wl.FWD, "x_eager", 5.0),
    Goal("DDIM step ≥ 5× eager (its randn included)", "ddim_step", wl.FWD, "x_eager", 5.0),
    Goal("DDPM step ≥ 85% of copy bandwidth", "ddpm_step", wl.FWD, "pct_peak", 85.0),
    Goal("DDIM step ≥ 85% of copy bandwidth", "ddim_step", wl.FWD, "pct_peak", 85.0),
    Goal("attention fwd ≥ 1.1× SDPA flash at L ≥ 1024", "attention", wl.FWD, "x_sdpa_flash", 1.1, _long),
    Goal("attention bwd ≥ 1.0× SDPA flash at L ≥ 1024", "attention", wl.BWD, "x_sdpa_flash", 1.0, _long),
)


def _nvtx(label: str, device: torch.device):
    return torch.cuda.nvtx.range(label) if device.type == "cuda" else contextlib.nullcontext()


def _say(text: str) -> None:
    print(text, flush=True)


def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"


# --------------------------------------------------------------------------------------------------
# the machine


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "cpu " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"cpu {platform.machine()}"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _git_commit() -> Optional[str]:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device, argv: list, quick: bool) -> dict:
    """What ran where: device, versions, the dxr commit, the CUDA extension's ops, the command."""
    from dxr.kernels import cuda

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/gpu_check.py", *argv]),
        "quick": quick,
        "device": _device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "dxr_commit": _git_commit(),
        "cuda_extension_ops": [op for op in wl.OPS if cuda.supports(op)],
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1),
                    l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1))
    return meta


def peaks(device: torch.device, quick_cpu: bool) -> dict:
    """Copy bandwidth (GB/s, read + write) and matmul throughput (TFLOP/s) of this device."""
    gpu = device.type == "cuda"
    nbytes = 1 << 30 if gpu else (16 << 20 if quick_cpu else 256 << 20)
    src = torch.randint(-128, 127, (nbytes,), dtype=torch.int8, device=device)
    dst = torch.empty_like(src)
    copy_ms = wl.median_ms(lambda: dst.copy_(src), device, budget_s=0.3)
    del src, dst
    size, dtype = (8192, torch.bfloat16) if gpu else ((256, torch.float32) if quick_cpu else (1024, torch.float32))
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    mm_ms = wl.median_ms(lambda: torch.matmul(a, b), device, budget_s=0.3)
    return {
        "copy_bytes": nbytes, "copy_ms": copy_ms, "copy_gbps": 2 * nbytes / copy_ms / 1e6,
        "matmul_size": size, "matmul_dtype": str(dtype).removeprefix("torch."), "matmul_ms": mm_ms,
        "matmul_tflops": 2 * size**3 / mm_ms / 1e9, "warp_instructions_per_s": warp_issue_rate(device),
    }


def warp_issue_rate(device: torch.device) -> Optional[float]:
    """Warp instructions per second the device issues at most: four schedulers per SM, one instruction
    each per cycle, at the clock the driver reports (None on a CPU or without a clock)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    khz = getattr(props, "clock_rate", None)
    return 4 * props.multi_processor_count * khz * 1e3 if khz else None


# --------------------------------------------------------------------------------------------------
# correctness


def _results(case: wl.Case, backend: str, inputs: dict) -> dict:
    """The output and the gradient of every differentiable input, with explicit noise for the DDPM and DDIM steps."""
    names = wl.GRAD_INPUTS[case.op]
    leaves = {k: (v.detach().requires_grad_() if k in names else v) for k, v in inputs.items()}
    out = wl.call_once(lambda: wl.forward(case, backend, leaves, draw_noise=False), backend)
    found = {"out": out.detach()}
    if names:
        grads = torch.autograd.grad(out, [leaves[k] for k in names], inputs["dy"])
        found.update((f"d{k}", g) for k, g in zip(names, grads))
    return found


def _float32(inputs: dict) -> dict:
    return {k: (v.float() if v.is_floating_point() else v) for k, v in inputs.items()}


def _record(case, backend, dtype, quantity, passed, **details) -> dict:
    return {"op": case.op, "case": str(case), "backend": backend, "dtype": str(dtype).removeprefix("torch."),
            "quantity": quantity, "passed": bool(passed), **details}


def _compare(case, backend, dtype, quantity, actual, expected) -> dict:
    atol, rtol = tol(dtype)
    if actual.shape != expected.shape or actual.dtype != dtype:
        return _record(case, backend, dtype, quantity, False, atol=atol, rtol=rtol,
                       message=f"got {actual.dtype} {tuple(actual.shape)}, expected {dtype} {tuple(expected.shape)}")
    diff = (actual.float() - expected.float()).abs()
    details = {"max_abs_err": float(diff.max()) if diff.numel() else 0.0, "atol": atol, "rtol": rtol}
    try:
        assert_close(actual, expected, dtype)
    except AssertionError as err:
        return _record(case, backend, dtype, quantity, False, message=" ".join(str(err).split()), **details)
    return _record(case, backend, dtype, quantity, True, **details)


def check_case(case: wl.Case, backend: str, dtype: torch.dtype, device: torch.device, seed: int) -> list:
    """Output and gradients of ``backend`` against the float32 reference on the same inputs.

    Raises wl.Unavailable when the backend cannot run here.
    """
    inputs = wl.make_inputs(case, dtype, device, seed)
    wl.probe(case, backend, inputs)
    try:
        found = _results(case, backend, inputs)
    except wl.Unavailable:
        raise
    except Exception as err:  # a kernel that raises fails its check; the run goes on
        return [_record(case, backend, dtype, "runs", False, message=_error_text(err))]
    expected = _results(case, "eager", _float32(inputs))
    records = [_compare(case, backend, dtype, name, found[name], expected[name]) for name in expected]
    if case.channels_last:
        kept = all(found[name].is_contiguous(memory_format=torch.channels_last) for name in ("out", "dx"))
        records.append(_record(case, backend, dtype, "channels_last kept", kept))
    return records


def draws_noise(case: wl.Case) -> bool:
    return case.op == "ddpm_step" or (case.op == "ddim_step" and case.kwargs["eta"] > 0)


def check_noise(case: wl.Case, backend: str, device: torch.device, seed: int) -> list:
    """In-kernel noise of a DDPM or DDIM step (float32): z recovered from the output has mean 0 and std 1
    within 6 standard errors, and the same seed gives the same result."""
    inputs = wl.make_inputs(case, torch.float32, device, seed)
    drawn = wl.forward(case, backend, inputs)
    again = wl.forward(case, backend, inputs)
    # the reference with z = 0 and z = 1 gives the step's mean and its σ, element by element
    mean = wl.forward(case, "eager", {**inputs, "noise": torch.zeros_like(drawn)}, draw_noise=False)
    sigma = wl.forward(case, "eager", {**inputs, "noise": torch.ones_like(drawn)}, draw_noise=False) - mean
    # σ = 0 where t_prev = -1 (DDIM's last step); tiny σ would magnify rounding into z
    noisy = sigma > 1e-3
    z = ((drawn - mean) / sigma)[noisy].double()
    m = z.numel()
    records = [_record(case, backend, torch.float32, "same seed, same result", torch.equal(drawn, again))]
    if m < 2:
        return records + [_record(case, backend, torch.float32, "noise", False, message="no noisy element")]
    # one standard error of the mean is 1/√m, of the std about 1/√(2m); 1e-4 covers float32 rounding
    for quantity, value, expected, bound in (("noise mean", float(z.mean()), 0.0, 6 / math.sqrt(m) + 1e-4),
                                             ("noise std", float(z.std()), 1.0, 6 / math.sqrt(2 * m) + 1e-4)):
        records.append(_record(case, backend, torch.float32, quantity, abs(value - expected) <= bound,
                               value=value, expected=expected, bound=bound, elements=m))
    return records


# --------------------------------------------------------------------------------------------------
# timing


# the elementwise step kernels: straight-line code, each thread runs every instruction once for its elements
STEP_KERNELS = ("_q_sample_kernel", "_ddpm_step_kernel", "_ddim_step_kernel")


def launched_kernels(fn: Callable[[], object]) -> list:
    """(name, compiled kernel, launch keywords) of every compiled Triton launch one call of fn makes."""
    from triton.runtime import jit

    seen, original = [], jit.JITFunction.run

    def run(self, *args, **kwargs):
        kernel = original(self, *args, **kwargs)
        seen.append((self.__name__, kernel, kwargs))
        return kernel

    jit.JITFunction.run = run
    try:
        fn()
    finally:
        jit.JITFunction.run = original
    return seen


def instructions_per_element(kernel, kwargs: dict) -> Optional[float]:
    """SASS instructions a thread of a step kernel runs per element: the listing's length over the
    BLOCK / (32 · num_warps) elements each thread takes (None without the SASS, e.g. no cuobjdump)."""
    try:
        listing = kernel.asm["sass"]
    except Exception:  # the disassembler is missing on this machine
        return None
    warps = kernel.metadata.num_warps
    return wl.count_sass(listing) / (kwargs["BLOCK"] / (32 * warps))


def _step_instructions(fn: Callable[[], object]) -> Optional[float]:
    costs = [instructions_per_element(kernel, kwargs) for name, kernel, kwargs in launched_kernels(fn)
             if name in STEP_KERNELS]
    return costs[0] if costs else None


def time_case(case: wl.Case, dtype: torch.dtype, device: torch.device, selected: tuple, missing: dict,
              flush: wl.L2Flush, budget_s: float, min_reps: int) -> list:
    """One row per (mode, backend) that runs here: median ms, or the error it raised."""
    inputs = wl.make_inputs(case, dtype, device, seed=7)
    rows = []
    for mode in wl.modes(case.op):
        for backend in (b for b in wl.backends(case.op) if b in selected and (case.op, b) not in missing):
            row = {"op": case.op, "case": str(case), "shape": list(case.shape), "channels_last": case.channels_last,
                   "dtype": str(dtype).removeprefix("torch."), "mode": mode, "backend": backend,
                   "bytes": wl.traffic_bytes(case, dtype, mode), "flops": wl.flops(case, mode),
                   "planned_bytes": wl.planned_bytes(case, dtype, mode, device) if backend == "triton" else None,
                   "expected_bytes": wl.expected_bytes(case, dtype, mode, device) if backend == "triton" else None}
            with _nvtx(f"{case.op} {case} {mode} {backend}", device):
                try:
                    fn = wl.runner(case, backend, mode, inputs)
                    row["ms"] = wl.median_ms(fn, device, budget_s=budget_s, min_reps=min_reps, flush=flush)
                    if case.op == "attention":
                        row["peak_mib"] = wl.peak_memory_mib(fn, device)
                    if backend == "triton" and device.type == "cuda" and case.op in ("q_sample", "ddpm_step",
                                                                                     "ddim_step"):
                        row["instructions_per_element"] = _step_instructions(fn)
                    del fn
                except wl.Unavailable as err:
                    missing[(case.op, backend)] = str(err)
                    continue
                except Exception as err:  # one backend's failure is reported; the others still run
                    row["error"] = _error_text(err)
            _say(f"  time  {case.op:16s} {str(case):28s} {mode:8s} {backend:15s} "
                 + (f"{row['ms']:.4f} ms" if "ms" in row else row["error"]))
            rows.append(row)
    return rows


def derive(rows: list, peak: dict) -> None:
    """Fill in GB/s, TFLOP/s, the share of the device peak and the speedups of every timed row."""
    ms = {(r["op"], r["case"], r["mode"], r["backend"]): r.get("ms") for r in rows}
    for r in rows:
        t = r.get("ms")
        r["gbps"] = r["bytes"] / t / 1e6 if t and r["bytes"] else None
        r["tflops"] = r["flops"] / t / 1e9 if t and r["flops"] else None
        planned = r.get("planned_bytes")
        # the share of the copy bandwidth at the traffic the chosen plan really moves (split paths: two reads)
        r["pct_peak_planned"] = 100 * planned / t / 1e6 / peak["copy_gbps"] if t and planned else None
        # and at the DRAM traffic left once L2 serves what it can of the second read
        expected = r.get("expected_bytes")
        r["pct_peak_expected"] = 100 * expected / t / 1e6 / peak["copy_gbps"] if t and expected else None
        # the time the step's instructions take at one warp instruction per scheduler per cycle
        ipe, issue = r.get("instructions_per_element"), peak.get("warp_instructions_per_s")
        r["issue_ms"] = 1e3 * math.prod(r["shape"]) * ipe / 32 / issue if t and ipe and issue else None
        if r["gbps"] is not None:
            r["pct_peak"] = 100 * r["gbps"] / peak["copy_gbps"]
        elif r["tflops"] is not None:
            r["pct_peak"] = 100 * r["tflops"] / peak["matmul_tflops"]
        else:
            r["pct_peak"] = None
        for baseline in ("eager", "compile", "sdpa_flash"):
            base = ms.get((r["op"], r["case"], r["mode"], baseline))
            r[f"x_{baseline}"] = base / t if t and base else None


def evaluate_goals(rows: list) -> list:
    """One line per goal, kernel backend and case it applies to: the measured value, met or not."""
    out = []
    for goal in GOALS:
        for r in rows:
            if r["op"] != goal.op or r["mode"] != goal.mode or r["backend"] not in wl.KERNEL_BACKENDS:
                continue
            if not goal.applies(r):
                continue
            value = r.get(goal.metric)
            out.append({"goal": goal.text, "op": r["op"], "case": r["case"], "backend": r["backend"],
                        "metric": goal.metric, "value": value, "target": goal.target,
                        "met": None if value is None else value >= goal.target})
    return out


# --------------------------------------------------------------------------------------------------
# report


def _fmt(value, digits=2) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def _table(header: list, lines: list) -> list:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(line) + " |" for line in lines)]


def _measured_allowed(check: dict) -> tuple:
    """How a check's record reads in the table: (what was measured, what was allowed)."""
    if "max_abs_err" in check:
        return f"max abs err {check['max_abs_err']:.2e}", f"{check['atol']:.1e} + {check['rtol']:.1e}·abs(ref)"
    if "value" in check:
        return f"{check['value']:.4f}", f"{check['expected']:g} ± {check['bound']:.4f}"
    return "", ""


def markdown(result: dict) -> str:
    meta, peak = result["meta"], result["peaks"]
    peak_text = (f"Copy bandwidth {peak['copy_gbps']:.1f} GB/s ({peak['copy_bytes'] >> 20} MiB device-to-device "
                 f"copy); matmul {peak['matmul_tflops']:.2f} TFLOP/s ({peak['matmul_dtype']}, {peak['matmul_size']}³)."
                 if peak else "Peaks not measured: the run stopped before.")
    checks, failed = result["checks"], [c for c in result["checks"] if not c["passed"]]
    ext = ", ".join(meta["cuda_extension_ops"]) or "not built"
    lines = [
        f"# Fused-op check: {meta['device']}, {meta['date'][:10]}",
        "",
        f"Command: `{meta['command']}`  ",
        f"torch {meta['torch']} (CUDA {meta['cuda']}), triton {meta['triton']}, python {meta['python']}, "
        f"dxr {meta['dxr_commit']}; CUDA extension: {ext}.  ",
        peak_text,
        "",
        f"## Correctness: {len(checks) - len(failed)} of {len(checks)} checks passed",
        "",
        "Each kernel backend against the float32 reference on the same inputs, at the tolerances of "
        "tests/helpers.py (failures first).",
        "",
    ]
    failures_first = sorted(checks, key=lambda c: c["passed"])
    lines += _table(["op", "case", "dtype", "backend", "quantity", "measured", "allowed", "passed", "note"],
                    [[c["op"], c["case"], c["dtype"], c["backend"], c["quantity"], *_measured_allowed(c),
                      _fmt(c["passed"]), c.get("message", "")[:160]] for c in failures_first])
    if result["errors"]:
        lines += ["", "## The run stopped", "", *(f"    {e['message']}" for e in result["errors"])]
    lines += ["", "## Backends that did not run", ""]
    lines += _table(["op", "backend", "reason"], [[m["op"], m["backend"], m["reason"]] for m in result["missing"]]) \
        if result["missing"] else ["All ran."]
    lines += ["", f"## Timings (median ms, {result['timing_dtype']})", "",
              "GB/s counts the minimal traffic; % peak is of the copy bandwidth (GB/s) or the matmul peak "
              "(TFLOP/s) above; % planned is of the copy bandwidth at the traffic the Triton plan moves (its "
              "split paths read x twice), % L2 at the DRAM traffic left when L2 serves all it can of that "
              "second read; instr/elem is the SASS a thread of a step kernel runs per element and issue ms "
              "the time those instructions take at one per scheduler per cycle; × columns are speedups of "
              "this row over that backend.", ""]
    lines += _table(["op", "case", "mode", "backend", "ms", "GB/s", "TFLOP/s", "% peak", "% planned", "% L2",
                     "instr/elem", "issue ms", "× eager", "× compile", "× SDPA flash", "peak MiB"],
                    [[r["op"], r["case"], r["mode"], r["backend"], _fmt(r.get("ms"), 4) if "ms" in r else r["error"],
                      _fmt(r.get("gbps"), 1), _fmt(r.get("tflops"), 1), _fmt(r.get("pct_peak"), 1),
                      _fmt(r.get("pct_peak_planned"), 1), _fmt(r.get("pct_peak_expected"), 1),
                      _fmt(r.get("instructions_per_element"), 1), _fmt(r.get("issue_ms"), 4),
                      _fmt(r.get("x_eager")), _fmt(r.get("x_compile")), _fmt(r.get("x_sdpa_flash")),
                      _fmt(r.get("peak_mib"), 1)] for r in result["timings"]])
    lines += ["", "## Performance goals (measured, not asserted)", ""]
    lines += _table(["goal", "case", "backend", "measured", "target", "met"],
                    [[g["goal"], g["case"], g["backend"], _fmt(g["value"]), _fmt(g["target"]),
                      "not measured" if g["met"] is None else ("met" if g["met"] else "not met")]
                     for g in result["goals"]]) if result["goals"] else ["No kernel backend was timed."]
    if result.get("e2e"):
        lines += ["", *_e2e_markdown(result["e2e"])]
    return "\n".join(lines) + "\n"


def _e2e_markdown(rows: list) -> list:
    """The end-to-end section: the timed variants, then the ones that did not run, grouped by reason."""
    timed = [r for r in rows if "skipped" not in r]
    lines = ["## End to end (median ms of a few calls after a warm-up call)", "",
             "× eager and × compile: speedup over that backend in the same layout (no CUDA graph); "
             "× NCHW: channels_last over the same variant in NCHW; memory: peak (max_memory_allocated over the "
             "timed calls, weights and optimizer state included) over eager's.", ""]
    header = ["case", "variant", "ms", "images/s", "× eager", "× compile", "× NCHW", "peak MiB", "memory × eager"]
    lines += _table(header,
                    [[r["case"], e2e.variant_label(r), _fmt(r.get("ms"), 1) if "ms" in r else r["error"],
                      _fmt(r.get("images_per_s"), 2), _fmt(r.get("x_eager")), _fmt(r.get("x_compile")),
                      _fmt(r.get("x_nchw")), _fmt(r.get("peak_mib"), 0), _fmt(r.get("mem_vs_eager"))]
                     for r in timed]) if timed else ["No end-to-end variant ran."]
    reasons = {}
    for r in rows:
        if "skipped" in r:
            reasons.setdefault(r["skipped"], []).append(f"{r['case']} {e2e.variant_label(r)}")
    if reasons:
        lines += ["", "Did not run:", ""]
        lines += [f"- {why}: {len(which)} variant(s), e.g. {which[0]}" for why, which in reasons.items()]
    return lines


# --------------------------------------------------------------------------------------------------
# main


def _names(text: str, choices: tuple, what: str) -> tuple:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in choices]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{what} must be a comma-separated list of {', '.join(choices)}; "
                                         f"got {text!r}")
    return names


def parse_args(argv: list) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python bench/gpu_check.py",
                                     description="Check and time every fused op on every available backend.")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cuda (default), or cpu to run the same path at small sizes")
    parser.add_argument("--quick", action="store_true", help="fewer cases (tiny ones on a CPU)")
    parser.add_argument("--ops", default=",".join(wl.OPS), type=lambda s: _names(s, wl.OPS, "--ops"),
                        help=f"comma-separated subset of {','.join(wl.OPS)}")
    parser.add_argument("--backends", default=",".join(ALL_BACKENDS),
                        type=lambda s: _names(s, ALL_BACKENDS, "--backends"),
                        help=f"comma-separated subset of {','.join(ALL_BACKENDS)}")
    parser.add_argument("--e2e", default="auto", choices=E2E_CHOICES,
                        help="the end-to-end cases (bench/e2e.py): auto (on a GPU, not on a CPU), on, off, "
                             "or only (them and the peaks, no op checks or op timings)")
    parser.add_argument("--out", type=Path, default=BENCH / "results", help="folder for the .json and .md")
    return parser.parse_args(argv)


def timing_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on a GPU; float32 on a CPU, where half precision is not what anyone runs."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def run(args: argparse.Namespace, result: dict) -> None:
    """Peaks, checks and timings, recorded into ``result`` as they come (kept if a step raises)."""
    device = torch.device(args.device)
    # float32 references stay IEEE float32 matmuls (no TF32)
    torch.set_float32_matmul_precision("highest")
    with _nvtx("peaks", device):
        result["peaks"] = peaks(device, quick_cpu=args.quick and device.type == "cpu")
    _say(f"copy {result['peaks']['copy_gbps']:.1f} GB/s, matmul {result['peaks']['matmul_tflops']:.2f} TFLOP/s")
    flush = wl.L2Flush(device)
    # on a CPU the numbers only exercise the path: few, short repetitions
    budget_s, min_reps = (0.2, 5) if device.type == "cuda" else (0.05, 3)
    missing = {}
    kernels = [b for b in wl.KERNEL_BACKENDS if b in args.backends]
    for op in (() if args.e2e == "only" else args.ops):
        for i, case in enumerate(wl.cases(op, device.type, args.quick)):
            with _nvtx(f"{op} {case}", device):
                for backend in kernels:
                    if (op, backend) not in missing:
                        with _nvtx(f"check {op} {case} {backend}", device):
                            result["checks"] += _check_all(case, backend, device, i, missing)
                with _nvtx(f"time {op} {case}", device):
                    result["timings"] += time_case(case, timing_dtype(device), device, args.backends, missing, flush,
                                                   budget_s, min_reps)
                result["missing"] = [{"op": o, "backend": b, "reason": why} for (o, b), why in missing.items()]
            if device.type == "cuda":
                torch.cuda.empty_cache()


def wants_e2e(args: argparse.Namespace) -> bool:
    return args.e2e in ("on", "only") or (args.e2e == "auto" and args.device == "cuda")


def time_e2e(device: torch.device, quick: bool, selected: tuple, rows: list) -> None:
    """Every variant of every end-to-end case that runs on this device, appended to ``rows`` as it is timed:
    what ran (``e2e.Run.info``), median ms of a few calls after a warm-up call, images/s, peak memory; or
    ``skipped`` with the reason, or the ``error`` it raised."""
    reps = 3 if device.type == "cuda" and not quick else 2
    for entry in e2e.cases(device.type, quick):
        if entry.case is None:
            continue
        for backend, layout, cuda_graph in e2e.variants(entry.workload):
            if backend not in selected:
                continue
            row = {"case": str(entry.case), "workload": entry.workload, "backend": backend, "layout": layout,
                   "cuda_graph": cuda_graph}
            label = f"{entry.case} {e2e.variant_label(row)}"
            with _nvtx(f"e2e {label}", device):
                try:
                    run_ = e2e.build(entry.case, backend, layout, device, cuda_graph=cuda_graph)
                    out = run_.fn()  # compiles, autotunes, allocates
                    wl.synchronize(device)
                    if e2e.finite(out):
                        row.update(run_.info, **e2e.measure(run_, device, reps=reps))
                    else:
                        row["error"] = "non-finite output"
                    del run_, out
                except wl.Unavailable as err:
                    row["skipped"] = str(err)
                except Exception as err:  # one variant's failure is reported; the others still run
                    row["error"] = _error_text(err)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            _say(f"  e2e   {label:70s} " + (f"{row['ms']:.1f} ms" if "ms" in row else
                                            row.get("error") or f"skipped: {row['skipped']}"))
            rows.append(row)


def _check_all(case: wl.Case, backend: str, device: torch.device, index: int, missing: dict) -> list:
    """Every check of one case on one kernel backend: each dtype at the first case of an op (bfloat16
    alone at the others), then the in-kernel noise of the DDPM and DDIM steps that draw it."""
    records = []
    try:
        for dtype in DTYPES if index == 0 else DTYPES[:1]:
            found = check_case(case, backend, dtype, device, seed=100 * index + DTYPES.index(dtype))
            records += found
            _say(f"  check {case.op:16s} {str(case):28s} {str(dtype).removeprefix('torch.'):8s} {backend:6s} "
                 + ("ok" if all(r["passed"] for r in found) else "FAILED"))
        if draws_noise(case):
            records += check_noise(case, backend, device, seed=11 + index)
    except wl.Unavailable as err:
        missing[(case.op, backend)] = str(err)
        _say(f"  {case.op}: {backend} does not run here: {err}")
    except Exception as err:  # a check that crashes fails; the run goes on
        records.append(_record(case, backend, DTYPES[0], "runs", False, message=_error_text(err)))
        _say(f"  check {case.op} {case} {backend}: FAILED, {_error_text(err)}")
    return records


def failures(result: dict) -> list:
    """Failed checks, kernel errors while timing, and errors that stopped the run."""
    return ([c for c in result["checks"] if not c["passed"]]
            + [r for r in result["timings"] if "error" in r and r["backend"] in wl.KERNEL_BACKENDS]
            + [r for r in result.get("e2e", []) if "error" in r]
            + result["errors"])


def write(result: dict, out: Path) -> tuple:
    meta = result["meta"]
    stem = f"{_slug(meta['device'])}-{meta['date'][:10]}" + ("-quick" if meta["quick"] else "")
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md_path.write_text(markdown(result))
    return json_path, md_path


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --device cpu to run the same path on the CPU", file=sys.stderr)
        return 2
    result = {"meta": environment(device, argv, args.quick),
              "timing_dtype": str(timing_dtype(device)).removeprefix("torch."),
              "peaks": None, "checks": [], "missing": [], "timings": [], "goals": [], "e2e": [], "errors": []}
    try:
        run(args, result)
    except Exception as err:  # still write what there is: the record of a broken run is evidence too
        result["errors"].append({"message": _error_text(err), "traceback": traceback.format_exc()})
        traceback.print_exc()
    if result["peaks"] is not None:
        derive(result["timings"], result["peaks"])
        result["goals"] = evaluate_goals(result["timings"])
    json_path, md_path = write(result, args.out)
    if wants_e2e(args) and not result["errors"]:
        # the op record is on disk before the longer end-to-end part starts; written again when it ends
        _say(f"wrote {json_path} and {md_path}; the end-to-end cases follow")
        try:
            with _nvtx("end to end", device):
                time_e2e(device, args.quick, args.backends, result["e2e"])
        except Exception as err:
            result["errors"].append({"message": _error_text(err), "traceback": traceback.format_exc()})
            traceback.print_exc()
        e2e.derive(result["e2e"])
        json_path, md_path = write(result, args.out)
    print(md_path.read_text())
    bad = failures(result)
    _say(f"wrote {json_path} and {md_path}; " + (f"{len(bad)} FAILURE(S)" if bad else "all checks passed"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

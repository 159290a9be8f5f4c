"""Are the Triton kernels ready for the hardware? A compile check that needs no GPU.

    python bench/gpu_ready.py                # every case, sm_90 and sm_80; table to bench/results/
    python bench/gpu_ready.py --quick        # the CI subset (a few minutes on two cores)
    python bench/gpu_ready.py --arch sm_80 --ops attention --out /tmp/r
    python bench/gpu_ready.py --cases my_cases.py   # other kernels, through the same rules

Triton's interpreter accepts programs the GPU compiler refuses, so the tests alone cannot show that a
kernel builds for a real device. Here each kernel is compiled ahead of time for real targets with no
GPU and no driver: a stand-in driver reports ``GPUTarget("cuda", 90, 32)`` (or 80), every Triton
launch becomes a compile-only warm-up, and an autotuned launch compiles every configuration its
pruning keeps. The cases run the project's own launch functions on CPU tensors of real shapes, so the
launch code picks the plans, block sizes and specialisations a GPU run would: the benchmark shapes,
and edge sizes (each dimension equal to 1 somewhere, ragged sizes), in float32, float16 and bfloat16.
Each compiled kernel's PTX goes through the ``ptxas -v`` that ships with Triton, which reports
registers, spill stores and loads and the stack frame; its shared memory comes from Triton.

A compiled kernel fails the check on a compile error, on any spill, on shared memory over the
architecture's per-block limit, or on a launch grid beyond CUDA's limits (2³¹ - 1 programs on x,
65,535 on y and z). Exit status 1 when anything fails, 2 for a bad command line. Writes
``<out>/gpu-ready[-quick].json`` and ``.md`` (one row per compiled kernel and architecture) and prints
a summary per kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Iterator, Optional

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("gpu_ready: run without TRITON_INTERPRET=1 (the interpreter compiles nothing)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import autotuner as _autotuner  # noqa: E402
from triton.runtime import jit as _jit  # noqa: E402
from triton.runtime.driver import driver as _driver  # noqa: E402

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for _path in (REPO, BENCH):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from workloads import count_sass  # noqa: E402

# the elementwise noise-schedule kernels (dxr.kernels.triton.ddpm_step), whose SASS count per element the
# report gives
_STEP_KERNELS = ("_q_sample_kernel", "_ddpm_step_kernel", "_ddim_step_kernel")

# CUDA's grid limits: x up to 2³¹ - 1 programs, y and z up to 65,535
GRID_LIMITS = (2**31 - 1, 65535, 65535)


@dataclasses.dataclass(frozen=True)
class Arch:
    """A compile target: its capability, the name ptxas knows it by, and its limits."""

    name: str
    capability: int
    ptxas_name: str
    shared_limit: int  # dynamic shared memory one block may opt into, bytes
    sms: int  # multiprocessors of the part the launch code plans for


ARCHS = {
    "sm_90": Arch("sm_90", 90, "sm_90a", 232_448, 132),  # H100 / H200
    "sm_80": Arch("sm_80", 80, "sm_80", 166_912, 108),  # A100
}


# --------------------------------------------------------------------------------------------------
# compiling without a GPU


class CompileOnlyDriver:
    """The part of a Triton driver a compile needs: the target, a device and a stream (integers).

    The device number is the capability, so each target keeps its own kernel cache."""

    def __init__(self, arch: Arch):
        self.arch = arch

    def get_current_target(self):
        return GPUTarget("cuda", self.arch.capability, 32)

    def get_current_device(self):
        return self.arch.capability

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_capability(self, device=None):
        return divmod(self.arch.capability, 10)


@dataclasses.dataclass
class Compiled:
    """One kernel compiled for one architecture, with what ptxas and Triton report and where it is used."""

    kernel: str
    arch: str
    config: str
    signature: str
    registers: Optional[int] = None
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    shared: int = 0
    instructions: Optional[int] = None  # SASS instructions in the cubin (cuobjdump)
    error: Optional[str] = None
    grid_error: Optional[str] = None
    cases: list = dataclasses.field(default_factory=list)

    def faults(self, arch: Arch) -> list[str]:
        """What fails the check, in words (empty when the kernel is ready)."""
        found = []
        if self.error:
            found.append(f"does not compile: {self.error}")
        if self.spill_stores or self.spill_loads:
            found.append(f"spills ({self.spill_stores} B stores, {self.spill_loads} B loads)")
        if self.shared > arch.shared_limit:
            found.append(f"shared memory {self.shared} B over the {arch.name} limit {arch.shared_limit} B")
        if self.grid_error:
            found.append(self.grid_error)
        return found


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(log: str) -> dict:
    """Registers, stack frame and spill bytes from ``ptxas -v`` output (the largest over its functions)."""
    result = {"registers": None, "stack": 0, "spill_stores": 0, "spill_loads": 0}
    used = [int(m) for m in _PTXAS_USED.findall(log)]
    if used:
        result["registers"] = max(used)
    for stack, stores, loads in _PTXAS_SPILL.findall(log):
        result["stack"] = max(result["stack"], int(stack))
        result["spill_stores"] = max(result["spill_stores"], int(stores))
        result["spill_loads"] = max(result["spill_loads"], int(loads))
    return result


def ptxas_path() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def run_ptxas(ptx: str, arch: Arch, disassemble: bool = True) -> dict:
    """``ptxas -v`` on one kernel's PTX for ``arch``, and (``disassemble``) the SASS instruction count of
    the result (cuobjdump takes about a second a call, longer than ptxas); raises RuntimeError with
    ptxas' output when it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = Path(tmp) / "kernel.ptx", Path(tmp) / "k.cubin"
        src.write_text(ptx)
        proc = subprocess.run([ptxas_path(), "-v", f"--gpu-name={arch.ptxas_name}", "-o", str(cubin), str(src)],
                              capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"ptxas failed: {(proc.stderr or proc.stdout).strip()[-400:]}")
        result = parse_ptxas(proc.stdout + proc.stderr)
        if not disassemble:
            return {**result, "instructions": None}
        sass = subprocess.run([str(Path(ptxas_path()).with_name("cuobjdump")), "-sass", str(cubin)],
                              capture_output=True, text=True)
        result["instructions"] = count_sass(sass.stdout) if sass.returncode == 0 else None
    return result


def _config_text(kwargs: dict) -> str:
    keys = [k for k in kwargs if k.isupper() or (k in ("num_warps", "num_stages", "maxnreg") and kwargs[k] is not None)]
    return " ".join(f"{k}={kwargs[k]}" for k in sorted(keys))


class Recorder:
    """Turns every Triton launch into a compile for one architecture and keeps what it compiled."""

    def __init__(self, arch: Arch, sass_for_all: bool = True):
        self.arch = arch
        self.sass_for_all = sass_for_all  # count the SASS of every kernel, else of the step kernels only
        self.compiled: dict[tuple, Compiled] = {}
        self.case = ""
        self.case_errors: list[tuple[str, str]] = []

    def _entry(self, fn, key, config: str, signature: str) -> Compiled:
        entry = self.compiled.get(key)
        if entry is None:
            entry = self.compiled[key] = Compiled(fn.__name__, self.arch.name, config, signature)
        if self.case not in entry.cases:
            entry.cases.append(self.case)
        return entry

    def launch(self, original, fn, args, kwargs):
        grid = kwargs.pop("grid", None)
        kwargs.pop("warmup", None)
        meta = {**dict(zip(fn.arg_names, args)), **kwargs}
        signature = ",".join(str(a.dtype).replace("torch.", "") for a in args if isinstance(a, torch.Tensor))
        config = _config_text(kwargs)
        try:
            kernel = original(fn, *args, grid=grid, warmup=True, **kwargs)
        except Exception as err:  # a compile error is a finding, not a crash of the check
            message = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
            entry = self._entry(fn, (fn.__name__, "error", config, signature, message), config, signature)
            entry.error = message[:300]
            return None
        entry = self._entry(fn, (fn.__name__, kernel.hash), config, signature)
        if entry.registers is None and entry.error is None:
            entry.shared = int(kernel.metadata.shared)
            try:
                disassemble = self.sass_for_all or fn.__name__ in _STEP_KERNELS
                entry.__dict__.update(run_ptxas(kernel.asm["ptx"], self.arch, disassemble))
            except RuntimeError as err:
                entry.error = str(err)
        if grid is not None:
            dims = tuple(grid(meta) if callable(grid) else grid)
            dims = dims + (1,) * (3 - len(dims))
            over = [f"{'xyz'[i]}={d}" for i, d in enumerate(dims) if d > GRID_LIMITS[i]]
            if over:
                entry.grid_error = f"grid {dims} over CUDA's limits ({', '.join(over)}) in {self.case}"
        return kernel

    @contextlib.contextmanager
    def active(self):
        original_run = _jit.JITFunction.run
        original_tune = _autotuner.Autotuner.run
        recorder = self

        def run(fn, *args, **kwargs):
            return recorder.launch(original_run, fn, args, kwargs)

        def tune(tuner, *args, **kwargs):
            # every configuration the pruning keeps, compiled; none benchmarked
            tuner.nargs = dict(zip(tuner.arg_names, args))
            configs = tuner.prune_configs(kwargs)
            for cfg in configs:
                tuner.fn.run(*args, **{**kwargs, **cfg.all_kwargs()})
            tuner.nargs = None

        _driver.set_active(CompileOnlyDriver(self.arch))
        _jit.JITFunction.run = run
        _autotuner.Autotuner.run = tune
        try:
            yield self
        finally:
            _jit.JITFunction.run = original_run
            _autotuner.Autotuner.run = original_tune
            _driver.reset_active() if _has_real_driver() else setattr(_driver, "_active", None)

    def run_case(self, label: str, thunk: Callable[[], object]) -> None:
        self.case = label
        try:
            thunk()
        except Exception as err:
            self.case_errors.append((label, f"{type(err).__name__}: {err}"[:300]))


def _has_real_driver() -> bool:
    try:
        _driver.default
        return True
    except RuntimeError:
        return False


# --------------------------------------------------------------------------------------------------
# the cases: the project's launch functions at benchmark shapes and edge sizes

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# cases a launch function declines on this architecture (no spill-free tile), noted by the cases
NOT_SERVED: list[str] = []
Case = tuple  # (op, label, thunk, quick)


def _dt(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _group_norm_cases() -> Iterator[Case]:
    from dxr.kernels.triton import group_norm_silu as gn

    # (shape, groups, channels_last, quick): the benchmark shapes, the UNet's, and edge sizes
    shapes = [
        ((8, 128, 64, 64), 32, False, False), ((1, 512, 32, 32), 32, False, True), ((16, 256, 32, 32), 32, False, True),
        ((8, 128, 64, 64), 32, True, True), ((1, 320, 64, 64), 32, False, True), ((8, 128, 128, 128), 32, False, False),
        ((16, 512, 32, 32), 32, False, False), ((2, 64, 16, 16), 32, True, False),
        ((1, 32, 1, 1), 32, False, True), ((1, 1, 9, 9), 1, False, False), ((3, 6, 5, 7), 3, False, True),
        ((3, 6, 5, 7), 3, True, True), ((2, 64, 45, 31), 32, False, False), ((1, 64, 97, 89), 8, True, False),
        ((4, 96, 1), 32, False, False), ((1, 2, 4099), 1, False, True),
    ]
    for shape, groups, cl, quick in shapes:
        for dtype in DTYPES:
            for affine, silu in ((True, True), (True, False), (False, True)):
                def thunk(shape=shape, groups=groups, cl=cl, dtype=dtype, affine=affine, silu=silu):
                    x = torch.empty(shape, dtype=dtype)
                    if cl:
                        x = x.movedim(1, -1).contiguous().movedim(-1, 1)  # channels innermost
                    c = shape[1]
                    w = torch.ones(c, dtype=dtype) if affine else None
                    b = torch.zeros(c, dtype=dtype) if affine else None
                    y, mean, rstd = gn.group_norm_silu_fwd(x, w, b, groups, 1e-5, silu)
                    gn.group_norm_silu_bwd(torch.empty_like(x), x, w, b, mean, rstd, groups, silu)

                label = f"{'x'.join(map(str, shape))} G{groups}{' cl' if cl else ''} {_dt(dtype)}" \
                        f"{'' if affine else ' no-affine'}{'' if silu else ' no-silu'}"
                yield "group_norm_silu", label, thunk, quick and (dtype != torch.float16) and affine


def _adain_cases() -> Iterator[Case]:
    from dxr.kernels.triton import adain

    shapes = [
        ((1, 256, 64, 64), False, True), ((8, 256, 64, 64), False, True), ((8, 256, 64, 64), True, True),
        ((1, 1, 1, 1), False, True), ((2, 3, 5, 7), False, True), ((2, 3, 5, 7), True, True),
        ((1, 64, 256, 256), False, False), ((4, 1, 33), False, False), ((2, 512, 16, 16), True, False),
    ]
    for shape, cl, quick in shapes:
        for dtype in DTYPES:
            def thunk(shape=shape, cl=cl, dtype=dtype):
                x = torch.empty(shape, dtype=dtype)
                if cl:
                    x = x.movedim(1, -1).contiguous().movedim(-1, 1)  # channels innermost
                n, c = shape[:2]
                scale, shift = torch.ones(n, c), torch.zeros(n, c)
                y, mean, rstd = adain.adain_fwd(x, scale, shift, 1e-5)
                adain.adain_bwd(torch.empty_like(x), x, scale, mean, rstd)

            yield "adain", f"{'x'.join(map(str, shape))}{' cl' if cl else ''} {_dt(dtype)}", thunk, \
                quick and dtype != torch.float16


def _ddpm_step_cases() -> Iterator[Case]:
    from dxr.kernels.triton import ddpm_step as steps

    ac = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    shapes = [((16, 3, 256, 256), True), ((8, 1, 256, 256), False), ((1, 1), True), ((3, 5, 7, 9), True),
              ((2, 4, 16, 16), False)]
    for shape, quick in shapes:
        for dtype in DTYPES:
            def thunk(shape=shape, dtype=dtype):
                x = torch.empty(shape, dtype=dtype)
                t = torch.zeros(shape[0], dtype=torch.int64)
                steps.q_sample(x, torch.empty_like(x), t, ac)
                for noise in (None, torch.empty_like(x)):
                    for variance, prediction, clip in (("small", "eps", None), ("large", "v", 1.0)):
                        steps.ddpm_step(x, x, t, ac, prediction, clip, variance, noise, 7)
                    for eta in (0.0, 1.0):
                        steps.ddim_step(x, x, t, t, ac, eta, "eps", None, noise, 7)
                steps.ddim_step(x, x, t, t, ac.float(), 0.5, "v", 1.0, None, 7)
                # the seed in device memory, as a CUDA-graph sampler passes it
                state = torch.zeros(2, dtype=torch.int64)
                for variance, prediction, clip in (("small", "eps", None), ("large", "v", 1.0)):
                    steps.ddpm_step(x, x, t, ac, prediction, clip, variance, None, state)
                steps.ddim_step(x, x, t, t, ac, 1.0, "eps", None, None, state)

            yield "ddpm_step", f"{'x'.join(map(str, shape))} {_dt(dtype)}", thunk, quick and dtype != torch.float16


def _attention_cases() -> Iterator[Case]:
    from dxr.kernels.triton import attention as attn

    # (B, H, Lq, Lk, D, quick): the benchmark shapes, then head dims 32 … 256 and padded ones, ragged
    # and unit lengths
    shapes = [
        (8, 8, 256, 256, 64, True), (4, 8, 1024, 1024, 128, True), (1, 16, 4096, 4096, 64, False),
        (1, 1, 1, 1, 64, True), (2, 3, 77, 45, 32, False), (1, 2, 100, 1, 128, False), (2, 1, 33, 65, 256, True),
        (1, 2, 129, 31, 40, False), (1, 1, 17, 17, 8, False), (1, 4, 300, 300, 96, False),
    ]
    for b, h, lq, lk, d, quick in shapes:
        for dtype in DTYPES:
            def thunk(b=b, h=h, lq=lq, lk=lk, d=d, dtype=dtype):
                q = torch.empty((b, h, lq, d), dtype=dtype)
                k = torch.empty((b, h, lk, d), dtype=dtype)
                v = torch.empty_like(k)
                # where no tile is free of spills the kernel is not used (dxr.ops runs SDPA): say so
                for backward in (False, True):
                    if not attn.serves(d, q.element_size(), backward):
                        NOT_SERVED.append(f"attention {'backward' if backward else 'forward'} D{d} {_dt(dtype)}")
                if not attn.serves(d, q.element_size(), False):
                    return
                o, lse = attn.attention_fwd(q, k, v, d ** -0.5)
                if attn.serves(d, q.element_size(), True):
                    attn.attention_bwd(torch.empty_like(o), q, k, v, o, lse, d ** -0.5)

            yield "attention", f"B{b} H{h} Lq{lq} Lk{lk} D{d} {_dt(dtype)}", thunk, quick and dtype != torch.float16


def _drr_cases() -> Iterator[Case]:
    from dxr.kernels.triton import drr

    shapes = [((128, 256, 256), 256 * 256, True), ((1, 1, 1), 1, True), ((5, 1, 7), 33, True),
              ((3, 9, 1), 17, True), ((64, 133, 512), 4097, False)]
    for shape, rays, quick in shapes:
        for dtype in DTYPES:
            def thunk(shape=shape, rays=rays, dtype=dtype):
                drr.march_planes(torch.empty(shape, dtype=dtype), torch.empty((6, rays)), torch.empty(rays))

            yield "drr", f"planes {'x'.join(map(str, shape))} rays {rays} {_dt(dtype)}", thunk, \
                quick and dtype != torch.float16


PROJECT_CASES = {
    "group_norm_silu": _group_norm_cases,
    "adain": _adain_cases,
    "ddpm_step": _ddpm_step_cases,  # q_sample, ddpm_step and ddim_step: the kernels of one module
    "attention": _attention_cases,
    "drr": _drr_cases,
}
# --ops also takes the other ops whose kernels share a family's module
OP_FAMILIES = {"q_sample": "ddpm_step", "ddim_step": "ddpm_step"}


def _load_cases(path: Path) -> dict:
    """Cases of another module: it defines ``CASES``, an iterable of (op, label, thunk) or (…, quick)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {"extra": lambda: (tuple(c) + (True,) * (4 - len(c)) for c in module.CASES)}


# --------------------------------------------------------------------------------------------------
# one architecture (in its own process), then the merged report


def check_arch(arch: Arch, ops: list[str], quick: bool, cases_file: Optional[Path], progress: bool) -> dict:
    from dxr.kernels.triton import group_norm_silu as gn

    gn.DEFAULT_SMS = arch.sms  # the split path plans for the SM count of the part
    sources = _load_cases(cases_file) if cases_file else {op: PROJECT_CASES[op] for op in ops}
    recorder = Recorder(arch, sass_for_all=not quick)
    started = time.perf_counter()
    with recorder.active():
        for op, make in sources.items():
            for _op, label, thunk, is_quick in make():
                if quick and not is_quick:
                    continue
                recorder.run_case(f"{_op}: {label}", thunk)
                if progress:
                    print(f"[{arch.name} {time.perf_counter() - started:6.0f} s] {_op}: {label}", file=sys.stderr,
                          flush=True)
    rows = []
    for entry in recorder.compiled.values():
        row = dataclasses.asdict(entry)
        row["faults"] = entry.faults(arch)
        rows.append(row)
    return {"arch": arch.name, "seconds": round(time.perf_counter() - started, 1), "kernels": rows,
            "case_errors": recorder.case_errors, "not_served": sorted(set(NOT_SERVED))}


def instructions_per_element(row: dict) -> Optional[float]:
    """SASS instructions per element of a noise-schedule kernel variant: the kernels are straight-line code,
    so a thread runs each instruction once for its BLOCK / (32 · num_warps) elements. None for other kernels."""
    if row["kernel"] not in _STEP_KERNELS or not row.get("instructions"):
        return None
    config = dict(item.split("=") for item in row["config"].split())
    return row["instructions"] / (int(config["BLOCK"]) / (32 * int(config["num_warps"])))


def _step_costs(report: dict) -> list[str]:
    groups: dict = {}
    for r in report["kernels"]:
        per_element = instructions_per_element(r)
        if per_element is not None:
            noise = ("tensor" if "DRAW_NOISE=True" not in r["config"] else
                     "in-kernel, seed in memory" if "SEED_IN_MEMORY=True" in r["config"] else "in-kernel")
            groups.setdefault((r["kernel"], r["arch"], noise), []).append(per_element)
    if not groups:
        return []
    lines = ["", "## Noise-schedule kernels (ddpm_step): SASS instructions per element", "",
             "Counted in the compiled code (straight-line kernels), over the variants: the in-kernel noise "
             "(Philox and Box-Muller) against a noise tensor read from memory.", "",
             "| kernel | arch | noise | instructions per element (min – max) |", "|---|---|---|---|"]
    for (kernel, arch, noise), values in sorted(groups.items()):
        lines.append(f"| {kernel} | {arch} | {noise} | "
                     f"{min(values):.1f} – {max(values):.1f} |")
    return lines


def _markdown(report: dict) -> str:
    lines = [f"# Triton kernels compiled for the hardware ({report['date']})", "",
             f"Triton {report['triton']}, ptxas from Triton; {'quick subset' if report['quick'] else 'every case'}; "
             f"{report['summary']}", "",
             "Per kernel and architecture: compiled variants (configurations × specialisations), the most registers, "
             "spill bytes, stack and shared memory of any variant, and the faults.", "",
             "| kernel | arch | variants | registers (max) | spill B (max) | stack B (max) | shared B (max) | faults |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for (kernel, arch), rows in sorted(_by_kernel(report).items()):
        faults = sum(1 for r in rows if r["faults"])
        regs = max((r["registers"] or 0) for r in rows)
        spill = max(r["spill_stores"] + r["spill_loads"] for r in rows)
        lines.append(f"| {kernel} | {arch} | {len(rows)} | {regs} | {spill} | {max(r['stack'] for r in rows)} | "
                     f"{max(r['shared'] for r in rows)} | {faults or '—'} |")
    failing = [r for r in report["kernels"] if r["faults"]]
    if failing:
        lines += ["", "## Faults", ""]
        for r in failing:
            lines.append(f"- {r['kernel']} ({r['arch']}, {r['config']}, {r['signature']}): {'; '.join(r['faults'])} "
                         f"— in {r['cases'][0]}")
    lines += _step_costs(report)
    if any(report.get("not_served", {}).values()):
        lines += ["", "## Not served by the Triton kernels (no spill-free tile; dxr.ops runs PyTorch there)", ""]
        lines += [f"- {arch}: {', '.join(cases)}" for arch, cases in report["not_served"].items() if cases]
    if report["case_errors"]:
        lines += ["", "## Cases that raised", ""]
        lines += [f"- {arch}: {label}: {err}" for arch, label, err in report["case_errors"]]
    lines += ["", "## Every compiled variant", "",
              "| kernel | arch | configuration | dtypes | registers | spill B | stack B | shared B | SASS instr |",
              "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in sorted(report["kernels"], key=lambda r: (r["kernel"], r["arch"], r["config"])):
        lines.append(f"| {r['kernel']} | {r['arch']} | {r['config']} | {r['signature']} | {r['registers']} | "
                     f"{r['spill_stores'] + r['spill_loads']} | {r['stack']} | {r['shared']} | "
                     f"{r.get('instructions') or '—'} |")
    return "\n".join(lines) + "\n"


def _by_kernel(report: dict) -> dict:
    groups: dict = {}
    for r in report["kernels"]:
        groups.setdefault((r["kernel"], r["arch"]), []).append(r)
    return groups


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="exit 1 when a kernel fails the check")
    parser.add_argument("--arch", default="sm_90,sm_80", help="targets, comma-separated (default: %(default)s)")
    parser.add_argument("--ops", default=",".join(PROJECT_CASES),
                        help="kernel families, comma-separated; q_sample and ddim_step name ddpm_step's "
                             "(default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="the CI subset: fewer shapes and dtypes")
    parser.add_argument("--cases", type=Path, help="a Python file defining CASES to check instead of the project's")
    parser.add_argument("--out", type=Path, default=BENCH / "results", help="folder for the report (default: bench/results)")
    parser.add_argument("--no-write", action="store_true", help="print the summary only")
    parser.add_argument("--progress", action="store_true", help="name each case as it compiles")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    ops = list(dict.fromkeys(OP_FAMILIES.get(o, o) for o in (o.strip() for o in args.ops.split(",")) if o))
    for a in archs:
        if a not in ARCHS:
            parser.error(f"--arch: unknown target {a!r}, expected some of {', '.join(ARCHS)}")
    for o in ops:
        if o not in PROJECT_CASES:
            parser.error(f"--ops: unknown kernel family {o!r}, "
                         f"expected some of {', '.join([*PROJECT_CASES, *OP_FAMILIES])}")
    if args.cases is not None and not args.cases.is_file():
        parser.error(f"--cases: no such file {args.cases}")
    if args.cases is not None and not args.worker:
        try:
            _load_cases(args.cases)["extra"]()
        except Exception as err:  # a foreign or broken file: one line, exit 2
            parser.error(f"--cases: {args.cases} must be a Python file defining CASES, a list of "
                         f"(op, label, thunk[, quick]) ({type(err).__name__}: {err})")

    if args.worker:  # one architecture, its result as JSON on stdout
        result = check_arch(ARCHS[args.worker], ops, args.quick, args.cases, args.progress)
        print(json.dumps(result))
        return 0

    # one process per architecture: they compile side by side, each with its own driver and caches
    started = time.perf_counter()
    base = [sys.executable, str(Path(__file__).resolve()), "--ops", ",".join(ops)]
    base += ["--quick"] if args.quick else []
    base += ["--cases", str(args.cases.resolve())] if args.cases else []
    base += ["--progress"] if args.progress else []
    procs = {a: subprocess.Popen(base + ["--worker", a], stdout=subprocess.PIPE, text=True) for a in archs}
    results = []
    for a, proc in procs.items():
        out, _ = proc.communicate()
        if proc.returncode:
            print(f"gpu_ready: the {a} check itself failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        results.append(json.loads(out.strip().splitlines()[-1]))

    kernels = [r for res in results for r in res["kernels"]]
    case_errors = [(res["arch"], label, err) for res in results for label, err in res["case_errors"]]
    failing = [r for r in kernels if r["faults"]]
    summary = (f"{len(kernels)} compiled variants over {', '.join(archs)} in {time.perf_counter() - started:.0f} s: "
               f"{len(failing)} failing, {len(case_errors)} cases raised")
    not_served = {res["arch"]: res.get("not_served", []) for res in results}
    report = {"date": datetime.date.today().isoformat(), "triton": triton.__version__, "quick": args.quick,
              "archs": archs, "summary": summary, "kernels": kernels, "case_errors": case_errors,
              "not_served": not_served}
    for (kernel, arch), rows in sorted(_by_kernel(report).items()):
        bad = [r for r in rows if r["faults"]]
        regs = max((r["registers"] or 0) for r in rows)
        print(f"{kernel:34s} {arch}  {len(rows):4d} variants  ≤{regs:3d} regs  "
              f"{'ok' if not bad else f'{len(bad)} FAILING'}")
    for r in failing:
        print(f"FAIL {r['kernel']} ({r['arch']}, {r['config']}, {r['signature']}): {'; '.join(r['faults'])} "
              f"[{r['cases'][0]}]")
    for arch, label, err in case_errors:
        print(f"FAIL case {label} ({arch}): {err}")
    for arch, cases in not_served.items():
        if cases:
            print(f"not served on {arch} (no spill-free tile; dxr.ops falls back): {', '.join(cases)}")
    print(summary)
    if not args.no_write and args.cases is None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / ("gpu-ready-quick" if args.quick else "gpu-ready")
        stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
        stem.with_suffix(".md").write_text(_markdown(report))
        print(f"wrote {stem}.json and .md")
    return 1 if failing or case_errors else 0


if __name__ == "__main__":
    sys.exit(main())

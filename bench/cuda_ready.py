"""Check the CUDA kernels of csrc/ for the hardware, without a GPU: build, read ptxas, fail on spills.

    python bench/cuda_ready.py                          # build for sm_80 and sm_90a, print the table
    python bench/cuda_ready.py --archs "80-real;90a-real;89-real" --jobs 2
    python bench/cuda_ready.py --log build.log          # check an existing `-Xptxas -v` build log

Configures and builds the extension from this tree into a fresh temporary directory with CMake
(``-DDXR_PTXAS_VERBOSE=ON``, so nvcc passes ``-Xptxas -v``), imports the built ``_C`` module, and reads
every kernel's registers, spill stores and loads, stack frame and static shared memory per architecture
from ptxas' report. The attention kernel's dynamic shared memory (a fixed size per head dim, from the
module) is added to its static one; the GroupNorm/AdaIN planner sizes its dynamic shared memory from the
device's opt-in limit at run time, so it cannot exceed it. The same rule as the Triton compile check
(bench/gpu_ready.py): exit status 1 on any spill or any block over its architecture's shared memory,
232,448 B on sm_90 and 166,912 B on sm_80; 2 when the build or the import fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ARCHS = "80-real;90a-real"
# shared memory a block may use, bytes, per architecture
SMEM_LIMIT = {"sm_80": 166_912, "sm_86": 101_376, "sm_89": 101_376, "sm_90": 232_448, "sm_90a": 232_448}
ATTENTION_HEADS = (32, 64, 128)

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")


@dataclass
class Kernel:
    """One kernel compiled for one architecture, as ptxas reports it."""

    name: str  # mangled
    arch: str  # sm_80, sm_90a, ...
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    smem: int = 0  # static shared memory, bytes
    dynamic_smem: int = 0  # the most dynamic shared memory a launch asks for, where known

    @property
    def shared(self) -> int:
        return self.smem + self.dynamic_smem


def parse_ptxas(log: str) -> list[Kernel]:
    """The kernels of a ``-Xptxas -v`` log, in order: registers, spills, stack and static smem of each."""
    kernels: list[Kernel] = []
    current: Optional[Kernel] = None
    for line in log.splitlines():
        entry = _ENTRY.search(line)
        if entry:
            current = Kernel(entry.group(1), entry.group(2))
            kernels.append(current)
            continue
        if current is None:
            continue
        frame = _FRAME.search(line)
        if frame:
            current.stack, current.spill_stores, current.spill_loads = map(int, frame.groups())
            continue
        used = _USED.search(line)
        if used:
            current.registers = int(used.group(1))
            current.smem = int(used.group(2) or 0)
            current = None  # "Used ..." closes the kernel's report
    return kernels


def problems(kernels: Iterable[Kernel]) -> list[str]:
    """What breaks the rule: a spill (stores or loads) or more shared memory than the architecture has."""
    found = []
    for k in kernels:
        if k.spill_stores or k.spill_loads:
            found.append(f"{k.arch} {short_name(k.name)}: spills {k.spill_stores} B stored, {k.spill_loads} B loaded")
        limit = SMEM_LIMIT.get(k.arch)
        if limit is not None and k.shared > limit:
            found.append(f"{k.arch} {short_name(k.name)}: {k.shared} B of shared memory, over the {limit} B limit")
    return found


def demangle(names: list[str]) -> list[str]:
    """Names through c++filt when it is installed, else as they are."""
    tool = shutil.which("c++filt")
    if not tool or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=False).stdout
    lines = out.splitlines()
    return lines if len(lines) == len(names) else names


def short_name(name: str) -> str:
    """``kernel<args>`` without namespaces, return type or parameter list."""
    text = demangle([name])[0]
    text = re.sub(r"\b\w+::|\(anonymous namespace\)::", "", text)
    text = re.sub(r"^void ", "", text)
    return re.sub(r"\((?:[^()]|\([^()]*\))*\)$", "", text)


def attach_dynamic_smem(kernels: list[Kernel], module) -> None:
    """Add attention_fwd's dynamic shared memory (per head dim, from the built module) to its kernels."""
    for k in kernels:
        head = re.search(r"attention_fwd_kernel.*?Li(\d+)E", k.name)
        if head and module is not None:
            k.dynamic_smem = int(module.attention_smem(int(head.group(1))))


def table(kernels: list[Kernel]) -> str:
    """One row per kernel, one column group per architecture: registers, spills, stack, shared memory."""
    archs = sorted({k.arch for k in kernels})
    names = list(dict.fromkeys(k.name for k in kernels))
    pretty = dict(zip(names, (short_name(n) for n in names)))
    by_key = {(k.name, k.arch): k for k in kernels}
    width = max([len("kernel")] + [len(p) for p in pretty.values()])
    head = f"{'kernel':<{width}}" + "".join(f" | {arch + ' regs spill stack smem':>34}" for arch in archs)
    lines = [head, "-" * len(head)]
    for name in names:
        cells = []
        for arch in archs:
            k = by_key.get((name, arch))
            if k is None:
                cells.append(f" | {'-':>34}")
                continue
            spill = f"{k.spill_stores}/{k.spill_loads}"
            cells.append(f" | {k.registers:>11} {spill:>7} {k.stack:>5} {k.shared:>8}")
        lines.append(f"{pretty[name]:<{width}}" + "".join(cells))
    return "\n".join(lines)


def summary(kernels: list[Kernel]) -> str:
    """Per architecture: kernels, the most registers, spills, the most shared memory."""
    out = []
    for arch in sorted({k.arch for k in kernels}):
        ks = [k for k in kernels if k.arch == arch]
        spilling = sum(1 for k in ks if k.spill_stores or k.spill_loads)
        top = max(ks, key=lambda k: k.registers)
        big = max(ks, key=lambda k: k.shared)
        out.append(f"{arch}: {len(ks)} kernels, {spilling} spilling, most registers {top.registers} "
                   f"({short_name(top.name)}), most shared memory {big.shared} B ({short_name(big.name)}), "
                   f"limit {SMEM_LIMIT.get(arch, '?')} B")
    return "\n".join(out)


def build(archs: str, jobs: int, build_dir: Path) -> tuple[str, Path]:
    """Configure and build the extension into ``build_dir``; (the build log, the module's path)."""
    out_dir = build_dir / "out"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = ["cmake", "--fresh", "-S", str(REPO), "-B", str(build_dir), *generator,
                 f"-DCMAKE_CUDA_ARCHITECTURES={archs}", "-DDXR_PTXAS_VERBOSE=ON", "-DCMAKE_BUILD_TYPE=Release",
                 f"-DPython_EXECUTABLE={sys.executable}", f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}"]
    try:
        import pybind11

        configure.append(f"-Dpybind11_DIR={pybind11.get_cmake_dir()}")
    except ImportError:
        pass
    log = []
    for command in (configure, ["cmake", "--build", str(build_dir), "--parallel", str(jobs)]):
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        log.append(done.stdout + done.stderr)
        if done.returncode:
            raise RuntimeError(f"{' '.join(command[:2])} failed ({done.returncode}):\n{log[-1][-4000:]}")
    modules = sorted(out_dir.glob("_C*.so")) + sorted(out_dir.glob("_C*.pyd"))
    if not modules:
        raise RuntimeError(f"the build wrote no _C module into {out_dir}")
    return "\n".join(log), modules[0]


def import_module(path: Path):
    """Import a built ``_C`` from its file (no GPU needed)."""
    spec = importlib.util.spec_from_file_location("_C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=DEFAULT_ARCHS, help=f"CMAKE_CUDA_ARCHITECTURES (default {DEFAULT_ARCHS})")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel compile jobs")
    parser.add_argument("--log", type=Path, help="check this ptxas -v log instead of building")
    parser.add_argument("--keep", type=Path, help="build here and keep it (default: a temporary directory)")
    args = parser.parse_args(argv)

    module = None
    if args.log:
        log = args.log.read_text()
    else:
        with tempfile.TemporaryDirectory(prefix="dxr-cuda-ready-") as tmp:
            build_dir = args.keep or Path(tmp)
            try:
                log, path = build(args.archs, args.jobs, build_dir)
                module = import_module(path)
            except (RuntimeError, OSError, ImportError) as err:
                print(f"cuda_ready: {err}", file=sys.stderr)
                return 2
            print(f"built and imported {path.name}: OPS = {module.OPS}, {module.device_count()} GPU(s) visible")
    kernels = parse_ptxas(log)
    if not kernels:
        print("cuda_ready: no kernel reports in the log (was it built with -Xptxas -v?)", file=sys.stderr)
        return 2
    attach_dynamic_smem(kernels, module)
    print(table(kernels))
    print()
    print(summary(kernels))
    found = problems(kernels)
    for line in found:
        print(f"FAIL {line}")
    print("ready: no spills, shared memory within every limit" if not found else f"{len(found)} problem(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())

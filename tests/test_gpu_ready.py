"""bench/gpu_ready.py, the compile check for real GPUs: its ptxas parsing, and that it fails on a kernel
that spills or does not compile and passes a clean one (compiled for sm_90 without a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / "bench" / "gpu_ready.py"

pytest.importorskip("triton", reason="triton is not installed")


def _load_parser():
    # gpu_ready refuses to run under the interpreter, so the parser is read from the source
    namespace: dict = {}
    source = CHECK.read_text()
    start, end = source.index("_PTXAS_USED ="), source.index("def ptxas_path")
    exec("import re\n" + source[start:end], namespace)
    return namespace["parse_ptxas"]


def test_ptxas_log_is_parsed_for_registers_stack_and_spills():
    parse = _load_parser()
    log = textwrap.dedent("""\
        ptxas info    : Compiling entry function 'k' for 'sm_90a'
        ptxas info    : Function properties for k
            48 bytes stack frame, 40 bytes spill stores, 36 bytes spill loads
        ptxas info    : Used 255 registers, used 1 barriers, 48 bytes cumulative stack size
        """)
    assert parse(log) == {"registers": 255, "stack": 48, "spill_stores": 40, "spill_loads": 36}
    clean = "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\nptxas info : Used 40 registers\n"
    assert parse(clean) == {"registers": 40, "stack": 0, "spill_stores": 0, "spill_loads": 0}


KERNELS = '''
import torch
import triton
import triton.language as tl


@triton.jit
def clean_copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


@triton.jit
def spilling_tile(x_ptr, y_ptr, BLOCK: tl.constexpr):
    # a 128 × 128 float32 tile held by one warp: 512 values a thread, past the 255 registers
    r = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + r[:, None] * BLOCK + r[None, :])
    y = x * tl.sum(x, axis=1)[:, None] + tl.max(x, axis=0)[None, :]
    tl.store(y_ptr + r[:, None] * BLOCK + r[None, :], y)


@triton.jit
def unit_size_cast(x_ptr, n):
    # n == 1 is specialised to a constant, which has no .to(): compiles in the interpreter only
    tl.store(x_ptr, n.to(tl.float32))


def _clean():
    clean_copy[(1,)](torch.empty(100), torch.empty(100), 100, BLOCK=128)


def _spill():
    spilling_tile[(1,)](torch.empty(128 * 128), torch.empty(128 * 128), BLOCK=128, num_warps=1)


def _unit():
    unit_size_cast[(1,)](torch.empty(1), 1)


CASES = [("toy", "clean copy", _clean)]
if "{bad}" == "yes":
    CASES += [("toy", "spilling tile", _spill), ("toy", "unit size", _unit)]
'''


def _check(tmp_path: Path, bad: bool) -> subprocess.CompletedProcess:
    cases = tmp_path / "toy_cases.py"
    cases.write_text(KERNELS.replace("{bad}", "yes" if bad else "no"))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    return subprocess.run([sys.executable, str(CHECK), "--arch", "sm_90", "--cases", str(cases), "--no-write"],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_check_passes_a_clean_kernel(tmp_path):
    proc = _check(tmp_path, bad=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "clean_copy" in proc.stdout and "0 failing" in proc.stdout


@pytest.mark.slow
def test_check_fails_on_a_spill_and_on_a_kernel_that_does_not_compile(tmp_path):
    proc = _check(tmp_path, bad=True)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("FAIL spilling_tile") and "spills" in line for line in lines), proc.stdout
    assert any(line.startswith("FAIL unit_size_cast") and "does not compile" in line for line in lines), proc.stdout
    assert not any(line.startswith("FAIL clean_copy") for line in lines)


def _load_functions(*names_and_bounds):
    namespace: dict = {}
    source = CHECK.read_text()
    code = "import re\nfrom typing import Optional\n"
    for start, end in names_and_bounds:
        code += source[source.index(start):source.index(end)]
    exec(code, namespace)
    return namespace


def test_sass_is_counted_and_step_costs_are_per_element():
    ns = _load_functions(("_STEP_KERNELS =", "# CUDA's grid limits"), ("def instructions_per_element", "def _step_costs"))
    sys.path.insert(0, str(REPO / "bench"))
    import workloads

    ns["count_sass"] = workloads.count_sass
    listing = textwrap.dedent("""\
        	code for sm_90a
        		Function : _ddpm_step_kernel
                /*0000*/                   LDC R1, c[0x0][0x28] ;          /* 0x00000a00ff017b82 */
                                                                            /* 0x000fe20000000800 */
                /*0010*/                   S2R R0, SR_CTAID.X ;            /* 0x0000000000007919 */
                /*0020*/                   EXIT ;                          /* 0x000000000000794d */
        """)
    assert ns["count_sass"](listing) == 3
    row = {"kernel": "_ddpm_step_kernel", "instructions": 400,
           "config": "BLOCK=2048 CLIP=False DRAW_NOISE=True num_stages=3 num_warps=4"}
    assert ns["instructions_per_element"](row) == 400 / (2048 / 128)
    assert ns["instructions_per_element"]({**row, "kernel": "_fwd_onchip_kernel"}) is None


def test_a_cases_file_without_cases_is_one_line_and_exit_2(tmp_path):
    foreign = tmp_path / "notes.py"
    foreign.write_text("x = 1\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(CHECK), "--cases", str(foreign), "--no-write"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert "--cases:" in proc.stderr and "defining CASES" in proc.stderr and "Traceback" not in proc.stderr


def test_an_unknown_kernel_family_exits_2_naming_the_families_and_ops():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(CHECK), "--ops", "q_sample,samplers", "--no-write"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    # q_sample (an op of the ddpm_step module) is taken; the unknown name is the one reported
    assert "unknown kernel family 'samplers'" in proc.stderr
    assert all(name in proc.stderr for name in ("ddpm_step", "q_sample", "ddim_step", "group_norm_silu"))


LAYOUT_PROBE = '''
import sys
sys.path.insert(0, {bench!r})
import gpu_ready
from dxr.kernels.triton import adain, group_norm_silu as gn


class Seen(Exception):
    pass


def probe(x, *args, **kwargs):
    raise Seen(x)


gn.group_norm_silu_fwd = adain.adain_fwd = probe
checked = wrong = 0
for op, label, thunk, quick in [*gpu_ready._group_norm_cases(), *gpu_ready._adain_cases()]:
    if " cl " not in label:
        continue
    try:
        thunk()
    except Seen as seen:
        x = seen.args[0]
        checked += 1
        wrong += not x.movedim(1, -1).is_contiguous()
print(checked, wrong)
'''


def test_channels_last_cases_hand_the_kernels_channels_innermost_tensors():
    # a 4-D transpose(1, -1) round trip is channels-last of the transposed image, which the kernels
    # copy to contiguous: such cases would never compile the channels-last addressing they name
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = LAYOUT_PROBE.format(bench=str(REPO / "bench"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    checked, wrong = map(int, proc.stdout.split())
    assert checked >= 10 and wrong == 0, proc.stdout

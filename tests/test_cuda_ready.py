"""bench/cuda_ready.py reads ptxas' report right: a spill or too much shared memory fails, a clean log passes."""

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import cuda_ready  # noqa: E402

_GN = "_ZN3dxr12_GLOBAL__N_115norm_fwd_onchipIfLi4ELb0EEEvNS0_8NormArgsE"
_ATT = "_ZN3dxr12_GLOBAL__N_120attention_fwd_kernelI6__halfLi128EEEvNS0_19AttentionKernelArgsE"


def _report(name, arch, regs, stores=0, loads=0, stack=0, smem=None):
    used = f"ptxas info    : Used {regs} registers, used 1 barriers"
    if smem is not None:
        used += f", {smem} bytes smem"
    return "\n".join([
        f"ptxas info    : Compiling entry function '{name}' for '{arch}'",
        f"ptxas info    : Function properties for {name}",
        f"    {stack} bytes stack frame, {stores} bytes spill stores, {loads} bytes spill loads",
        used + ", 400 bytes cmem[0]",
        "ptxas info    : Compile time = 100.0 ms",
    ])


CLEAN = "\n".join([
    "ptxas info    : 0 bytes gmem",
    _report(_GN, "sm_80", 42),
    _report(_GN, "sm_90a", 56, smem=32),
    _report(_ATT, "sm_90a", 184),
])


def test_a_clean_log_passes():
    kernels = cuda_ready.parse_ptxas(CLEAN)
    assert [(k.arch, k.registers, k.smem) for k in kernels] == [("sm_80", 42, 0), ("sm_90a", 56, 32), ("sm_90a", 184, 0)]
    assert cuda_ready.problems(kernels) == []
    assert "norm_fwd_onchip" in cuda_ready.table(kernels)


def test_a_spill_fails():
    kernels = cuda_ready.parse_ptxas(CLEAN + "\n" + _report(_ATT, "sm_80", 255, stores=16, loads=24, stack=16))
    found = cuda_ready.problems(kernels)
    assert len(found) == 1 and "sm_80" in found[0] and "spills 16 B stored, 24 B loaded" in found[0]
    assert "attention_fwd_kernel" in found[0]
    # loads alone count too
    assert cuda_ready.problems(cuda_ready.parse_ptxas(_report(_GN, "sm_90a", 40, loads=4)))


def test_shared_memory_over_the_architecture_limit_fails():
    over_80 = cuda_ready.parse_ptxas(_report(_GN, "sm_80", 40, smem=166_913))
    assert cuda_ready.problems(over_80)
    at_90 = cuda_ready.parse_ptxas(_report(_GN, "sm_90a", 40, smem=232_448))
    assert cuda_ready.problems(at_90) == []
    # dynamic shared memory counts with the static
    kernels = cuda_ready.parse_ptxas(_report(_ATT, "sm_80", 184, smem=1024))

    class Module:
        @staticmethod
        def attention_smem(head):
            return 166_000 if head == 128 else 0

    cuda_ready.attach_dynamic_smem(kernels, Module)
    assert kernels[0].shared == 167_024 and cuda_ready.problems(kernels)


def test_the_exit_status_follows_the_log(tmp_path, capsys):
    clean, spilled = tmp_path / "clean.log", tmp_path / "spilled.log"
    clean.write_text(CLEAN)
    spilled.write_text(CLEAN + "\n" + _report(_GN, "sm_80", 32, stores=8, loads=8, stack=8))
    assert cuda_ready.main(["--log", str(clean)]) == 0
    assert cuda_ready.main(["--log", str(spilled)]) == 1
    assert "FAIL sm_80" in capsys.readouterr().out
    empty = tmp_path / "empty.log"
    empty.write_text("nothing here\n")
    assert cuda_ready.main(["--log", str(empty)]) == 2

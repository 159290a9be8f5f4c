"""pytest-benchmark suites of the fused ops: ``pytest bench --benchmark-only``.

Each case times one backend (see workloads.py): the eager reference, torch.compile of it, the Triton and
CUDA kernels through ``dxr.ops``, and PyTorch SDPA for attention. Cases of one op, shape and mode share a
benchmark group, so the table compares the backends side by side; ``extra_info`` carries GB/s (minimal
traffic) or TFLOP/s, and the peak memory of attention.

On a GPU: bfloat16 at UNet shapes; every round starts after an L2 flush (untimed) and ends with a
synchronize, after a warm-up that compiles and autotunes. On a CPU: float32 at modest shapes, the eager
reference against torch.compile (and SDPA); the kernels skip with the reason (Triton would run in its
interpreter, which is not benchmarked; the CUDA extension needs a GPU).
"""

import math

import pytest
import torch

import workloads as wl

DTYPE = torch.bfloat16 if wl.DEVICE.type == "cuda" else torch.float32
BUDGET_S = 1.0 if wl.DEVICE.type == "cuda" else 0.4  # timed seconds per case, at most 200 rounds


_CPU_SKIP = {
    "triton": "needs a CUDA GPU: on a CPU Triton runs only in its interpreter, which is not benchmarked",
    "cuda": "needs a CUDA GPU: the CUDA extension runs on GPU tensors only",
}


def _finite(result) -> bool:
    tensors = result if isinstance(result, (tuple, list)) else (result,)
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@pytest.fixture
def run_case(benchmark):
    """``run_case(case, backend, mode)``: time one backend on one case, or skip saying why it cannot run."""

    def run(case: wl.Case, backend: str, mode: str) -> None:
        if backend in wl.KERNEL_BACKENDS and wl.DEVICE.type != "cuda":
            pytest.skip(_CPU_SKIP[backend])
        inputs = wl.make_inputs(case, DTYPE, wl.DEVICE)
        try:
            fn = wl.runner(case, backend, mode, inputs)
        except wl.Unavailable as err:
            pytest.skip(f"{backend} cannot run here: {err}")
        # a benchmark of NaNs would time the wrong thing
        assert _finite(fn()), f"{backend} gave non-finite values on {case} ({mode})"

        def timed():
            fn()
            wl.synchronize(wl.DEVICE)

        l2_flush = wl.L2Flush(wl.DEVICE)

        def flush():
            l2_flush()
            wl.synchronize(wl.DEVICE)  # or the flush would still run inside the timed call

        rounds = wl.repetitions(wl.estimate_seconds(timed, wl.DEVICE), BUDGET_S, 3, 200)
        benchmark.group = f"{case.op} {case} {mode}"
        benchmark.extra_info.update(op=case.op, case=str(case), mode=mode, backend=backend,
                                    dtype=str(DTYPE).removeprefix("torch."), device=str(wl.DEVICE))
        if case.op == "attention" and wl.DEVICE.type == "cuda":
            benchmark.extra_info["peak_mib"] = wl.peak_memory_mib(fn, wl.DEVICE)
        benchmark.pedantic(timed, setup=flush, rounds=rounds, warmup_rounds=1, iterations=1)
        if benchmark.stats is None:  # benchmarks disabled: the case ran once, untimed
            return
        seconds = benchmark.stats.stats.median
        nbytes, nflops = wl.traffic_bytes(case, DTYPE, mode), wl.flops(case, mode)
        if nbytes:
            benchmark.extra_info["GB/s"] = round(nbytes / seconds / 1e9, 2)
        if nflops:
            benchmark.extra_info["TFLOP/s"] = round(nflops / seconds / 1e12, 3)
        assert math.isfinite(seconds) and seconds > 0

    return run


def pytest_benchmark_update_machine_info(config, machine_info):
    """The GPU's name beside the CPU's in a saved run (``--benchmark-json``), so that it says which device it timed."""
    if torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name()

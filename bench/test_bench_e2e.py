"""End to end: UNet and MUNIT training steps, DDPM and DDIM sampling, one radiograph restored.

``pytest bench/test_bench_e2e.py --benchmark-only``. The cases are ``e2e.SUITE``: on a GPU the cpu-demo
and paper presets, DDPM 1000 / DDIM 50 steps at batch 1 and 16, a 2048² radiograph (DDIM 25, tiles of
16); on a CPU the cpu-demo preset at small batches, step counts and image sizes, the rest skipped with
the reason. Each case runs on every backend (eager, torch.compile of the eager network, Triton, CUDA)
in NCHW and channels_last, and the samplers and the restorer also with ``cuda_graph=True`` (GPU only,
where they take the keyword). Cases of one workload and size share a benchmark group.

``extra_info``: what ran (workload, case, preset, backend, layout, cuda_graph, batch, image_size, steps,
precision, parameters_m, device; tiles, tile and overlap for "enhance"), ``images_per_s`` (images trained
on or produced per second at the median; radiographs per second for "enhance", and ``tiles_per_s``),
``steps_per_s`` for the samplers (network calls per second), ``peak_mib`` (GPU:
``torch.cuda.max_memory_allocated`` over the timed rounds, weights and optimizer state included; None on
a CPU, where torch's allocator keeps no peak and tracemalloc would see only Python objects) and
``peak_memory`` saying which of the two it is.
"""

import math

import pytest

import e2e
import workloads as wl

GPU = wl.DEVICE.type == "cuda"
BUDGET_S = 5.0 if GPU else 1.0  # timed seconds per case
ROUNDS = (3, 50) if GPU else (2, 10)
PEAK_MEMORY = ("torch.cuda.max_memory_allocated over the timed rounds" if GPU
               else "not measured on a CPU (torch's CPU allocator keeps no peak)")


def _entries(*workloads):
    return [pytest.param(entry, id=entry.id) for entry in e2e.cases(wl.DEVICE.type) if entry.workload in workloads]


def _run(benchmark, entry: e2e.Entry, backend: str, layout: str, cuda_graph: bool = False) -> None:
    if entry.case is None:
        pytest.skip(entry.skip)
    try:
        run = e2e.build(entry.case, backend, layout, wl.DEVICE, cuda_graph=cuda_graph)
    except wl.Unavailable as err:
        pytest.skip(str(err))

    def timed():
        out = run.fn()
        wl.synchronize(wl.DEVICE)
        return out

    # the first call compiles, autotunes and allocates; a benchmark of NaNs would time the wrong thing
    assert e2e.finite(timed()), f"{e2e.variant_label(run.info)} gave non-finite values on {entry.case}"
    rounds = wl.repetitions(wl.estimate_seconds(timed, wl.DEVICE), BUDGET_S, *ROUNDS)
    benchmark.group = f"e2e {entry.case}"
    benchmark.extra_info.update(run.info, peak_memory=PEAK_MEMORY)
    e2e.reset_peak(wl.DEVICE)
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=0, iterations=1)
    benchmark.extra_info["peak_mib"] = e2e.peak_mib(wl.DEVICE)
    if benchmark.stats is None:  # benchmarks disabled: the case ran, untimed
        return
    seconds = benchmark.stats.stats.median
    assert math.isfinite(seconds) and seconds > 0
    benchmark.extra_info["images_per_s"] = round(run.images / seconds, 3)
    if entry.case.workload in e2e.SAMPLERS:
        benchmark.extra_info["steps_per_s"] = round(entry.case.steps / seconds, 2)
    if entry.case.workload == "enhance":
        benchmark.extra_info["tiles_per_s"] = round(run.info["tiles"] / seconds, 2)


@pytest.mark.parametrize("layout", e2e.LAYOUTS)
@pytest.mark.parametrize("backend", e2e.BACKENDS)
@pytest.mark.parametrize("entry", _entries("unet_train", "munit_train"))
def test_train_step(benchmark, entry, backend, layout):
    _run(benchmark, entry, backend, layout)


@pytest.mark.parametrize("cuda_graph", [False, True], ids=["no_graph", "cuda_graph"])
@pytest.mark.parametrize("layout", e2e.LAYOUTS)
@pytest.mark.parametrize("backend", e2e.BACKENDS)
@pytest.mark.parametrize("entry", _entries("ddpm_sample", "ddim_sample"))
def test_sample(benchmark, entry, backend, layout, cuda_graph):
    _run(benchmark, entry, backend, layout, cuda_graph)


@pytest.mark.parametrize("cuda_graph", [False, True], ids=["no_graph", "cuda_graph"])
@pytest.mark.parametrize("layout", e2e.LAYOUTS)
@pytest.mark.parametrize("backend", e2e.BACKENDS)
@pytest.mark.parametrize("entry", _entries("enhance"))
def test_enhance(benchmark, entry, backend, layout, cuda_graph):
    _run(benchmark, entry, backend, layout, cuda_graph)

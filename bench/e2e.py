"""What the end-to-end benchmarks run: whole training steps, samplers and a radiograph restored.

Shared by the pytest-benchmark suite (``bench/test_bench_e2e.py``) and ``bench/gpu_check.py``.

A :class:`Case` is one workload at one size:

- "unet_train": one ``dxr.train.train_step`` of the DDPM-LQ UNet (forward under the preset's autocast,
  backward, grad-norm clip, Adam step; no data loading, no EMA);
- "munit_train": one ``train_step`` of MUNIT-LQ (stage "lq-munit": the discriminators' update, then the
  generators');
- "ddpm_sample", "ddim_sample": one call of ``dxr.diffusion.ddpm_sample`` / ``ddim_sample`` with the
  DDPM-LQ UNet, from x_T to x_0;
- "enhance": one radiograph restored by ``dxr.enhance.Restorer`` (DDPM-HQ, DDIM, tiles of the model's
  size batched).

Every case runs on a backend — "eager" (the fused ops' torch reference, ``backend="torch"``),
"compile" (``torch.compile`` of that eager network, as ``dxr.train --compile`` does), "triton",
"cuda" — in a layout, "nchw" or "channels_last" (network and inputs), and the samplers and the restorer
also with ``cuda_graph=True`` where they take that keyword (GPU only). The networks are freshly initialised
(seed 0): the cost of a step does not depend on the weights.

:data:`SUITE` pairs each GPU case with the smaller case a CPU runs instead, or with the reason it is
GPU-only; :func:`cases` gives the list for a device.
"""

from __future__ import annotations

import inspect
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import workloads as wl

WORKLOADS = ("unet_train", "munit_train", "ddpm_sample", "ddim_sample", "enhance")
BACKENDS = ("eager", "compile", "triton", "cuda")
LAYOUTS = ("nchw", "channels_last")
SAMPLERS = ("ddpm_sample", "ddim_sample")
GRAPHED = (*SAMPLERS, "enhance")  # the workloads with a cuda_graph option
# whole-network torch.compile on 2 CPU cores: the cpu-demo training step took 213 s to compile (measured)
CPU_COMPILE_ENV = "DXR_BENCH_CPU_COMPILE"


@dataclass(frozen=True)
class Case:
    """One workload at one size.

    preset: the training preset whose network (and precision) it uses, "cpu-demo" or "paper".
    batch: images per training step or per sampler call; tiles per network call for "enhance".
    steps: sampler steps (DDPM: t runs from steps - 1 down to 0; DDIM and "enhance": DDIM steps).
    image: "enhance": the side of the square radiograph restored; else 0 (the preset's image size).
    """

    workload: str
    preset: str
    batch: int
    steps: int = 0
    image: int = 0

    def __str__(self) -> str:
        label = f"{self.workload} {self.preset} b{self.batch}"
        if self.workload == "enhance":
            return f"{self.workload} {self.preset} {self.image}² DDIM {self.steps} tiles×{self.batch}"
        return label + (f" {self.steps} steps" if self.steps else "")

    @property
    def id(self) -> str:
        return str(self).replace(" ", "_").replace("²", "px").replace("×", "x")


# (the case on a GPU, the case a CPU runs instead or why it is GPU-only)
SUITE = (
    (Case("unet_train", "cpu-demo", 16), Case("unet_train", "cpu-demo", 4)),
    (Case("unet_train", "paper", 16), "GPU only: the paper preset (256², bf16 autocast)"),
    (Case("munit_train", "cpu-demo", 8), Case("munit_train", "cpu-demo", 2)),
    (Case("munit_train", "paper", 16), "GPU only: the paper preset (256² MUNIT)"),
    (Case("ddpm_sample", "cpu-demo", 1, steps=1000), Case("ddpm_sample", "cpu-demo", 1, steps=20)),
    (Case("ddpm_sample", "cpu-demo", 16, steps=1000), "GPU only: batch 16 at full size"),
    (Case("ddim_sample", "cpu-demo", 1, steps=50), Case("ddim_sample", "cpu-demo", 1, steps=10)),
    (Case("ddim_sample", "cpu-demo", 16, steps=50), "GPU only: batch 16 at full size"),
    (Case("ddim_sample", "paper", 1, steps=50), "GPU only: the paper preset (256², bf16 autocast)"),
    (Case("ddim_sample", "paper", 16, steps=50), "GPU only: the paper preset at batch 16"),
    (Case("enhance", "paper", 16, steps=25, image=2048), "GPU only: a 2048² radiograph"),
    (Case("enhance", "cpu-demo", 16, steps=25, image=512), Case("enhance", "cpu-demo", 16, steps=4, image=128)),
)

# the subset of gpu_check --quick: the small preset's training steps, both samplers at batch 1, the paper UNet's
# DDIM at batch 16 and a 512² radiograph (the 2048² one with the paper model takes seconds a call, on 14 variants)
QUICK = ("unet_train cpu-demo b16", "munit_train cpu-demo b8", "ddpm_sample cpu-demo b1 1000 steps",
         "ddim_sample cpu-demo b1 50 steps", "ddim_sample paper b16 50 steps",
         "enhance cpu-demo 512² DDIM 25 tiles×16")


@dataclass(frozen=True)
class Entry:
    """One row of :data:`SUITE` for a device: ``case`` to run, or None and ``skip`` saying why."""

    id: str  # the id of the case that runs here (of the GPU case where none does)
    workload: str
    case: Optional[Case]
    skip: str = ""


def cases(device_type: str, quick: bool = False) -> list:
    """The :class:`Entry` of every row of :data:`SUITE` on a device type ("cuda" or "cpu")."""
    entries = []
    for gpu_case, on_cpu in SUITE:
        if quick and str(gpu_case) not in QUICK:
            continue
        if device_type == "cuda":
            entries.append(Entry(gpu_case.id, gpu_case.workload, gpu_case))
        elif isinstance(on_cpu, Case):
            entries.append(Entry(on_cpu.id, gpu_case.workload, on_cpu))
        else:
            entries.append(Entry(gpu_case.id, gpu_case.workload, None, on_cpu))
    return entries


def supports_cuda_graph(workload: str) -> bool:
    """Whether this tree's sampler (or restorer) of ``workload`` takes ``cuda_graph=``."""
    from dxr.diffusion import ddim_sample, ddpm_sample
    from dxr.enhance import Restorer

    takes = {"ddpm_sample": ddpm_sample, "ddim_sample": ddim_sample, "enhance": Restorer}[workload]
    return "cuda_graph" in inspect.signature(takes).parameters


def why_not(case: Case, backend: str, layout: str, device: torch.device, cuda_graph: bool = False) -> Optional[str]:
    """Why this variant cannot run here (None when it can)."""
    if backend not in BACKENDS or layout not in LAYOUTS:
        raise ValueError(f"backend must be one of {BACKENDS} and layout one of {LAYOUTS}, got {backend!r}, {layout!r}")
    if backend in wl.KERNEL_BACKENDS and device.type != "cuda":
        return f"needs a CUDA GPU: the {backend} kernels are benchmarked on GPU tensors only"
    if backend == "compile" and device.type != "cuda" and os.environ.get(CPU_COMPILE_ENV) != "1":
        return (f"torch.compile of a whole network takes minutes on a CPU (213 s for the cpu-demo training step on "
                f"2 cores); {CPU_COMPILE_ENV}=1 runs it")
    if cuda_graph:
        if case.workload not in GRAPHED:
            return "cuda_graph is an option of the samplers and the restorer"
        if device.type != "cuda":
            return "CUDA graphs need a GPU"
        if backend == "compile":
            return "torch.compile brings its own graphs (mode='reduce-overhead'); cuda_graph runs the eager network"
        if not supports_cuda_graph(case.workload):
            where = "dxr.enhance.Restorer" if case.workload == "enhance" else f"dxr.diffusion.{case.workload}"
            return f"{where} takes no cuda_graph keyword in this tree"
    if backend in wl.KERNEL_BACKENDS:
        from dxr.training.config import ConfigError, check_backend

        try:
            check_backend(backend, str(device))
        except ConfigError as err:
            return str(err)
    return None


@dataclass
class Run:
    """A built variant: ``fn()`` runs one unit of work (a training step, a sampler call, a radiograph)."""

    fn: Callable[[], object]
    images: int  # images one call produces or trains on (radiographs for "enhance")
    info: dict  # what describes the run in benchmark.extra_info and in gpu_check's record


_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(precision: str, device: torch.device):
    return torch.autocast(device.type, dtype=_AMP.get(precision), enabled=precision in _AMP)


def _config(case: Case, stage: str, device: torch.device):
    from dxr.training.config import preset

    return preset(case.preset, stage, device=device.type, batch_size=case.batch)


def _layout(module_or_tensor, layout: str):
    return module_or_tensor.to(memory_format=torch.channels_last) if layout == "channels_last" else module_or_tensor


def _compiled(module: torch.nn.Module) -> torch.nn.Module:
    # each batch size and layout is a recompile of the same network: keep them all compiled, not eager
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit, max(getattr(config, limit), 64))
    return torch.compile(module)


def build(case: Case, backend: str, layout: str, device, cuda_graph: bool = False) -> Run:
    """The variant ``backend`` / ``layout`` (/ ``cuda_graph``) of ``case`` on ``device``, not yet called.

    Raises :class:`workloads.Unavailable` when it cannot run here (see :func:`why_not`).
    """
    from dxr.training import stages

    device = torch.device(device)
    reason = why_not(case, backend, layout, device, cuda_graph)
    if reason:
        raise wl.Unavailable(reason)
    kernels = "torch" if backend in ("eager", "compile") else backend
    stage = {"munit_train": "lq-munit", "enhance": "hq-ddpm"}.get(case.workload, "lq-ddpm")
    config = _config(case, stage, device)
    torch.manual_seed(0)
    net = _layout(stages.build_net(config, backend=kernels).to(device), layout)
    size = config.image_size
    info = {"workload": case.workload, "case": str(case), "preset": case.preset, "backend": backend, "layout": layout,
            "cuda_graph": cuda_graph, "batch": case.batch, "image_size": case.image or size, "steps": case.steps,
            "precision": config.precision if case.workload != "enhance" else "fp32",
            "parameters_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 2), "device": str(device)}
    gen = torch.Generator(device=device).manual_seed(1)

    def images(n: int, side: int):  # training images in [-1, 1]
        return _layout(torch.rand((n, 1, side, side), generator=gen, device=device) * 2 - 1, layout)

    if case.workload in ("unet_train", "munit_train"):
        from dxr.train import train_step

        updates = stages.make_updates(config, net)
        model = _compiled(net) if backend == "compile" else net
        inputs = (images(case.batch, size), None) if stage == "lq-ddpm" else (images(case.batch, size),
                                                                              images(case.batch, size))
        scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
        net.train()
        return Run(lambda: train_step(model, updates, inputs, config, scaler, device), case.batch, info)

    net.eval().requires_grad_(False)
    if case.workload == "enhance":
        from dxr.enhance import Restorer, tile_starts

        if backend == "compile":
            net.denoiser = _compiled(net.denoiser)
        restorer = Restorer(net, config, steps=case.steps, batch_size=case.batch,
                            **({"cuda_graph": True} if cuda_graph else {}))
        # the command's input: a radiograph in [0, 1] on the host
        radiograph = torch.rand((1, 1, case.image, case.image), generator=gen, device=device).cpu()
        tiles = len(tile_starts(case.image, restorer.tile, restorer.overlap)) ** 2
        info.update(tiles=tiles, tile=restorer.tile, overlap=restorer.overlap)
        return Run(lambda: restorer(radiograph), 1, info)

    from dxr.diffusion import ddim_sample, ddpm_sample

    denoiser = _compiled(net.denoiser) if backend == "compile" else net.denoiser
    alphas = net.alphas_cumprod(device)
    x_T = _layout(torch.randn((case.batch, 1, size, size), generator=gen, device=device), layout)  # x_T ~ N(0, I)
    extra = {"cuda_graph": True} if cuda_graph else {}
    common = dict(prediction=net.prediction, backend=kernels, **extra)

    def sample():
        with torch.no_grad(), _autocast(config.precision, device):
            if case.workload == "ddpm_sample":
                return ddpm_sample(denoiser, x_T, alphas, t_start=case.steps - 1, **common)
            return ddim_sample(denoiser, x_T, alphas, steps=case.steps, **common)

    return Run(sample, case.batch, info)


# --------------------------------------------------------------------------------------------------
# timing and the figures derived from it


def finite(result) -> bool:
    """Whether every tensor in ``result`` (a tensor, a list of them, or a dict of losses) is finite."""
    if isinstance(result, dict):
        result = list(result.values())
    tensors = result if isinstance(result, (tuple, list)) else (result,)
    return all(bool(torch.isfinite(t).all()) for t in tensors if isinstance(t, torch.Tensor))


def peak_mib(device) -> Optional[float]:
    """``torch.cuda.max_memory_allocated`` since the last reset, in MiB (None on a CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def reset_peak(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def measure(run: Run, device, *, reps: int) -> dict:
    """Median ms of ``reps`` synchronised calls of ``run.fn`` (after the caller's warm-up), images/s, and
    the peak memory over those calls (GPU: ``max_memory_allocated``, weights and optimizer state
    included; None on a CPU)."""
    device = torch.device(device)
    reset_peak(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run.fn()
        wl.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    ms = statistics.median(times)
    return {"ms": ms, "images_per_s": run.images / ms * 1e3, "peak_mib": peak_mib(device)}


Row = dict  # case, backend, layout, cuda_graph, ms (and peak_mib)


def _key(row: Row, **change) -> tuple:
    merged = {**row, **change}
    return merged["case"], merged["backend"], merged["layout"], bool(merged.get("cuda_graph"))


def derive(rows: list) -> None:
    """Add to every timed row its speed-ups and memory ratio, against rows of the same case:

    - ``x_eager``: eager's ms over this row's, same layout (no CUDA graph);
    - ``x_compile``: the same against torch.compile, same layout;
    - ``x_nchw``: for channels_last rows, the same backend in NCHW over this row (the layout's own gain);
    - ``mem_vs_eager``: this row's peak memory over eager's, same layout (GPU only).
    """
    timed = {_key(r): r for r in rows if r.get("ms")}
    for row in rows:
        if not row.get("ms"):
            continue
        eager = timed.get(_key(row, backend="eager", cuda_graph=False))
        compiled = timed.get(_key(row, backend="compile", cuda_graph=False))
        nchw = timed.get(_key(row, layout="nchw")) if row["layout"] == "channels_last" else None
        row["x_eager"] = eager["ms"] / row["ms"] if eager else None
        row["x_compile"] = compiled["ms"] / row["ms"] if compiled else None
        row["x_nchw"] = nchw["ms"] / row["ms"] if nchw else None
        peak, base = row.get("peak_mib"), eager.get("peak_mib") if eager else None
        row["mem_vs_eager"] = peak / base if peak and base else None


def variant_label(row: Row) -> str:
    """"triton channels_last", "eager nchw cuda_graph", ...: the variant of a row, for tables and charts."""
    return f"{row['backend']} {row['layout']}" + (" cuda_graph" if row.get("cuda_graph") else "")


def variants(workload: str) -> list:
    """(backend, layout, cuda_graph) of every variant timed for ``workload``, eager NCHW first."""
    graphs = (False, True) if workload in GRAPHED else (False,)
    return [(b, layout, g) for g in graphs for layout in LAYOUTS for b in BACKENDS]


__all__ = ["WORKLOADS", "BACKENDS", "LAYOUTS", "SUITE", "Case", "Entry", "Run", "cases", "why_not", "build",
           "measure", "derive", "finite", "variant_label", "variants", "supports_cuda_graph"]

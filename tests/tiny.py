"""Tiny datasets and runs for the pipeline's tests: 16² images, networks of a few thousand weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SIZE = 16
# every training stage at 16² with a tiny UNet / MUNIT, 50 diffusion steps
SETTINGS = [
    "image_size=16", "batch_size=4", "unet.base_channels=8", "unet.channel_mult=1,2", "unet.num_res_blocks=1",
    "unet.attention_resolutions=8", "unet.num_head_channels=8", "unet.num_groups=4", "timesteps=50",
    "sample_steps=3", "sdedit_t0=20", "munit.dim=4", "munit.mlp_dim=8", "munit.n_downsample=1", "munit.n_res=1",
    "munit.dis_dim=4", "munit.dis_layers=2", "munit.dis_scales=2",
]


def radiograph(rng: np.random.Generator, size: int = SIZE) -> tuple[np.ndarray, tuple[float, float]]:
    """A smooth stand-in radiograph in [0, 1] (a gradient, one bright blob, mild noise) and the blob's (col, row)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    cx, cy = rng.uniform(0.3, 0.7, 2)
    image = 0.3 + 0.4 * yy + 0.3 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.01)
    image = image + 0.03 * rng.standard_normal((size, size))
    return np.clip(image, 0, 1), (cx * size, cy * size)


def make_dataset(root: Path, *, size: int = SIZE, train: int = 8, test: int = 3, seed: int = 0) -> Path:
    """root/{lq,hq}/{train,test}/img_NNN.png (16-bit); LQ images carry a nodule sidecar on their blob."""
    from dxr.data.io import write_png16

    rng = np.random.default_rng(seed)
    for domain in ("lq", "hq"):
        for split, count in (("train", train), ("test", test)):
            for i in range(count):
                image, (col, row) = radiograph(rng, size)
                path = root / domain / split / f"img_{i:03d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                write_png16(path, image)
                if domain == "lq":
                    r = 0.1 * size
                    nodule = {"id": 0, "center_px": [col, row], "box_px": [col - r, row - r, col + r, row + r],
                              "in_view": True, "radius_mm": r}
                    path.with_suffix(".json").write_text(json.dumps({"image": path.name, "pixel_mm": 1.0,
                                                                     "nodules": [nodule]}))
    return root


def pipeline_argv(data: Path, out: Path, *extra: str) -> list[str]:
    """``python -m dxr.pipeline`` flags of a tiny run on ``data`` into ``out``."""
    argv = ["--data", str(data), "--out", str(out), "--steps", "2", "--sample-steps", "2", "--max-images", "3",
            "--no-progress", "--device", "cpu"]
    for setting in SETTINGS:
        argv += ["--set", setting]
    return argv + list(extra)


def trained_runs(root: Path, stop_after: str) -> tuple[Path, Path]:
    """(dataset, run folder): a tiny dataset under ``root`` and the pipeline's stages up to
    ``stop_after`` trained on it for two steps each."""
    from dxr.pipeline import Plan, run_pipeline

    data = make_dataset(root / "data")
    plan = Plan(out=root / "run", preset="cpu-demo", data=data, device="cpu", steps=2, sample_steps=2,
                max_images=None, progress=False, seed=0, overrides=SETTINGS)
    run_pipeline(plan, stop_after=stop_after, log=lambda line: None)
    return data, root / "run"

"""Restore radiographs with DDPM-HQ: ``python -m dxr.enhance --checkpoint CKPT INPUT... --out DIR``.

Each input (PNG, TIFF, JPEG or DICOM; a folder means every image in it) is restored by the
conditional DDPM of an ``hq-ddpm`` (or ``bicubic-ddpm``) run: DDIM with ``--steps`` steps (default 25;
``--steps 0`` runs every DDPM step), optionally ×2 (``--scale 2``: the input is bicubic up-sampled
first and the model restores at the output size, SR3-style). Any size is restored through tiles of
the model's training size (``--tile``) that overlap by ``--overlap`` pixels and are blended with a
raised-cosine window; every tile starts from its crop of one noise image, so overlapping tiles agree.
Tiles of all inputs are batched (``--batch-size``).

Output: ``out/<name>.png`` (16-bit) for image inputs; ``out/<name>.dcm`` for DICOM inputs, keeping
the source's patient and study attributes, with a new SOP Instance UID, marked DERIVED, its pixel
spacing divided by the scale. Same seed → same images.

``--cuda-graph`` captures one sampler step (network and fused step) in a CUDA graph per batch and
replays it for every step, the same images with less launch overhead; on a CPU it runs the plain loop.
``--profile nvtx`` marks every sampler step (``sample.step``) as an NVTX range for ``nsys``;
``--profile torch`` writes a ``torch.profiler`` trace to ``out/trace.json``.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from dxr import profiling
from dxr.cli import CommandError, run
from dxr.inference import (PathLike, batches, default_device, load_stage_model, read_grayscale, resize,
                           size_multiple, to_signed, to_unit)

RESTORING_STAGES = ("hq-ddpm", "bicubic-ddpm")


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels covering ``length`` with at least ``overlap`` in common;
    the last tile ends at the edge. ``length <= tile`` gives [0]."""
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    stride = (length - tile) / (count - 1)
    return [round(i * stride) for i in range(count)]


def blend_window(height: int, width: int, overlap: int, *, device=None) -> Tensor:
    """(height, width) weights: 1 inside, a raised-cosine ramp over ``overlap`` pixels at every edge
    (strictly positive, so a lone tile's edge keeps its value after normalisation)."""
    def ramp(n: int) -> Tensor:
        r = torch.ones(n, dtype=torch.float64, device=device)
        k = min(overlap, n // 2)
        if k > 0:
            rise = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(k, dtype=torch.float64, device=device) + 0.5) / k)
            r[:k], r[n - k:] = rise, rise.flip(0)
        return r

    return (ramp(height)[:, None] * ramp(width)[None, :]).float()


@dataclass
class _Canvas:
    """One image being restored: its condition and noise padded to the tiled size, and the blend sums."""

    height: int  # output size before padding
    width: int
    cond: Tensor  # (1, 1, H', W') in [-1, 1]
    noise: Tensor  # (1, 1, H', W'): x_T, cropped per tile
    tile: tuple[int, int]
    starts: list[tuple[int, int]]
    total: Tensor
    weight: Tensor


class Restorer:
    """DDPM-HQ as a function: (N, 1, H, W) float32 in [0, 1] → (N, 1, H·scale, W·scale) in [0, 1].

    ``net`` a :class:`dxr.diffusion.GaussianDiffusion` with a conditional UNet (``config`` its run's
    configuration); ``steps`` DDIM steps (0: every DDPM step) with ``eta``; ``tile``/``overlap`` in output
    pixels (default: the model's image size, an eighth of it); ``batch_size`` tiles per network call,
    gathered across images. x_T of an image comes from ``seed`` and its position in the call, so with
    DDIM at eta 0 the result does not depend on the batching; step noise (DDPM, eta > 0) does.
    ``cuda_graph`` replays each sampler step from a CUDA graph on a GPU (the same images).
    """

    def __init__(self, net, config, *, steps: int = 25, eta: float = 0.0, scale: int = 1, tile: Optional[int] = None,
                 overlap: Optional[int] = None, batch_size: int = 8, seed: int = 0, progress: bool = False,
                 cuda_graph: bool = False):
        if config.stage not in RESTORING_STAGES:
            raise CommandError(f"a restorer needs a model of {RESTORING_STAGES}, got {config.stage}")
        if steps < 0:
            raise CommandError(f"--steps must be >= 0 (0: every DDPM step), got {steps}")
        if scale not in (1, 2):
            raise CommandError(f"--scale must be 1 or 2, got {scale}")
        self.multiple = size_multiple(config)
        tile = config.image_size if tile is None else tile
        overlap = tile // 8 if overlap is None else overlap
        if tile < self.multiple or tile % self.multiple:
            raise CommandError(f"--tile must be a positive multiple of {self.multiple} (the network halves it "
                               f"{len(config.unet.channel_mult) - 1} times), got {tile}")
        if not 0 <= overlap <= tile // 2:
            raise CommandError(f"--overlap must lie in [0, {tile // 2}] for --tile {tile}, got {overlap}")
        if batch_size < 1:
            raise CommandError(f"--batch-size must be >= 1, got {batch_size}")
        self.net, self.config = net, config
        self.steps, self.eta, self.scale, self.tile, self.overlap = steps, eta, scale, tile, overlap
        self.batch_size, self.seed, self.progress, self.cuda_graph = batch_size, seed, progress, cuda_graph

    @classmethod
    def from_checkpoint(cls, checkpoint: PathLike, *, device=None, backend: Optional[str] = None,
                        label: Optional[str] = None, **settings):
        """The restorer of a trained ``hq-ddpm`` or ``bicubic-ddpm`` run (EMA weights when kept); errors
        name it as ``label`` (default ``--checkpoint <path>``)."""
        net, config = load_stage_model(checkpoint, RESTORING_STAGES, device=default_device(device), backend=backend,
                                       label=label)
        return cls(net, config, **settings)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def _side(self, n: int) -> int:
        """A padded side the network takes: n itself from one tile up, else n rounded up to its multiple."""
        return n if n >= self.tile else -(-n // self.multiple) * self.multiple

    def _canvas(self, image: Tensor, index: int) -> _Canvas:
        height, width = image.shape[-2] * self.scale, image.shape[-1] * self.scale
        lq = resize(image.float(), (height, width))
        side_h, side_w = self._side(height), self._side(width)
        pad = (0, side_w - width, 0, side_h - height)
        mode = "reflect" if max(pad) < min(height, width) else "replicate"
        cond = to_signed(torch.nn.functional.pad(lq, pad, mode=mode)).to(self.device)
        generator = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + index)
        noise = torch.randn(cond.shape, generator=generator, device=self.device)
        tile = (min(self.tile, side_h), min(self.tile, side_w))
        starts = [(top, left) for top in tile_starts(side_h, tile[0], self.overlap)
                  for left in tile_starts(side_w, tile[1], self.overlap)]
        return _Canvas(height, width, cond, noise, tile, starts, torch.zeros_like(cond), torch.zeros_like(cond))

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 1:
            raise CommandError(f"images must be (N, 1, H, W) one-channel radiographs, got {tuple(images.shape)}")
        if images.shape[0] == 0:
            return images.new_zeros(0, 1, images.shape[2] * self.scale, images.shape[3] * self.scale)
        return torch.cat(self.restore([images[i:i + 1] for i in range(images.shape[0])]))

    @torch.no_grad()
    def restore(self, images: Sequence[Tensor], *, first: int = 0) -> list[Tensor]:
        """Each (1, 1, H, W) image in [0, 1] of ``images`` (sizes may differ) restored, in order; image i
        draws its noise as the ``first + i``-th image of the seed."""
        from tqdm.auto import tqdm

        from dxr.diffusion import ddim_sample, ddpm_sample

        canvases = [self._canvas(image, first + i) for i, image in enumerate(images)]
        jobs: dict[tuple[int, int], list] = {}  # tiles of one shape share a batch
        for k, canvas in enumerate(canvases):
            jobs.setdefault(canvas.tile, []).extend((k, top, left) for top, left in canvas.starts)
        windows = {shape: blend_window(*shape, self.overlap, device=self.device) for shape in jobs}
        alphas = self.net.alphas_cumprod(self.device)
        common = dict(prediction=self.net.prediction, backend=self.net.backend, cuda_graph=self.cuda_graph)
        bar = tqdm(total=sum(map(len, jobs.values())), desc="restoring", unit="tile", disable=not self.progress)
        group_index = 0
        for (tile_h, tile_w), tiles in jobs.items():
            for group in batches(tiles, self.batch_size):
                crops = [(k, (..., slice(t, t + tile_h), slice(l, l + tile_w))) for k, t, l in group]
                x_T = torch.cat([canvases[k].noise[c] for k, c in crops])
                cond = torch.cat([canvases[k].cond[c] for k, c in crops])
                seed = self.seed * 1_000_003 + 7919 * group_index
                if self.steps:
                    out = ddim_sample(self.net.denoiser, x_T, alphas, steps=self.steps, eta=self.eta, cond=cond,
                                      seed=seed, **common)
                else:
                    out = ddpm_sample(self.net.denoiser, x_T, alphas, cond=cond, seed=seed, **common)
                out = self.net.to_image(out, cond)
                window = windows[(tile_h, tile_w)]
                for (k, c), restored in zip(crops, out):
                    canvases[k].total[c] += restored.float() * window
                    canvases[k].weight[c] += window
                group_index += 1
                bar.update(len(group))
        bar.close()
        return [to_unit(c.total / c.weight)[..., :c.height, :c.width].cpu() for c in canvases]

    def settings(self) -> dict:
        return {"stage": self.config.stage, "image_size": self.config.image_size,
                "residual": bool(getattr(self.net, "residual", False)),
                "sampler": f"DDIM {self.steps} steps, eta {self.eta}" if self.steps else "DDPM",
                "scale": self.scale, "tile": self.tile, "overlap": self.overlap, "seed": self.seed}


# --------------------------------------------------------------------------------------------------
# files


def _inputs(paths: Sequence[str]) -> list[Path]:
    from dxr.data.io import image_files

    files = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            found = image_files(path)
            if not found:
                raise CommandError(f"{path}: the folder holds no PNG, JPEG, TIFF or DICOM image")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise CommandError(f"{path}: no such file or folder")
    stems = [f.stem for f in files]
    if len(set(stems)) != len(stems):
        twice = sorted({s for s in stems if stems.count(s) > 1})
        raise CommandError(f"two inputs would write the same output name: {', '.join(twice[:3])}")
    return files


def write_restored(source: Path, restored: Tensor, out: Path, *, scale: int, description: str) -> Path:
    """Write (H, W) in [0, 1] beside ``out`` atomically: DICOM for a DICOM source, else 16-bit PNG."""
    import os

    import pydicom

    from dxr.data.io import is_dicom, write_dicom, write_png16

    array = restored.numpy()
    out.mkdir(parents=True, exist_ok=True)
    if is_dicom(source):
        target = out / f"{source.stem}.dcm"
        header = pydicom.dcmread(source, stop_before_pixels=True)
        spacing = header.get("PixelSpacing") or header.get("ImagerPixelSpacing")
        spacing = tuple(float(v) / scale for v in spacing) if spacing and all(float(v) > 0 for v in spacing) else None
        photometric = str(header.get("PhotometricInterpretation", "MONOCHROME2")).strip()
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        write_dicom(tmp, array, source=header, photometric=photometric if photometric == "MONOCHROME1" else "MONOCHROME2",
                    pixel_spacing=spacing, description=description)
    else:
        target = out / f"{source.stem}.png"
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}.png")
        write_png16(tmp, array)
    os.replace(tmp, target)
    return target


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dxr.enhance", description=__doc__.split("\n\n")[0].replace("``", ""),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="radiographs (PNG/TIFF/JPEG/DICOM) or folders of them")
    p.add_argument("--checkpoint", required=True, help="an hq-ddpm (or bicubic-ddpm) run folder or checkpoint file")
    p.add_argument("--out", required=True, help="folder for the restored images")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps (0: every DDPM step)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic given the seed)")
    p.add_argument("--scale", type=int, choices=(1, 2), default=1, help="output size over input size")
    p.add_argument("--tile", type=int, default=None, help="tile side in output pixels (default: the model's image size)")
    p.add_argument("--overlap", type=int, default=None, help="tile overlap in pixels (default: tile / 8)")
    p.add_argument("--batch-size", type=int, default=8, help="tiles per network call")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--backend", choices=("auto", "torch", "triton", "cuda"), default=None, help="kernels of the fused ops")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay each sampler step from a CUDA graph (a GPU; the plain loop on a CPU)")
    profiling.add_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    files = _inputs(args.inputs)
    restorer = Restorer.from_checkpoint(args.checkpoint, device=args.device, backend=args.backend, steps=args.steps,
                                        eta=args.eta, scale=args.scale, tile=args.tile, overlap=args.overlap,
                                        batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress,
                                        cuda_graph=args.cuda_graph)
    images = [read_grayscale(f) for f in files]  # every input checked before any work
    for path, image in zip(files, images):
        if min(image.shape) < 8:
            raise CommandError(f"{path}: {image.shape[1]}×{image.shape[0]} pixels is too small to restore (at least 8×8)")
    description = f"dxr {restorer.config.stage} restoration ({restorer.settings()['sampler']}, x{args.scale})"
    out = Path(args.out)
    with profiling.session(args.profile, out):
        for first in range(0, len(files), 16):  # bounded memory; tiles batched across a chunk of inputs
            chunk = list(zip(files, images))[first:first + 16]
            restored = restorer.restore([torch.from_numpy(image)[None, None] for _, image in chunk], first=first)
            for (path, _), result in zip(chunk, restored):
                print(write_restored(path, result[0, 0], out, scale=args.scale, description=description))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command: its exit status (2 with one line on stderr for input it cannot work with)."""
    return run(_main, argv, prog="python -m dxr.enhance")


if __name__ == "__main__":
    sys.exit(main())

"""Stage 1 → paired data: ``python -m dxr.synth --generator {munit,ddpm} --checkpoint CKPT --hq DIR --out DIR``.

A stage-1 model turns real HQ radiographs into their LQ (DRR-like) counterparts, and each (LQ, HQ)
pair becomes training or test data for stage 2:

- ``munit``: MUNIT-LQ's HQ → LQ translation, with a random LQ style per image (``--style random``) or
  the style of LQ reference images (``--style reference --style-images DIR``, cycled in name order).
- ``ddpm``: DDPM-LQ by SDEdit: each HQ image is diffused to the noise level ``--strength`` s ∈ (0, 1]
  — the timestep t0 whose noise share √(1 − ᾱ_t0) first reaches s, so s means the same under every
  schedule — then denoised by the LQ model (``--steps`` DDIM steps, or ``--steps 0`` for every DDPM
  step), optionally guided by ILVR (``--ilvr N`` keeps the 1/N low-pass of the HQ image).

``--hq`` is a folder of images, or a dataset domain holding ``train/`` and ``test/`` (as the embedded
default's ``hq/``): then each split becomes its own paired folder. Output::

    out/manifest.json                          generator, checkpoint (path, SHA-256, stage, step), settings, splits
    out/<split>/lq/<name>.png, hq/<name>.png   16-bit PNG pairs of equal names and sizes
    (out/lq/, out/hq/ for a plain --hq folder)

Images are resized to the model's training size (``--image-size`` to change it) and HQ is written at
that size too, so a pair is aligned pixel for pixel. The folder appears atomically when complete; an
existing one is kept unless ``--overwrite``. The same seed and batch size give the same pairs.

``--cuda-graph`` (ddpm) captures one sampler step in a CUDA graph per batch and replays it for every
step, the same pairs; on a CPU it runs the plain loop. ``--profile nvtx`` marks every sampler step
(``sample.step``) as an NVTX range for ``nsys``; ``--profile torch`` writes a ``torch.profiler`` trace to
``out/trace.json`` once the folder is complete.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from dxr import profiling
from dxr.cli import CommandError, run
from dxr.inference import (batches, default_device, load_stage_model, read_grayscale, resize, size_multiple,
                           to_signed, to_unit)

GENERATORS = {"munit": "lq-munit", "ddpm": "lq-ddpm"}
STYLES = ("random", "reference")
SPLITS = ("train", "test")


def strength_to_t0(strength: float, alphas_cumprod: Tensor) -> int:
    """The number of diffusion steps t0 ∈ [1, T] whose noise share √(1 − ᾱ_{t0−1}) first reaches ``strength``."""
    if not 0.0 < strength <= 1.0:
        raise CommandError(f"--strength must lie in (0, 1] (a noise level), got {strength}")
    share = (1 - alphas_cumprod.double().cpu()).sqrt()
    reached = torch.nonzero(share >= strength)
    return int(reached[0]) + 1 if len(reached) else int(alphas_cumprod.numel())


class Degrader:
    """A stage-1 model as a function HQ (N, 1, H, W) in [0, 1] → LQ of the same shape.

    ``generator`` "munit" or "ddpm"; ``style_images`` (M, 1, H, W) in [0, 1]: MUNIT reference styles, used
    in turn; the rest as the module docstring says. Each batch's noise comes from ``seed`` and the batch's
    position, so the same seed and batch size give the same images. ``cuda_graph`` (ddpm) replays each
    sampler step from a CUDA graph on a GPU, the same images.
    """

    def __init__(self, net, config, generator: str, *, strength: float = 0.4, steps: int = 25,
                 ilvr: Optional[int] = None, style_images: Optional[Tensor] = None, seed: int = 0,
                 cuda_graph: bool = False):
        if generator not in GENERATORS:
            raise CommandError(f"--generator must be one of {tuple(GENERATORS)}, got {generator!r}")
        if steps < 0:
            raise CommandError(f"--steps must be >= 0 (0: every DDPM step), got {steps}")
        if ilvr is not None and ilvr < 1:
            raise CommandError(f"--ilvr must be a factor >= 1, got {ilvr}")
        self.net, self.config, self.generator = net, config, generator
        self.steps, self.ilvr, self.style_images, self.seed = steps, ilvr, style_images, seed
        self.strength, self.cuda_graph = strength, cuda_graph
        self.t0 = strength_to_t0(strength, net.alphas_cumprod("cpu")) if generator == "ddpm" else None
        self.count = 0  # images translated so far: the per-image seed offset

    @torch.no_grad()
    def __call__(self, hq: Tensor) -> Tensor:
        device = next(self.net.parameters()).device
        x = to_signed(hq).to(device)
        first, self.count = self.count, self.count + hq.shape[0]
        seed = self.seed * 1_000_003 + first  # the batch's noise: a function of the seed and its position
        if self.generator == "munit":
            torch.manual_seed(seed)
            style = None
            if self.style_images is not None:
                picks = [(first + i) % len(self.style_images) for i in range(hq.shape[0])]
                style = to_signed(self.style_images[picks]).to(device)
            lq = self.net.hq_to_lq(x, style)
        else:
            lq = self.net.sdedit(x, self.t0, steps=self.steps or None, seed=seed, ilvr_factor=self.ilvr,
                                 cuda_graph=self.cuda_graph)
        return to_unit(lq).cpu()

    def settings(self) -> dict:
        record = {"generator": self.generator, "stage": self.config.stage, "image_size": self.config.image_size,
                  "seed": self.seed}
        if self.generator == "ddpm":
            record.update(strength=self.strength, t0=self.t0, timesteps=self.config.timesteps,
                          schedule=self.config.schedule, sampler=f"DDIM {self.steps} steps" if self.steps else "DDPM",
                          ilvr=self.ilvr)
        else:
            record.update(style="reference" if self.style_images is not None else "random")
        return record


def _splits(hq: Path, split: str = "all") -> dict[str, Path]:
    """{split: folder}: ``hq/train`` and ``hq/test`` when present (``split`` picks one), else {"": hq}."""
    if not hq.is_dir():
        raise CommandError(f"--hq {hq}: no such folder")
    found = {s: hq / s for s in SPLITS if (hq / s).is_dir()}
    if split == "all":
        return found or {"": hq}
    if split not in found:
        raise CommandError(f"--split {split}: --hq {hq} has no {split}/ folder")
    return {split: found[split]}


def _images(folder: Path, limit: Optional[int]) -> list[Path]:
    from dxr.data.io import image_files

    files = image_files(folder)
    if not files:
        raise CommandError(f"--hq {folder}: holds no PNG, JPEG, TIFF or DICOM image")
    return files[:limit] if limit else files


def _load(files: Sequence[Path], size: int) -> Tensor:
    return torch.cat([resize(torch.from_numpy(read_grayscale(f))[None, None], (size, size)) for f in files])


def synthesize(degrader: Degrader, hq: Path, out: Path, *, image_size: int, batch_size: int = 16,
               max_images: Optional[int] = None, split: str = "all", overwrite: bool = False,
               progress: bool = True, provenance: Optional[dict] = None) -> Path:
    """Write the paired folder of each split of ``hq`` (``split``: "all", "train" or "test") into
    ``out`` (atomically); returns ``out``."""
    from tqdm.auto import tqdm

    from dxr.data.build import atomic_build
    from dxr.data.io import write_png16

    splits = _splits(hq, split)
    listing = {split: _images(folder, max_images) for split, folder in splits.items()}
    names = {split: [f.relative_to(splits[split]).with_suffix(".png") for f in files]
             for split, files in listing.items()}
    for split, paths in names.items():
        if len(set(paths)) != len(paths):
            raise CommandError(f"--hq {splits[split]}: two images share a name once written as PNG")

    def fill(tmp: Path) -> None:
        bar = tqdm(total=sum(map(len, listing.values())), desc=f"synth {degrader.generator}", unit="img",
                   disable=not progress)
        for split, files in listing.items():
            degrader.count = 0  # each split's noise depends on that split alone
            for chunk, chunk_names in zip(batches(files, batch_size), batches(names[split], batch_size)):
                hq_images = _load(chunk, image_size)
                lq_images = degrader(hq_images)
                for name, lq_image, hq_image in zip(chunk_names, lq_images, hq_images):
                    write_png16(tmp / split / "lq" / name, lq_image[0].numpy())
                    write_png16(tmp / split / "hq" / name, hq_image[0].numpy())
                bar.update(len(chunk))
        bar.close()
        manifest = {
            "name": "dxr-pairs",
            **(provenance or {}),
            "settings": degrader.settings(),
            "hq_source": str(hq.absolute()),
            "splits": {split or ".": {"pairs": len(files), "lq": f"{split}/lq" if split else "lq",
                                      "hq": f"{split}/hq" if split else "hq"} for split, files in listing.items()},
            "image_size": image_size,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))

    return atomic_build(out, overwrite, fill)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dxr.synth", description=__doc__.split("\n\n")[0].replace("``", ""),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--generator", required=True, choices=tuple(GENERATORS), help="munit (MUNIT-LQ) or ddpm (DDPM-LQ)")
    p.add_argument("--checkpoint", required=True, help="the stage-1 run folder or checkpoint.safetensors")
    p.add_argument("--hq", required=True, help="folder of HQ radiographs, or a domain folder with train/ and test/")
    p.add_argument("--out", required=True, help="paired folder to create")
    p.add_argument("--split", choices=("all",) + SPLITS, default="all",
                   help="with --hq holding train/ and test/: which split(s) to turn into pairs")
    p.add_argument("--strength", type=float, default=0.4, help="ddpm: SDEdit noise level in (0, 1]")
    p.add_argument("--steps", type=int, default=25, help="ddpm: DDIM steps of the denoising (0: every DDPM step)")
    p.add_argument("--ilvr", type=int, default=None, help="ddpm: ILVR guidance keeping the 1/N low-pass of HQ")
    p.add_argument("--style", choices=STYLES, default="random", help="munit: random LQ styles or reference images")
    p.add_argument("--style-images", default=None, help="munit --style reference: folder of LQ images")
    p.add_argument("--image-size", type=int, default=None, help="side of the pairs (default: the model's)")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch")
    p.add_argument("--max-images", type=int, default=None, help="at most this many images per split")
    p.add_argument("--seed", type=int, default=0, help="seed of the styles and the noise")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--backend", choices=("auto", "torch", "triton", "cuda"), default=None, help="kernels of the fused ops")
    p.add_argument("--cuda-graph", action="store_true",
                   help="ddpm: replay each sampler step from a CUDA graph (a GPU; the plain loop on a CPU)")
    profiling.add_argument(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _main(argv: Optional[Sequence[str]] = None) -> int:
    from dxr.data.build import file_sha256

    args = _parser().parse_args(argv)
    device = default_device(args.device)
    net, config = load_stage_model(args.checkpoint, (GENERATORS[args.generator],), device=device, backend=args.backend)
    image_size = args.image_size or config.image_size
    multiple = size_multiple(config)
    if image_size < 8 or image_size % multiple:
        raise CommandError(f"--image-size must be a multiple of {multiple} (the {config.stage} network halves it "
                           f"{multiple.bit_length() - 1} times) and >= 8, got {image_size}")
    if args.ilvr is not None and (args.ilvr < 1 or image_size % args.ilvr):
        raise CommandError(f"--ilvr must be a factor >= 1 dividing the image size {image_size}, got {args.ilvr}")
    styles = None
    if args.style == "reference":
        if args.generator != "munit" or not args.style_images:
            raise CommandError("--style reference needs --generator munit and --style-images DIR")
        folder = Path(args.style_images)
        if not folder.is_dir():
            raise CommandError(f"--style-images {folder}: no such folder")
        styles = _load(_images(folder, None), image_size)
    elif args.style_images:
        raise CommandError("--style-images is for --style reference")
    degrader = Degrader(net, config, args.generator, strength=args.strength, steps=args.steps, ilvr=args.ilvr,
                        style_images=styles, seed=args.seed, cuda_graph=args.cuda_graph)
    checkpoint = Path(args.checkpoint)
    checkpoint = checkpoint / "checkpoint.safetensors" if checkpoint.is_dir() else checkpoint
    provenance = {"checkpoint": {"path": str(checkpoint.absolute()), "sha256": file_sha256(checkpoint),
                                 "stage": config.stage, "image_size": config.image_size}}
    with profiling.session(args.profile, args.out):
        out = synthesize(degrader, Path(args.hq), Path(args.out), image_size=image_size, batch_size=args.batch_size,
                         max_images=args.max_images, split=args.split, overwrite=args.overwrite,
                         progress=not args.no_progress, provenance=provenance)
    print(out)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command: its exit status (2 with one line on stderr for input it cannot work with)."""
    return run(_main, argv, prog="python -m dxr.synth")


if __name__ == "__main__":
    sys.exit(main())

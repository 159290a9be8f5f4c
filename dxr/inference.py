"""What the pipeline's commands share: trained models by stage, grayscale images in and out, batches.

``dxr.synth`` (stage-1 models → pairs), ``dxr.enhance`` (DDPM-HQ → restored radiographs) and
``dxr.evaluate`` load checkpoints through :func:`load_stage_model`, which says which stage a file holds
when it is not the one asked for, and read images through :func:`read_grayscale`, which refuses colour.
Images travel as (N, 1, H, W) float32 in [0, 1]; networks see [-1, 1].
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from dxr.cli import CommandError

PathLike = Union[str, os.PathLike]
GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def default_device(device: Optional[str] = None) -> torch.device:
    """``device`` as a torch device (checked), else cuda when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise CommandError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {device}: this machine has no CUDA GPU (use --device cpu)")
    return resolved


def load_stage_model(checkpoint: PathLike, stages: Sequence[str], *, device: torch.device,
                     backend: Optional[str] = None, label: Optional[str] = None):
    """``(net, config)`` of the trained run at ``checkpoint`` (a file or a run folder), EMA weights when
    kept, in eval mode. Raises CommandError when it is missing, unreadable or of another stage, naming
    it as ``label`` (default ``--checkpoint <path>``)."""
    from dxr.training.checkpoint import load_trained

    path = Path(checkpoint)
    label = label or f"--checkpoint {path}"
    if not path.exists():
        raise CommandError(f"{label}: no such file or run folder")
    try:
        net, config = load_trained(path, device=device, backend=backend)
    except CommandError:
        raise
    except ValueError as err:
        raise CommandError(f"{label}: {err}") from None
    except Exception as err:  # safetensors and torch raise their own types for a foreign or torn file
        raise CommandError(f"{label}: not a readable dxr checkpoint ({type(err).__name__}: {err})") from None
    if config.stage not in stages:
        raise CommandError(f"{label} holds a {config.stage} model; this command needs "
                           f"{' or '.join(stages)}")
    return net, config


def size_multiple(config) -> int:
    """The factor every image side must be a multiple of for the network of a run's ``config``."""
    from dxr.training import stages

    return stages.of(config).image_multiple(config)


def read_grayscale(path: PathLike) -> np.ndarray:
    """(H, W) float32 in [0, 1] of a one-channel PNG/JPEG/TIFF/DICOM; CommandError for colour or an unreadable file."""
    from dxr.data.io import is_dicom, read_image

    path = Path(path)
    if not is_dicom(path):
        from PIL import Image

        try:
            with Image.open(path) as image:
                mode = image.mode
        except Exception as err:
            raise CommandError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None
        if mode not in GRAYSCALE_MODES:
            raise CommandError(f"{path}: expected a one-channel (grayscale) radiograph, got {len(mode)}-channel "
                               f"{mode} (convert it to grayscale first)")
    try:
        return read_image(path)
    except Exception as err:
        raise CommandError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None


def resize(images: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, C, H, W) resized to ``size`` (bicubic, anti-aliased when shrinking), clamped to [0, 1]."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    shrink = size[0] < images.shape[-2] or size[1] < images.shape[-1]
    return torch.nn.functional.interpolate(images, size=size, mode="bicubic", antialias=shrink,
                                           align_corners=False).clamp(0, 1)


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    """Consecutive slices of ``items`` of at most ``size``."""
    if size < 1:
        raise CommandError(f"--batch-size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start:start + size]


def to_signed(images01: Tensor) -> Tensor:
    return images01 * 2 - 1


def to_unit(signed: Tensor) -> Tensor:
    return ((signed.float() + 1) / 2).clamp(0, 1)


__all__ = ["default_device", "load_stage_model", "size_multiple", "read_grayscale", "resize", "batches", "to_signed",
           "to_unit", "PathLike"]

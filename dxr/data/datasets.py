"""Datasets of radiographs: a recursive image folder, paired ``lq/``–``hq/`` folders, and two unpaired domains.

Every item is a float32 tensor (1, H, W) in [-1, 1] (bright = attenuating). With ``image_size`` the image
is resized (anti-aliased) to cover it and centre-cropped; ``augment=True`` adds what suits radiographs:
a random crop of 80–100 % of the covered area, a rotation within ±4°, a gamma in 1/1.2–1.2 and a contrast
in 0.9–1.1 — no flips (the heart is on the patient's left). An unreadable or corrupt file is reported by
name (an :class:`UnreadableImageWarning`) and skipped, or raises :class:`UnreadableImage` with
``strict=True``; it never stops an epoch midway. Randomness comes from torch's global generator, which
a DataLoader seeds per worker.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from dxr.data.io import IMAGE_EXTENSIONS, image_files, read_image

PathLike = Union[str, os.PathLike]
Size = Union[None, int, Sequence[int]]


class UnreadableImage(ValueError):
    """An image file could not be read (``strict=True``); the message names the file."""


class UnreadableImageWarning(UserWarning):
    """An image file could not be read and is skipped; the message names the file."""


def _size(image_size: Size) -> Optional[tuple[int, int]]:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    height, width = (int(v) for v in image_size)
    if height < 1 or width < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return height, width


@dataclass
class Augmentation:
    """One draw of the random transform, in relative units so that it fits images of any size."""

    area: float = 1.0  # share of the covered area kept by the crop
    center: tuple[float, float] = (0.0, 0.0)  # crop centre offset, fraction of the free margin in [-1, 1]
    angle: float = 0.0  # degrees
    gamma: float = 1.0
    contrast: float = 1.0

    @classmethod
    def draw(cls) -> "Augmentation":
        u = torch.rand(6, dtype=torch.float64).tolist()
        return cls(
            area=0.8 + 0.2 * u[0],
            center=(2 * u[1] - 1, 2 * u[2] - 1),
            angle=8.0 * u[3] - 4.0,
            gamma=math.exp((2 * u[4] - 1) * math.log(1.2)),
            contrast=0.9 + 0.2 * u[5],
        )


def transform(image: Tensor, image_size: Size, augmentation: Optional[Augmentation] = None) -> Tensor:
    """Resize/crop (1, H, W) in [0, 1] to ``image_size`` (None keeps the size) and apply ``augmentation``."""
    size = _size(image_size)
    height, width = image.shape[-2:]
    target = size or (height, width)
    aug = augmentation or Augmentation()
    # scale that makes the image cover the target, enlarged so the kept area is the target
    cover = max(target[0] / height, target[1] / width) / math.sqrt(aug.area)
    if size is not None or aug.area != 1.0:
        resized = (max(target[0], round(height * cover)), max(target[1], round(width * cover)))
        if resized != (height, width):
            image = F.interpolate(image[None], size=resized, mode="bilinear", antialias=True, align_corners=False)[0]
    if image.shape[-2:] != target or aug.angle != 0.0:
        image = _affine_crop(image, target, aug)
    if aug.gamma != 1.0 or aug.contrast != 1.0:
        image = image.clamp(0, 1).pow(aug.gamma)
        mean = image.mean()
        image = ((image - mean) * aug.contrast + mean).clamp(0, 1)
    return image


def _affine_crop(image: Tensor, target: tuple[int, int], aug: Augmentation) -> Tensor:
    """Sample a ``target`` window, rotated by ``aug.angle`` about its centre, from (1, H, W)."""
    height, width = image.shape[-2:]
    sx, sy = target[1] / width, target[0] / height
    tx = aug.center[0] * (1 - sx)
    ty = aug.center[1] * (1 - sy)
    cos, sin = math.cos(math.radians(aug.angle)), math.sin(math.radians(aug.angle))
    # pixel-space rotation expressed in normalized coordinates of a (possibly non-square) image
    theta = torch.tensor([[[cos * sx, -sin * target[0] / width, tx], [sin * target[1] / height, cos * sy, ty]]], dtype=image.dtype)
    grid = F.affine_grid(theta, [1, 1, target[0], target[1]], align_corners=False)
    return F.grid_sample(image[None], grid, mode="bilinear", padding_mode="reflection", align_corners=False)[0]


class _Loader:
    """Reads files into (1, H, W) float32 [0, 1] tensors, remembering and reporting unreadable ones."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.bad: set[Path] = set()

    def load(self, path: Path) -> Optional[Tensor]:
        if path in self.bad:
            return None
        try:
            return torch.from_numpy(read_image(path)).unsqueeze(0)
        except Exception as err:  # any decoder failure: the file is what is wrong
            if self.strict:
                raise UnreadableImage(f"{path}: {type(err).__name__}: {err}") from err
            self.bad.add(path)
            warnings.warn(f"skipping unreadable image {path}: {type(err).__name__}: {err}", UnreadableImageWarning, stacklevel=3)
            return None


def _to_signed(image: Tensor) -> Tensor:
    return image.mul(2).sub(1).contiguous()


class ImageFolder(Dataset):
    """Every image under ``root`` (recursive; PNG, JPEG, TIFF, DICOM). Item: (1, H, W) float32 in [-1, 1].

    An unreadable file is skipped for the next readable one (indices stay stable; :attr:`bad` lists the
    skipped files). Raises ``FileNotFoundError`` if ``root`` holds no image.
    """

    def __init__(self, root: PathLike, image_size: Size = None, *, augment: bool = False, strict: bool = False, extensions: Sequence[str] = IMAGE_EXTENSIONS):
        self.root = Path(root)
        self.files = image_files(self.root, extensions)
        if not self.files:
            raise FileNotFoundError(f"{self.root}: no images ({', '.join(extensions)})")
        self.image_size = _size(image_size)
        self.augment = augment
        self._loader = _Loader(strict)

    @property
    def bad(self) -> set[Path]:
        return self._loader.bad

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> Tensor:
        """The readable image at ``index`` or after it (wrapping), transformed, in [-1, 1]."""
        for step in range(len(self.files)):
            image = self._loader.load(self.files[(index + step) % len(self.files)])
            if image is not None:
                return _to_signed(transform(image, self.image_size, Augmentation.draw() if self.augment else None))
        raise RuntimeError(f"{self.root}: none of the {len(self.files)} images is readable")

    def __getitem__(self, index: int) -> Tensor:
        return self.load(index)


class PairedFolder(Dataset):
    """Pairs ``root/lq/<name>`` with ``root/hq/<name>`` (same relative path, any image extension).
    Item: (lq, hq), each (1, H, W) float32 in [-1, 1], cropped and augmented alike.

    Names found on one side only are reported (and dropped) or, with ``strict``, raise ``ValueError``.
    """

    def __init__(self, root: PathLike, image_size: Size = None, *, augment: bool = False, strict: bool = False, extensions: Sequence[str] = IMAGE_EXTENSIONS):
        self.root = Path(root)
        sides = {}
        for side in ("lq", "hq"):
            folder = self.root / side
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder}: missing (PairedFolder needs {self.root}/lq and {self.root}/hq)")
            sides[side] = {self._key(p, folder): p for p in image_files(folder, extensions)}
        common = sorted(set(sides["lq"]) & set(sides["hq"]))
        lonely = sorted(set(sides["lq"]) ^ set(sides["hq"]))
        if lonely:
            message = f"{self.root}: {len(lonely)} names are on one side only (e.g. {', '.join(lonely[:3])})"
            if strict:
                raise ValueError(message)
            warnings.warn(message + "; they are left out", UnreadableImageWarning, stacklevel=2)
        if not common:
            raise FileNotFoundError(f"{self.root}: no name is in both lq/ and hq/")
        self.pairs = [(sides["lq"][k], sides["hq"][k]) for k in common]
        self.image_size = _size(image_size)
        self.augment = augment
        self._loader = _Loader(strict)

    @staticmethod
    def _key(path: Path, folder: Path) -> str:
        relative = path.relative_to(folder)
        return str(relative.with_suffix("")) if relative.suffix else str(relative)

    @property
    def bad(self) -> set[Path]:
        return self._loader.bad

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        for step in range(len(self.pairs)):
            lq_path, hq_path = self.pairs[(index + step) % len(self.pairs)]
            lq, hq = self._loader.load(lq_path), self._loader.load(hq_path)
            if lq is not None and hq is not None:
                aug = Augmentation.draw() if self.augment else None
                return _to_signed(transform(lq, self.image_size, aug)), _to_signed(transform(hq, self.image_size, aug))
        raise RuntimeError(f"{self.root}: none of the {len(self.pairs)} pairs is readable")


class UnpairedFolders(Dataset):
    """Two domains: item ``i`` is (a, b) with ``a`` the i-th image of ``root_a`` (wrapping) and ``b`` drawn
    at random from ``root_b``, independently. Length: the larger domain. Tensors as :class:`ImageFolder`."""

    def __init__(self, root_a: PathLike, root_b: PathLike, image_size: Size = None, *, augment: bool = False, strict: bool = False, extensions: Sequence[str] = IMAGE_EXTENSIONS):
        self.a = ImageFolder(root_a, image_size, augment=augment, strict=strict, extensions=extensions)
        self.b = ImageFolder(root_b, image_size, augment=augment, strict=strict, extensions=extensions)

    @property
    def bad(self) -> set[Path]:
        return self.a.bad | self.b.bad

    def __len__(self) -> int:
        return max(len(self.a), len(self.b))

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        b_index = int(torch.randint(len(self.b), (1,)))
        return self.a.load(index % len(self.a)), self.b.load(b_index)

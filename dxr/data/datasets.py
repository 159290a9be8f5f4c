"""Datasets of radiographs: a recursive image folder, paired ``lq/``–``hq/`` folders, and two unpaired domains.

Every item is a float32 tensor (1, H, W) in [-1, 1] (bright = attenuating). With ``image_size`` the image
is resized (anti-aliased) to cover it and centre-cropped; ``augment=True`` adds what suits radiographs:
a random crop of 80–100 % of the covered area, a rotation within ±4°, a gamma in 1/1.2–1.2 and a contrast
in 0.9–1.1 — no flips (the heart is on the patient's left). A folder is checked when opened (each file's
header read once): unreadable, corrupt or too small files are named in one :class:`UnreadableImageWarning`
and left out of the count, or raise :class:`UnreadableImage` with ``strict=True``; a file that fails
later, while decoding, never stops an epoch midway. Randomness comes from torch's global generator, which
a DataLoader seeds per worker.
"""

from __future__ import annotations

import math
import operator
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from dxr.data.io import IMAGE_EXTENSIONS, BitDepthWarning, image_files, read_image, read_image_shape

PathLike = Union[str, os.PathLike]
Size = Union[None, int, Sequence[int]]


class UnreadableImage(ValueError):
    """Image files could not be read (any, with ``strict=True``; else all of a folder's); the message names them."""


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


MIN_SIDE = 8  # pixels: a smaller image holds too little to resize into a training image


def _reason(err: BaseException, path: Path) -> str:
    """An error's message on one line, without the path it repeats."""
    text = " ".join(str(err).split())
    for prefix in (f"{path}: ", f"{path}:"):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _survey(paths: Sequence[Path]) -> tuple[dict[Path, tuple[int, int]], dict[Path, str]]:
    """Read each file's header once: ({path: (height, width)} of the usable files, {path: why not} of the rest)."""
    sizes, problems = {}, {}
    for path in paths:
        try:
            height, width = read_image_shape(path)
        except Exception as err:  # any decoder failure: the file is what is wrong
            problems[path] = _reason(err, path)
            continue
        if min(height, width) < MIN_SIDE:
            problems[path] = f"{height}x{width} px, below the minimum of {MIN_SIDE} px a side"
        else:
            sizes[path] = (height, width)
    return sizes, problems


def _report(root: Path, problems: dict[Path, str], total: int, what: str, strict: bool) -> None:
    """Name every left-out file in one line: a warning, or :class:`UnreadableImage` when ``strict`` or
    nothing is left."""
    if not problems:
        return
    names = "; ".join(f"{_relative(path, root)} ({why})" for path, why in sorted(problems.items()))
    if strict or len(problems) == total:
        if len(problems) == total:
            head = f"none of the {total} {what} is usable"
        else:
            head = f"{len(problems)} of {total} {what} unusable"
        raise UnreadableImage(f"{root}: {head}: {names}")
    warnings.warn(f"{root}: left out {len(problems)} of {total} {what}: {names}", UnreadableImageWarning, stacklevel=3)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _position(index, length: int) -> int:
    """``index`` as a position in 0..length-1, negative indices counting from the end; IndexError beyond."""
    index = operator.index(index)
    if not -length <= index < length:
        raise IndexError(f"index {index} is out of range for {length} items")
    return index % length


class _Loader:
    """Reads files into (1, H, W) float32 [0, 1] tensors, remembering and reporting unreadable ones.

    A file whose header passed the survey can still fail to decode; it is reported by name once and
    the caller moves on to the next file.
    """

    def __init__(self, strict: bool):
        self.strict = strict
        self.bad: set[Path] = set()
        self.noted = False

    def load(self, path: Path) -> Optional[Tensor]:
        if path in self.bad:
            return None
        notes: list[str] = []
        try:
            image = torch.from_numpy(read_image(path, notes=notes)).unsqueeze(0)
        except Exception as err:  # any decoder failure: the file is what is wrong
            if self.strict:
                raise UnreadableImage(f"{path}: {_reason(err, path)}") from err
            self.bad.add(path)
            warnings.warn(f"skipping unreadable image {path}: {_reason(err, path)}", UnreadableImageWarning, stacklevel=3)
            return None
        if notes and not self.noted:  # one note per dataset: a folder of 12-bit images is one fact
            self.noted = True
            warnings.warn(notes[0] + " (further images scaled alike are not reported)", BitDepthWarning, stacklevel=3)
        return image


def _to_signed(image: Tensor) -> Tensor:
    return image.mul(2).sub(1).contiguous()


class ImageFolder(Dataset):
    """Every image under ``root`` (recursive; PNG, JPEG, TIFF, DICOM). Item: (1, H, W) float32 in [-1, 1].

    The folder is checked when opened: each file's header is read once, and files that cannot be read
    or are smaller than :data:`MIN_SIDE` pixels a side are named in one :class:`UnreadableImageWarning`
    and left out (``strict=True``: :class:`UnreadableImage` instead). Raises ``FileNotFoundError`` if
    ``root`` holds no image, :class:`UnreadableImage` if none is usable. A file that fails later, while
    decoding, is reported once and its item comes from the next file (:attr:`bad` lists such files and
    those left out). Indices past the end raise ``IndexError``, so iterating the dataset ends.
    """

    def __init__(self, root: PathLike, image_size: Size = None, *, augment: bool = False, strict: bool = False, extensions: Sequence[str] = IMAGE_EXTENSIONS):
        self.root = Path(root)
        found = image_files(self.root, extensions)
        if not found:
            raise FileNotFoundError(f"{self.root}: no images ({', '.join(extensions)})")
        self.image_size = _size(image_size)
        sizes, self.left_out = _survey(found)
        _report(self.root, self.left_out, len(found), "images", strict)
        self.files = [p for p in found if p in sizes]
        self.augment = augment
        self._loader = _Loader(strict)

    @property
    def bad(self) -> set[Path]:
        return set(self.left_out) | self._loader.bad

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> Tensor:
        """The image at ``index`` (or, if it fails to decode, the next one that does), transformed, in [-1, 1]."""
        index = _position(index, len(self.files))
        for step in range(len(self.files)):
            image = self._loader.load(self.files[(index + step) % len(self.files)])
            if image is not None:
                return _to_signed(transform(image, self.image_size, Augmentation.draw() if self.augment else None))
        raise UnreadableImage(f"{self.root}: none of the {len(self.files)} images decodes")

    def __getitem__(self, index: int) -> Tensor:
        return self.load(index)


class PairedFolder(Dataset):
    """Pairs ``root/lq/<name>`` with ``root/hq/<name>`` (same relative path, any image extension).
    Item: (lq, hq), each (1, H, W) float32 in [-1, 1], cropped and augmented alike.

    Names found on one side only are reported (and dropped) or, with ``strict``, raise ``ValueError``.
    Both sides are checked when opened as :class:`ImageFolder` checks its files: a pair with an
    unusable side is named and left out; a pair whose two images differ in size raises ``ValueError``
    naming both (it could not be cropped in alignment). Indices past the end raise ``IndexError``.
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
        self.image_size = _size(image_size)
        candidates = [(sides["lq"][k], sides["hq"][k]) for k in common]
        sizes, self.left_out = _survey([p for pair in candidates for p in pair])
        _report(self.root, self.left_out, 2 * len(candidates), "images of the pairs", strict)
        self.pairs = [(lq, hq) for lq, hq in candidates if lq in sizes and hq in sizes]
        if not self.pairs:
            raise UnreadableImage(f"{self.root}: no pair has both images usable")
        for lq, hq in self.pairs:
            if sizes[lq] != sizes[hq]:
                raise ValueError(f"{self.root}: the pair {_relative(lq, self.root)} ({sizes[lq][0]}x{sizes[lq][1]}) and "
                                 f"{_relative(hq, self.root)} ({sizes[hq][0]}x{sizes[hq][1]}) differ in size; "
                                 "paired images must have the same height and width")
        self.augment = augment
        self._loader = _Loader(strict)

    @staticmethod
    def _key(path: Path, folder: Path) -> str:
        relative = path.relative_to(folder)
        return str(relative.with_suffix("")) if relative.suffix else str(relative)

    @property
    def bad(self) -> set[Path]:
        return set(self.left_out) | self._loader.bad

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        index = _position(index, len(self.pairs))
        for step in range(len(self.pairs)):
            lq_path, hq_path = self.pairs[(index + step) % len(self.pairs)]
            lq, hq = self._loader.load(lq_path), self._loader.load(hq_path)
            if lq is not None and hq is not None:
                aug = Augmentation.draw() if self.augment else None
                return _to_signed(transform(lq, self.image_size, aug)), _to_signed(transform(hq, self.image_size, aug))
        raise UnreadableImage(f"{self.root}: none of the {len(self.pairs)} pairs decodes")


class UnpairedFolders(Dataset):
    """Two domains: item ``i`` is (a, b) with ``a`` the i-th image of ``root_a`` (wrapping) and ``b`` drawn
    at random from ``root_b``, independently. Length: the larger domain (``IndexError`` past it). Tensors and
    checks as :class:`ImageFolder`."""

    def __init__(self, root_a: PathLike, root_b: PathLike, image_size: Size = None, *, augment: bool = False, strict: bool = False, extensions: Sequence[str] = IMAGE_EXTENSIONS):
        self.a = ImageFolder(root_a, image_size, augment=augment, strict=strict, extensions=extensions)
        self.b = ImageFolder(root_b, image_size, augment=augment, strict=strict, extensions=extensions)

    @property
    def bad(self) -> set[Path]:
        return self.a.bad | self.b.bad

    def __len__(self) -> int:
        return max(len(self.a), len(self.b))

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        index = _position(index, len(self))
        b_index = int(torch.randint(len(self.b), (1,)))
        return self.a.load(index % len(self.a)), self.b.load(b_index)

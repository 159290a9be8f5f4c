"""The four training stages: what each trains, on which data, with which optimisers, and what it shows.

- ``lq-ddpm``: an unconditional DDPM of LQ images (DRRs), later used SDEdit-style to turn HQ images
  into LQ-looking ones. Data: ``<data>/lq/train`` (or ``<data>`` itself when it is a plain image folder).
- ``lq-munit``: MUNIT between LQ and HQ, unpaired. Data: ``<data>/lq/train`` and ``<data>/hq/train``.
- ``hq-ddpm``: the conditional (SR3) DDPM that restores LQ → HQ, trained on ``--pairs`` (``lq/``,
  ``hq/`` with matching names), the paired folder made by synthesis. Its grids show the held-out pairs
  beside them (``<pairs>/../test``) and, with ``--data``, real DRRs (``<data>/lq/test``) restored.
- ``bicubic-ddpm``: the same conditional DDPM on HQ images degraded by bicubic down- and up-sampling
  on the fly (the baseline). Data: ``<data>/hq/train`` (or a plain image folder).

Every network is one ``nn.Module`` whose ``forward(*inputs, part)`` returns (loss, parts); a stage has
one optimiser per ``part`` (MUNIT: "dis" then "gen"; the DDPMs: "loss").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dxr.diffusion import GaussianDiffusion, make_schedule
from dxr.models.munit import MUNIT
from dxr.models.unet import UNet
from dxr.training.config import ConfigError, TrainConfig


def build_net(config: TrainConfig, backend: Optional[str] = None) -> nn.Module:
    """The network a stage trains: MUNIT for ``lq-munit``, else a UNet inside :class:`GaussianDiffusion`."""
    if config.stage == "lq-munit":
        return MUNIT(config.munit, backend=backend)
    unet = UNet(config.unet, backend=backend)
    return GaussianDiffusion(unet, make_schedule(config.schedule, config.timesteps), prediction=config.prediction,
                             backend=backend, residual=config.residual and config.stage in ("hq-ddpm", "bicubic-ddpm"))


@dataclass
class Update:
    """One optimiser step per training step: ``part`` names the objective of the network's forward."""

    part: str
    parameters: list
    optimizer: torch.optim.Optimizer


def make_updates(config: TrainConfig, net: nn.Module) -> list[Update]:
    """The optimisers, in the order they step: MUNIT's discriminators then generators (Adam with
    MUNIT's β and weight decay), or the denoiser (Adam)."""
    if config.stage == "lq-munit":
        c = config.munit
        adam = dict(lr=config.lr, betas=(c.beta1, c.beta2), weight_decay=c.weight_decay)
        dis, gen = net.discriminator_parameters(), net.generator_parameters()
        return [Update("dis", dis, torch.optim.Adam(dis, **adam)), Update("gen", gen, torch.optim.Adam(gen, **adam))]
    params = list(net.parameters())
    return [Update("loss", params, torch.optim.Adam(params, lr=config.lr))]


# --------------------------------------------------------------------------------------------------
# data


def data_root(config: TrainConfig) -> Path:
    """``--data``, or the embedded default dataset (built on first use)."""
    if config.data is not None:
        return Path(config.data)
    from dxr.data import default_dataset

    return default_dataset()


def _domain(root: Path, domain: str, split: str = "train", *, plain_ok: bool = False) -> Path:
    """``root/domain/split``, else ``root/domain``, else (``plain_ok``) ``root``; raises FileNotFoundError."""
    for candidate in (root / domain / split, root / domain):
        if candidate.is_dir():
            return candidate
    if plain_ok and root.is_dir():
        return root
    raise FileNotFoundError(f"{root} holds no {domain}/ folder (expected {root}/{domain}/{split})")


def make_dataset(config: TrainConfig):
    """The training set of the stage; items as ``dxr.data.datasets`` gives them."""
    from dxr.data.datasets import ImageFolder, PairedFolder, UnpairedFolders

    size = config.image_size
    if config.stage == "hq-ddpm":
        if config.pairs is None:
            raise ConfigError("hq-ddpm trains on paired (LQ, HQ) images: pass --pairs, a folder with lq/ and hq/ "
                             "holding images of the same names (as python -m dxr.synth writes)")
        return PairedFolder(config.pairs, size, augment=True)
    root = data_root(config)
    if config.stage == "lq-munit":
        return UnpairedFolders(_domain(root, "lq"), _domain(root, "hq"), size, augment=True)
    domain = "lq" if config.stage == "lq-ddpm" else "hq"
    return ImageFolder(_domain(root, domain, plain_ok=True), size, augment=True)


def held_out_pairs(pairs: Path) -> Path:
    """The test pairs beside training pairs ``<dir>/train`` (``<dir>/test``, as dxr.synth writes them),
    else ``pairs`` itself."""
    sibling = pairs.parent / "test"
    return sibling if pairs.name == "train" and (sibling / "lq").is_dir() else pairs


def bicubic_degrade(x: Tensor, factor: int) -> Tensor:
    """The baseline degradation: anti-aliased bicubic down-sampling by ``factor``, bicubic back up."""
    small = F.interpolate(x, scale_factor=1 / factor, mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(small, size=x.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)


def inputs(config: TrainConfig, batch, device) -> tuple:
    """A loader batch → the network's inputs on ``device``: (x0, cond) for the DDPMs, (lq, hq) for MUNIT."""
    def move(t: Tensor) -> Tensor:
        return t.to(device, non_blocking=True)

    if config.stage == "lq-ddpm":
        return move(batch), None
    if config.stage == "bicubic-ddpm":
        hq = move(batch)
        return hq, bicubic_degrade(hq, config.bicubic_factor)
    lq, hq = move(batch[0]), move(batch[1])
    return (hq, lq) if config.stage == "hq-ddpm" else (lq, hq)


def preview_images(config: TrainConfig, count: int) -> dict[str, Tensor]:
    """A fixed handful of held-out images (the test split when there is one) for the sample grids."""
    from dxr.data.datasets import ImageFolder, PairedFolder

    def first(dataset) -> list:
        return [dataset[i] for i in range(min(count, len(dataset)))]

    size = config.image_size
    if config.stage == "hq-ddpm":
        pairs = first(PairedFolder(held_out_pairs(Path(config.pairs)), size))
        out = {"lq": torch.stack([p[0] for p in pairs]), "hq": torch.stack([p[1] for p in pairs])}
        if config.data is not None:  # real DRRs: what the model is for
            try:
                out["drr"] = torch.stack(first(ImageFolder(_domain(Path(config.data), "lq", "test"), size)))
            except FileNotFoundError:  # a dataset without real test DRRs: the grid shows the pairs alone
                pass
        return out
    root = data_root(config)
    out = {}
    for domain in ("lq", "hq"):
        try:
            out[domain] = torch.stack(first(ImageFolder(_domain(root, domain, "test"), size)))
        except FileNotFoundError:
            continue
    if config.stage == "bicubic-ddpm" and "hq" not in out:
        out["hq"] = torch.stack(first(ImageFolder(root, size)))
    return out


# --------------------------------------------------------------------------------------------------
# sample grids


@torch.no_grad()
def sample_rows(config: TrainConfig, net: nn.Module, preview: dict[str, Tensor], *, seed: int, device) -> list:
    """(label, images) rows of the sample grid for this stage, from ``net`` (the EMA copy when kept)."""
    preview = {k: v.to(device) for k, v in preview.items()}
    if config.stage == "lq-munit":
        torch.manual_seed(seed)  # the random styles
        count = min(preview["hq"].shape[0], preview["lq"].shape[0])
        hq, lq = preview["hq"][:count], preview["lq"][:count]
        return [("HQ", hq), ("HQ -> LQ, random style", net.hq_to_lq(hq)),
                ("HQ -> LQ, style of the LQ below", net.hq_to_lq(hq, lq)), ("LQ", lq)]
    steps = config.sample_steps
    size = (1, config.image_size, config.image_size)
    if config.stage == "lq-ddpm":
        rows = [("samples", net.sample((config.num_samples, *size), steps=steps, seed=seed, device=device))]
        if "hq" in preview:
            hq = preview["hq"]
            t0 = min(config.sdedit_t0, config.timesteps)
            edited = net.sdedit(hq, t0, steps=max(1, steps * t0 // config.timesteps), seed=seed)
            rows += [("HQ", hq), (f"HQ -> LQ by SDEdit (t0 = {t0})", edited)]
        return rows
    hq = preview["hq"]
    lq = preview["lq"] if config.stage == "hq-ddpm" else bicubic_degrade(hq, config.bicubic_factor)
    restored = net.sample(tuple(hq.shape), cond=lq, steps=steps, seed=seed, device=device)
    held_out = "held-out " if config.stage == "hq-ddpm" else ""
    rows = [(f"{held_out}LQ", lq), ("restored", restored), (f"{held_out}HQ", hq)]
    if "drr" in preview:
        drr = preview["drr"]
        rows += [("real DRR", drr),
                 ("DRR restored", net.sample(tuple(drr.shape), cond=drr, steps=steps, seed=seed, device=device))]
    return rows


__all__ = ["build_net", "make_updates", "Update", "make_dataset", "inputs", "preview_images", "sample_rows",
           "bicubic_degrade", "data_root", "held_out_pairs"]

"""The four training stages, one :class:`Stage` record each in :data:`TABLE`: what each trains, on which
data, with which optimisers, and what its sample grids show.

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

A new stage is one more record in :data:`TABLE` (and the functions it names, kept beside the others here).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dxr.diffusion import GaussianDiffusion, make_schedule
from dxr.models.munit import MUNIT
from dxr.models.unet import UNet
from dxr.training.config import ConfigError, TrainConfig


@dataclass
class Update:
    """One optimiser step per training step: ``part`` names the objective of the network's forward."""

    part: str
    parameters: list
    optimizer: torch.optim.Optimizer


# --------------------------------------------------------------------------------------------------
# networks and optimisers


def _munit(config: TrainConfig, backend: Optional[str]) -> nn.Module:
    return MUNIT(config.munit, backend=backend)


def _diffusion(config: TrainConfig, backend: Optional[str]) -> nn.Module:
    """A UNet inside :class:`GaussianDiffusion`; a conditional stage's may diffuse the residual HQ − LQ."""
    unet = UNet(config.unet, backend=backend)
    return GaussianDiffusion(unet, make_schedule(config.schedule, config.timesteps), prediction=config.prediction,
                             backend=backend, residual=config.residual and of(config).conditional)


def _munit_updates(config: TrainConfig, net: nn.Module) -> list[Update]:
    """The discriminators then the generators, each with Adam of MUNIT's β and weight decay."""
    c = config.munit
    adam = dict(lr=config.lr, betas=(c.beta1, c.beta2), weight_decay=c.weight_decay)
    dis, gen = net.discriminator_parameters(), net.generator_parameters()
    return [Update("dis", dis, torch.optim.Adam(dis, **adam)), Update("gen", gen, torch.optim.Adam(gen, **adam))]


def _denoiser_updates(config: TrainConfig, net: nn.Module) -> list[Update]:
    params = list(net.parameters())
    return [Update("loss", params, torch.optim.Adam(params, lr=config.lr))]


def _munit_multiple(config: TrainConfig) -> int:
    return 2 ** config.munit.n_downsample  # the generator alone: its content encoder halves that often


def _unet_multiple(config: TrainConfig) -> int:
    return config.unet.size_multiple


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


def _pairs_dataset(config: TrainConfig):
    from dxr.data.datasets import PairedFolder

    if config.pairs is None:
        raise ConfigError(f"{config.stage} trains on paired (LQ, HQ) images: pass --pairs, a folder with lq/ and hq/ "
                          "holding images of the same names (as python -m dxr.synth writes)")
    return PairedFolder(config.pairs, config.image_size, augment=True)


def _unpaired_dataset(config: TrainConfig):
    from dxr.data.datasets import UnpairedFolders

    root = data_root(config)
    return UnpairedFolders(_domain(root, "lq"), _domain(root, "hq"), config.image_size, augment=True)


def _images(domain: str) -> Callable[[TrainConfig], object]:
    """The training set of one domain: ``<data>/<domain>/train``, or a plain image folder."""
    def dataset(config: TrainConfig):
        from dxr.data.datasets import ImageFolder

        return ImageFolder(_domain(data_root(config), domain, plain_ok=True), config.image_size, augment=True)

    return dataset


def _pairs_source(config: TrainConfig) -> str:
    return config.pairs


def held_out_pairs(pairs: Path) -> Path:
    """The test pairs beside training pairs ``<dir>/train`` (``<dir>/test``, as dxr.synth writes them),
    else ``pairs`` itself."""
    sibling = pairs.parent / "test"
    return sibling if pairs.name == "train" and (sibling / "lq").is_dir() else pairs


def bicubic_degrade(x: Tensor, factor: int) -> Tensor:
    """The baseline degradation: anti-aliased bicubic down-sampling by ``factor``, bicubic back up."""
    small = F.interpolate(x, scale_factor=1 / factor, mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(small, size=x.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)


def _move(t: Tensor, device) -> Tensor:
    return t.to(device, non_blocking=True)


def _images_in(config: TrainConfig, batch, device) -> tuple:
    return _move(batch, device), None


def _bicubic_in(config: TrainConfig, batch, device) -> tuple:
    hq = _move(batch, device)
    return hq, bicubic_degrade(hq, config.bicubic_factor)


def _unpaired_in(config: TrainConfig, batch, device) -> tuple:
    return _move(batch[0], device), _move(batch[1], device)


def _pairs_in(config: TrainConfig, batch, device) -> tuple:
    lq, hq = _move(batch[0], device), _move(batch[1], device)
    return hq, lq  # x0, cond


def _first(dataset, count: int) -> list:
    return [dataset[i] for i in range(min(count, len(dataset)))]


def _test_split_preview(config: TrainConfig, count: int) -> dict[str, Tensor]:
    """The first images of ``<data>/lq/test`` and ``<data>/hq/test``, where there are such folders."""
    from dxr.data.datasets import ImageFolder

    root, out = data_root(config), {}
    for domain in ("lq", "hq"):
        try:
            out[domain] = torch.stack(_first(ImageFolder(_domain(root, domain, "test"), config.image_size), count))
        except FileNotFoundError:
            continue
    return out


def _bicubic_preview(config: TrainConfig, count: int) -> dict[str, Tensor]:
    """The HQ test split, else the first images of a plain image folder."""
    from dxr.data.datasets import ImageFolder

    out = _test_split_preview(config, count)
    if "hq" not in out:
        out["hq"] = torch.stack(_first(ImageFolder(data_root(config), config.image_size), count))
    return out


def _pairs_preview(config: TrainConfig, count: int) -> dict[str, Tensor]:
    """The held-out pairs and, with ``--data``, real test DRRs: what the model is for."""
    from dxr.data.datasets import ImageFolder, PairedFolder

    size = config.image_size
    pairs = _first(PairedFolder(held_out_pairs(Path(config.pairs)), size), count)
    out = {"lq": torch.stack([p[0] for p in pairs]), "hq": torch.stack([p[1] for p in pairs])}
    if config.data is not None:
        try:
            out["drr"] = torch.stack(_first(ImageFolder(_domain(Path(config.data), "lq", "test"), size), count))
        except FileNotFoundError:  # a dataset without real test DRRs: the grid shows the pairs alone
            pass
    return out


# --------------------------------------------------------------------------------------------------
# sample grids: (label, images) rows from the network (the EMA copy when kept), preview on the device


def _munit_rows(config: TrainConfig, net: nn.Module, preview: dict[str, Tensor], seed: int, device) -> list:
    torch.manual_seed(seed)  # the random styles
    count = min(preview["hq"].shape[0], preview["lq"].shape[0])
    hq, lq = preview["hq"][:count], preview["lq"][:count]
    return [("HQ", hq), ("HQ -> LQ, random style", net.hq_to_lq(hq)),
            ("HQ -> LQ, style of the LQ below", net.hq_to_lq(hq, lq)), ("LQ", lq)]


def _lq_ddpm_rows(config: TrainConfig, net: nn.Module, preview: dict[str, Tensor], seed: int, device) -> list:
    steps, size = config.sample_steps, (1, config.image_size, config.image_size)
    rows = [("samples", net.sample((config.num_samples, *size), steps=steps, seed=seed, device=device))]
    if "hq" in preview:
        hq = preview["hq"]
        t0 = min(config.sdedit_t0, config.timesteps)
        edited = net.sdedit(hq, t0, steps=max(1, steps * t0 // config.timesteps), seed=seed)
        rows += [("HQ", hq), (f"HQ -> LQ by SDEdit (t0 = {t0})", edited)]
    return rows


def _restored_rows(config: TrainConfig, net: nn.Module, preview: dict[str, Tensor], seed: int, device, *,
                   lq: Tensor, held_out: str) -> list:
    """LQ, restored, HQ; then, when the preview has real DRRs, those restored."""
    steps, hq = config.sample_steps, preview["hq"]
    restored = net.sample(tuple(hq.shape), cond=lq, steps=steps, seed=seed, device=device)
    rows = [(f"{held_out}LQ", lq), ("restored", restored), (f"{held_out}HQ", hq)]
    if "drr" in preview:
        drr = preview["drr"]
        rows += [("real DRR", drr),
                 ("DRR restored", net.sample(tuple(drr.shape), cond=drr, steps=steps, seed=seed, device=device))]
    return rows


def _pairs_rows(config: TrainConfig, net: nn.Module, preview: dict[str, Tensor], seed: int, device) -> list:
    return _restored_rows(config, net, preview, seed, device, lq=preview["lq"], held_out="held-out ")


def _bicubic_rows(config: TrainConfig, net: nn.Module, preview: dict[str, Tensor], seed: int, device) -> list:
    lq = bicubic_degrade(preview["hq"], config.bicubic_factor)
    return _restored_rows(config, net, preview, seed, device, lq=lq, held_out="")


# --------------------------------------------------------------------------------------------------
# settings


def _munit_settings(base: TrainConfig) -> dict:
    """MUNIT's own learning rate, no warm-up, clip or EMA (as NVlabs trains it)."""
    changes = dict(lr=base.munit.lr, warmup=0, grad_clip=0.0, ema=0.0)
    if base.preset == "cpu-demo":
        changes["batch_size"] = 8  # six networks a step: half the batch keeps it to minutes
    return changes


def _restorer_settings(base: TrainConfig) -> dict:
    # a few hundred steps learn the residual far sooner
    return {"residual": True} if base.preset == "cpu-demo" else {}


def _no_settings(base: TrainConfig) -> dict:
    return {}


def _no_check(config: TrainConfig) -> None:
    return None


def _check_bicubic(config: TrainConfig) -> None:
    if config.bicubic_factor > config.image_size:
        raise ConfigError(f"bicubic_factor {config.bicubic_factor} must not exceed image_size {config.image_size}")


# --------------------------------------------------------------------------------------------------
# the table


Inputs = Callable[[TrainConfig, object, Union[str, torch.device]], tuple]
Rows = Callable[[TrainConfig, nn.Module, dict, int, object], list]


@dataclass(frozen=True)
class Stage:
    """Everything that sets one training stage apart from the others."""

    name: str
    summary: str  # one line for --help: what it trains, on which data
    network: str  # the config section of its network: "unet" or "munit"
    conditional: bool  # its UNet takes the LQ image beside x_t (and with ``residual`` diffuses HQ − LQ)
    build: Callable[[TrainConfig, Optional[str]], nn.Module]  # the network, for a backend of the fused ops
    updates: Callable[[TrainConfig, nn.Module], list]  # its optimisers, in the order they step
    dataset: Callable[[TrainConfig], object]  # the training set; items as dxr.data.datasets gives them
    source: Callable[[TrainConfig], object]  # where that set comes from, as the start line names it
    inputs: Inputs  # a loader batch → the network's inputs on a device
    preview: Callable[[TrainConfig, int], dict]  # a fixed handful of held-out images for the grids
    rows: Rows  # the sample grid's (label, images) rows
    image_multiple: Callable[[TrainConfig], int]  # every image side must be a multiple of this at inference
    settings: Callable[[TrainConfig], dict] = _no_settings  # the stage's changes to a preset's values
    check: Callable[[TrainConfig], None] = _no_check  # raises ConfigError for a run it cannot take
    find_unused_parameters: bool = False  # DDP: some update leaves parameters without gradients


TABLE: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("lq-ddpm", "unconditional DDPM of LQ images (DRRs): <data>/lq/train", network="unet", conditional=False,
          build=_diffusion, updates=_denoiser_updates, dataset=_images("lq"), source=data_root, inputs=_images_in,
          preview=_test_split_preview, rows=_lq_ddpm_rows, image_multiple=_unet_multiple),
    Stage("lq-munit", "MUNIT between LQ and HQ, unpaired: <data>/lq/train and <data>/hq/train", network="munit",
          conditional=False, build=_munit, updates=_munit_updates, dataset=_unpaired_dataset, source=data_root,
          inputs=_unpaired_in, preview=_test_split_preview, rows=_munit_rows, image_multiple=_munit_multiple,
          settings=_munit_settings,
          find_unused_parameters=True),  # the discriminator update leaves the generators without gradients
    Stage("hq-ddpm", "conditional DDPM restoring LQ -> HQ on synthesised pairs: --pairs", network="unet",
          conditional=True, build=_diffusion, updates=_denoiser_updates, dataset=_pairs_dataset, source=_pairs_source,
          inputs=_pairs_in, preview=_pairs_preview, rows=_pairs_rows, image_multiple=_unet_multiple,
          settings=_restorer_settings),
    Stage("bicubic-ddpm", "the same conditional DDPM on bicubic-degraded HQ images (the baseline): <data>/hq/train",
          network="unet", conditional=True, build=_diffusion, updates=_denoiser_updates, dataset=_images("hq"),
          source=data_root, inputs=_bicubic_in, preview=_bicubic_preview, rows=_bicubic_rows,
          image_multiple=_unet_multiple, settings=_restorer_settings, check=_check_bicubic),
)}
STAGES = tuple(TABLE)


def get(name: str) -> Stage:
    """The record of stage ``name``; ConfigError naming the stages for another."""
    try:
        return TABLE[name]
    except KeyError:
        raise ConfigError(f"stage must be one of {tuple(TABLE)}, got {name!r}") from None


def of(config: TrainConfig) -> Stage:
    """The record of the stage ``config`` trains."""
    return get(config.stage)


# --------------------------------------------------------------------------------------------------
# what the training loop and the tests call


def build_net(config: TrainConfig, backend: Optional[str] = None) -> nn.Module:
    """The network a stage trains: MUNIT for ``lq-munit``, else a UNet inside :class:`GaussianDiffusion`."""
    return of(config).build(config, backend)


def make_updates(config: TrainConfig, net: nn.Module) -> list[Update]:
    """The optimisers, in the order they step: MUNIT's discriminators then generators (Adam with
    MUNIT's β and weight decay), or the denoiser (Adam)."""
    return of(config).updates(config, net)


def make_dataset(config: TrainConfig):
    """The training set of the stage; items as ``dxr.data.datasets`` gives them."""
    return of(config).dataset(config)


def inputs(config: TrainConfig, batch, device) -> tuple:
    """A loader batch → the network's inputs on ``device``: (x0, cond) for the DDPMs, (lq, hq) for MUNIT."""
    return of(config).inputs(config, batch, device)


def preview_images(config: TrainConfig, count: int) -> dict[str, Tensor]:
    """A fixed handful of held-out images (the test split when there is one) for the sample grids."""
    return of(config).preview(config, count)


@torch.no_grad()
def sample_rows(config: TrainConfig, net: nn.Module, preview: dict[str, Tensor], *, seed: int, device) -> list:
    """(label, images) rows of the sample grid for this stage, from ``net`` (the EMA copy when kept)."""
    preview = {k: v.to(device) for k, v in preview.items()}
    return of(config).rows(config, net, preview, seed, device)


__all__ = ["Stage", "TABLE", "STAGES", "get", "of", "build_net", "make_updates", "Update", "make_dataset", "inputs",
           "preview_images", "sample_rows", "bicubic_degrade", "data_root", "held_out_pairs"]

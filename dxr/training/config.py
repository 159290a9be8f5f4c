"""The full configuration of a training run, its presets, and the rules for resuming one.

A run is described by one :class:`TrainConfig` (nested dataclasses, saved as JSON beside every
checkpoint). A preset fills every field; command-line flags then override single fields.

Presets:

- ``cpu-demo`` (the default without a GPU): 64² images, a 0.7 M-parameter UNet (base 16 channels,
  levels ×1/×2/×4, attention at 16², cosine schedule, v-prediction), Adam at 1e-3, batch 16,
  300 steps — about two minutes on 2 CPU cores, after which the samples are recognisable chests — and
  a small MUNIT (dim 16, batch 8) for ``lq-munit``. Its restoring DDPMs (``hq-ddpm``, ``bicubic-ddpm``) are
  residual (``residual``: they diffuse HQ − LQ, as SRDiff does, rather than HQ as SR3 does): after a
  few hundred steps that is about 1 dB closer to HQ on bicubic pairs (200 steps at 32²: 22.4 against
  21.5 dB). The paper preset keeps SR3's formulation.
- ``paper`` (the default with a GPU): 256² images and the model scale of the works DiffusionXRay
  builds on — the DDPM/ADM UNet of Ho et al. and Dhariwal & Nichol (base 128 channels, levels
  ×1/×1/×2/×2/×4/×4, two residual blocks per level, attention at 16² in heads of 64 channels, dropout 0.1),
  linear schedule with T = 1000 and ε-prediction, Adam at 1e-4, batch 16, EMA 0.9999, bf16 autocast,
  grad-norm clip 1, 200 k steps; MUNIT with NVlabs' defaults (dim 64, style 8, MLP 256, 2 down-samplings,
  4 residual blocks, 3-scale discriminators of 4 layers, Adam 1e-4 with β = (0.5, 0.999)).
  The DiffusionXRay paper does not list its hyper-parameters; these are the published defaults of the
  models it uses, scaled to its 256² radiographs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

from dxr.models.munit import MUNITConfig
from dxr.models.unet import UNetConfig

PRESETS = ("cpu-demo", "paper")
PRECISIONS = ("fp32", "bf16", "fp16")


class ConfigError(ValueError):
    """A run that cannot start as asked: a bad setting, or a checkpoint it cannot continue."""


def _stage(name: str):
    """The record of stage ``name`` in ``dxr.training.stages.TABLE`` (ConfigError for another name)."""
    from dxr.training import stages  # it builds on this module, so it is imported when first needed

    return stages.get(name)


# Fields a resumed run may change: how long it runs, where and how fast, and how often it reports.
RESUMABLE = frozenset({
    "preset", "steps", "out", "resume", "device", "backend", "compile", "sample_every", "save_every",
    "log_every", "num_workers", "num_samples", "progress",
})


@dataclass
class TrainConfig:
    """Everything that defines a training run (see the module docstring for the presets)."""

    stage: str = "lq-ddpm"
    preset: str = "cpu-demo"
    data: Optional[str] = None  # dataset root (lq/, hq/); None: the embedded default
    pairs: Optional[str] = None  # hq-ddpm: a paired folder (lq/, hq/) made by synthesis
    out: Optional[str] = None  # None: runs/<stage>
    resume: bool = False
    steps: int = 300
    batch_size: int = 16
    image_size: int = 64
    lr: float = 1e-3
    warmup: int = 0  # steps of linear learning-rate warm-up
    grad_clip: float = 1.0
    ema: float = 0.99  # EMA decay of the sampled weights; 0 turns EMA off
    seed: int = 0
    device: str = "cpu"
    backend: Optional[str] = None
    precision: str = "fp32"
    compile: bool = False
    channels_last: bool = False
    sample_every: int = 100
    save_every: int = 100
    log_every: int = 10
    num_samples: int = 16
    num_workers: int = 0
    progress: bool = True
    # diffusion stages
    schedule: str = "cosine"
    timesteps: int = 1000
    prediction: str = "v"
    sample_steps: int = 50  # DDIM steps of the sample grids
    sdedit_t0: int = 300  # lq-ddpm grid: HQ images diffused this many steps, then denoised
    bicubic_factor: int = 4  # bicubic-ddpm: down- and up-sampling factor of the degradation
    residual: bool = False  # hq-ddpm, bicubic-ddpm: diffuse HQ − LQ (as SRDiff) and restore LQ + it
    unet: UNetConfig = field(default_factory=UNetConfig)
    munit: MUNITConfig = field(default_factory=MUNITConfig)

    def __post_init__(self):
        _stage(self.stage)
        if self.preset not in PRESETS:
            raise ConfigError(f"preset must be one of {PRESETS}, got {self.preset!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("steps", "batch_size", "image_size", "sample_every", "save_every", "log_every", "timesteps"):
            if getattr(self, name) < (0 if name == "steps" else 1):
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"ema must be a decay in [0, 1), got {self.ema}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a finite learning rate > 0, got {self.lr}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ConfigError(f"grad_clip must be a finite norm >= 0 (0: off), got {self.grad_clip}")
        for name in ("warmup", "num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("num_samples", "sample_steps", "sdedit_t0", "bicubic_factor"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if isinstance(self.unet, dict):
            self.unet = UNetConfig(**self.unet)
        if isinstance(self.munit, dict):
            self.munit = MUNITConfig(**self.munit)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        return cls(**json.loads(text))


def preset(name: str, stage: str = "lq-ddpm", **changes) -> TrainConfig:
    """The configuration of preset ``name`` for ``stage`` (the preset's values, then the stage's own, from its
    record's ``settings`` in ``dxr.training.stages``), with ``changes`` applied to top-level fields."""
    if name == "cpu-demo":
        base = TrainConfig(
            stage=stage, preset=name,
            unet=UNetConfig(base_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, attention_resolutions=(16,),
                            image_size=64, num_head_channels=32, num_groups=8),
            munit=MUNITConfig(dim=16, mlp_dim=64, n_res=2, dis_dim=16, dis_layers=3, dis_scales=2),
        )
    elif name == "paper":
        base = TrainConfig(
            stage=stage, preset=name, steps=200_000, batch_size=16, image_size=256, lr=1e-4, warmup=1000,
            ema=0.9999, device="cuda", precision="bf16", channels_last=True, sample_every=5000, save_every=5000,
            log_every=50, num_workers=4, schedule="linear", prediction="eps", sample_steps=100,
            unet=UNetConfig(base_channels=128, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                            attention_resolutions=(16,), image_size=256, dropout=0.1, num_head_channels=64,
                            num_groups=32),
            munit=MUNITConfig(),
        )
    else:
        raise ConfigError(f"preset must be one of {PRESETS}, got {name!r}")
    base = dataclasses.replace(base, **_stage(stage).settings(base))
    return replace(base, **changes)


def replace(config: TrainConfig, **changes) -> TrainConfig:
    """A copy of ``config`` with top-level ``changes``. The UNet follows the run: its image size is
    ``image_size``, and it takes a conditioning image exactly when the stage is conditional."""
    new = dataclasses.replace(config, **changes)
    cond_channels = new.unet.in_channels if _stage(new.stage).conditional else 0
    new.unet = dataclasses.replace(new.unet, image_size=new.image_size, cond_channels=cond_channels)
    return new


def _parse_value(text: str, kind, key: str):
    """``text`` as a value of the annotated type ``kind`` (bool, int, float, str, tuple of ints, Optional)."""
    options = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) is typing.Union:
        if text.lower() == "none":
            return None
        kind = options[0]
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key} takes true or false, got {text!r}")
    try:
        if kind is tuple:
            return tuple(int(v) for v in text.split(",") if v.strip())
        return kind(text)
    except ValueError as err:
        raise ConfigError(f"{key}: {err}") from None


def apply_overrides(config: TrainConfig, assignments: list[str]) -> TrainConfig:
    """Apply ``KEY=VALUE`` strings (``unet.base_channels=32``, ``unet.channel_mult=1,2,2``, ``timesteps=200``).

    Raises ConfigError for an unknown key or a value of the wrong type.
    """
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep:
            raise ConfigError(f"--set takes KEY=VALUE, got {assignment!r}")
        target, name = config, key
        if "." in key:
            section, name = key.split(".", 1)
            if section not in ("unet", "munit"):
                raise ConfigError(f"unknown section {section!r} in {key!r} (unet or munit)")
            target = getattr(config, section)
        known = {f.name for f in fields(target)}
        if name not in known:
            raise ConfigError(f"unknown setting {key!r}; known: {', '.join(sorted(known))}")
        value = _parse_value(text, typing.get_type_hints(type(target))[name], key)
        if target is config:
            config = replace(config, **{name: value})
        else:
            setattr(config, section, dataclasses.replace(target, **{name: value}))
    return replace(config)


def check_device(device: str) -> None:
    """Raise ConfigError unless ``device`` names a torch device this machine has (cpu, cuda[:N], mps)."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"device must be cpu, cuda or cuda:N, got {device!r}") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(f"device {device!r}: {why}; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"device {device!r}: MPS is not available on this machine; use --device cpu")
    elif parsed.type != "cpu":
        raise ConfigError(f"device must be cpu, cuda, cuda:N or mps, got {device!r}")


def check_backend(backend: Optional[str], device: str) -> None:
    """Raise ConfigError unless every fused op can run with ``backend`` on ``device`` (call after
    :func:`check_device`)."""
    import torch

    from dxr import ops

    probe = torch.empty(1, device=device)
    for op in ops.OPS:
        try:
            ops.resolve_backend(backend, op, probe)
        except (RuntimeError, ValueError) as err:
            raise ConfigError(f"backend {backend!r} on device {device!r}: {err}") from None


def check_runnable(config: TrainConfig) -> None:
    """Raise ConfigError, naming the setting and what it needs, for a run that would fail once started:
    a device this machine lacks, a backend that cannot run there, a network that cannot be built, or
    an image size the network cannot take."""
    check_device(config.device)
    check_backend(config.backend, config.device)
    stage = _stage(config.stage)
    try:
        getattr(config, stage.network).validate()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if stage.network == "munit":
        multiple = config.munit.size_multiple
        why = (f"MUNIT halves it up to {multiple.bit_length() - 1} times: munit.n_downsample, "
               "munit.style_downsample, munit.dis_layers + munit.dis_scales - 1")
    else:
        multiple = config.unet.size_multiple
        why = f"the UNet halves it at each of its {len(config.unet.channel_mult) - 1} lower levels (unet.channel_mult)"
    if config.image_size % multiple:
        below, above = config.image_size // multiple * multiple, (config.image_size // multiple + 1) * multiple
        nearest = f"{below} or {above}" if below else f"{above}"
        raise ConfigError(f"image_size {config.image_size} must be a multiple of {multiple} ({why}); "
                          f"try {nearest}")
    stage.check(config)


def differences(saved: TrainConfig, requested: TrainConfig) -> list[str]:
    """The settings that differ between a checkpoint's config and this run's, outside :data:`RESUMABLE`,
    each as ``"name: checkpoint <a>, this run <b>"``."""

    def flat(config: TrainConfig) -> dict:
        out = {}
        for key, value in asdict(config).items():
            if isinstance(value, dict):
                out.update({f"{key}.{k}": v for k, v in value.items()})
            elif key not in RESUMABLE:
                out[key] = value
        return out

    a, b = flat(saved), flat(requested)
    return [f"{k}: checkpoint {a.get(k)!r}, this run {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if json.dumps(a.get(k)) != json.dumps(b.get(k))]

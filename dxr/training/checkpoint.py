"""Checkpoints of a training run: one safetensors file and a JSON of the full configuration.

``checkpoint.safetensors`` holds every tensor needed to continue — the trained network (``net.*``),
its EMA copy (``ema.*``) and the optimiser moments (``optim.<update>.<param>.<key>``) — and a header
(safetensors metadata) with the configuration, the step, the optimisers' hyper-parameters, the
gradient scaler and the data-order state. ``config.json`` repeats the configuration for people and
tools. Both are written to a temporary file beside the target and renamed over it, so a crash never
leaves a half-written checkpoint; the temporary a killed process leaves is removed when the next run
starts (:func:`remove_stale_temporaries`).

The random state needs no saving: every step seeds torch from (seed, rank, step) and every data item
from (seed, epoch, position) (see ``dxr.training.data``), so the step number restores it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor, nn

from dxr.training.config import ConfigError, TrainConfig, differences

FORMAT = "dxr-train/1"
CHECKPOINT = "checkpoint.safetensors"
CONFIG = "config.json"

PathLike = Union[str, os.PathLike]


def atomic_write(path: Path, write) -> Path:
    """Call ``write(tmp)`` for a temporary path beside ``path``, then rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(out: PathLike) -> list[Path]:
    """Delete the temporaries (``.<name>.tmp-<pid>``) that a process killed mid-write left in ``out``,
    those of processes no longer running; returns what was removed."""
    out = Path(out)
    removed = []
    for tmp in out.glob(".*.tmp-*") if out.is_dir() else ():
        pid = tmp.name.rpartition(".tmp-")[2]
        if tmp.is_file() and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _cpu(t: Tensor) -> Tensor:
    # safetensors stores dense CPU tensors; channels_last weights are copied to the plain layout
    return t.detach().to("cpu", copy=True).contiguous()


def save_checkpoint(out: PathLike, *, config: TrainConfig, step: int, net: nn.Module, ema: Optional[nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer], scaler: Optional[torch.amp.GradScaler],
                    data_state: dict, log_window: Optional[dict] = None) -> Path:
    """Write ``out/checkpoint.safetensors`` and ``out/config.json`` atomically; returns the checkpoint path.

    ``log_window``: the metrics logging window open at ``step`` (``{"start": step, "sums": {name: float}}``),
    so that a run resumed mid-window logs the record an uninterrupted run would."""
    from safetensors.torch import save_file

    tensors = {f"net.{k}": _cpu(v) for k, v in net.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": _cpu(v) for k, v in ema.state_dict().items()})
    optimizer_header = {}
    for name, optimizer in optimizers.items():
        state = optimizer.state_dict()
        header = {"param_groups": state["param_groups"], "state": {}}
        for index, values in state["state"].items():
            for key, value in values.items():
                if isinstance(value, Tensor):
                    tensors[f"optim.{name}.{index}.{key}"] = _cpu(value)
                else:
                    header["state"].setdefault(str(index), {})[key] = value
        optimizer_header[name] = header
    metadata = {
        "format": FORMAT,
        "config": config.to_json(),
        "state": json.dumps({
            "step": step,
            "optimizers": optimizer_header,
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
            "data": data_state,
            "log_window": log_window,
        }),
    }
    out = Path(out)
    path = atomic_write(out / CHECKPOINT, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    atomic_write(out / CONFIG, lambda tmp: tmp.write_text(config.to_json() + "\n"))
    return path


@dataclass
class Checkpoint:
    """A checkpoint read back: its configuration, step, header state and tensors (on the CPU)."""

    path: Path
    config: TrainConfig
    step: int
    state: dict
    tensors: dict[str, Tensor]

    def group(self, prefix: str) -> dict[str, Tensor]:
        """The tensors under ``prefix.``, with the prefix removed."""
        start = len(prefix) + 1
        return {k[start:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}


def _open(path: PathLike, *, tensors: bool) -> tuple[Path, dict, dict]:
    """(file, header metadata, tensors — empty unless ``tensors``) of a checkpoint file or run folder."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise ConfigError(f"{path} is not a dxr training checkpoint (format {metadata.get('format')!r}, "
                                  f"expected {FORMAT!r})")
            loaded = {key: handle.get_tensor(key) for key in handle.keys()} if tensors else {}
    except ConfigError:
        raise
    except Exception as err:  # safetensors' own error: empty, truncated, corrupt, or another format (a pickle)
        size = path.stat().st_size
        raise ConfigError(f"{path} is not a readable checkpoint ({size} bytes: {' '.join(str(err).split())}); "
                          "it may be cut short by a crash or not a safetensors file: resume from another copy "
                          "or start a new run") from None
    return path, metadata, loaded


def read_checkpoint(path: PathLike, *, tensors: bool = True) -> Checkpoint:
    """Read a checkpoint file (or the one in a run folder); ``tensors=False`` reads its header alone
    (config, step and state, no weights). Raises FileNotFoundError when it is missing and ConfigError,
    naming the file, when it is unreadable (empty, truncated, corrupt, another format) or not a dxr
    training checkpoint."""
    path, metadata, loaded = _open(path, tensors=tensors)
    try:
        state = json.loads(metadata["state"])
        return Checkpoint(path, TrainConfig.from_json(metadata["config"]), int(state["step"]), state, loaded)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{path}: the checkpoint's header is incomplete or of another dxr version "
                          f"({type(err).__name__}: {' '.join(str(err).split())})") from None


def check_compatible(checkpoint: Checkpoint, config: TrainConfig) -> None:
    """Raise ConfigError, naming every differing setting, when ``config`` cannot continue ``checkpoint``."""
    diff = differences(checkpoint.config, config)
    if diff:
        raise ConfigError(
            f"cannot resume from {checkpoint.path}: it was trained with a different configuration\n  "
            + "\n  ".join(diff)
            + "\nresume with the checkpoint's settings (drop the conflicting flags), or start a new run in "
              "another --out folder"
        )


def restore(checkpoint: Checkpoint, *, net: nn.Module, ema: Optional[nn.Module],
            optimizers: dict[str, torch.optim.Optimizer], scaler: Optional[torch.amp.GradScaler]) -> int:
    """Load a checkpoint's tensors and state into a freshly built run; returns the step to continue from."""
    net.load_state_dict(checkpoint.group("net"))
    if ema is not None:
        saved = checkpoint.group("ema")
        ema.load_state_dict(saved if saved else checkpoint.group("net"))
    for name, optimizer in optimizers.items():
        header = checkpoint.state["optimizers"][name]
        tensors = checkpoint.group(f"optim.{name}")
        state: dict[int, dict] = {int(i): dict(values) for i, values in header["state"].items()}
        for key, value in tensors.items():
            index, field = key.split(".", 1)
            state.setdefault(int(index), {})[field] = value
        optimizer.load_state_dict({"state": state, "param_groups": header["param_groups"]})
    if scaler is not None and checkpoint.state.get("scaler"):
        scaler.load_state_dict(checkpoint.state["scaler"])
    return checkpoint.step


def load_trained(path: PathLike, *, device="cpu", ema: bool = True, backend: Optional[str] = None):
    """The trained network of a run, for inference: ``(net, config)``.

    ``net`` is a :class:`dxr.diffusion.GaussianDiffusion` (its ``denoiser`` a :class:`dxr.models.UNet`) for
    the diffusion stages and a :class:`dxr.models.MUNIT` for ``lq-munit``, in eval mode on ``device``,
    with the EMA weights when the run kept them and ``ema`` is true. ``backend`` picks its kernels.
    """
    from dxr.training.stages import build_net

    checkpoint = read_checkpoint(path)
    net = build_net(checkpoint.config, backend=backend)
    weights = checkpoint.group("ema") if ema else {}
    net.load_state_dict(weights or checkpoint.group("net"))
    return net.to(device).eval(), checkpoint.config


__all__ = ["save_checkpoint", "read_checkpoint", "check_compatible", "restore", "load_trained", "Checkpoint",
           "atomic_write", "remove_stale_temporaries", "CHECKPOINT", "CONFIG"]

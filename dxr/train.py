"""Train one DiffusionXRay stage: ``python -m dxr.train --stage {lq-ddpm,lq-munit,hq-ddpm,bicubic-ddpm}``.

With no other flag it trains DDPM-LQ on the embedded default dataset with the ``cpu-demo`` preset
(``paper`` on a GPU) and writes into ``runs/<stage>/``: ``checkpoint.safetensors`` + ``config.json``,
``metrics.jsonl``, ``samples/step_NNNNNNN.png`` and ``loss.png``. ``--resume`` continues a run exactly
where its checkpoint left it; Ctrl-C finishes the current step, saves and exits. Several GPUs or
machines: ``torchrun --nproc_per_node=N -m dxr.train ...`` (DistributedDataParallel; rank 0 logs and saves).
``--profile nvtx`` marks the phases of each step (``train.data``, ``train.forward``, ``train.backward``,
``train.optimizer``) for ``nsys profile -t cuda,nvtx``; ``--profile torch`` writes them in a torch.profiler
trace, ``runs/<stage>/trace.json``.

The pieces: ``dxr.training.config`` (settings, presets), ``stages`` (one record per stage: networks, data,
grids), ``data`` (resumable data order), ``checkpoint`` and ``report`` (metrics and its logging window, grids).
"""

from __future__ import annotations

import argparse
import copy
import os
import signal
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from dxr import profiling
from dxr.cli import run
from dxr.training import stages
from dxr.training.checkpoint import (CHECKPOINT, check_compatible, read_checkpoint, remove_stale_temporaries, restore,
                                     save_checkpoint)
from dxr.training.config import (PRECISIONS, PRESETS, ConfigError, TrainConfig, apply_overrides, check_runnable,
                                 preset, replace)
from dxr.training.data import SeededItems, StepBatches, seed_step
from dxr.training.report import MetricsLog, save_grid, save_loss_curve

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(config: TrainConfig, device: torch.device) -> torch.autocast:
    """Mixed precision as ``config.precision`` asks (off for fp32)."""
    return torch.autocast(device.type, dtype=AMP_DTYPES.get(config.precision), enabled=config.precision != "fp32")


# --------------------------------------------------------------------------------------------------
# one step


def train_step(model: nn.Module, updates: Sequence[stages.Update], inputs: tuple, config: TrainConfig,
               scaler: torch.amp.GradScaler, device: torch.device) -> dict[str, torch.Tensor]:
    """One optimiser step per update (forward under autocast, backward, clip, step); returns the
    detached losses, ``"<part>"`` and ``"<part>/<term>"``, still on the device."""
    logs = {}
    for update in updates:
        update.optimizer.zero_grad(set_to_none=True)
        with profiling.region("train.forward"), autocast(config, device):
            loss, parts = model(*inputs, update.part)
        with profiling.region("train.backward"):
            scaler.scale(loss).backward()
        with profiling.region("train.optimizer"):
            if config.grad_clip > 0:
                scaler.unscale_(update.optimizer)
                torch.nn.utils.clip_grad_norm_(update.parameters, config.grad_clip)
            scaler.step(update.optimizer)
            scaler.update()
        logs[update.part] = loss.detach().float()
        logs.update({f"{update.part}/{k}": v.detach().float() for k, v in parts.items()})
    return logs


@torch.no_grad()
def update_ema(ema: nn.Module, net: nn.Module, decay: float, step: int) -> None:
    """ema ← decay·ema + (1 - decay)·net, with the decay ramped up over the first steps."""
    decay = min(decay, (1 + step) / (10 + step))
    ema_params, params = list(ema.parameters()), list(net.parameters())
    torch._foreach_lerp_(ema_params, params, 1 - decay)
    for e, b in zip(ema.buffers(), net.buffers()):
        e.copy_(b)


def learning_rate(config: TrainConfig, step: int) -> float:
    """Constant after a linear warm-up of ``config.warmup`` steps."""
    return config.lr * min(1.0, (step + 1) / config.warmup) if config.warmup else config.lr


# --------------------------------------------------------------------------------------------------
# processes and signals


def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process; under torchrun, joins the process group
    (NCCL on GPUs, gloo on CPUs) and takes the GPU of its local rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device(device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world, torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current step; a second Ctrl-C stops at
    once. Under DDP the ranks agree (an all-reduce at log steps) so that they stop at the same step."""

    def __init__(self, world: int):
        self.requested, self.world = False, world
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def should_stop(self, at_log_step: bool, device: torch.device) -> bool:
        if self.world == 1:
            return self.requested
        if not at_log_step:
            return False
        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------------------------------
# the loop


def train(config: TrainConfig, profile: Optional[str] = None) -> Path:
    """Run (or resume) the training described by ``config``; returns the run folder.

    ``profile`` ("none", "nvtx", "torch"; see :mod:`dxr.profiling`) profiles the training loop; "torch"
    writes ``trace.json`` into the run folder (``rank<N>/`` below it for the other processes of a DDP run).
    Raises ConfigError before any work for a run that cannot start (see ``check_runnable``)."""
    profile = profiling.check_mode(profile)
    check_runnable(config)
    stage = stages.of(config)
    rank, world, device = setup_distributed(config.device)
    master = rank == 0
    out = Path(config.out or f"runs/{config.stage}")
    checkpoint = read_checkpoint(out) if config.resume else None
    if checkpoint is not None:
        check_compatible(checkpoint, config)

    torch.manual_seed(config.seed)  # the initial weights (DDP then copies rank 0's to every rank)
    net = stage.build(config, config.backend).to(device)
    if config.channels_last:
        net = net.to(memory_format=torch.channels_last)
    updates = stage.updates(config, net)
    optimizers = {u.part: u.optimizer for u in updates}
    ema = copy.deepcopy(net).requires_grad_(False).eval() if config.ema > 0 else None
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    dataset = stage.dataset(config)
    start = restore(checkpoint, net=net, ema=ema, optimizers=optimizers, scaler=scaler) if checkpoint else 0
    sampler = StepBatches(len(dataset), config.batch_size, seed=config.seed, start=start, rank=rank, world_size=world)
    if checkpoint is not None and checkpoint.state["data"] != sampler.state():
        raise ConfigError(f"cannot resume from {checkpoint.path} exactly: the data order was "
                          f"{checkpoint.state['data']}, now {sampler.state()} (a changed dataset or number of processes)")
    loader = torch.utils.data.DataLoader(SeededItems(dataset), batch_sampler=sampler, num_workers=config.num_workers,
                                         pin_memory=device.type == "cuda", persistent_workers=config.num_workers > 0)
    model = net
    if world > 1:
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None,
                                                    find_unused_parameters=stage.find_unused_parameters)
    if config.compile:
        model = torch.compile(model)

    stale = remove_stale_temporaries(out) if master else []
    notes = [f"removed {p}, left by a process killed while writing" for p in stale]
    log = MetricsLog(out, resume_step=start if checkpoint else None,
                     images_per_step=config.batch_size * world) if master else None
    notes += log.notes if master else []
    preview = stage.preview(config, min(8, config.num_samples)) if master else None
    written = {}

    def save(step: int) -> None:
        if master:
            save_checkpoint(out, config=config, step=step, net=net, ema=ema, optimizers=optimizers, scaler=scaler,
                            data_state=sampler.state(), log_window=log.window_state())

    def sample(step: int) -> None:
        if not master:
            return
        shown = ema if ema is not None else net
        shown.eval()
        with autocast(config, device):
            rows = stages.sample_rows(config, shown, preview, seed=config.seed, device=device)
        net.train()
        grid = out / "samples" / f"step_{step:07d}.png"
        written["samples"] = save_grid(rows, grid, title=f"{config.stage}, step {step}")
        written["loss curve"] = save_loss_curve(log.series(), out / "loss.png") or written.get("loss curve")

    if master:
        size = sum(p.numel() for p in net.parameters())
        print(f"dxr.train {config.stage}: {len(dataset)} images from {stage.source(config)}, "
              f"{size / 1e6:.2f} M parameters, {config.steps} steps of batch {config.batch_size} at "
              f"{config.image_size}² on {device}{f' x{world}' if world > 1 else ''} ({config.preset} preset, "
              f"{config.precision}) -> {out}" + (f", resuming at step {start}" if checkpoint else ""), flush=True)
        for note in notes:
            print(f"note: {note}", flush=True)
    stop = StopRequest(world)
    batches = iter(loader)
    progress = None
    if master and config.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=config.steps, initial=start, desc=config.stage, unit="step", dynamic_ncols=True)
    if master:
        # the logging window open at the checkpoint: a run resumed mid-window logs what an uninterrupted one does
        window = (checkpoint.state.get("log_window") if checkpoint else None) or {"start": start, "sums": {}}
        log.open_window(window["start"], window["sums"], device=device)
    step = start
    try:
        net.train()
        with profiling.session(profile, out if master else out / f"rank{rank}"):
            while step < config.steps:
                with profiling.region("train.data"):
                    inputs = stage.inputs(config, next(batches), device)
                seed_step(config.seed, rank, step)  # dropout, timesteps, noise, styles: a function of the step
                for update in updates:
                    for group in update.optimizer.param_groups:
                        group["lr"] = learning_rate(config, step)
                logs = train_step(model, updates, inputs, config, scaler, device)
                if ema is not None:
                    update_ema(ema, net, config.ema, step)
                step += 1
                at_log = step % config.log_every == 0 or step == config.steps
                if master:
                    log.add(logs)
                    if at_log:
                        record = log.write_window(step, lr=learning_rate(config, step - 1))
                        if progress is not None:
                            progress.set_postfix({**{k: f"{record[k]:.4f}" for k in optimizers},
                                                  "img/s": f"{log.images_per_s:.1f}"})
                if progress is not None:
                    progress.update(1)
                if stop.should_stop(at_log, device):
                    break
                if step % config.save_every == 0 and step < config.steps:
                    save(step)
                if step % config.sample_every == 0 and step < config.steps:
                    sample(step)
    finally:
        stop.close()
        if progress is not None:
            progress.close()
    save(step)
    if step == config.steps:
        sample(step)
    if master:
        reason = "stopped by request" if stop.requested else "done"
        outputs = [f"checkpoint {out / CHECKPOINT}", f"metrics {log.path}"]
        if profile == "torch":
            outputs.append(f"profile {out / profiling.TRACE}")
        outputs += [f"{name} {path.parent if name == 'samples' else path}" for name, path in written.items() if path]
        print(f"{reason} at step {step}: {', '.join(outputs)}", flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if stop.requested:
        raise SystemExit(130)
    return out


# --------------------------------------------------------------------------------------------------
# command line

DEFAULT_STAGE = "lq-ddpm"
# settings the help's table leaves out: paths and run control, which have no preset value
_UNLISTED = {"stage", "preset", "data", "pairs", "out", "resume", "device", "backend", "progress"}
PROFILE_HELP = ("none (default): nothing; "
                "nvtx: the phases of each step (train.data, train.forward, train.backward, train.optimizer) become "
                "NVTX ranges for Nsight Systems, as DXR_NVTX=1 does: nsys profile -t cuda,nvtx -o dxr-train "
                "python -m dxr.train --profile nvtx ...; "
                "torch: torch.profiler records the training loop (CPU, and CUDA on a GPU) with those phases named, "
                "and writes <out>/trace.json (chrome://tracing or ui.perfetto.dev)")


def _text(value) -> str:
    """A setting's value as ``--set`` takes it."""
    if value is None or isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def _preset_values(stage: str) -> dict[str, dict[str, str]]:
    """Every listed setting of ``stage`` → {preset: its value}: the top-level ones, then the stage's network."""
    section = stages.get(stage).network
    table: dict[str, dict[str, str]] = {}
    for name in PRESETS:
        config = asdict(preset(name, stage))
        for key, value in config.items():
            if key == section:
                for sub, v in value.items():
                    table.setdefault(f"{key}.{sub}", {})[name] = _text(tuple(v) if isinstance(v, list) else v)
            elif not isinstance(value, dict) and key not in _UNLISTED:
                table.setdefault(key, {})[name] = _text(value)
    return table


def _per_preset(values: dict[str, str]) -> str:
    """"300 in cpu-demo, 200000 in paper", or "16 in every preset"."""
    if len(set(values.values())) == 1:
        return f"{next(iter(values.values()))} in every preset"
    return ", ".join(f"{v} in {name}" for name, v in values.items())


def _epilog(stage: str, values: dict[str, dict[str, str]]) -> str:
    width = max(map(len, values)) + 2
    lines = ["stages:"] + [f"  {s.name:<14}{s.summary}" for s in stages.TABLE.values()]
    which = f"--stage {stage}" + (" (the default)" if stage == DEFAULT_STAGE else "")
    lines += ["", f"settings of {which} in each preset; a flag or --set KEY=VALUE changes one,",
              "--stage STAGE --help shows another stage's:",
              (f"  {'KEY':<{width}}" + "".join(f"{name:<12}" for name in PRESETS)).rstrip()]
    lines += [f"  {key:<{width}}" + "".join(f"{per.get(name, ''):<12}" for name in PRESETS).rstrip()
              for key, per in values.items()]
    lines += ["", "profiling on a GPU: nsys profile -t cuda,nvtx -o dxr-train python -m dxr.train --profile nvtx ..."]
    return "\n".join(lines)


def _stage_named(argv: Optional[Sequence[str]]) -> str:
    """The --stage in ``argv`` (the default when there is none, or one the full parser will refuse)."""
    pre = argparse.ArgumentParser(prog="python -m dxr.train", add_help=False)
    pre.add_argument("--stage")
    stage = pre.parse_known_args(argv)[0].stage
    return stage if stage in stages.TABLE else DEFAULT_STAGE


def _parser(stage: str = DEFAULT_STAGE) -> argparse.ArgumentParser:
    """The command's flags; their help and the epilog give the presets' values for ``stage``."""
    values = _preset_values(stage)

    def of(key: str) -> str:
        return _per_preset(values[key])

    p = argparse.ArgumentParser(prog="python -m dxr.train", description=__doc__.split("\n\n")[0].replace("``", ""),
                                argument_default=argparse.SUPPRESS, epilog=_epilog(stage, values),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=stages.STAGES, help=f"what to train (default {DEFAULT_STAGE}); see stages below")
    p.add_argument("--preset", choices=PRESETS, help="cpu-demo (default on a CPU) or paper (default on a GPU); "
                   "their values are listed below and in dxr/training/config.py")
    p.add_argument("--data", help="dataset root with lq/ and hq/ (default: the embedded default dataset)")
    p.add_argument("--pairs", help="hq-ddpm: paired folder with lq/ and hq/ (from synthesis)")
    p.add_argument("--out", help="run folder (default runs/<stage>)")
    p.add_argument("--steps", type=int, help=f"total training steps ({of('steps')})")
    p.add_argument("--batch-size", type=int, dest="batch_size",
                   help=f"images per step and process ({of('batch_size')})")
    p.add_argument("--image-size", type=int, dest="image_size",
                   help=f"training resolution, square ({of('image_size')})")
    p.add_argument("--lr", type=float, help=f"learning rate ({of('lr')})")
    p.add_argument("--seed", type=int, help=f"seed of the data order, noise and initialisation ({of('seed')})")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default cuda when available, else cpu)")
    p.add_argument("--backend", choices=("auto", "torch", "triton", "cuda"),
                   help="kernels of the fused ops (default: DXR_BACKEND, else auto)")
    p.add_argument("--precision", choices=PRECISIONS, help=f"fp32, or bf16/fp16 autocast ({of('precision')})")
    p.add_argument("--compile", action="store_true", help=f"torch.compile the network ({of('compile')})")
    p.add_argument("--ema", type=float, help=f"EMA decay of the sampled weights, 0: off ({of('ema')})")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--sample-every", type=int, dest="sample_every",
                   help=f"steps between sample grids ({of('sample_every')})")
    p.add_argument("--save-every", type=int, dest="save_every", help=f"steps between checkpoints ({of('save_every')})")
    p.add_argument("--log-every", type=int, dest="log_every", help=f"steps between metrics records ({of('log_every')})")
    p.add_argument("--no-progress", action="store_false", dest="progress", help="no progress bar")
    profiling.add_argument(p, PROFILE_HELP, default=None)
    p.add_argument("--set", action="append", dest="overrides", metavar="KEY=VALUE",
                   help="any other setting (listed below), e.g. unet.base_channels=32, unet.channel_mult=1,2,2, "
                        "timesteps=200")
    return p


def _parse(argv: Optional[Sequence[str]]) -> tuple[TrainConfig, str]:
    """(the run's configuration, the --profile mode)."""
    flags = vars(_parser(_stage_named(argv)).parse_args(argv))
    overrides = flags.pop("overrides", [])
    profile = flags.pop("profile", "none")
    if flags.get("resume"):
        out = Path(flags.get("out") or f"runs/{flags.get('stage', DEFAULT_STAGE)}")
        base = replace(read_checkpoint(out, tensors=False).config, out=str(out))
    else:
        cuda = torch.cuda.is_available()
        name = flags.get("preset", "paper" if cuda else "cpu-demo")
        base = preset(name, flags.get("stage", DEFAULT_STAGE), device="cuda" if cuda else "cpu")
    return apply_overrides(replace(base, **flags), overrides), profile


def config_from_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """The run's configuration: the checkpoint's when resuming, else the preset's; then the flags given."""
    return _parse(argv)[0]


def _main(argv: Optional[Sequence[str]] = None) -> int:
    config, profile = _parse(argv)
    train(config, profile=profile)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; returns its exit status: 0, 2 with one line on stderr for a run that cannot start
    (see :mod:`dxr.cli`), 130 when stopped by Ctrl-C."""
    return run(_main, argv, prog="python -m dxr.train")


if __name__ == "__main__":
    sys.exit(main())

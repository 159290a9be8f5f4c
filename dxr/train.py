"""Train one DiffusionXRay stage: ``python -m dxr.train --stage {lq-ddpm,lq-munit,hq-ddpm,bicubic-ddpm}``.

With no other flag it trains DDPM-LQ on the embedded default dataset with the ``cpu-demo`` preset
(``paper`` on a GPU) and writes into ``runs/<stage>/``: ``checkpoint.safetensors`` + ``config.json``,
``metrics.jsonl``, ``samples/step_NNNNNNN.png`` and ``loss.png``. ``--resume`` continues a run exactly
where its checkpoint left it; Ctrl-C finishes the current step, saves and exits. Several GPUs or
machines: ``torchrun --nproc_per_node=N -m dxr.train ...`` (DistributedDataParallel; rank 0 logs and saves).

The pieces: ``dxr.training.config`` (settings, presets), ``stages`` (networks, data, grids),
``data`` (resumable data order), ``checkpoint`` and ``report``.
"""

from __future__ import annotations

import argparse
import copy
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from dxr.cli import run
from dxr.training import stages
from dxr.training.checkpoint import (CHECKPOINT, check_compatible, read_checkpoint, remove_stale_temporaries, restore,
                                     save_checkpoint)
from dxr.training.config import (PRECISIONS, PRESETS, STAGES, ConfigError, TrainConfig, apply_overrides,
                                 check_runnable, preset, replace)
from dxr.training.data import SeededItems, StepBatches, seed_step
from dxr.training.report import MetricsLog, save_grid, save_loss_curve

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------------------------------
# one step


def train_step(model: nn.Module, updates: Sequence[stages.Update], inputs: tuple, config: TrainConfig,
               scaler: torch.amp.GradScaler, device: torch.device) -> dict[str, torch.Tensor]:
    """One optimiser step per update (forward under autocast, backward, clip, step); returns the
    detached losses, ``"<part>"`` and ``"<part>/<term>"``, still on the device."""
    logs = {}
    for update in updates:
        update.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=AMP_DTYPES.get(config.precision), enabled=config.precision != "fp32"):
            loss, parts = model(*inputs, update.part)
        scaler.scale(loss).backward()
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


def train(config: TrainConfig) -> Path:
    """Run (or resume) the training described by ``config``; returns the run folder.

    Raises ConfigError before any work for a run that cannot start (see ``check_runnable``)."""
    check_runnable(config)
    rank, world, device = setup_distributed(config.device)
    master = rank == 0
    out = Path(config.out or f"runs/{config.stage}")
    checkpoint = read_checkpoint(out) if config.resume else None
    if checkpoint is not None:
        check_compatible(checkpoint, config)

    torch.manual_seed(config.seed)  # the initial weights (DDP then copies rank 0's to every rank)
    net = stages.build_net(config, backend=config.backend).to(device)
    if config.channels_last:
        net = net.to(memory_format=torch.channels_last)
    updates = stages.make_updates(config, net)
    optimizers = {u.part: u.optimizer for u in updates}
    ema = copy.deepcopy(net).requires_grad_(False).eval() if config.ema > 0 else None
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    dataset = stages.make_dataset(config)
    start = restore(checkpoint, net=net, ema=ema, optimizers=optimizers, scaler=scaler) if checkpoint else 0
    sampler = StepBatches(len(dataset), config.batch_size, seed=config.seed, start=start, rank=rank, world_size=world)
    if checkpoint is not None and checkpoint.state["data"] != sampler.state():
        raise ConfigError(f"cannot resume from {checkpoint.path} exactly: the data order was "
                          f"{checkpoint.state['data']}, now {sampler.state()} (a changed dataset or number of processes)")
    loader = torch.utils.data.DataLoader(SeededItems(dataset), batch_sampler=sampler, num_workers=config.num_workers,
                                         pin_memory=device.type == "cuda", persistent_workers=config.num_workers > 0)
    model = net
    if world > 1:
        # MUNIT's discriminator update leaves the generators without gradients
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None,
                                                    find_unused_parameters=config.stage == "lq-munit")
    if config.compile:
        model = torch.compile(model)

    stale = remove_stale_temporaries(out) if master else []
    notes = [f"removed {p}, left by a process killed while writing" for p in stale]
    log = MetricsLog(out, resume_step=start if checkpoint else None) if master else None
    notes += log.notes if master else []
    preview = stages.preview_images(config, min(8, config.num_samples)) if master else None
    # the logging window open at the checkpoint: a run resumed mid-window logs what an uninterrupted one does
    open_window = (checkpoint.state.get("log_window") if checkpoint else None) or {"start": start, "sums": {}}
    window_start = open_window["start"]
    sums = {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in open_window["sums"].items()}
    written = {}

    def save(step: int) -> None:
        if master:
            save_checkpoint(out, config=config, step=step, net=net, ema=ema, optimizers=optimizers, scaler=scaler,
                            data_state=sampler.state(),
                            log_window={"start": window_start, "sums": {k: float(v) for k, v in sums.items()}})

    def sample(step: int) -> None:
        if not master:
            return
        shown = ema if ema is not None else net
        shown.eval()
        with torch.autocast(device.type, dtype=AMP_DTYPES.get(config.precision), enabled=config.precision != "fp32"):
            rows = stages.sample_rows(config, shown, preview, seed=config.seed, device=device)
        net.train()
        grid = out / "samples" / f"step_{step:07d}.png"
        written["samples"] = save_grid(rows, grid, title=f"{config.stage}, step {step}")
        written["loss curve"] = save_loss_curve(log.series(), out / "loss.png") or written.get("loss curve")

    if master:
        size = sum(p.numel() for p in net.parameters())
        source = config.pairs if config.stage == "hq-ddpm" else stages.data_root(config)
        print(f"dxr.train {config.stage}: {len(dataset)} images from {source}, "
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
    step, window_time = start, time.perf_counter()
    try:
        net.train()
        while step < config.steps:
            batch = next(batches)
            seed_step(config.seed, rank, step)  # dropout, timesteps, noise, styles: a function of the step
            for update in updates:
                for group in update.optimizer.param_groups:
                    group["lr"] = learning_rate(config, step)
            logs = train_step(model, updates, stages.inputs(config, batch, device), config, scaler, device)
            if ema is not None:
                update_ema(ema, net, config.ema, step)
            step += 1
            for key, value in logs.items():
                sums[key] = sums.get(key, 0.0) + value
            at_log = step % config.log_every == 0 or step == config.steps
            if at_log and master:
                now = time.perf_counter()
                window = step - window_start
                record = {"step": step, **{k: round(float(v) / window, 6) for k, v in sums.items()},
                          "lr": learning_rate(config, step - 1), "steps_per_s": round(window / (now - window_time), 3)}
                log.append(record)
                if progress is not None:
                    progress.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k in optimizers})
                window_start, window_time, sums = step, now, {}
            elif at_log:
                window_start, sums = step, {}
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dxr.train", description=__doc__.split("\n\n")[0].replace("``", ""),
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--stage", choices=STAGES, help="what to train (default lq-ddpm)")
    p.add_argument("--preset", choices=PRESETS, help="cpu-demo (default on a CPU) or paper (default on a GPU); "
                   "see dxr/training/config.py")
    p.add_argument("--data", help="dataset root with lq/ and hq/ (default: the embedded default dataset)")
    p.add_argument("--pairs", help="hq-ddpm: paired folder with lq/ and hq/ (from synthesis)")
    p.add_argument("--out", help="run folder (default runs/<stage>)")
    p.add_argument("--steps", type=int, help="total training steps")
    p.add_argument("--batch-size", type=int, dest="batch_size", help="images per step and process")
    p.add_argument("--image-size", type=int, dest="image_size", help="training resolution (square)")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--seed", type=int, help="seed of the data order, noise and initialisation")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default cuda when available)")
    p.add_argument("--backend", choices=("auto", "torch", "triton", "cuda"), help="kernels of the fused ops")
    p.add_argument("--precision", choices=PRECISIONS, help="fp32, or bf16/fp16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--ema", type=float, help="EMA decay of the sampled weights (0: off)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--sample-every", type=int, dest="sample_every", help="steps between sample grids")
    p.add_argument("--save-every", type=int, dest="save_every", help="steps between checkpoints")
    p.add_argument("--log-every", type=int, dest="log_every", help="steps between metrics records")
    p.add_argument("--no-progress", action="store_false", dest="progress", help="no progress bar")
    p.add_argument("--set", action="append", dest="overrides", metavar="KEY=VALUE",
                   help="any other setting, e.g. unet.base_channels=32, unet.channel_mult=1,2,2, timesteps=200")
    return p


def config_from_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """The run's configuration: the checkpoint's when resuming, else the preset's; then the flags given."""
    flags = vars(_parser().parse_args(argv))
    overrides = flags.pop("overrides", [])
    if flags.get("resume"):
        out = Path(flags.get("out") or f"runs/{flags.get('stage', 'lq-ddpm')}")
        base = replace(read_checkpoint(out, tensors=False).config, out=str(out))
    else:
        cuda = torch.cuda.is_available()
        name = flags.get("preset", "paper" if cuda else "cpu-demo")
        base = preset(name, flags.get("stage", "lq-ddpm"), device="cuda" if cuda else "cpu")
    return apply_overrides(replace(base, **flags), overrides)


def _main(argv: Optional[Sequence[str]] = None) -> int:
    train(config_from_args(argv))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; returns its exit status: 0, 2 with one line on stderr for a run that cannot start
    (see :mod:`dxr.cli`), 130 when stopped by Ctrl-C."""
    return run(_main, argv, prog="python -m dxr.train")


if __name__ == "__main__":
    sys.exit(main())

"""DiffusionXRay end to end: ``python -m dxr.pipeline [--preset cpu-demo|paper] [--data DIR] [--out runs/NAME]``.

Every stage in order, each writing into its own folder under ``--out``:

=================  =======================================================================================
data               the dataset (``--data``, else the embedded default at the preset's image size)
lq-ddpm            DDPM-LQ on the LQ DRRs                                      (python -m dxr.train)
lq-munit           MUNIT-LQ between LQ and HQ                                  (python -m dxr.train)
synth-munit        HQ train/test images → MUNIT-LQ pairs                        (python -m dxr.synth)
synth-ddpm         HQ train/test images → DDPM-LQ pairs (SDEdit)                (python -m dxr.synth)
hq-ddpm-munit      DDPM-HQ on the MUNIT-LQ training pairs                      (python -m dxr.train)
hq-ddpm-ddpm       DDPM-HQ on the DDPM-LQ training pairs                       (python -m dxr.train)
bicubic-ddpm       the baseline, on bicubic-degraded HQ                        (python -m dxr.train)
evaluate           PSNR/SSIM/noise on both test-pair sets, nodule CNR on DRRs  (python -m dxr.evaluate)
enhance            the LQ test DRRs restored by DDPM-HQ (MUNIT-LQ pairs)       (python -m dxr.enhance)
=================  =======================================================================================

A stage whose output is complete is skipped (a finished checkpoint, a synthesis or evaluation
manifest); a training stage stopped midway resumes from its checkpoint. Outputs appear atomically,
so a pipeline stopped at any point (Ctrl-C, a crash) continues where it was when run again.
``--stop-after STAGE`` ends the run after that stage. The last lines — also written to
``<out>/summary.txt`` — are the stages run or skipped, the preset's quality goals as met or not (from
the evaluation), and the report's path.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from dxr.cli import CommandError, run

STAGES = ("data", "lq-ddpm", "lq-munit", "synth-munit", "synth-ddpm", "hq-ddpm-munit", "hq-ddpm-ddpm",
          "bicubic-ddpm", "evaluate", "enhance")
# the DDPM-LQ degradation of the pairs: SDEdit strength (noise level) and DDIM steps
SDEDIT = {"cpu-demo": ("0.4", "20"), "paper": ("0.4", "50")}
# test images per set the evaluation scores by default (None: all of them)
EVALUATED = {"cpu-demo": 32, "paper": None}
# evaluation rows and columns: the baseline, each DiffusionXRay model with the test pairs of its own degradation
BASELINE = "bicubic-DDPM"
OWN_TEST_SET = {"DiffusionXRay (MUNIT-LQ pairs)": "MUNIT-LQ test pairs",
                "DiffusionXRay (DDPM-LQ pairs)": "DDPM-LQ test pairs"}
# paper preset: DiffusionXRay − bicubic-DDPM PSNR gaps (dB) reported on each degradation's test pairs
PAPER_GAPS_DB = {"MUNIT-LQ test pairs": 27.50 - 20.08, "DDPM-LQ test pairs": 22.21 - 19.85}


@dataclass
class Plan:
    """Where a pipeline run reads and writes, and the settings every stage shares."""

    out: Path
    preset: str
    data: Optional[Path]
    device: Optional[str]
    steps: Optional[int]  # training steps of every training stage (None: the preset's)
    sample_steps: int  # DDIM steps of evaluation and enhancement
    max_images: Optional[int]
    progress: bool
    seed: int
    overrides: Sequence[str] = ()  # KEY=VALUE settings of every training stage (dxr.train --set)

    def folder(self, stage: str) -> Path:
        return self.out / stage

    @property
    def dataset(self) -> Path:
        return Path(json.loads((self.folder("data") / "dataset.json").read_text())["root"])


# --------------------------------------------------------------------------------------------------
# stages


def _common(plan: Plan) -> list[str]:
    flags = ["--seed", str(plan.seed)]
    if plan.device:
        flags += ["--device", plan.device]
    return flags + ([] if plan.progress else ["--no-progress"])


def _training_done(folder: Path) -> Optional[bool]:
    """True when the run in ``folder`` reached its last step, False when it stopped before, None when absent."""
    from dxr.training.checkpoint import CHECKPOINT, read_checkpoint

    if not (folder / CHECKPOINT).is_file():
        return None
    checkpoint = read_checkpoint(folder, tensors=False)
    return checkpoint.step >= checkpoint.config.steps


def _train(plan: Plan, stage: str, name: str, pairs: Optional[str] = None) -> Callable[[], None]:
    """Train ``stage`` into ``<out>/<name>`` on the dataset (and the ``pairs`` stage's training pairs)."""
    def go() -> None:
        from dxr import train

        folder = plan.folder(name)
        data = ["--data", str(plan.dataset)] + (["--pairs", str(plan.folder(pairs) / "train")] if pairs else [])
        from dxr.training.config import preset

        steps = plan.steps if plan.steps is not None else preset(plan.preset, stage).steps
        # one sample grid, at the end: the pipeline's own figures come from the evaluation
        argv = ["--stage", stage, "--preset", plan.preset, "--out", str(folder), *data, *_common(plan),
                "--steps", str(steps), "--sample-every", str(steps)]
        for assignment in plan.overrides:
            argv += ["--set", assignment]
        if _training_done(folder) is False:
            argv = ["--resume", "--out", str(folder)] + (["--no-progress"] if not plan.progress else [])
        _run_command(train, argv, name)
    return go


def _run_command(module, argv: Sequence[str], name: str) -> None:
    """Run ``module``'s command on ``argv``; its expected failures become one CommandError naming the stage."""
    from dxr.cli import PATH_ERRORS, one_line

    try:
        status = module._main(list(argv))
    except (ValueError,) + PATH_ERRORS as err:
        raise CommandError(f"stage {name}: {one_line(err)}") from None
    if status:
        raise CommandError(f"stage {name} ended with status {status}")


def stages(plan: Plan) -> list[tuple[str, Callable[[], bool], Callable[[], None]]]:
    """(name, is_complete, run) of every stage, in order."""
    folder = plan.folder

    def data_done() -> bool:
        return (folder("data") / "dataset.json").is_file()

    def data_run() -> None:
        from dxr.training.checkpoint import atomic_write
        from dxr.training.config import preset

        if plan.data is not None:
            root = plan.data.absolute()
            for domain in ("lq", "hq"):
                for split in ("train", "test"):
                    if not (root / domain / split).is_dir():
                        raise CommandError(f"--data {root}: missing {domain}/{split}/ (a dataset root holds "
                                           "lq/{train,test} DRRs and hq/{train,test} radiographs)")
        else:
            from dxr.data import default_dataset

            root = default_dataset(image_size=preset(plan.preset).image_size, progress=plan.progress)
        record = json.dumps({"root": str(root), "embedded_default": plan.data is None}, indent=1)
        atomic_write(folder("data") / "dataset.json", lambda tmp: tmp.write_text(record))

    def trained(name: str) -> Callable[[], bool]:
        return lambda: _training_done(folder(name)) is True

    def synth_run(generator: str, name: str) -> Callable[[], None]:
        def go() -> None:
            from dxr import synth

            model = "lq-munit" if generator == "munit" else "lq-ddpm"
            argv = ["--generator", generator, "--checkpoint", str(folder(model)), "--hq", str(plan.dataset / "hq"),
                    "--out", str(folder(name)), "--overwrite", *_common(plan)]
            if plan.max_images:
                argv += ["--max-images", str(plan.max_images)]
            if generator == "ddpm":
                strength, steps = SDEDIT[plan.preset]
                argv += ["--strength", strength, "--steps", steps]
            _run_command(synth, argv, name)
        return go

    def manifest_done(name: str, file: str = "manifest.json") -> Callable[[], bool]:
        return lambda: (folder(name) / file).is_file()

    def evaluate_run() -> None:
        from dxr import evaluate

        argv = ["--out", str(folder("evaluate")), "--steps", str(plan.sample_steps),
                "--pairs", f"MUNIT-LQ test pairs={folder('synth-munit') / 'test'}",
                "--pairs", f"DDPM-LQ test pairs={folder('synth-ddpm') / 'test'}",
                "--model", f"{BASELINE}={folder('bicubic-ddpm')}",
                "--model", f"DiffusionXRay (MUNIT-LQ pairs)={folder('hq-ddpm-munit')}",
                "--model", f"DiffusionXRay (DDPM-LQ pairs)={folder('hq-ddpm-ddpm')}",
                "--drrs", str(plan.dataset / "lq" / "test"), *_common(plan)]
        limit = plan.max_images or EVALUATED[plan.preset]
        if limit:
            argv += ["--max-images", str(limit)]
        _run_command(evaluate, argv, "evaluate")

    def enhance_run() -> None:
        from dxr import enhance
        from dxr.data.io import image_files
        from dxr.training.checkpoint import atomic_write

        drrs = image_files(plan.dataset / "lq" / "test")[:plan.max_images or None]
        target = folder("enhance")
        argv = ["--checkpoint", str(folder("hq-ddpm-munit")), "--out", str(target), "--steps", str(plan.sample_steps),
                *_common(plan), *map(str, drrs)]
        _run_command(enhance, argv, "enhance")
        record = json.dumps({"inputs": [str(p) for p in drrs], "checkpoint": str(folder("hq-ddpm-munit"))}, indent=1)
        atomic_write(target / "manifest.json", lambda tmp: tmp.write_text(record))

    return [
        ("data", data_done, data_run),
        ("lq-ddpm", trained("lq-ddpm"), _train(plan, "lq-ddpm", "lq-ddpm")),
        ("lq-munit", trained("lq-munit"), _train(plan, "lq-munit", "lq-munit")),
        ("synth-munit", manifest_done("synth-munit"), synth_run("munit", "synth-munit")),
        ("synth-ddpm", manifest_done("synth-ddpm"), synth_run("ddpm", "synth-ddpm")),
        ("hq-ddpm-munit", trained("hq-ddpm-munit"), _train(plan, "hq-ddpm", "hq-ddpm-munit", pairs="synth-munit")),
        ("hq-ddpm-ddpm", trained("hq-ddpm-ddpm"), _train(plan, "hq-ddpm", "hq-ddpm-ddpm", pairs="synth-ddpm")),
        ("bicubic-ddpm", trained("bicubic-ddpm"), _train(plan, "bicubic-ddpm", "bicubic-ddpm")),
        ("evaluate", manifest_done("evaluate", "metrics.json"), evaluate_run),
        ("enhance", manifest_done("enhance"), enhance_run),
    ]


def quality_goals(metrics: dict, preset: str) -> list[tuple[str, str, bool]]:
    """(goal, what was measured, met) of the preset's quality goals, from the evaluation's metrics.json."""
    rows = []
    sets = metrics.get("pairs", {}).get("sets", {})
    for model, test_set in OWN_TEST_SET.items():
        cells = sets.get(test_set, {}).get("metrics", {})
        if model not in cells:
            continue
        ours, hq_noise = cells[model], sets[test_set]["hq_noise"]["mean"]
        if preset == "paper":
            gap = ours["psnr"]["mean"] - cells[BASELINE]["psnr"]["mean"]
            need = PAPER_GAPS_DB[test_set]
            rows.append((f"{model} − {BASELINE} PSNR on {test_set} ≥ the paper's +{need:.1f} dB", f"{gap:+.2f} dB",
                         gap >= need))
            continue
        for metric, unit in (("psnr", " dB"), ("ssim", "")):
            for rival in ("identity", BASELINE):
                a, b = ours[metric]["mean"], cells[rival][metric]["mean"]
                rows.append((f"{model} {metric.upper()} > {rival} on {test_set}", f"{a:.3f}{unit} vs {b:.3f}{unit}",
                             a > b))
        noise = ours["noise"]["mean"]
        rows.append((f"{model} noise ≤ HQ's on {test_set}", f"{noise:.4f} vs {hq_noise:.4f}", noise <= hq_noise))
    for model in OWN_TEST_SET:
        drr = metrics.get("drrs", {}).get("methods", {}).get(model)
        if drr and drr.get("n_nodules"):
            kept = drr["cnr_kept"]
            rows.append((f"{model}: nodule CNR after ≥ 0.95 × before for ≥ 90% of nodules",
                         f"{kept:.0%} of {drr['n_nodules']}", kept >= 0.9))
    return rows


def run_pipeline(plan: Plan, *, stop_after: Optional[str] = None,
                 log: Callable[[str], None] = print) -> list[tuple[str, str, float]]:
    """Run every stage not yet complete, in order; returns (stage, "done" | "skipped", seconds) rows."""
    rows = []
    for name, complete, go in stages(plan):
        started = time.perf_counter()
        if complete():
            rows.append((name, "skipped", 0.0))
            log(f"[{name}] complete: skipped ({plan.folder(name)})")
        else:
            log(f"[{name}] running -> {plan.folder(name)}")
            go()
            rows.append((name, "done", time.perf_counter() - started))
        if name == stop_after:
            break
    return rows


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dxr.pipeline", description=__doc__.split("\n\n")[0].replace("``", ""),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=("cpu-demo", "paper"), default=None,
                   help="model scale of every stage (default: paper on a GPU, cpu-demo otherwise)")
    p.add_argument("--data", default=None, help="dataset root with lq/{train,test} and hq/{train,test} "
                   "(default: the embedded default at the preset's image size)")
    p.add_argument("--out", default=None, help="run folder (default runs/pipeline-<preset>)")
    p.add_argument("--steps", type=int, default=None, help="training steps of every training stage (default: the preset's)")
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps of evaluation and enhancement")
    p.add_argument("--max-images", type=int, default=None, help="at most this many images per split and set (quick runs)")
    p.add_argument("--stop-after", choices=STAGES, default=None, help="end the run after this stage")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="a setting of every training stage, as python -m dxr.train --set")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from dxr.inference import default_device

    args = _parser().parse_args(argv)
    device = default_device(args.device)
    name = args.preset or ("paper" if device.type == "cuda" else "cpu-demo")
    if args.steps is not None and args.steps < 1:
        raise CommandError(f"--steps must be >= 1, got {args.steps}")
    if args.max_images is not None and args.max_images < 1:
        raise CommandError(f"--max-images must be >= 1, got {args.max_images}")
    data = Path(args.data) if args.data else None
    if data is not None and not data.is_dir():
        raise CommandError(f"--data {data}: no such folder")
    plan = Plan(out=Path(args.out or f"runs/pipeline-{name}"), preset=name, data=data,
                device=args.device, steps=args.steps, sample_steps=args.sample_steps, max_images=args.max_images,
                progress=not args.no_progress, seed=args.seed, overrides=args.overrides)
    started = time.perf_counter()
    rows = run_pipeline(plan, stop_after=args.stop_after)
    lines = [f"dxr.pipeline {name} -> {plan.out} ({time.perf_counter() - started:.0f} s)"]
    lines += [f"  {stage:<14} {status:<8} {seconds:7.0f} s" for stage, status, seconds in rows]
    metrics = plan.folder("evaluate") / "metrics.json"
    goals = quality_goals(json.loads(metrics.read_text()), name) if metrics.is_file() else []
    if goals:
        lines += ["", f"quality goals ({name}): {sum(met for *_, met in goals)} of {len(goals)} met"]
        lines += [f"  [{'met' if met else 'not met'}] {goal}: {measured}" for goal, measured, met in goals]
    text = "\n".join(lines) + "\n"
    print("\n" + text, end="")
    from dxr.training.checkpoint import atomic_write

    atomic_write(plan.out / "summary.txt", lambda tmp: tmp.write_text(text))
    report = plan.folder("evaluate") / "report.md"
    if report.is_file():
        print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main, prog="python -m dxr.pipeline"))

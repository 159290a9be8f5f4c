"""Measure restorations: ``python -m dxr.evaluate --pairs NAME=DIR ... [--model NAME=CKPT ...] [--drrs DIR] --out DIR``.

Two kinds of test data:

- ``--pairs NAME=DIR``: a paired folder of ``dxr.synth`` (``DIR/lq/<name>.png`` and ``DIR/hq/<name>.png``,
  equal names and sizes). Every method restores the LQ image and is scored against HQ: PSNR and SSIM
  (scikit-image, data range 1) and the noise figure of :func:`noise_measure` (HQ's own noise is the
  reference: a good restoration is no noisier than HQ). The row ``identity`` is the LQ input itself.
- ``--drrs DIR``: real DRRs (``drr_NNNNN.png``) with ``drr_NNNNN.json`` sidecars listing their nodules.
  There is no HQ truth, so each in-view nodule's contrast-to-noise ratio (:func:`nodule_cnr`) is
  measured before and after restoration — a restoration should keep nodules visible — together with
  the no-reference :func:`sharpness` of the whole image.

Each ``--model NAME=CKPT`` (an ``hq-ddpm`` or ``bicubic-ddpm`` run folder or checkpoint) is a method,
sampled by DDIM with ``--steps`` steps. Output::

    out/figures/pairs_<set>.png   LQ | each method | HQ for a few test images of each set
    out/figures/drrs.png          DRR before | after each method, nodule boxes drawn, a nodule enlarged
    out/report.md                 the tables, the settings, links to the figures
    out/metrics.json              every number (JSON-safe), written last: its presence marks the folder complete

The measures are :mod:`dxr.metrics` (re-exported here), the report and figures :mod:`dxr.report`.
Conventions: means come with the sample standard deviation over images (0 for one image). The PSNR
of an image identical to its target is infinite: per image it is ``"inf"`` in metrics.json, and it
counts as :data:`PSNR_CAP_DB` (100 dB) in means and standard deviations. A value that cannot be
measured (a nodule too close to the border) is ``null`` and left out of the summaries.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from dxr.cli import CommandError, run
from dxr.inference import PathLike, batches, read_grayscale, resize
from dxr.metrics import (CNR_KEPT, PSNR_CAP_DB, image_metrics, nodule_cnr, nodule_geometry, nodule_regions,
                         noise_measure, sharpness, skimage_metrics, ssim_window, summary)
from dxr.report import IDENTITY, Evaluation, json_safe, write_report

# --------------------------------------------------------------------------------------------------
# files


def _name(path: Path, root: Path) -> str:
    return path.relative_to(root).with_suffix("").as_posix()


def _listing(sample: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(sample[:limit])
    return shown + (f" (and {len(sample) - limit} more)" if len(sample) > limit else "")


def paired_files(folder: PathLike) -> list[tuple[Path, Path]]:
    """(lq, hq) file pairs of a paired folder (``lq/`` and ``hq/`` holding images of equal names), in name
    order. CommandError when the folder or either side is missing, holds no image, or the names differ.
    Sizes are checked when the images are read."""
    from dxr.data.io import image_files

    folder = Path(folder)
    if not folder.is_dir():
        raise CommandError(f"{folder}: no such folder (a paired folder holds lq/ and hq/ images of equal names)")
    sides = {}
    for side in ("lq", "hq"):
        if not (folder / side).is_dir():
            raise CommandError(f"{folder}: missing {side}/ (a paired folder holds lq/ and hq/ images of equal names)")
        files = image_files(folder / side)
        names = [_name(f, folder / side) for f in files]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise CommandError(f"{folder / side}: two images share a name: {_listing(twice)}")
        sides[side] = dict(zip(names, files))
    if not sides["lq"] and not sides["hq"]:
        raise CommandError(f"{folder}: lq/ and hq/ hold no PNG, JPEG, TIFF or DICOM image")
    only_lq = sorted(set(sides["lq"]) - set(sides["hq"]))
    only_hq = sorted(set(sides["hq"]) - set(sides["lq"]))
    if only_lq or only_hq:
        parts = ([f"only in lq/: {_listing(only_lq)}"] if only_lq else []) + \
                ([f"only in hq/: {_listing(only_hq)}"] if only_hq else [])
        raise CommandError(f"{folder}: lq/ and hq/ must hold the same image names; {'; '.join(parts)}")
    return [(sides["lq"][n], sides["hq"][n]) for n in sorted(sides["lq"])]


def drr_files(folder: PathLike) -> list[tuple[Path, list[dict]]]:
    """Each image of a DRR folder with its in-view nodules from its ``.json`` sidecar (no sidecar: no
    nodules), in name order. CommandError when the folder is missing or holds no image, or a sidecar
    is unreadable."""
    from dxr.data.io import image_files

    folder = Path(folder)
    if not folder.is_dir():
        raise CommandError(f"--drrs {folder}: no such folder")
    files = image_files(folder)
    if not files:
        raise CommandError(f"--drrs {folder}: holds no PNG, JPEG, TIFF or DICOM image")
    found = []
    for path in files:
        sidecar = path.with_suffix(".json")
        nodules: list[dict] = []
        if sidecar.is_file():
            try:
                record = json.loads(sidecar.read_text())
                listed = record.get("nodules", []) if isinstance(record, dict) else None
                if not isinstance(listed, list) or not all(isinstance(n, dict) for n in listed):
                    raise ValueError("its 'nodules' must be a list of records")
                nodules = [n for n in listed if n.get("in_view", True)]
                for nodule in nodules:
                    nodule_geometry(nodule)
            except (OSError, ValueError) as err:
                raise CommandError(f"{sidecar}: not a readable DRR sidecar ({err})") from None
        found.append((path, nodules))
    return found


def _read_pair(lq_path: Path, hq_path: Path) -> tuple[np.ndarray, np.ndarray]:
    lq, hq = read_grayscale(lq_path), read_grayscale(hq_path)
    if lq.shape != hq.shape:
        raise CommandError(f"{lq_path} is {lq.shape[1]}×{lq.shape[0]} pixels but {hq_path} is "
                           f"{hq.shape[1]}×{hq.shape[0]}: a pair must have one size")
    return lq, hq


# --------------------------------------------------------------------------------------------------
# restoring


def load_restorers(models: Mapping[str, PathLike], *, steps: int = 25, device=None, seed: int = 0,
                   batch_size: int = 8, progress: bool = False) -> dict:
    """``{name: Restorer}`` of each ``hq-ddpm`` / ``bicubic-ddpm`` checkpoint or run folder in ``models``,
    sampling with DDIM in ``steps`` steps (0: every DDPM step). CommandError names the ``--model``."""
    from dxr.enhance import Restorer

    restorers = {}
    for name, path in models.items():
        restorers[name] = Restorer.from_checkpoint(path, device=device, steps=steps, seed=seed, batch_size=batch_size,
                                                   progress=progress, label=f"--model {name}={path}")
    return restorers


def _restore(restorer, images: Sequence[np.ndarray], first: int) -> list[np.ndarray]:
    """(H', W') float32 outputs of ``restorer`` for each (H, W) image; image i is the ``first + i``-th."""
    tensors = [torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None] for image in images]
    if hasattr(restorer, "restore"):
        outputs = restorer.restore(tensors, first=first)
    else:
        outputs = [restorer(t) for t in tensors]
    return [out.detach().float().cpu() for out in outputs]


def _fit(output: torch.Tensor, size: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """An output (1, 1, H', W') as an (H, W) array of ``size`` (resized when it differs) and whether it was."""
    if output.dim() == 2:
        output = output[None, None]
    resized = tuple(output.shape[-2:]) != tuple(size)
    return resize(output.reshape(1, 1, *output.shape[-2:]), size)[0, 0].numpy().astype(np.float32), resized


def _settings_of(restorer) -> dict:
    try:
        return dict(restorer.settings())
    except AttributeError:
        return {}


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled)


def evaluate_pairs(restorers: Mapping[str, object], test_sets: Mapping[str, PathLike], *, batch_size: int = 8,
                   max_images: Optional[int] = None, progress: bool = False, samples: int = 4) -> dict:
    """PSNR, SSIM and noise of every method on every paired test set.

    ``restorers`` ``{name: Restorer}`` (a None value is skipped); the method ``identity`` (the LQ input
    itself) always comes first. ``test_sets`` ``{name: paired folder}``; at most ``max_images`` pairs each,
    read and restored ``batch_size`` at a time. Outputs of another size than HQ (a ×2 restorer) are
    resized to HQ's size, and the set records it. Returns ``{"methods": [...], "sets": {name: {"folder",
    "n", "metrics": {method: {"psnr", "ssim", "noise": summary}}, "hq_noise": summary, "resized":
    {method: bool}, "images": [per-image values]}}, "samples": {name: [{"name", "lq", "hq", "outputs"}]}}``
    where ``samples`` holds the first ``samples`` images of each set as arrays (for the figures).
    """
    active = {name: r for name, r in restorers.items() if r is not None}
    methods = [IDENTITY] + list(active)
    result: dict = {"methods": methods, "sets": {}, "samples": {}}
    for set_name, folder in test_sets.items():
        pairs = paired_files(folder)[:max_images or None]
        images, kept = [], []
        resized = {m: False for m in methods}
        bar = _progress(len(pairs) * len(methods), f"evaluate {set_name}", progress)
        for first, chunk in zip(range(0, len(pairs), batch_size), batches(pairs, batch_size)):
            read = [_read_pair(lq_path, hq_path) for lq_path, hq_path in chunk]
            outputs = {IDENTITY: [lq for lq, _ in read]}
            bar.update(len(chunk))
            for name, restorer in active.items():
                fitted = [_fit(out, hq.shape) for out, (_, hq) in zip(_restore(restorer, [lq for lq, _ in read], first), read)]
                outputs[name] = [image for image, _ in fitted]
                resized[name] |= any(flag for _, flag in fitted)
                bar.update(len(chunk))
            for i, ((lq_path, hq_path), (lq, hq)) in enumerate(zip(chunk, read)):
                record = {"name": _name(lq_path, Path(folder) / "lq"), "hq_noise": noise_measure(hq, reference=hq),
                          "psnr": {}, "ssim": {}, "noise": {}}
                for method in methods:
                    scores = image_metrics(outputs[method][i], hq)
                    record["psnr"][method] = scores["psnr"]
                    record["ssim"][method] = scores["ssim"]
                    record["noise"][method] = noise_measure(outputs[method][i], reference=hq)
                images.append(record)
                if len(kept) < samples:
                    kept.append({"name": record["name"], "lq": lq, "hq": hq,
                                 "outputs": {m: outputs[m][i] for m in methods if m != IDENTITY}})
        bar.close()
        result["sets"][set_name] = {
            "folder": str(Path(folder)),
            "n": len(images),
            "metrics": {m: {"psnr": summary([r["psnr"][m] for r in images], cap=PSNR_CAP_DB),
                            "psnr_infinite": sum(math.isinf(r["psnr"][m]) for r in images),
                            "ssim": summary([r["ssim"][m] for r in images]),
                            "noise": summary([r["noise"][m] for r in images])} for m in methods},
            "hq_noise": summary([r["hq_noise"] for r in images]),
            "resized": resized,
            "images": images,
        }
        result["samples"][set_name] = kept
    return result


def _prefer_nodules(files: list[tuple[Path, list[dict]]], limit: Optional[int]) -> list[tuple[Path, list[dict]]]:
    """At most ``limit`` images, those with nodules first (name order kept within each group)."""
    if not limit or limit >= len(files):
        return files
    chosen = ([f for f in files if f[1]] + [f for f in files if not f[1]])[:limit]
    order = {path: i for i, (path, _) in enumerate(files)}
    return sorted(chosen, key=lambda f: order[f[0]])


def evaluate_drrs(restorers: Mapping[str, object], folder: PathLike, *, batch_size: int = 8,
                  max_images: Optional[int] = None, progress: bool = False, samples: int = 3) -> dict:
    """Nodule CNR and sharpness of real DRRs before and after each restorer (there is no HQ truth).

    ``folder`` holds DRRs with ``.json`` sidecars (see :func:`drr_files`); with ``max_images`` at most that
    many, images with nodules first. For each in-view nodule: :func:`nodule_cnr` before and after each
    method (outputs of another size are resized back to the DRR's), and per method the share of
    measurable nodules whose CNR fell (after < 0.95 × before) or was kept (after ≥ 0.95 × before), and
    the ratio after / before. Returns ``{"folder", "n_images", "n_nodules", "n_measurable", "before":
    {"cnr", "sharpness"}, "methods": {name: {"cnr", "sharpness", "cnr_ratio": summary, "cnr_fell",
    "cnr_kept": share or None, "n_nodules": measurable}}, "nodules": [...], "images": [...], "samples":
    [{"name", "image", "outputs", "nodules"}]}`` (``samples``: up to ``samples`` images with nodules, else
    any, as arrays for the figure).
    """
    active = {name: r for name, r in restorers.items() if r is not None}
    files = _prefer_nodules(drr_files(folder), max_images)
    with_nodules = {path for path, nodules in files if nodules}
    sample_paths = set(([p for p, _ in files if p in with_nodules] + [p for p, _ in files if p not in with_nodules])[:samples])
    nodule_rows, image_rows, kept = [], [], []
    bar = _progress(len(files) * (1 + len(active)), "evaluate DRRs", progress)
    for first, chunk in zip(range(0, len(files), batch_size), batches(files, batch_size)):
        images = [read_grayscale(path) for path, _ in chunk]
        bar.update(len(chunk))
        outputs = {}
        for name, restorer in active.items():
            outputs[name] = [_fit(out, image.shape)[0] for out, image in zip(_restore(restorer, images, first), images)]
            bar.update(len(chunk))
        for i, ((path, nodules), image) in enumerate(zip(chunk, images)):
            image_rows.append({"name": path.stem, "nodules": len(nodules), "sharpness_before": sharpness(image),
                               "sharpness_after": {m: sharpness(outputs[m][i]) for m in active}})
            for nodule in nodules:
                nodule_rows.append({"image": path.stem, "id": nodule.get("id"), "diameter_mm": nodule.get("diameter_mm"),
                                    "center_px": list(nodule["center_px"]), "box_px": list(nodule["box_px"]),
                                    "cnr_before": nodule_cnr(image, nodule),
                                    "cnr_after": {m: nodule_cnr(outputs[m][i], nodule) for m in active}})
            if path in sample_paths:
                kept.append({"name": path.stem, "image": image, "outputs": {m: outputs[m][i] for m in active},
                             "nodules": nodules})
    bar.close()
    methods = {}
    for name in active:
        pairs = [(r["cnr_before"], r["cnr_after"][name]) for r in nodule_rows]
        pairs = [(b, a) for b, a in pairs if math.isfinite(b) and math.isfinite(a)]
        fell = sum(a < CNR_KEPT * b for b, a in pairs)
        methods[name] = {
            "cnr": summary([a for _, a in pairs]),
            "cnr_ratio": summary([a / b for b, a in pairs if b != 0]),
            "cnr_fell": fell / len(pairs) if pairs else None,
            "cnr_kept": (len(pairs) - fell) / len(pairs) if pairs else None,
            "n_nodules": len(pairs),
            "sharpness": summary([r["sharpness_after"][name] for r in image_rows]),
        }
    return {
        "folder": str(Path(folder)),
        "n_images": len(image_rows),
        "n_with_nodules": len(with_nodules),
        "n_nodules": len(nodule_rows),
        "n_measurable": sum(math.isfinite(r["cnr_before"]) for r in nodule_rows),
        "before": {"cnr": summary([r["cnr_before"] for r in nodule_rows]),
                   "sharpness": summary([r["sharpness_before"] for r in image_rows])},
        "methods": methods,
        "nodules": nodule_rows,
        "images": image_rows,
        "samples": kept,
    }

# --------------------------------------------------------------------------------------------------
# command line


def parse_assignment(text: str, flag: str, what: str = "DIR") -> tuple[str, str]:
    """``NAME=VALUE`` of a repeatable flag as (name, value); CommandError naming ``flag`` when malformed."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise CommandError(f"{flag} expects NAME={what}, got {text!r}")
    return name.strip(), value.strip()


def _assignments(texts: Sequence[str], flag: str, what: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for text in texts:
        name, value = parse_assignment(text, flag, what)
        if name in found:
            raise CommandError(f"{flag}: the name {name!r} is given twice")
        found[name] = value
    return found


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dxr.evaluate", description=__doc__.split("\n\n")[0].replace("``", ""),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pairs", action="append", default=[], metavar="NAME=DIR",
                   help="a paired test folder (lq/ and hq/), repeatable; at least one unless --drrs")
    p.add_argument("--model", action="append", default=[], metavar="NAME=CKPT",
                   help="an hq-ddpm or bicubic-ddpm checkpoint file or run folder, repeatable")
    p.add_argument("--drrs", default=None, metavar="DIR", help="a folder of real DRRs with .json nodule sidecars")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for report.md, metrics.json and figures/")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps of the restorers (0: every DDPM step)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=8, help="images per restoring call (and tiles per network call)")
    p.add_argument("--max-images", type=int, default=None, help="at most this many images per test set and of --drrs")
    p.add_argument("--seed", type=int, default=0, help="seed of the restorers' noise")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _main(argv: Optional[Sequence[str]] = None) -> int:
    from dxr.inference import default_device

    args = _parser().parse_args(argv)
    test_sets = _assignments(args.pairs, "--pairs", "DIR")
    models = _assignments(args.model, "--model", "CKPT")
    if not test_sets and args.drrs is None:
        raise CommandError("give at least one --pairs NAME=DIR (or --drrs DIR)")
    if IDENTITY in models:
        raise CommandError(f"--model: the name {IDENTITY!r} is the LQ input's row; choose another")
    if args.steps < 0:
        raise CommandError(f"--steps must be >= 0 (0: every DDPM step), got {args.steps}")
    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_images is not None and args.max_images < 1:
        raise CommandError(f"--max-images must be >= 1, got {args.max_images}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out}: exists and is not a folder")
    for name, folder in test_sets.items():  # every input checked before any model is loaded
        try:
            paired_files(folder)
        except CommandError as err:
            raise CommandError(f"--pairs {name}: {err}") from None
    if args.drrs is not None:
        drr_files(args.drrs)
    skimage_metrics()
    device = default_device(args.device)
    progress = not args.no_progress
    restorers = load_restorers(models, steps=args.steps, device=device, seed=args.seed, batch_size=args.batch_size,
                               progress=False)
    pairs = evaluate_pairs(restorers, test_sets, batch_size=args.batch_size, max_images=args.max_images,
                           progress=progress) if test_sets else None
    drrs = evaluate_drrs(restorers, args.drrs, batch_size=args.batch_size, max_images=args.max_images,
                         progress=progress) if args.drrs is not None else None
    settings = {
        "steps": args.steps, "seed": args.seed, "device": str(device), "batch_size": args.batch_size,
        "max_images": args.max_images,
        "pairs": {name: str(Path(folder).absolute()) for name, folder in test_sets.items()},
        "drrs": None if args.drrs is None else str(Path(args.drrs).absolute()),
        "models": {name: {"checkpoint": str(Path(models[name]).absolute()), **_settings_of(r)}
                   for name, r in restorers.items()},
    }
    evaluation = Evaluation(pairs, drrs, settings)
    report = evaluation.write(out)
    print(evaluation.tables(), end="")
    print(f"report: {report}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m dxr.evaluate`` with ``argv``; returns the exit status (0, 2 for an expected error, 130 on Ctrl-C)."""
    return run(_main, argv, prog="python -m dxr.evaluate")


__all__ = ["image_metrics", "ssim_window", "noise_measure", "sharpness", "nodule_cnr", "nodule_regions", "summary",
           "paired_files", "drr_files", "load_restorers", "evaluate_pairs", "evaluate_drrs", "Evaluation",
           "write_report", "json_safe", "parse_assignment", "main",
           "PSNR_CAP_DB", "CNR_KEPT"]


if __name__ == "__main__":
    sys.exit(main())

"""Command line: ``python -m dxr.data build-default --out DIR`` and ``python -m dxr.data drr --ct PATH --out DIR --num N``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from dxr.cli import CommandError, run
from dxr.data.build import DRRSettings, build_ct_drrs, build_default


def _add_run_options(parser: argparse.ArgumentParser, *, rebuild_help: str) -> None:
    """The options both commands share: seed, device, rebuild, progress bars."""
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--device", default=None, help="render on this torch device (default: cuda if available, else cpu)")
    parser.add_argument("--rebuild", action="store_true", help=rebuild_help)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dxr.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    default = commands.add_parser("build-default", help="build the embedded default dataset (LQ DRRs + HQ radiograph crops)")
    default.add_argument("--out", required=True, help="folder to create (built beside it, then renamed into place)")
    default.add_argument("--image-size", type=int, default=256, help="side of every image in pixels (default 256)")
    default.add_argument("--num-lq", type=int, default=320, help="LQ DRRs in all (default 320)")
    default.add_argument("--num-hq", type=int, default=320, help="HQ crops in all (default 320)")
    default.add_argument("--test-fraction", type=float, default=0.2, help="share of each domain in test/ (default 0.2)")
    default.add_argument("--nodule-fraction", type=float, default=0.5, help="share of DRRs with inserted nodules (default 0.5)")
    default.add_argument("--max-nodules", type=int, default=3, help="nodules per nodule volume, 1..N (default 3)")
    default.add_argument("--samples", type=int, default=256, help="samples per ray (default 256)")
    default.add_argument("--hq-fov-mm", type=float, default=130.0, help="field of view of an HQ crop in mm (default 130)")
    _add_run_options(default, rebuild_help="replace an existing dataset at --out")

    ct = commands.add_parser("drr", help="render DRRs (optionally with nodules) of your own CT")
    ct.add_argument("--ct", required=True, help="CT volume: NIfTI file or a folder holding one DICOM series")
    ct.add_argument("--out", required=True, help="folder to create")
    ct.add_argument("--num", type=int, required=True, help="number of DRRs")
    ct.add_argument("--nodules", type=int, default=0, help="nodules inserted into every DRR's volume (default 0)")
    ct.add_argument("--mask", default=None, help="TotalSegmentator label map on the CT's grid (lung lobes 10-14); default: threshold lung segmentation")
    ct.add_argument("--suppress-contrast", action="store_true", help="reset contrast-filled vessels to blood HU (needs --mask)")
    ct.add_argument("--image-size", type=int, default=256, help="side of every DRR in pixels (default 256)")
    ct.add_argument("--samples", type=int, default=256, help="samples per ray (default 256)")
    _add_run_options(ct, rebuild_help="replace an existing output folder")
    return parser


# the flag behind each setting that the builders name in their errors
_FLAGS = {"num": "--num", "nodules": "--nodules", "image_size": "--image-size", "test_fraction": "--test-fraction",
          "hq_fov_mm": "--hq-fov-mm", "counts": "--num-lq/--num-hq", "nodule_fraction": "--nodule-fraction",
          "max_nodules": "--max-nodules"}


def _main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _build(args)
    except CommandError:
        raise
    except ValueError as err:  # name the flag the user typed, not the builder's parameter
        text = str(err)
        for name, flag in _FLAGS.items():
            if text.startswith(f"{name} ") or text.startswith(f"settings.{name} "):
                raise CommandError(flag + text[text.index(" "):]) from None
        raise


def _build(args) -> int:
    if args.command == "build-default":
        settings = DRRSettings(image_size=args.image_size, n_samples=args.samples, nodule_fraction=args.nodule_fraction, max_nodules=args.max_nodules)
        root = build_default(
            args.out, image_size=args.image_size, num_lq=args.num_lq, num_hq=args.num_hq, test_fraction=args.test_fraction,
            hq_fov_mm=args.hq_fov_mm, settings=settings, seed=args.seed, device=args.device, progress=not args.no_progress, rebuild=args.rebuild,
        )
    else:
        for flag, path in (("--ct", args.ct), ("--mask", args.mask)):
            if path is not None and not Path(path).exists():  # found before any rendering starts
                raise CommandError(f"{flag} {path}: no such file or folder")
        settings = DRRSettings(image_size=args.image_size, n_samples=args.samples)
        root = build_ct_drrs(
            args.ct, args.out, args.num, nodules=args.nodules, mask=args.mask, suppress=args.suppress_contrast, settings=settings,
            seed=args.seed, device=args.device, progress=not args.no_progress, rebuild=args.rebuild,
        )
    print(root)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; returns its exit status (2 with one line on stderr for bad input, see :mod:`dxr.cli`)."""
    return run(_main, argv, prog="python -m dxr.data")


if __name__ == "__main__":
    sys.exit(main())

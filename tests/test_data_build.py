"""dxr.data build commands: a tiny build of the embedded default dataset, DRRs of a user's CT, atomic output."""

import json
import subprocess
import sys

import numpy as np
import pytest

nib = pytest.importorskip("nibabel", reason="the data extra (nibabel) is not installed")
pytest.importorskip("scipy.ndimage", reason="the data extra (scipy) is not installed")
Image = pytest.importorskip("PIL.Image", reason="the data extra (Pillow) is not installed")
pytest.importorskip("tqdm", reason="tqdm is not installed")

from dxr.data import build, datasets  # noqa: E402
from dxr.data.__main__ import main  # noqa: E402
from dxr.data.samples import SampleDataMissing, ct_path, radiograph_path  # noqa: E402


def _embedded_or_skip():
    try:
        ct_path()
        radiograph_path()
    except SampleDataMissing as err:
        pytest.skip(f"embedded sample data not installed: {err}")


def _check_png16(path, size):
    with Image.open(path) as image:
        assert image.mode.startswith("I;16") and image.size == (size, size)


@pytest.mark.slow
def test_build_default_tiny_configuration(tmp_path):
    _embedded_or_skip()
    out = tmp_path / "default"
    command = [sys.executable, "-m", "dxr.data", "build-default", "--out", str(out), "--image-size", "32", "--num-lq", "8",
               "--num-hq", "5", "--samples", "48", "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["image_size"] == 32
    assert manifest["counts"]["lq"]["train"] == 6 and manifest["counts"]["lq"]["test"] == 2
    assert manifest["counts"]["hq"] == {"train": 4, "test": 1}
    assert manifest["provenance"]["ct"]["license"] == "MIT" and len(manifest["provenance"]["ct"]["sha256"]) == 64
    assert manifest["geometry"]["n_samples"] == 48 and manifest["geometry"]["sdd"] > manifest["geometry"]["sod"]
    regions = manifest["provenance"]["radiograph"]["regions"]
    assert regions["train"][3] < regions["test"][2]  # held-out region is disjoint
    lq = sorted((out / "lq").rglob("*.png"))
    hq = sorted((out / "hq").rglob("*.png"))
    assert len(lq) == 8 and len(hq) == 5
    for path in lq + hq:
        _check_png16(path, 32)
    # one physical scale: both domains' mm/px (detector plane) agree within 5%, recorded per image
    scale = manifest["scale"]
    assert scale["lq_pixel_mm"] == manifest["geometry"]["pixel_mm"]
    assert abs(scale["lq_over_hq"] - 1) < 0.05
    crops = manifest["hq_crops"]
    assert sorted(c["image"] for c in crops) == sorted(str(p.relative_to(out / "hq")) for p in hq)
    assert scale["hq_pixel_mm_mean"] == pytest.approx(np.mean([c["pixel_mm"] for c in crops]))
    assert "one CT" in manifest["split"]["limits"] and "one radiograph" in manifest["split"]["limits"]
    with_nodules = 0
    for path in lq:
        sidecar = json.loads(path.with_suffix(".json").read_text())
        assert sidecar["pixel_mm"] == scale["lq_pixel_mm"]
        assert set(sidecar["pose"]) == {"rotation_deg", "translation_mm"}
        for nodule in sidecar["nodules"]:
            assert 3.0 * 0.8**8 <= nodule["radius_mm"] <= 15.0 and nodule["lobe"].startswith("lung_")
            x0, y0, x1, y1 = nodule["box_px"]
            assert x0 <= nodule["center_px"][0] <= x1 and y0 <= nodule["center_px"][1] <= y1
        with_nodules += bool(sidecar["nodules"])
    assert with_nodules == manifest["counts"]["lq"]["with_nodules"] == 3 + 1  # half of each split
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.mode == "RGB" and sheet.size[0] >= 4 * 32
    unpaired = datasets.UnpairedFolders(out / "lq" / "train", out / "hq" / "train", image_size=32)
    a, b = unpaired[0]
    assert a.shape == b.shape == (1, 32, 32)
    # a second call finds the finished dataset and keeps it
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert build.build_default(out, image_size=32, progress=False) == out
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def _phantom_ct(path):
    shape, spacing = (48, 40, 36), (3.0, 3.0, 4.0)
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[(x / 66) ** 2 + (y / 52) ** 2 <= 1] = 40.0
    for side in (-1, 1):
        hu[((x - side * 30) / 24) ** 2 + (y / 34) ** 2 + (z / 60) ** 2 <= 1] = -850.0
    hu[(np.abs(x) < 8) & (np.abs(y + 40) < 6)] = 700.0  # a spine
    nib.save(nib.Nifti1Image(hu, np.diag([*spacing, 1.0])), str(path))


def test_drr_command_renders_a_user_ct_with_nodules(tmp_path):
    _phantom_ct(tmp_path / "ct.nii.gz")
    out = tmp_path / "drrs"
    code = main(["drr", "--ct", str(tmp_path / "ct.nii.gz"), "--out", str(out), "--num", "3", "--nodules", "2",
                 "--image-size", "32", "--samples", "40", "--no-progress"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["drrs"] == 3 and manifest["counts"]["with_nodules"] == 3
    images = sorted(out.glob("drr_*.png"))
    assert [p.name for p in images] == manifest["files"] == ["drr_00000.png", "drr_00001.png", "drr_00002.png"]
    for path in images:
        _check_png16(path, 32)
        sidecar = json.loads(path.with_suffix(".json").read_text())
        assert len(sidecar["nodules"]) == 2 and all(n["lobe"] is None for n in sidecar["nodules"])
        pixels = np.asarray(Image.open(path), dtype=np.float64) / 65535
        assert pixels.std() > 0.05  # a picture, not a blank
    assert (out / "contact_sheet.png").is_file()
    with pytest.raises(ValueError, match="needs a label map"):
        build.build_ct_drrs(tmp_path / "ct.nii.gz", tmp_path / "other", 1, suppress=True)


def test_failed_build_leaves_nothing_and_existing_folders_are_protected(tmp_path):
    def broken(folder):
        (folder / "half.png").write_bytes(b"x")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        build.atomic_build(tmp_path / "data", False, broken)
    assert list(tmp_path.iterdir()) == []

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        build.atomic_build(tmp_path / "mine", False, lambda folder: None)
    assert (tmp_path / "mine" / "keep.txt").read_text() == "user data"

    def complete(folder):
        (folder / "manifest.json").write_text("{}")

    assert build.atomic_build(tmp_path / "mine", True, complete) == tmp_path / "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"] and (tmp_path / "mine" / "manifest.json").is_file()


@pytest.mark.slow
def test_default_dataset_location_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DXR_DATA_DIR", str(tmp_path / "cache"))
    assert build.default_root(64) == tmp_path / "cache" / "default-64"
    cached = tmp_path / "cache" / "default-64"
    cached.mkdir(parents=True)
    (cached / "manifest.json").write_text("{}")
    assert build.default_dataset(image_size=64, progress=False) == cached  # found, not rebuilt
    monkeypatch.delenv("DXR_DATA_DIR")
    assert build.default_root() == build.default_root(256) and build.default_root().name == "default-256"
    assert ".cache" in build.default_root().parts

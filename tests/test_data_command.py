"""python -m dxr.data: every bad input is one line on stderr and exit status 2, found before rendering."""

import subprocess
import sys

import numpy as np
import pytest

nib = pytest.importorskip("nibabel", reason="the data extra (nibabel) is not installed")
pytest.importorskip("pydicom", reason="the data extra (pydicom) is not installed")
pytest.importorskip("scipy.ndimage", reason="the data extra (scipy) is not installed")

from dxr.data.__main__ import main  # noqa: E402

PROG = "python -m dxr.data: error: "


@pytest.fixture()
def cts(tmp_path):
    """A small valid CT, a truncated copy, a text file named as a CT, and a DICOM folder with no slice."""
    good = tmp_path / "ct.nii.gz"
    hu = np.random.default_rng(0).uniform(-1000, 1000, size=(12, 10, 8)).astype(np.float32)  # compresses little
    nib.save(nib.Nifti1Image(hu, np.eye(4)), str(good))
    data = good.read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.nii.gz").write_text("this is not a volume")
    (tmp_path / "series").mkdir()
    (tmp_path / "series" / "notes.txt").write_text("no slices here")
    (tmp_path / "badseries").mkdir()
    (tmp_path / "badseries" / "0001.dcm").write_text("not DICOM")
    (tmp_path / "a-file").write_text("x")
    return tmp_path


def _drr(root, ct, *extra, out="out"):
    return ["drr", "--ct", str(root / ct), "--out", str(root / out), "--num", "1", "--image-size", "16",
            "--samples", "8", "--no-progress", *extra]


def _one_error_line(capsys, *expected):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PROG), err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("ct, extra, expected", [
    ("missing.nii.gz", (), ["--ct", "missing.nii.gz", "no such file"]),
    ("text.nii.gz", (), ["text.nii.gz", "not a readable NIfTI"]),
    ("cut.nii.gz", (), ["cut.nii.gz", "truncated"]),
    ("series", (), ["series", "no DICOM slices"]),
    ("badseries", (), ["0001.dcm", "not a readable DICOM"]),
    ("ct.nii.gz", ("--num", "0"), ["--num must be >= 1"]),
    ("ct.nii.gz", ("--image-size", "4"), ["--image-size must be >= 8"]),
    ("ct.nii.gz", ("--mask", "nowhere.nii.gz"), ["--mask", "no such file"]),
])
def test_drr_command_errors_are_one_line(cts, capsys, ct, extra, expected):
    assert main(_drr(cts, ct, *extra)) == 2
    _one_error_line(capsys, *expected)
    assert not (cts / "out").exists()
    assert not [p for p in cts.iterdir() if p.name.startswith(".out")]  # no temporary folder left


def test_drr_out_naming_a_file_is_one_line(cts, capsys):
    assert main(_drr(cts, "ct.nii.gz", out="a-file")) == 2
    _one_error_line(capsys, "a-file", "not a folder")


def test_build_default_bad_settings_are_one_line(tmp_path, capsys):
    assert main(["build-default", "--out", str(tmp_path / "d"), "--test-fraction", "1", "--no-progress"]) == 2
    _one_error_line(capsys, "--test-fraction must be in [0, 1)")
    assert main(["build-default", "--out", str(tmp_path / "d"), "--image-size", "4", "--no-progress"]) == 2
    _one_error_line(capsys, "--image-size must be >= 8")
    assert not (tmp_path / "d").exists()


def test_the_module_entry_point_prints_one_line_and_exits_2(cts):
    result = subprocess.run([sys.executable, "-m", "dxr.data", *_drr(cts, "text.nii.gz")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(PROG) and "text.nii.gz" in result.stderr


def _help(argv, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "400")  # one line per flag
    assert main([*argv, "--help"]) == 0
    return capsys.readouterr().out


def test_help_is_plain_text_naming_both_commands(capsys, monkeypatch):
    text = _help([], capsys, monkeypatch)
    assert "``" not in text and ":class:" not in text
    assert "build-default" in text and "drr" in text and "COMMAND --help" in text


def test_command_help_says_the_builders_defaults(capsys, monkeypatch):
    import inspect

    from dxr.data.build import DRRSettings, build_ct_drrs, build_default

    default = inspect.signature(build_default).parameters
    settings = DRRSettings()
    text = _help(["build-default"], capsys, monkeypatch)
    assert "``" not in text
    assert f"LQ DRRs in all (default {default['num_lq'].default})" in text
    assert f"side of every image in pixels (default {default['image_size'].default})" in text
    assert f"share of each domain in test/ (default {default['test_fraction'].default})" in text
    assert f"samples per ray (default {settings.n_samples})" in text
    assert f"nodules per nodule volume, 1..N (default {settings.max_nodules})" in text
    text = _help(["drr"], capsys, monkeypatch)
    assert f"(default {inspect.signature(build_ct_drrs).parameters['nodules'].default})" in text
    assert f"side of every DRR in pixels (default {settings.image_size})" in text

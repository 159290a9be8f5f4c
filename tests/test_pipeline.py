"""python -m dxr.pipeline: every stage in order, a stopped run resumes without redoing finished stages."""

import json

import pytest

pytest.importorskip("PIL.Image", reason="the data extra (Pillow) is not installed")
pytest.importorskip("skimage", reason="the eval extra (scikit-image) is not installed")
pytest.importorskip("tqdm", reason="tqdm is not installed")

from dxr import pipeline  # noqa: E402
from dxr.cli import run  # noqa: E402
from dxr.training.checkpoint import CHECKPOINT  # noqa: E402

from tiny import make_dataset, pipeline_argv  # noqa: E402


def _stamps(out):
    return {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_pipeline_runs_every_stage_and_resumes_after_a_stop(tmp_path, capsys):
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "run"
    assert pipeline.main(pipeline_argv(data, out, "--stop-after", "synth-munit")) == 0
    first = capsys.readouterr().out
    assert "synth-munit" in first and "synth-ddpm" not in first.split("dxr.pipeline")[-1]
    assert not (out / "synth-ddpm").exists()
    for stage in ("lq-ddpm", "lq-munit"):
        assert (out / stage / CHECKPOINT).is_file()
    assert json.loads((out / "synth-munit" / "manifest.json").read_text())["settings"]["generator"] == "munit"
    before = _stamps(out)

    assert pipeline.main(pipeline_argv(data, out)) == 0
    second = capsys.readouterr().out
    summary = second.split("dxr.pipeline")[-1]
    for stage in ("data", "lq-ddpm", "lq-munit", "synth-munit"):
        assert f"{stage} " in summary and "skipped" in summary.split(stage)[1].splitlines()[0]
    for stage in ("synth-ddpm", "hq-ddpm-munit", "hq-ddpm-ddpm", "bicubic-ddpm", "evaluate", "enhance"):
        assert "done" in summary.split(stage)[1].splitlines()[0], summary
    after = _stamps(out)
    assert all(after[path] == stamp for path, stamp in before.items())  # nothing finished was redone
    report = out / "evaluate" / "report.md"
    assert f"report: {report}" in second
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    assert metrics  # the evaluation's figures, written last
    restored = sorted((out / "enhance").glob("*.png"))
    assert [p.stem for p in restored] == [p.stem for p in sorted((data / "lq" / "test").glob("*.png"))]

    # a third run finds everything complete
    assert pipeline.main(pipeline_argv(data, out)) == 0
    third = capsys.readouterr().out.split("dxr.pipeline")[-1]
    assert "done" not in third and third.count("skipped") == len(pipeline.STAGES)


def test_bad_pipeline_inputs_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "half" / "lq" / "train").mkdir(parents=True)
    for argv, words in (
        (["--data", str(tmp_path / "missing")], ["missing"]),
        (["--data", str(tmp_path / "half"), "--out", str(tmp_path / "run")], ["half", "lq/test"]),
        (["--steps", "0"], ["--steps"]),
        (["--device", "nonsense"], ["--device"]),
    ):
        status = run(pipeline.main, argv, prog="python -m dxr.pipeline")
        err = capsys.readouterr().err
        assert status == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert all(word in err for word in words), err
    assert not (tmp_path / "run" / "data" / "dataset.json").exists()

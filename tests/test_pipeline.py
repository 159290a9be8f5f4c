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
    """Modification times of every stage's files (summary.txt is the run's, rewritten each time)."""
    return {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.parent != out}


@pytest.mark.slow
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
    assert f"report: {report}" in second and "quality goals (cpu-demo)" in second
    assert (out / "summary.txt").read_text() in second
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
    # a stage that cannot start: one line naming the stage and the setting, nothing trained
    data = make_dataset(tmp_path / "data")
    status = run(pipeline.main, pipeline_argv(data, tmp_path / "bad", "--set", "unet.num_groups=3"),
                 prog="python -m dxr.pipeline")
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "stage lq-ddpm" in err and "num_groups" in err
    assert not (tmp_path / "bad" / "lq-ddpm" / CHECKPOINT).exists()


def _metrics(ours_psnr, baseline_psnr, identity_psnr, noise, hq_noise, kept):
    def cell(psnr, ssim, noise_value):
        return {"psnr": {"mean": psnr}, "ssim": {"mean": ssim}, "noise": {"mean": noise_value}}

    sets = {}
    for model, test_set in pipeline.OWN_TEST_SET.items():
        sets[test_set] = {"hq_noise": {"mean": hq_noise}, "metrics": {
            "identity": cell(identity_psnr, 0.5, 0.2), pipeline.BASELINE: cell(baseline_psnr, 0.6, 0.01),
            model: cell(ours_psnr, 0.7, noise)}}
    drrs = {"methods": {model: {"cnr_kept": kept, "n_nodules": 10} for model in pipeline.OWN_TEST_SET}}
    return {"pairs": {"sets": sets}, "drrs": drrs}


def test_quality_goals_read_the_evaluation():
    good = pipeline.quality_goals(_metrics(25.0, 20.0, 18.0, 0.01, 0.02, 0.9), "cpu-demo")
    assert len(good) == 12 and all(met for *_, met in good)
    bad = pipeline.quality_goals(_metrics(19.0, 20.0, 18.0, 0.03, 0.02, 0.8), "cpu-demo")
    failed = [goal for goal, _, met in bad if not met]
    assert len(failed) == 2 * 3 and all(("bicubic" in g and "PSNR" in g) or "noise" in g or "CNR" in g for g in failed)
    # the paper preset asks for the paper's gaps over the baseline: +7.4 dB (MUNIT-LQ), +2.4 dB (DDPM-LQ)
    paper = {goal: met for goal, _, met in pipeline.quality_goals(_metrics(25.0, 20.0, 18.0, 0.01, 0.02, 1), "paper")}
    assert [met for goal, met in paper.items() if "PSNR" in goal] == [False, True]

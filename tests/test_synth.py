"""python -m dxr.synth: stage-1 models turn HQ radiographs into aligned (LQ, HQ) pairs."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("PIL.Image", reason="the data extra (Pillow) is not installed")
pytest.importorskip("tqdm", reason="tqdm is not installed")

from dxr import synth  # noqa: E402
from dxr.cli import run  # noqa: E402
from dxr.data.build import file_sha256  # noqa: E402
from dxr.data.io import read_image, write_png16  # noqa: E402
from dxr.diffusion import make_schedule  # noqa: E402

from tiny import SIZE, trained_runs  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny dataset and its stage-1 models (two training steps each)."""
    return trained_runs(tmp_path_factory.mktemp("synth"), "lq-munit")


def _synth(tmp_path, runs, generator, *extra):
    data, run = runs
    out = tmp_path / f"pairs-{generator}"
    model = run / ("lq-munit" if generator == "munit" else "lq-ddpm")
    argv = ["--generator", generator, "--checkpoint", str(model), "--hq", str(data / "hq"), "--out", str(out),
            "--device", "cpu", "--no-progress", *extra]
    assert synth.main(argv) == 0
    return out, model


@pytest.mark.parametrize("generator", ["munit", "ddpm"])
def test_pairs_are_aligned_with_equal_names_and_sizes_per_split(tmp_path, runs, generator):
    extra = ["--strength", "0.05", "--steps", "3"] if generator == "ddpm" else []
    out, model = _synth(tmp_path, runs, generator, "--batch-size", "3", *extra)
    data, _ = runs
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["generator"] == generator
    assert manifest["checkpoint"]["sha256"] == file_sha256(model / "checkpoint.safetensors")
    assert manifest["checkpoint"]["stage"] == synth.GENERATORS[generator]
    for split, count in (("train", 8), ("test", 3)):
        lq = sorted(p.name for p in (out / split / "lq").iterdir())
        hq = sorted(p.name for p in (out / split / "hq").iterdir())
        source = sorted(p.name for p in (data / "hq" / split).glob("*.png"))
        assert lq == hq == source and len(lq) == count
        assert manifest["splits"][split]["pairs"] == count
        for name in lq:
            low, high = read_image(out / split / "lq" / name), read_image(out / split / "hq" / name)
            assert low.shape == high.shape == (SIZE, SIZE)
            # the HQ side is the source itself; the LQ side is made from it
            assert np.abs(high - read_image(data / "hq" / split / name)).max() < 1e-4
            if generator == "ddpm":  # SDEdit at noise level 0.05 keeps the image: a misaligned pair would not
                assert np.corrcoef(low.ravel(), high.ravel())[0, 1] > 0.8


def test_the_split_asked_alone_and_same_seed_same_pairs(tmp_path, runs):
    first, _ = _synth(tmp_path / "a", runs, "ddpm", "--split", "test", "--steps", "2", "--seed", "3")
    assert sorted(p.name for p in first.iterdir()) == ["manifest.json", "test"]
    again, _ = _synth(tmp_path / "b", runs, "ddpm", "--split", "test", "--steps", "2", "--seed", "3")
    for path in sorted((first / "test" / "lq").iterdir()):
        np.testing.assert_array_equal(read_image(path), read_image(again / "test" / "lq" / path.name))


def test_cuda_graph_falls_back_on_a_cpu_and_a_torch_profile_traces_every_step(tmp_path, runs):
    args = ("--split", "test", "--steps", "2", "--seed", "3")
    plain, _ = _synth(tmp_path / "plain", runs, "ddpm", *args)
    graphed, _ = _synth(tmp_path / "graph", runs, "ddpm", *args, "--cuda-graph", "--profile", "torch")
    for path in sorted((plain / "test" / "lq").iterdir()):  # the same pairs as the plain loop
        np.testing.assert_array_equal(read_image(path), read_image(graphed / "test" / "lq" / path.name))
    trace = json.loads((graphed / "trace.json").read_text())
    steps = [e for e in trace["traceEvents"] if e.get("name") == "sample.step"]
    assert steps and len(steps) % 2 == 0  # two DDIM steps per batch
    assert not (plain / "trace.json").exists()
    parsed = synth._parser().parse_args(["--generator", "ddpm", "--checkpoint", "c", "--hq", "h", "--out", "o",
                                         "--cuda-graph", "--profile", "nvtx"])
    assert parsed.cuda_graph and parsed.profile == "nvtx"
    assert synth._parser().parse_args(["--generator", "ddpm", "--checkpoint", "c", "--hq", "h", "--out", "o"]).profile \
        == "none"
    with pytest.raises(SystemExit):
        synth._parser().parse_args(["--generator", "ddpm", "--checkpoint", "c", "--hq", "h", "--out", "o",
                                    "--profile", "perf"])


def test_strength_is_a_noise_level_under_every_schedule():
    for schedule in ("linear", "cosine"):
        alphas = make_schedule(schedule, 1000)
        for strength in (0.1, 0.4, 0.9):
            t0 = synth.strength_to_t0(strength, alphas)
            share = (1 - alphas.double()).sqrt()
            assert share[t0 - 1] >= strength and (t0 == 1 or share[t0 - 2] < strength)
    assert synth.strength_to_t0(1.0, torch.linspace(0.99, 0.0, 10)) == 10
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="--strength"):
            synth.strength_to_t0(bad, make_schedule("linear", 10))


def _fails(capsys, argv, *words):
    status = run(synth.main, argv, prog="python -m dxr.synth")
    err = capsys.readouterr().err
    assert status == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for word in words:
        assert word in err
    return err


def test_bad_inputs_are_one_line_errors_and_write_nothing(tmp_path, runs, capsys):
    data, run = runs
    out = tmp_path / "out"
    base = ["--hq", str(data / "hq"), "--out", str(out), "--device", "cpu", "--no-progress"]
    _fails(capsys, ["--generator", "munit", "--checkpoint", str(tmp_path / "missing"), *base], "missing")
    # a checkpoint of the other stage
    _fails(capsys, ["--generator", "munit", "--checkpoint", str(run / "lq-ddpm"), *base], "lq-ddpm", "lq-munit")
    torn = tmp_path / "torn.safetensors"
    torn.write_bytes((run / "lq-ddpm" / "checkpoint.safetensors").read_bytes()[:100])
    _fails(capsys, ["--generator", "ddpm", "--checkpoint", str(torn), *base], str(torn))
    # a size the network cannot take
    _fails(capsys, ["--generator", "ddpm", "--checkpoint", str(run / "lq-ddpm"), "--image-size", "15", *base],
           "--image-size")
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(capsys, ["--generator", "ddpm", "--checkpoint", str(run / "lq-ddpm"), "--hq", str(empty),
                    "--out", str(out), "--device", "cpu"], str(empty))
    colour = tmp_path / "colour"
    colour.mkdir()
    write_png16(colour / "a.png", np.full((SIZE, SIZE), 0.5))
    from PIL import Image

    Image.new("RGB", (SIZE, SIZE)).save(colour / "b.png")
    _fails(capsys, ["--generator", "ddpm", "--checkpoint", str(run / "lq-ddpm"), "--hq", str(colour),
                    "--out", str(out), "--device", "cpu", "--no-progress"], "b.png", "channel")
    _fails(capsys, ["--generator", "ddpm", "--checkpoint", str(run / "lq-ddpm"), "--strength", "0", *base],
           "--strength")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_reference_styles_and_ilvr(tmp_path, runs):
    data, _ = runs
    out, _ = _synth(tmp_path, runs, "munit", "--style", "reference", "--style-images", str(data / "lq" / "train"),
                    "--split", "test")
    assert json.loads((out / "manifest.json").read_text())["settings"]["style"] == "reference"
    random_style, _ = _synth(tmp_path / "random", runs, "munit", "--split", "test")
    differs = [np.abs(read_image(p) - read_image(random_style / "test" / "lq" / p.name)).max() > 1e-3
               for p in sorted((out / "test" / "lq").iterdir())]
    assert all(differs)  # the reference images' styles, not random ones
    guided, _ = _synth(tmp_path, runs, "ddpm", "--ilvr", "4", "--strength", "0.9", "--steps", "3", "--split", "test")
    free, _ = _synth(tmp_path / "free", runs, "ddpm", "--strength", "0.9", "--steps", "3", "--split", "test")
    from dxr.diffusion import low_pass

    def low(folder, name):
        return low_pass(torch.from_numpy(read_image(folder / "test" / name))[None, None], 4)

    for path in sorted((guided / "test" / "lq").iterdir()):
        hq = low(guided, "hq/" + path.name)
        # ILVR keeps the HQ image's 1/4 low-pass far closer than unguided SDEdit at the same strength
        assert (low(guided, "lq/" + path.name) - hq).abs().mean() < 0.5 * (low(free, "lq/" + path.name) - hq).abs().mean()

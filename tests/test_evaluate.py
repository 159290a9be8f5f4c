"""python -m dxr.evaluate: PSNR/SSIM, noise, sharpness and nodule CNR measures, folders, the report.

Everything runs on tiny images made here; the end-to-end case restores with an untrained 16² DDPM-HQ
checkpoint (a few DDIM steps), the others with small stand-in restorers.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from dxr import evaluate as ev
from dxr import report as report_module
from dxr.cli import CommandError
from dxr.data.io import write_png16

SIZE = 32


def _smooth(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A smooth 'radiograph': a gradient and a soft blob, in [0.2, 0.8]."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    cx, cy = rng.uniform(0.3, 0.7, 2)
    return 0.2 + 0.3 * yy + 0.3 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.05)


def _noisy(image: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    return np.clip(image + sigma * np.random.default_rng(seed).standard_normal(image.shape), 0, 1)


class Smoother:
    """A stand-in restorer: a Gaussian blur of each image (``scale`` 2 doubles the size)."""

    def __init__(self, sigma: float = 1.0, scale: int = 1):
        self.sigma, self.scale, self.calls = sigma, scale, []

    def restore(self, images, *, first=0):
        self.calls.append((len(images), first))
        outputs = []
        for image in images:
            out = torch.from_numpy(gaussian_filter(image[0, 0].numpy(), self.sigma).astype(np.float32))[None, None]
            if self.scale != 1:
                out = torch.nn.functional.interpolate(out, scale_factor=self.scale, mode="nearest")
            outputs.append(out)
        return outputs

    def settings(self):
        return {"stage": "stand-in", "sigma": self.sigma}


# --------------------------------------------------------------------------------------------------
# image_metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_metrics_agree_with_skimage(seed):
    rng = np.random.default_rng(seed)
    target = rng.uniform(0, 1, (40, 48))
    pred = np.clip(target + 0.05 * rng.standard_normal(target.shape), 0, 1)
    got = ev.image_metrics(pred, target)
    assert got["psnr"] == pytest.approx(peak_signal_noise_ratio(target, pred, data_range=1.0), rel=1e-9)
    assert got["ssim"] == pytest.approx(structural_similarity(target, pred, data_range=1.0), rel=1e-9)
    mse = np.mean((pred - target) ** 2)
    assert got["psnr"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-9)


def test_psnr_of_a_constant_offset_of_a_tenth_is_20_db():
    target = np.full((16, 16), 0.5)
    got = ev.image_metrics(target + 0.1, target)
    assert got["psnr"] == pytest.approx(20.0, abs=1e-9)
    assert 0 < got["ssim"] < 1


def test_identical_images_have_infinite_psnr_capped_in_summaries_and_json_safe():
    image = _smooth(np.random.default_rng(0))
    got = ev.image_metrics(image, image)
    assert got["psnr"] == math.inf and got["ssim"] == pytest.approx(1.0)
    stats = ev.summary([got["psnr"], 30.0], cap=ev.PSNR_CAP_DB)
    assert stats["mean"] == pytest.approx((ev.PSNR_CAP_DB + 30) / 2) and stats["n"] == 2
    text = json.dumps(ev.json_safe({"psnr": got["psnr"], "cnr": math.nan, "x": np.float32(1.5)}), allow_nan=False)
    assert json.loads(text) == {"psnr": "inf", "cnr": None, "x": 1.5}


@pytest.mark.parametrize("pred, target, words", [
    (np.zeros((2, 8, 8)), np.zeros((8, 8)), ["pred", "2-D"]),
    (np.zeros((8, 8)), np.full((8, 8), 1.5), ["target", "[0, 1]"]),
    (np.full((8, 8), np.nan), np.zeros((8, 8)), ["pred", "finite"]),
    (np.zeros((8, 8)), np.zeros((8, 9)), ["same shape"]),
    (np.zeros((2, 2)), np.zeros((2, 2)), ["3×3", "SSIM"]),
])
def test_image_metrics_refuse_bad_images_naming_the_argument(pred, target, words):
    with pytest.raises(ValueError) as caught:
        ev.image_metrics(pred, target)
    assert all(w in str(caught.value) for w in words), str(caught.value)


@pytest.mark.parametrize("side, window", [(5, 5), (4, 3), (3, 3), (7, 7), (64, 7)])
def test_tiny_images_get_an_ssim_window_that_fits(side, window):
    rng = np.random.default_rng(side)
    target = rng.uniform(0, 1, (side, side + 2))
    pred = np.clip(target + 0.05, 0, 1)
    assert ev.ssim_window(side, side + 2) == window
    got = ev.image_metrics(pred, target)
    assert got["ssim"] == pytest.approx(structural_similarity(target, pred, data_range=1.0, win_size=window))


def test_small_rounding_outside_the_unit_range_is_accepted():
    target = np.full((8, 8), 0.5)
    assert math.isfinite(ev.image_metrics(target + 0.5 + 1e-6, target)["psnr"])


# --------------------------------------------------------------------------------------------------
# noise, sharpness, CNR


def test_noise_measure_rises_with_the_noise_sigma():
    clean = _smooth(np.random.default_rng(0), 64)
    levels = [ev.noise_measure(_noisy(clean, sigma, seed=1), reference=clean) for sigma in (0.0, 0.01, 0.02, 0.05)]
    assert all(a < b for a, b in zip(levels, levels[1:])), levels
    assert levels[0] < 0.5 * levels[1]  # a smooth image has little residual
    no_reference = [ev.noise_measure(_noisy(clean, sigma, seed=1)) for sigma in (0.0, 0.02)]
    assert no_reference[0] < no_reference[1]


def test_noise_measure_keeps_to_the_mask_and_checks_shapes():
    clean = _smooth(np.random.default_rng(0), 64)
    noisy = clean.copy()
    noisy[:, 32:] = _noisy(clean, 0.05, seed=2)[:, 32:]
    left = np.zeros(clean.shape, dtype=bool)
    left[:, :28] = True
    quiet = ev.noise_measure(noisy, reference=clean, mask=left)
    assert quiet < 0.2 * ev.noise_measure(noisy, reference=clean, mask=~left)
    with pytest.raises(ValueError, match="reference"):
        ev.noise_measure(clean, reference=clean[:10])
    with pytest.raises(ValueError, match="mask"):
        ev.noise_measure(clean, mask=np.zeros(clean.shape, dtype=bool))


def test_sharpness_is_the_slope_of_a_ramp_and_falls_with_blur():
    ramp = np.tile(np.arange(32) * 0.01, (32, 1))
    assert ev.sharpness(ramp) == pytest.approx(0.01, rel=0.1)
    image = _noisy(_smooth(np.random.default_rng(0), 64), 0.02, seed=3)
    assert ev.sharpness(gaussian_filter(image, 2)) < ev.sharpness(image)


NODULE = {"id": 0, "center_px": [30.0, 34.0], "box_px": [24.0, 28.0, 36.0, 40.0], "in_view": True, "diameter_mm": 6.0}


def _nodule_image(amplitude: float, blur: float = 0.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64]
    blob = amplitude * np.exp(-((xx - 30) ** 2 + (yy - 34) ** 2) / (2 * 3.0 ** 2))
    if blur:
        blob = gaussian_filter(blob, blur)
    return 0.4 + blob + 0.02 * rng.standard_normal((64, 64))


def test_nodule_cnr_rises_when_the_nodule_brightens_and_falls_when_it_is_blurred_away():
    base = ev.nodule_cnr(_nodule_image(0.1), NODULE)
    assert base > 2
    assert ev.nodule_cnr(_nodule_image(0.2), NODULE) > base
    assert ev.nodule_cnr(_nodule_image(0.1, blur=8), NODULE) < 0.5 * base
    assert abs(ev.nodule_cnr(_nodule_image(0.0), NODULE)) < 0.5 * base  # replaced by background
    assert ev.nodule_cnr(_nodule_image(-0.1), NODULE) < 0  # a darker spot keeps its sign


def test_nodule_cnr_regions_and_edge_cases():
    inside, ring = ev.nodule_regions((64, 64), NODULE)
    assert inside[34, 30] and not ring[34, 30] and not (inside & ring).any()
    assert ring.sum() >= 8 and not ring[28:41, 24:37].any()  # the ring lies outside the box
    flat = np.full((64, 64), 0.4)
    flat[34, 30] = 0.5
    assert math.isfinite(ev.nodule_cnr(flat, NODULE))  # background std floored
    off = {"center_px": [200.0, 200.0], "box_px": [195.0, 195.0, 205.0, 205.0]}
    assert math.isnan(ev.nodule_cnr(flat, off))
    with pytest.raises(ValueError, match="box_px"):
        ev.nodule_cnr(flat, {"center_px": [3, 3]})


# --------------------------------------------------------------------------------------------------
# folders


def _pairs(root: Path, count: int = 3, *, size: int = SIZE, noise: float = 0.03, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(count):
        hq = _smooth(rng, size)
        write_png16(root / "hq" / f"{i:03d}.png", hq)
        write_png16(root / "lq" / f"{i:03d}.png", _noisy(hq, noise, seed=100 + i) if noise else hq)
    return root


def test_paired_files_lists_pairs_in_name_order(tmp_path):
    pairs = ev.paired_files(_pairs(tmp_path / "set"))
    assert [(lq.parent.name, hq.parent.name, lq.name) for lq, hq in pairs] == \
        [("lq", "hq", f"{i:03d}.png") for i in range(3)]
    assert all(lq.name == hq.name for lq, hq in pairs)


def test_paired_files_errors_name_the_folder(tmp_path):
    with pytest.raises(CommandError, match="no such folder") as caught:
        ev.paired_files(tmp_path / "missing")
    assert str(tmp_path / "missing") in str(caught.value)
    (tmp_path / "half" / "lq").mkdir(parents=True)
    with pytest.raises(CommandError, match="missing hq/") as caught:
        ev.paired_files(tmp_path / "half")
    assert str(tmp_path / "half") in str(caught.value)
    (tmp_path / "empty" / "lq").mkdir(parents=True)
    (tmp_path / "empty" / "hq").mkdir()
    with pytest.raises(CommandError, match="no PNG"):
        ev.paired_files(tmp_path / "empty")
    folder = _pairs(tmp_path / "odd")
    (folder / "hq" / "001.png").rename(folder / "hq" / "999.png")
    with pytest.raises(CommandError) as caught:
        ev.paired_files(folder)
    message = str(caught.value)
    assert str(folder) in message and "only in lq/: 001" in message and "only in hq/: 999" in message


def test_pairs_of_different_sizes_are_refused_when_read(tmp_path):
    folder = _pairs(tmp_path / "set", count=1)
    write_png16(folder / "hq" / "000.png", np.zeros((16, 16)))
    with pytest.raises(CommandError, match="one size"):
        ev.evaluate_pairs({}, {"set": folder})


def _drrs(root: Path) -> Path:
    root.mkdir(parents=True)
    write_png16(root / "drr_00000.png", np.clip(_nodule_image(0.15), 0, 1))
    out_of_view = dict(NODULE, id=1, center_px=[-20.0, 10.0], box_px=[-26.0, 4.0, -14.0, 16.0], in_view=False)
    (root / "drr_00000.json").write_text(json.dumps({"pixel_mm": 2.0, "nodules": [NODULE, out_of_view]}))
    write_png16(root / "drr_00001.png", np.clip(_nodule_image(0.0, seed=1), 0, 1))
    (root / "drr_00001.json").write_text(json.dumps({"pixel_mm": 2.0, "nodules": []}))
    write_png16(root / "drr_00002.png", np.clip(_nodule_image(0.0, seed=2), 0, 1))  # no sidecar
    return root


def test_drr_files_keep_in_view_nodules_and_images_without_sidecars(tmp_path):
    found = ev.drr_files(_drrs(tmp_path / "drrs"))
    assert [(p.name, [n["id"] for n in nodules]) for p, nodules in found] == \
        [("drr_00000.png", [0]), ("drr_00001.png", []), ("drr_00002.png", [])]
    with pytest.raises(CommandError, match="no such folder"):
        ev.drr_files(tmp_path / "missing")
    (tmp_path / "none").mkdir()
    with pytest.raises(CommandError, match="no PNG"):
        ev.drr_files(tmp_path / "none")
    (tmp_path / "drrs" / "drr_00001.json").write_text("{not json")
    with pytest.raises(CommandError, match="drr_00001.json"):
        ev.drr_files(tmp_path / "drrs")


# --------------------------------------------------------------------------------------------------
# evaluating


def test_evaluate_pairs_scores_identity_first_then_each_method(tmp_path):
    folder = _pairs(tmp_path / "set", count=5, noise=0.05)
    smoother = Smoother(sigma=1.0)
    result = ev.evaluate_pairs({"smooth": smoother, "skipped": None}, {"noisy": folder}, batch_size=2, samples=2)
    assert result["methods"] == ["identity", "smooth"]
    scores = result["sets"]["noisy"]
    assert scores["n"] == 5 and len(scores["images"]) == 5
    assert smoother.calls == [(2, 0), (2, 2), (1, 4)]  # images restored in batches, numbered in order
    identity, smooth = scores["metrics"]["identity"], scores["metrics"]["smooth"]
    assert smooth["psnr"]["mean"] > identity["psnr"]["mean"]  # smoothing removes much of the noise
    assert smooth["noise"]["mean"] < identity["noise"]["mean"]
    assert scores["hq_noise"]["mean"] < smooth["noise"]["mean"]
    assert identity["psnr"]["n"] == 5 and identity["psnr"]["std"] >= 0
    first = scores["images"][0]
    lq, hq = (ev.read_grayscale(p) for p in ev.paired_files(folder)[0])
    assert first["psnr"]["identity"] == pytest.approx(ev.image_metrics(lq, hq)["psnr"])
    assert len(result["samples"]["noisy"]) == 2 and set(result["samples"]["noisy"][0]["outputs"]) == {"smooth"}
    assert scores["resized"] == {"identity": False, "smooth": False}
    assert ev.evaluate_pairs({}, {"noisy": folder}, max_images=2)["sets"]["noisy"]["n"] == 2


def test_outputs_of_another_size_are_resized_to_hq_and_noted(tmp_path):
    folder = _pairs(tmp_path / "set", count=2)
    result = ev.evaluate_pairs({"x2": Smoother(scale=2)}, {"set": folder})
    assert result["sets"]["set"]["resized"]["x2"] is True
    assert result["samples"]["set"][0]["outputs"]["x2"].shape == (SIZE, SIZE)


class Function:
    """A stand-in restorer called as a function of an (1, 1, H, W) tensor (it has no ``restore``)."""

    def __init__(self, change):
        self.change = change

    def __call__(self, images):
        return torch.from_numpy(np.clip(self.change(images[0, 0].numpy()), 0, 1).astype(np.float32))[None, None]


def _erase_nodule_sized_detail(image):
    """Removes the band of nodule-sized detail (σ 1 to 8 px) and keeps the fine noise: nodules fade."""
    return image - (gaussian_filter(image, 1.0) - gaussian_filter(image, 8.0))


def test_evaluate_drrs_counts_nodules_whose_cnr_falls(tmp_path):
    folder = _drrs(tmp_path / "drrs")
    result = ev.evaluate_drrs({"erase": Function(_erase_nodule_sized_detail), "keep": Function(lambda x: x),
                                "blur": Function(lambda x: gaussian_filter(x, 2.0))}, folder, batch_size=2, samples=2)
    assert (result["n_images"], result["n_nodules"], result["n_measurable"], result["n_with_nodules"]) == (3, 1, 1, 1)
    erase, keep, blur = (result["methods"][m] for m in ("erase", "keep", "blur"))
    assert (erase["cnr_fell"], erase["cnr_kept"]) == (1.0, 0.0)
    assert erase["cnr"]["mean"] < result["before"]["cnr"]["mean"]
    assert (keep["cnr_fell"], keep["cnr_kept"]) == (0.0, 1.0)
    assert keep["cnr_ratio"]["median"] == pytest.approx(1.0)
    assert blur["sharpness"]["mean"] < result["before"]["sharpness"]["mean"]
    assert [s["name"] for s in result["samples"]] == ["drr_00000", "drr_00001"]  # images with nodules first
    only = ev.evaluate_drrs({}, folder, max_images=1)
    assert only["n_images"] == 1 and only["n_nodules"] == 1 and only["methods"] == {}


def test_write_report_removes_a_stale_metrics_file_and_writes_it_last(tmp_path, monkeypatch):
    folder = _pairs(tmp_path / "set", count=2)
    result = ev.evaluate_pairs({"smooth": Smoother()}, {"set": folder})
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("{}")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(report_module, "pairs_figure", broken)
    with pytest.raises(OSError):
        ev.write_report(out, result, None, {})
    assert not (out / "metrics.json").exists()
    monkeypatch.undo()
    report = ev.write_report(out, result, None, {"steps": 3})
    assert report == out / "report.md" and (out / "figures" / "pairs_set.png").is_file()
    assert (out / "metrics.json").stat().st_mtime_ns >= report.stat().st_mtime_ns
    assert not [p for p in out.rglob(".*tmp*")]


# --------------------------------------------------------------------------------------------------
# the command


def _numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained 16² hq-ddpm run folder: a real restorer that is cheap to sample."""
    from dxr.training import stages
    from dxr.training.checkpoint import save_checkpoint
    from dxr.training.config import apply_overrides, preset

    tiny = ["unet.base_channels=8", "unet.channel_mult=1,2", "unet.num_res_blocks=1", "unet.attention_resolutions=8",
            "unet.num_head_channels=8", "unet.num_groups=4", "timesteps=50"]
    config = apply_overrides(preset("cpu-demo", "hq-ddpm", image_size=16, progress=False), tiny)
    torch.manual_seed(0)
    net = stages.build_net(config, backend="torch")
    folder = tmp_path_factory.mktemp("hq-ddpm")
    save_checkpoint(folder, config=config, step=1, net=net, ema=None, optimizers={}, scaler=None, data_state={})
    return folder


@pytest.fixture
def one_thread():
    """Tiny networks run faster on one CPU thread than on several contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_main_end_to_end_with_a_tiny_checkpoint(tmp_path, tiny_checkpoint, capsys, one_thread):
    noisy = _pairs(tmp_path / "noisy", count=3)
    same = _pairs(tmp_path / "same", count=2, noise=0.0, seed=5)  # LQ identical to HQ: infinite PSNR
    drrs = _drrs(tmp_path / "drrs")
    out = tmp_path / "out"
    status = ev.main(["--pairs", f"Noisy pairs={noisy}", "--pairs", f"same={same}", "--model", f"tiny DDPM={tiny_checkpoint}",
                      "--drrs", str(drrs), "--out", str(out), "--steps", "2", "--batch-size", "16", "--device", "cpu",
                      "--no-progress"])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert f"report: {out / 'report.md'}" in printed.out and "| identity (LQ input) |" in printed.out
    report = (out / "report.md").read_text()
    for text in ("| identity (LQ input) |", "| tiny DDPM |", "Noisy pairs (n=3)", "same (n=2)", "HQ (reference)",
                 "before (DRR as is)", "figures/pairs_noisy-pairs.png", "figures/pairs_same.png", "figures/drrs.png"):
        assert text in report, text
    assert report.index("| identity (LQ input) |") < report.index("| tiny DDPM |")
    for name in ("pairs_noisy-pairs.png", "pairs_same.png", "drrs.png"):
        assert (out / "figures" / name).stat().st_size > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(math.isfinite(v) for v in _numbers(metrics))
    sets = metrics["pairs"]["sets"]
    assert sets["Noisy pairs"]["n"] == 3 and sets["same"]["n"] == 2
    assert sets["same"]["metrics"]["identity"]["psnr"]["mean"] == ev.PSNR_CAP_DB
    assert sets["same"]["metrics"]["identity"]["psnr_infinite"] == 2
    assert sets["same"]["images"][0]["psnr"]["identity"] == "inf"
    assert math.isfinite(sets["Noisy pairs"]["metrics"]["tiny DDPM"]["psnr"]["mean"])
    assert metrics["drrs"]["n_nodules"] == 1 and metrics["drrs"]["methods"]["tiny DDPM"]["n_nodules"] == 1
    assert metrics["settings"]["models"]["tiny DDPM"]["stage"] == "hq-ddpm"
    assert metrics["settings"]["steps"] == 2


def test_main_with_identity_only_and_a_stand_in(tmp_path, monkeypatch, capsys):
    folder = _pairs(tmp_path / "set", count=2)
    assert ev.main(["--pairs", f"set={folder}", "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    assert "| identity (LQ input) |" in (tmp_path / "a" / "report.md").read_text()
    monkeypatch.setattr(ev, "load_restorers", lambda models, **kw: {name: Smoother() for name in models})
    assert ev.main(["--pairs", f"set={folder}", "--model", "smooth=anything", "--out", str(tmp_path / "b"),
                    "--no-progress", "--max-images", "1"]) == 0
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["pairs"]["methods"] == ["identity", "smooth"] and metrics["pairs"]["sets"]["set"]["n"] == 1
    capsys.readouterr()


@pytest.mark.parametrize("flags, words", [
    (["--pairs", "no-equals-sign"], ["--pairs", "NAME=DIR"]),
    (["--pairs", "=dir"], ["--pairs", "NAME=DIR"]),
    ([], ["--pairs"]),
    (["--pairs", "x={pairs}", "--model", "m"], ["--model", "NAME=CKPT"]),
    (["--pairs", "x={pairs}", "--model", "m={tmp}/nothing"], ["--model m=", "no such"]),
    (["--pairs", "x={pairs}", "--model", "identity={tmp}"], ["identity"]),
    (["--pairs", "x={pairs}", "--pairs", "x={pairs}"], ["twice"]),
    (["--pairs", "x={tmp}/nothing"], ["--pairs x", "no such folder"]),
    (["--pairs", "x={pairs}", "--max-images", "0"], ["--max-images"]),
    (["--drrs", "{tmp}/nothing"], ["--drrs", "no such folder"]),
])
def test_bad_flags_fail_with_one_line_and_no_metrics(tmp_path, capsys, flags, words):
    pairs = _pairs(tmp_path / "pairs", count=1)
    argv = [f.format(pairs=pairs, tmp=tmp_path) for f in flags] + ["--out", str(tmp_path / "out"), "--no-progress"]
    assert ev.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("python -m dxr.evaluate: error: "), err
    assert all(w in err for w in words), err
    assert not (tmp_path / "out" / "metrics.json").exists()

"""python -m dxr.train: every stage learns, resume continues exactly, checkpoints, reports, DDP, Ctrl-C.

Everything runs on tiny 16² PNG folders made here, with tiny networks and a few steps.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dxr.train as train_mod
from dxr.training import stages
from dxr.training.checkpoint import CHECKPOINT, load_trained, read_checkpoint
from dxr.training.config import ConfigError, apply_overrides, differences, preset, replace
from dxr.training.data import StepBatches
from dxr.training.report import MetricsLog, save_grid, save_loss_curve

SIZE = 16
TINY = [
    "unet.base_channels=8", "unet.channel_mult=1,2", "unet.num_res_blocks=1", "unet.attention_resolutions=8",
    "unet.num_head_channels=8", "unet.num_groups=4", "timesteps=50", "sample_steps=3", "sdedit_t0=20",
    "munit.dim=4", "munit.mlp_dim=8", "munit.n_downsample=1", "munit.n_res=1", "munit.dis_dim=4",
    "munit.dis_layers=2", "munit.dis_scales=2",
]


def _write_png16(path: Path, array01: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(array01 * 65535).astype(np.uint16)).save(path)


def _image(rng: np.random.Generator, blur: bool) -> np.ndarray:
    """A smooth random 'radiograph': a bright blob on a gradient; LQ images are blurred copies."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    cx, cy, r = rng.uniform(0.3, 0.7, 3)
    image = 0.3 + 0.4 * yy + 0.3 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (0.05 * r))
    image = image + 0.05 * rng.standard_normal((SIZE, SIZE))
    if blur:
        image = (image + np.roll(image, 1, 0) + np.roll(image, 1, 1) + np.roll(image, -1, 0)) / 4
    return np.clip(image, 0, 1)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """root/{lq,hq}/{train,test}/*.png (16-bit) and pairs/{lq,hq}/*.png."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for domain in ("lq", "hq"):
        for split, count in (("train", 12), ("test", 4)):
            for i in range(count):
                _write_png16(root / "set" / domain / split / f"{i:03d}.png", _image(rng, domain == "lq"))
    for i in range(12):
        hq = _image(rng, False)
        _write_png16(root / "pairs" / "hq" / f"{i:03d}.png", hq)
        _write_png16(root / "pairs" / "lq" / f"{i:03d}.png", (hq + np.roll(hq, 1, 0) + np.roll(hq, 1, 1)) / 3)
    return root


def _config(stage, data, out, **changes):
    config = preset("cpu-demo", stage, data=str(data / "set"), pairs=str(data / "pairs"), out=str(out), image_size=SIZE,
                    batch_size=4, num_samples=4, progress=False, log_every=1, **changes)
    return apply_overrides(config, TINY)


def _args(stage, data, out, *extra):
    sets = [a for s in TINY for a in ("--set", s)]
    return ["--stage", stage, "--data", str(data / "set"), "--pairs", str(data / "pairs"), "--out", str(out),
            "--image-size", str(SIZE), "--batch-size", "4", "--no-progress", "--log-every", "1",
            "--set", "num_samples=4", *sets, *extra]


def _losses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------------
# learning


def _fixed_batch_loss(net, config, batch, seed=123):
    """The stage's loss on a batch with fixed randomness (MUNIT: its reconstruction terms)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        loss, parts = net(*batch, "gen" if config.stage == "lq-munit" else "loss")
    return float(parts["recon_x"] + parts["recon_c"] + parts["recon_s"]) if config.stage == "lq-munit" else float(loss)


@pytest.mark.parametrize("stage", ["lq-ddpm", "lq-munit", "hq-ddpm", "bicubic-ddpm"])
@pytest.mark.slow
def test_twenty_steps_lower_the_loss_on_a_fixed_batch(stage, data, tmp_path):
    config = _config(stage, data, tmp_path, lr=3e-3)
    torch.manual_seed(0)
    net = stages.build_net(config, backend="torch")
    updates = stages.make_updates(config, net)
    dataset = stages.make_dataset(config)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(4)])
    inputs = stages.inputs(config, batch, torch.device("cpu"))
    before = _fixed_batch_loss(net, config, inputs)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for step in range(20):
        torch.manual_seed(step)
        logs = train_mod.train_step(net, updates, inputs, config, scaler, torch.device("cpu"))
        assert all(torch.isfinite(v) for v in logs.values()), logs
    after = _fixed_batch_loss(net, config, inputs)
    assert after < 0.9 * before, (before, after)


def test_bf16_autocast_step_runs_and_keeps_float32_weights(data, tmp_path):
    config = _config("hq-ddpm", data, tmp_path, precision="bf16")
    net = stages.build_net(config)
    updates = stages.make_updates(config, net)
    dataset = stages.make_dataset(config)
    inputs = stages.inputs(config, torch.utils.data.default_collate([dataset[i] for i in range(4)]), "cpu")
    logs = train_mod.train_step(net, updates, inputs, config, torch.amp.GradScaler("cpu", enabled=False),
                                torch.device("cpu"))
    assert torch.isfinite(logs["loss"])
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_bicubic_degradation_is_a_low_pass_of_the_same_size():
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    y = stages.bicubic_degrade(x, 4)
    assert y.shape == x.shape and y.abs().max() <= 1
    smooth = lambda t: (t[..., 1:, :] - t[..., :-1, :]).abs().mean()  # noqa: E731
    assert smooth(y) < 0.5 * smooth(x)


# --------------------------------------------------------------------------------------------------
# the command: outputs, resume, mismatches, Ctrl-C


@pytest.mark.parametrize("stage", ["lq-ddpm", "lq-munit"])
@pytest.mark.slow
def test_resume_equals_an_uninterrupted_run(stage, data, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    args = ["--set", "ema=0.9"] if stage == "lq-ddpm" else []
    assert train_mod.main(_args(stage, data, full, "--steps", "6", "--save-every", "3", *args)) == 0
    assert train_mod.main(_args(stage, data, split, "--steps", "3", *args)) == 0
    assert read_checkpoint(split).step == 3
    assert train_mod.main(["--out", str(split), "--resume", "--steps", "6", "--no-progress"]) == 0

    full_log, split_log = _losses(full), _losses(split)
    assert [r["step"] for r in split_log] == list(range(1, 7))
    keys = [k for k in full_log[0] if k not in ("steps_per_s",)]
    assert [[r[k] for k in keys] for r in split_log] == [[r[k] for k in keys] for r in full_log]
    a, b = read_checkpoint(full), read_checkpoint(split)
    assert a.step == b.step == 6 and a.tensors.keys() == b.tensors.keys()
    for key in a.tensors:
        torch.testing.assert_close(a.tensors[key], b.tensors[key], atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("stage", ["hq-ddpm", "bicubic-ddpm"])
@pytest.mark.slow
def test_each_stage_writes_checkpoint_config_metrics_grid_and_curve(stage, data, tmp_path):
    assert train_mod.main(_args(stage, data, tmp_path, "--steps", "4", "--sample-every", "2")) == 0
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_0000002.png", "step_0000004.png"]
    from PIL import Image

    grid = np.asarray(Image.open(tmp_path / "samples" / "step_0000004.png"))
    assert grid.ndim == 2 and grid.std() > 0
    assert Image.open(tmp_path / "loss.png").size == (640, 360)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["stage"] == stage and config["unet"]["cond_channels"] == 1
    assert [r["step"] for r in _losses(tmp_path)] == [1, 2, 3, 4]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    net, saved = load_trained(tmp_path)
    assert saved.stage == stage and not net.training
    lq = torch.rand(2, 1, SIZE, SIZE) * 2 - 1
    assert net.sample((2, 1, SIZE, SIZE), cond=lq, steps=2).shape == lq.shape


@pytest.mark.slow
def test_resume_with_a_mismatched_config_fails_with_a_clear_message(data, tmp_path, capsys):
    assert train_mod.main(_args("lq-ddpm", data, tmp_path, "--steps", "2")) == 0
    code = train_mod.main(["--out", str(tmp_path), "--resume", "--image-size", "32", "--set", "unet.base_channels=16"])
    err = capsys.readouterr().err
    assert code == 2
    assert "cannot resume" in err and "image_size: checkpoint 16, this run 32" in err
    assert "unet.base_channels: checkpoint 8, this run 16" in err
    assert read_checkpoint(tmp_path).step == 2


def test_missing_pairs_and_bad_settings_are_clear_errors(data, tmp_path, capsys):
    assert train_mod.main(["--stage", "hq-ddpm", "--out", str(tmp_path), "--steps", "1"]) == 2
    assert "--pairs" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown setting 'unet.widht'"):
        apply_overrides(preset("cpu-demo"), ["unet.widht=3"])
    with pytest.raises(ConfigError, match="steps"):
        apply_overrides(preset("cpu-demo"), ["steps=many"])
    with pytest.raises(ConfigError, match="not a dxr training checkpoint"):
        from safetensors.torch import save_file

        save_file({"w": torch.ones(2)}, str(tmp_path / CHECKPOINT))
        read_checkpoint(tmp_path)


def test_ctrl_c_finishes_the_step_saves_and_exits(data, tmp_path, monkeypatch):
    calls = []
    real_step = train_mod.train_step

    def interrupted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C does, in the middle of step 3
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", interrupted_step)
    before = signal.getsignal(signal.SIGINT)  # the default, or SIG_IGN in a process started in the background
    assert train_mod.main(_args("lq-ddpm", data, tmp_path, "--steps", "50")) == 130
    assert read_checkpoint(tmp_path).step == 3 and len(calls) == 3
    assert signal.getsignal(signal.SIGINT) is before  # the handler the run found is back


@pytest.mark.slow
def test_torchrun_two_gloo_processes_train_and_rank0_saves_once(data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("TRITON_INTERPRET", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "dxr.train", *_args("lq-ddpm", data, tmp_path, "--steps", "3", "--device", "cpu",
                                         "--save-every", "100")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done at step 3") == 1  # rank 0 alone reports
    assert "on cpu x2" in result.stdout
    assert [r["step"] for r in _losses(tmp_path)] == [1, 2, 3]  # one writer
    checkpoint = read_checkpoint(tmp_path)
    assert checkpoint.step == 3 and checkpoint.state["data"]["world_size"] == 2
    header = read_checkpoint(tmp_path, tensors=False)  # the header alone: no weights read
    assert (header.step, header.state, header.config) == (3, checkpoint.state, checkpoint.config)
    assert header.tensors == {} and checkpoint.tensors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors", "config.json", "loss.png",
                                                          "metrics.jsonl", "samples"]


# --------------------------------------------------------------------------------------------------
# parts


def test_step_batches_resume_mid_stream_and_split_epochs_across_ranks():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    whole = take(StepBatches(10, 3, seed=5), 8)
    assert take(StepBatches(10, 3, seed=5, start=5), 3) == whole[5:]
    assert sorted(i for i, _ in sum(whole[:3], []) + whole[3][:1]) == list(range(10))  # epoch 0 is a permutation
    assert whole != take(StepBatches(10, 3, seed=6), 8)
    ranks = [take(StepBatches(10, 5, seed=1, rank=r, world_size=2), 1)[0] for r in range(2)]
    assert sorted(i for batch in ranks for i, _ in batch) == list(range(10))
    seeds = [s for batch in whole for _, s in batch]
    assert len(set(seeds)) == len(seeds)


def test_config_differences_ignore_run_length_and_reporting():
    a = preset("cpu-demo")
    assert differences(a, replace(a, steps=10, sample_every=3, device="cuda", out="x")) == []
    assert differences(a, replace(a, lr=1.0)) == [f"lr: checkpoint {a.lr!r}, this run 1.0"]
    assert preset("cpu-demo", "hq-ddpm").unet.cond_channels == 1
    assert preset("cpu-demo", "lq-ddpm").unet.cond_channels == 0
    paper = preset("paper")
    assert paper.image_size == 256 and paper.unet.image_size == 256 and paper.precision == "bf16"


def test_metrics_log_drops_records_after_the_resumed_step_and_plots(tmp_path):
    log = MetricsLog(tmp_path)
    for step in range(1, 6):
        log.append({"step": step, "loss": 1.0 / step, "gen": 2.0 / step, "gen/gan": 0.1, "lr": 1e-3})
    resumed = MetricsLog(tmp_path, resume_step=3)
    assert [r["step"] for r in resumed.records] == [1, 2, 3]
    assert sorted(resumed.series()) == ["gen", "loss"]
    assert save_loss_curve(resumed.series(), tmp_path / "loss.png").is_file()
    assert save_loss_curve({}, tmp_path / "none.png") is None
    path = save_grid([("a", torch.rand(5, 1, 8, 8) * 2 - 1), ("b", -torch.ones(3, 1, 8, 8))], tmp_path / "g.png",
                     columns=4)
    from PIL import Image

    assert Image.open(path).size == (4 * 10 + 2, 3 * (8 + 12 + 2) + 2)


# --------------------------------------------------------------------------------------------------
# a run that cannot start: one line on stderr, status 2, before any work


def _one_error_line(capsys, *expected):
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m dxr.train: error: "), captured.err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("stage, extra, expected", [
    ("lq-ddpm", ["--image-size", "63"], ["image_size 63 must be a multiple of 2", "unet.channel_mult", "try 62 or 64"]),
    ("lq-munit", ["--image-size", "63"], ["image_size 63 must be a multiple of 16", "MUNIT", "try 48 or 64"]),
    ("lq-munit", ["--image-size", "2"], ["image_size 2 must be a multiple of 16", "try 16"]),
    ("lq-ddpm", ["--device", "foo"], ["device must be cpu, cuda or cuda:N, got 'foo'"]),
    ("lq-ddpm", ["--lr", "nan"], ["lr must be a finite learning rate > 0, got nan"]),
    ("lq-ddpm", ["--lr", "-1"], ["lr must be a finite learning rate > 0"]),
    ("lq-ddpm", ["--set", "unet.num_groups=3"], ["unet.num_groups (3) must divide", "[8, 16]"]),
    ("lq-ddpm", ["--set", "unet.num_head_channels=5"], ["unet.num_head_channels (5) must divide"]),
    ("lq-munit", ["--set", "munit.n_res=0"], ["munit.n_res must be >= 1"]),
])
def test_settings_the_networks_cannot_take_fail_before_the_first_step(stage, extra, expected, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_mod.main(_args(stage, data, out, "--steps", "1", *extra)) == 2
    _one_error_line(capsys, *expected)
    assert not out.exists()  # nothing was started


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_one_line(data, tmp_path, capsys):
    assert train_mod.main(_args("lq-ddpm", data, tmp_path / "run", "--device", "cuda")) == 2
    _one_error_line(capsys, "device 'cuda'", "--device cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_backends_on_a_cpu_are_one_line(backend, data, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as for a user: no interpreter
    assert train_mod.main(_args("lq-ddpm", data, tmp_path / "run", "--backend", backend, "--device", "cpu")) == 2
    _one_error_line(capsys, f"backend '{backend}' on device 'cpu'", "needs")
    assert not (tmp_path / "run").exists()


def test_a_data_folder_with_no_readable_image_is_one_line(tmp_path, capsys):
    root = tmp_path / "set" / "lq" / "train"
    root.mkdir(parents=True)
    for name in ("a.png", "b.dcm"):
        (root / name).write_bytes(b"not an image")
    assert train_mod.main(_args("lq-ddpm", tmp_path, tmp_path / "run", "--steps", "1")) == 2
    _one_error_line(capsys, str(root), "none of the 2 images is usable", "a.png", "b.dcm")
    assert not (tmp_path / "run" / CHECKPOINT).exists()


@pytest.fixture(scope="module")
def zero_step_run(data, tmp_path_factory):
    """A run of --steps 0: a checkpoint, metrics and a sample grid, and no loss curve (nothing to plot)."""
    out = tmp_path_factory.mktemp("zero") / "run"
    assert train_mod.main(_args("lq-ddpm", data, out, "--steps", "0")) == 0
    return out


def test_zero_steps_reports_only_what_it_wrote(zero_step_run, data, tmp_path, capsys):
    assert read_checkpoint(zero_step_run).step == 0
    assert not (zero_step_run / "loss.png").exists()
    assert train_mod.main(_args("lq-ddpm", data, tmp_path, "--steps", "0")) == 0
    done = [line for line in capsys.readouterr().out.splitlines() if line.startswith("done at step 0")]
    assert len(done) == 1 and "loss curve" not in done[0] and "loss.png" not in done[0]
    assert "samples" in done[0] and (tmp_path / "samples" / "step_0000000.png").is_file()


def _spoil(kind: str, path: Path) -> None:
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "corrupted":
        path.write_bytes(data[:8] + bytes(range(40)) + data[48:])
    else:  # a pickle renamed to the checkpoint's name
        torch.save({"net": torch.ones(3)}, path)


@pytest.mark.parametrize("kind", ["truncated", "empty", "corrupted", "pickle"])
def test_resume_from_an_unreadable_checkpoint_names_the_file(kind, zero_step_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(zero_step_run, out)
    _spoil(kind, out / CHECKPOINT)
    assert train_mod.main(["--out", str(out), "--resume", "--steps", "1", "--no-progress"]) == 2
    _one_error_line(capsys, str(out / CHECKPOINT), "not a readable checkpoint")
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        read_checkpoint(out)


def test_the_module_entry_point_prints_one_line_and_exits_2(data, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "dxr.train", *_args("lq-ddpm", data, tmp_path / "run", "--lr", "nan")],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("python -m dxr.train: error: lr must be")


# --------------------------------------------------------------------------------------------------
# crash safety


@pytest.mark.slow
def test_resume_drops_a_torn_last_metrics_line_and_stale_temporaries(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_mod.main(_args("lq-ddpm", data, out, "--steps", "2")) == 0
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 3, "loss": 0.4')  # a write cut short by a crash
    dead = subprocess.Popen([sys.executable, "-c", "pass"])  # a process id that no longer runs
    dead.wait()
    stale = out / f".{CHECKPOINT}.tmp-{dead.pid}"
    stale.write_bytes(b"half a checkpoint")
    capsys.readouterr()
    assert train_mod.main(["--out", str(out), "--resume", "--steps", "3", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "dropped its last line" in printed and f"removed {stale}" in printed
    assert not stale.exists()
    assert [r["step"] for r in _losses(out)] == [1, 2, 3]


@pytest.mark.slow
def test_resume_after_ctrl_c_mid_window_logs_what_an_uninterrupted_run_logs(data, tmp_path, monkeypatch):
    full, split = tmp_path / "full", tmp_path / "split"
    assert train_mod.main(_args("lq-ddpm", data, full, "--steps", "5", "--log-every", "4")) == 0
    calls = []
    real_step = train_mod.train_step

    def interrupted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", interrupted_step)
    assert train_mod.main(_args("lq-ddpm", data, split, "--steps", "5", "--log-every", "4")) == 130
    monkeypatch.setattr(train_mod, "train_step", real_step)
    assert train_mod.main(["--out", str(split), "--resume", "--no-progress"]) == 0
    strip = lambda records: [{k: v for k, v in r.items() if k != "steps_per_s"} for r in records]  # noqa: E731
    assert [r["step"] for r in _losses(split)] == [4, 5]
    assert strip(_losses(split)) == strip(_losses(full))


def test_metrics_log_refuses_a_bad_line_before_the_last(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n{"step": 3, "loss": 0.5}\n')
    with pytest.raises(ValueError, match="line 2: not a metrics record"):
        MetricsLog(tmp_path, resume_step=3)


# --------------------------------------------------------------------------------------------------
# stages as records, the help, profiling


def test_a_stage_is_one_record_of_the_table(data, tmp_path, monkeypatch):
    import dataclasses

    assert stages.STAGES == tuple(stages.TABLE) == ("lq-ddpm", "lq-munit", "hq-ddpm", "bicubic-ddpm")
    assert [name for name, s in stages.TABLE.items() if s.conditional] == ["hq-ddpm", "bicubic-ddpm"]
    assert [name for name, s in stages.TABLE.items() if s.find_unused_parameters] == ["lq-munit"]
    with pytest.raises(ConfigError, match="stage must be one of .*'lq-ddpm'.*, got 'hq-gan'"):
        preset("cpu-demo", "hq-gan")
    # a new stage: one record (here the baseline's, renamed) is all the loop needs
    record = dataclasses.replace(stages.TABLE["bicubic-ddpm"], name="bicubic-x2")
    monkeypatch.setitem(stages.TABLE, "bicubic-x2", record)
    config = _config("bicubic-x2", data, tmp_path, steps=1, bicubic_factor=2)
    assert config.unet.cond_channels == 1 and config.residual  # the record's settings and conditioning
    assert train_mod.train(config) == tmp_path
    assert read_checkpoint(tmp_path).config.stage == "bicubic-x2"


def _help(argv, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps flag help to the terminal: one line per flag here
    assert train_mod.main([*argv, "--help"]) == 0
    return capsys.readouterr().out


def _table(text: str) -> dict[str, list[str]]:
    """The help's settings table: KEY → [cpu-demo value, paper value]."""
    lines = text.split("  KEY ", 1)[1].splitlines()[1:]
    rows = [line.split() for line in lines[:lines.index("")]]
    return {row[0]: row[1:] for row in rows}


def test_help_lists_each_presets_values(capsys, monkeypatch):
    text = _help([], capsys, monkeypatch)
    demo, paper = preset("cpu-demo"), preset("paper")
    assert demo.steps != paper.steps and demo.lr != paper.lr
    assert f"total training steps ({demo.steps} in cpu-demo, {paper.steps} in paper)" in text
    assert f"learning rate ({demo.lr} in cpu-demo, {paper.lr} in paper)" in text
    assert f"images per step and process ({demo.batch_size} in every preset)" in text
    assert "settings of --stage lq-ddpm (the default) in each preset" in text
    table = _table(text)
    assert table["image_size"] == [str(demo.image_size), str(paper.image_size)]
    assert table["unet.base_channels"] == [str(demo.unet.base_channels), str(paper.unet.base_channels)]
    assert table["unet.channel_mult"] == [",".join(map(str, c.unet.channel_mult)) for c in (demo, paper)]
    assert table["schedule"] == [demo.schedule, paper.schedule] and "munit.dim" not in table
    for stage in stages.STAGES:
        assert f"  {stage} " in text  # each stage with its summary


def test_stage_help_shows_that_stages_values(capsys, monkeypatch):
    text = _help(["--stage", "lq-munit"], capsys, monkeypatch)
    demo, paper = preset("cpu-demo", "lq-munit"), preset("paper", "lq-munit")
    assert "settings of --stage lq-munit in each preset" in text
    table = _table(text)
    assert table["batch_size"] == [str(demo.batch_size), str(paper.batch_size)] == ["8", "16"]
    assert table["ema"] == ["0.0", "0.0"] and table["lr"] == [str(demo.munit.lr), str(paper.munit.lr)]
    assert table["munit.dim"] == [str(demo.munit.dim), str(paper.munit.dim)]
    assert "unet.base_channels" not in table
    assert f"total training steps ({demo.steps} in cpu-demo, {paper.steps} in paper)" in text
    residual = _table(_help(["--stage", "hq-ddpm"], capsys, monkeypatch))["residual"]
    assert residual == [str(preset(p, "hq-ddpm").residual).lower() for p in ("cpu-demo", "paper")] == ["true", "false"]


def test_help_says_what_each_profile_mode_does(capsys, monkeypatch):
    text = _help([], capsys, monkeypatch)
    assert "--profile {none,nvtx,torch}" in text
    assert "nsys profile -t cuda,nvtx -o dxr-train python -m dxr.train --profile nvtx ..." in text
    assert "NVTX ranges" in text and "DXR_NVTX=1" in text and "<out>/trace.json" in text


def test_profile_torch_writes_a_trace_with_the_training_phases(data, tmp_path, capsys):
    assert train_mod.main(_args("lq-ddpm", data, tmp_path, "--steps", "2", "--profile", "torch")) == 0
    assert f"profile {tmp_path / 'trace.json'}" in capsys.readouterr().out
    trace = json.loads((tmp_path / "trace.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    for phase in ("train.data", "train.forward", "train.backward", "train.optimizer"):
        assert phase in names, phase
    assert [r["step"] for r in _losses(tmp_path)] == [1, 2]


def test_metrics_log_window_means_each_loss_and_carries_an_open_window_over(tmp_path):
    log = MetricsLog(tmp_path, images_per_step=8)
    for value in (1.0, 2.0, 3.0):
        log.add({"loss": torch.tensor(value), "loss/mse": torch.tensor(2 * value)})
    record = log.write_window(3, lr=0.1)
    assert list(record) == ["step", "loss", "loss/mse", "lr", "steps_per_s"]
    assert (record["step"], record["loss"], record["loss/mse"], record["lr"]) == (3, 2.0, 4.0, 0.1)
    assert log.images_per_s == pytest.approx(8 * record["steps_per_s"], rel=1e-2)
    log.add({"loss": torch.tensor(4.0)})
    state = log.window_state()
    assert state == {"start": 3, "sums": {"loss": 4.0}}
    resumed = MetricsLog(tmp_path, resume_step=4)  # a run resumed at step 4, inside the window opened at 3
    resumed.open_window(state["start"], state["sums"])
    resumed.add({"loss": torch.tensor(5.0)})
    assert resumed.write_window(5, lr=0.1)["loss"] == 4.5
    assert [r["step"] for r in _losses(tmp_path)] == [3, 5]


def test_profile_nvtx_turns_nvtx_on_for_the_loop_alone(data, tmp_path, monkeypatch):
    from dxr import profiling

    seen = []
    real_step = train_mod.train_step

    def recording_step(*args, **kwargs):
        seen.append(profiling.nvtx_enabled())
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", recording_step)
    before = profiling.nvtx_enabled()
    assert train_mod.main(_args("lq-ddpm", data, tmp_path, "--steps", "2", "--profile", "nvtx")) == 0
    assert seen == [True, True] and profiling.nvtx_enabled() == before
    assert not (tmp_path / "trace.json").exists()

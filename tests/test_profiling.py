"""dxr.profiling: regions appear in a torch.profiler trace on a CPU; sessions check their mode."""

import json

import pytest
import torch

from dxr import profiling


def test_regions_appear_in_a_torch_trace(tmp_path):
    with profiling.session("torch", tmp_path) as trace:
        with profiling.region("dxr.forward"):
            torch.ones(8).mul_(2)
        with profiling.region("dxr.backward"):
            torch.ones(8).add_(1)
    events = json.loads(trace.read_text())["traceEvents"]
    names = {event.get("name") for event in events}
    assert {"dxr.forward", "dxr.backward"} <= names
    assert trace == tmp_path / profiling.TRACE


def test_nvtx_session_turns_ranges_on_and_back_off(monkeypatch):
    monkeypatch.setitem(profiling._state, "nvtx", False)
    with profiling.session("nvtx") as trace:
        assert trace is None and profiling.nvtx_enabled()
        with profiling.region("step"):  # no GPU here: no NVTX call, the block still runs
            pass
    assert not profiling.nvtx_enabled()


def test_region_without_a_profiler_runs_its_block():
    ran = []
    with profiling.region("plain"):
        ran.append(1)
    assert ran == [1]


def test_bad_modes_and_names_are_named():
    with pytest.raises(ValueError, match="profile must be one of none, nvtx, torch"):
        with profiling.session("perf"):
            pass
    with pytest.raises(ValueError, match="out_dir"):
        with profiling.session("torch"):
            pass
    with pytest.raises(TypeError, match="name must be a str"):
        with profiling.region(3):
            pass
    assert profiling.check_mode(None) == "none"


def test_commands_share_one_profile_flag(capsys):
    import argparse

    parser = argparse.ArgumentParser()
    profiling.add_argument(parser)
    assert parser.parse_args([]).profile == "none"
    assert parser.parse_args(["--profile", "torch"]).profile == "torch"
    with pytest.raises(SystemExit):
        parser.parse_args(["--profile", "perf"])
    assert "invalid choice: 'perf'" in capsys.readouterr().err

"""Named ranges for profilers: NVTX for ``nsys``, ``record_function`` for ``torch.profiler``.

Code marks its phases with ``with profiling.region("forward"):``. A region costs one dictionary lookup
when nothing records it. It becomes

- an NVTX range (``torch.cuda.nvtx``) when NVTX is on: ``--profile nvtx`` on a command, or
  ``DXR_NVTX=1`` in the environment. ``nsys profile -t cuda,nvtx ...`` then shows each phase on its
  own timeline row;
- a ``torch.profiler.record_function`` range while a torch profiler is recording, so the phase names
  appear in the trace of :func:`session` (``--profile torch``), on a CPU as on a GPU.

:func:`session` is what a command's ``--profile {none,nvtx,torch}`` flag opens around its work.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

MODES = ("none", "nvtx", "torch")
TRACE = "trace.json"

_state = {"nvtx": os.environ.get("DXR_NVTX", "0") not in ("", "0", "false", "no")}


def nvtx_enabled() -> bool:
    """Whether regions are NVTX ranges (``DXR_NVTX=1`` or an open ``session("nvtx")``)."""
    return _state["nvtx"]


def _nvtx_available() -> bool:
    return torch.cuda.is_available()


@contextlib.contextmanager
def region(name: str) -> Iterator[None]:
    """A named range around the block: NVTX when on, and a ``record_function`` while a torch profiler
    records. Raises TypeError when name is not a string."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    nvtx = _state["nvtx"] and _nvtx_available()
    recording = torch._C._autograd._profiler_enabled()
    if not nvtx and not recording:
        yield
        return
    if nvtx:
        torch.cuda.nvtx.range_push(name)
    try:
        if recording:
            with torch.profiler.record_function(name):
                yield
        else:
            yield
    finally:
        if nvtx:
            torch.cuda.nvtx.range_pop()


def check_mode(mode: Optional[str]) -> str:
    """``mode`` ("none" for None), or ValueError naming the choices."""
    mode = "none" if mode is None else mode
    if mode not in MODES:
        raise ValueError(f"profile must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


SAMPLER_HELP = "nvtx: NVTX ranges per sampler step for nsys; torch: a torch.profiler trace in --out"


def add_argument(parser, help: str = SAMPLER_HELP, default: Optional[str] = "none") -> None:
    """Declare ``--profile {none,nvtx,torch}`` on an argparse ``parser`` (the commands' one flag for
    :func:`session`)."""
    parser.add_argument("--profile", choices=MODES, default=default, help=help)


@contextlib.contextmanager
def session(mode: Optional[str], out_dir: Union[str, Path, None] = None) -> Iterator[Optional[Path]]:
    """Profile the block: "none" does nothing, "nvtx" turns regions into NVTX ranges (run the command
    under ``nsys profile -t cuda,nvtx``), "torch" records a ``torch.profiler`` trace (CPU, and CUDA when
    a GPU is there) and writes it as Chrome JSON to ``out_dir/trace.json`` when the block ends. Yields
    the trace's path for "torch", else None. Raises ValueError for another mode, or for "torch"
    without out_dir."""
    mode = check_mode(mode)
    if mode == "none":
        yield None
        return
    if mode == "nvtx":
        before = _state["nvtx"]
        _state["nvtx"] = True
        try:
            yield None
        finally:
            _state["nvtx"] = before
        return
    if out_dir is None:
        raise ValueError("out_dir is needed for profile='torch' (where trace.json goes)")
    path = Path(out_dir) / TRACE
    path.parent.mkdir(parents=True, exist_ok=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=False) as prof:
        yield path
    prof.export_chrome_trace(str(path))


__all__ = ["MODES", "TRACE", "check_mode", "nvtx_enabled", "region", "session"]

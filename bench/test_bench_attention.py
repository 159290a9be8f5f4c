"""Attention forward and forward+backward, B·H 16–64, L 256–4096, D 64 and 128 (GPU), against PyTorch SDPA
with its flash and memory-efficient backends too; extra_info carries TFLOP/s and the peak memory."""

import pytest

import workloads as wl


@pytest.mark.parametrize("backend", wl.backends("attention"))
@pytest.mark.parametrize("mode", (wl.FWD, wl.FWD_BWD))
@pytest.mark.parametrize("case", wl.cases("attention", wl.DEVICE.type), ids=lambda c: c.id)
def test_attention(run_case, case, mode, backend):
    run_case(case, backend, mode)

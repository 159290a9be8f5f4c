"""GroupNorm+SiLU and AdaIN, forward and forward+backward, at UNet (GPU) or modest (CPU) shapes."""

import pytest

import workloads as wl

MODES = (wl.FWD, wl.FWD_BWD)


@pytest.mark.parametrize("backend", wl.backends("group_norm_silu"))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", wl.cases("group_norm_silu", wl.DEVICE.type), ids=lambda c: c.id)
def test_group_norm_silu(run_case, case, mode, backend):
    run_case(case, backend, mode)


@pytest.mark.parametrize("backend", wl.backends("adain"))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", wl.cases("adain", wl.DEVICE.type), ids=lambda c: c.id)
def test_adain(run_case, case, mode, backend):
    run_case(case, backend, mode)

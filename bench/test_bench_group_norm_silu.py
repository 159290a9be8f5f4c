"""GroupNorm+SiLU, forward and forward+backward, at UNet (GPU) or modest (CPU) shapes."""

import pytest

import workloads as wl


@pytest.mark.parametrize("backend", wl.backends("group_norm_silu"))
@pytest.mark.parametrize("mode", (wl.FWD, wl.FWD_BWD))
@pytest.mark.parametrize("case", wl.cases("group_norm_silu", wl.DEVICE.type), ids=lambda c: c.id)
def test_group_norm_silu(run_case, case, mode, backend):
    run_case(case, backend, mode)

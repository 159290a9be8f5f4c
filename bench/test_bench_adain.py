"""AdaIN, forward and forward+backward, at MUNIT decoder (GPU) or modest (CPU) shapes."""

import pytest

import workloads as wl


@pytest.mark.parametrize("backend", wl.backends("adain"))
@pytest.mark.parametrize("mode", (wl.FWD, wl.FWD_BWD))
@pytest.mark.parametrize("case", wl.cases("adain", wl.DEVICE.type), ids=lambda c: c.id)
def test_adain(run_case, case, mode, backend):
    run_case(case, backend, mode)

"""q_sample, one DDPM step and one DDIM step (forward only) at 16×3×256² and 8×1×256² (GPU).

The steps draw their noise: the reference with ``torch.randn``, the kernels in-kernel.
"""

import pytest

import workloads as wl


@pytest.mark.parametrize("backend", wl.backends("q_sample"))
@pytest.mark.parametrize("case", wl.cases("q_sample", wl.DEVICE.type), ids=lambda c: c.id)
def test_q_sample(run_case, case, backend):
    run_case(case, backend, wl.FWD)


@pytest.mark.parametrize("backend", wl.backends("ddpm_step"))
@pytest.mark.parametrize("case", wl.cases("ddpm_step", wl.DEVICE.type), ids=lambda c: c.id)
def test_ddpm_step(run_case, case, backend):
    run_case(case, backend, wl.FWD)


@pytest.mark.parametrize("backend", wl.backends("ddim_step"))
@pytest.mark.parametrize("case", wl.cases("ddim_step", wl.DEVICE.type), ids=lambda c: c.id)
def test_ddim_step(run_case, case, backend):
    run_case(case, backend, wl.FWD)

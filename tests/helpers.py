"""Shared test helpers: devices, dtypes, and tolerances that fit each dtype."""

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (atol, rtol) for an output rounded to the dtype, compared with a float32 reference computed from the
# same (already rounded) inputs: a couple of units in the last place of the dtype.
_TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def tol(dtype, scale: float = 1.0):
    """(atol, rtol) for ``dtype``; ``scale`` widens both for quantities summed over many elements."""
    atol, rtol = _TOL[dtype]
    return atol * scale, rtol * scale


def assert_close(actual, expected, dtype=None, scale: float = 1.0, msg: str = ""):
    """Compare ``actual`` (any dtype) with the float32 ``expected`` at the tolerance of ``dtype``."""
    dtype = dtype or actual.dtype
    atol, rtol = tol(dtype, scale)
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, msg=msg or None)


def randn(*shape, dtype=torch.float32, device=DEVICE, requires_grad=False, seed=None, channels_last=False):
    """Fresh random input (never zeros); ``channels_last`` for 4-D tensors."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    x = torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x.requires_grad_(requires_grad)

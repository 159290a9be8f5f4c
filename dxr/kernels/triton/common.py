"""What the Triton kernel modules share: the interpreter flag, autotuning with a deterministic mode,
float32 loads and the ln 2 constants.

Determinism. Every kernel is free of atomics, so one compiled configuration gives bitwise the same
output for the same input, run after run. Which configuration runs is the autotuner's choice, made by
timing on the first call for each shape in a process, and configurations that sum in another order (the
warps of a GroupNorm or AdaIN reduction, attention's key block) differ in the last bits. With
``DXR_DETERMINISTIC=1`` in the environment (read at each first call of a shape) the autotuner is given
one configuration, the first its pruning keeps, so every process on every GPU of one architecture picks
the same and the bits repeat across processes too. The samplers' outputs and in-kernel noise do not
depend on the configuration at all.
"""

from __future__ import annotations

import math
import os

import triton
import triton.language as tl

# ln 2 and log2 e as constants kernels may read (``.value`` is the float on the host)
LN2 = tl.constexpr(math.log(2.0))
LOG2E = tl.constexpr(1.0 / math.log(2.0))


def interpreting() -> bool:
    """Whether kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, a CPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# 32-bit registers per SM (every architecture from sm_50 to sm_100)
REGISTERS_PER_SM = 65536


def register_cap(num_warps: int, programs_per_sm: int = 2) -> int:
    """The ``maxnreg`` that still lets ``programs_per_sm`` programs of ``num_warps`` warps share an SM
    (a multiple of 8, or 255 where that is lower).

    Without a cap ptxas picks its own occupancy target and will spill a few registers to meet it (4-20
    bytes in GroupNorm kernels of 4 and 8 warps); with one it allocates up to the cap and spills only when
    the kernel needs more."""
    if num_warps <= 0:
        raise ValueError(f"num_warps must be positive, got {num_warps}")
    return min(255, REGISTERS_PER_SM // (32 * num_warps * programs_per_sm) // 8 * 8)


def deterministic() -> bool:
    """Whether ``DXR_DETERMINISTIC=1`` pins each autotuned kernel to one configuration."""
    return os.environ.get("DXR_DETERMINISTIC", "0").lower() in ("1", "true", "yes", "on")


def autotune(configs, key, prune=None):
    """``triton.autotune`` over ``configs`` keyed by ``key``, with an optional ``early_config_prune``;
    under ``DXR_DETERMINISTIC=1`` only the first configuration the pruning keeps is run (see above)."""

    def kept(candidates, named_args, **kwargs):
        chosen = prune(candidates, named_args, **kwargs) if prune is not None else list(candidates)
        return chosen[:1] if deterministic() else chosen

    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": kept})


@triton.jit
def load_f32(ptr, mask):
    """Load and convert to float32 at once (arithmetic on raw bfloat16 is wrong under the interpreter)."""
    return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)

"""The attention tiles that compile without register spills, per kernel, architecture, dtype and head dim.

Triton's interpreter runs any tile; a GPU's register file does not hold every one. These are the
configurations of ``attention._configs`` for which ``ptxas -v`` (the one shipped with Triton 3.6)
reported no spill and Triton no shared memory over the part's limit, compiled ahead of time for
sm_90a (H100/H200) and sm_80 (A100) through the launch code at a ragged length (300), for each tile
width BLOCK_D (the head dim rounded up to a power of two, at least 16). Half precision was measured in
bfloat16 (float16 tiles compile the same operand layouts; ``make gpu-ready`` checks both), and the
16-wide half-precision tiles are those of the 32-wide ones. ``make gpu-ready`` re-checks every entry
that the pruning can pick, so a Triton upgrade that makes one spill turns that check red.

Keys are (kernel, capability, element size, BLOCK_D) with kernel "forward", "dkdv" or "dq" and
capability 90 (sm_90 and newer) or 80 (sm_80 to sm_89); values list ``rows x step w warps : stages``
(rows the program's own block, step the block its loop streams). An empty entry means no candidate
tile is free of spills there: the Triton kernel does not serve that case (see ``attention.serves``).
"""

from __future__ import annotations

_TABLE = {
    ("forward", 90, 2, 16): "64x32w4:234 64x32w8:234 64x64w4:234 64x64w8:234 128x32w4:234 128x32w8:234 128x64w4:234 128x64w8:234 128x128w4:234 128x128w8:234",
    ("forward", 90, 2, 32): "64x32w4:234 64x32w8:234 64x64w4:234 64x64w8:234 128x32w4:234 128x32w8:234 128x64w4:234 128x64w8:234 128x128w4:234 128x128w8:234",
    ("forward", 90, 2, 64): "64x32w4:234 64x32w8:234 64x64w4:234 64x64w8:234 128x32w4:234 128x32w8:234 128x64w4:234 128x64w8:234 128x128w8:234",
    ("forward", 90, 2, 128): "64x32w4:234 64x32w8:234 64x64w4:234 64x64w8:234 128x32w4:234 128x32w8:234 128x64w8:234 128x128w8:23",
    ("forward", 90, 2, 256): "64x32w4:234 64x32w8:234 64x64w8:23 128x32w8:234 128x64w8:2",
    ("forward", 90, 4, 16): "16x16w4:2 16x16w8:2 32x16w4:2 32x16w8:2 32x32w4:2 32x32w8:2",
    ("forward", 90, 4, 32): "16x16w4:2 16x16w8:2 32x16w4:2 32x16w8:2 32x32w4:2 32x32w8:2",
    ("forward", 90, 4, 64): "16x16w8:2 32x16w8:2",
    ("forward", 90, 4, 128): "16x16w8:2",
    ("forward", 90, 4, 256): "",
    ("forward", 80, 2, 16): "64x32w4:234 64x32w8:234 64x64w4:234 64x64w8:234 128x32w4:234 128x32w8:234 128x64w4:234 128x64w8:234 128x128w8:234",
    ("forward", 80, 2, 32): "64x32w4:234 64x32w8:234 64x64w4:234 64x64w8:234 128x32w4:234 128x32w8:234 128x64w4:234 128x64w8:234 128x128w8:234",
    ("forward", 80, 2, 64): "64x32w4:234 64x32w8:234 64x64w4:234 64x64w8:234 128x32w4:2 128x32w8:234 128x64w8:234",
    ("forward", 80, 2, 128): "64x32w8:234 64x64w8:2 128x32w8:34 128x64w8:234",
    ("forward", 80, 2, 256): "",
    ("forward", 80, 4, 16): "16x16w4:2 16x16w8:2 32x16w4:2 32x16w8:2 32x32w4:2 32x32w8:2",
    ("forward", 80, 4, 32): "16x16w4:2 16x16w8:2 32x16w4:2 32x16w8:2 32x32w4:2 32x32w8:2",
    ("forward", 80, 4, 64): "16x16w4:2 16x16w8:2 32x16w4:2 32x16w8:2 32x32w8:2",
    ("forward", 80, 4, 128): "16x16w8:2",
    ("forward", 80, 4, 256): "",
    ("dkdv", 90, 2, 16): "64x32w4:234 64x32w8:234 64x64w4:234 64x64w8:234 128x32w4:234 128x32w8:234 128x64w8:234 128x128w8:2",
    ("dkdv", 90, 2, 32): "64x32w4:234 64x32w8:234 64x64w4:234 64x64w8:234 128x32w4:234 128x32w8:234 128x64w8:234 128x128w8:2",
    ("dkdv", 90, 2, 64): "64x32w4:234 64x32w8:234 64x64w4:234 64x64w8:234 128x32w8:234 128x64w8:234",
    ("dkdv", 90, 2, 128): "64x32w4:234 64x32w8:234 64x64w8:234 128x32w8:234",
    ("dkdv", 90, 2, 256): "",
    ("dkdv", 90, 4, 16): "16x16w4:2 16x16w8:2 32x16w4:2 32x16w8:2 32x32w4:2 32x32w8:2",
    ("dkdv", 90, 4, 32): "16x16w4:2 16x16w8:2 32x16w4:2 32x16w8:2 32x32w8:2",
    ("dkdv", 90, 4, 64): "16x16w8:2",
    ("dkdv", 90, 4, 128): "",
    ("dkdv", 90, 4, 256): "",
    ("dkdv", 80, 2, 16): "64x32w4:234 64x32w8:234 64x64w4:234 64x64w8:234 128x32w4:234 128x32w8:2 128x64w8:234 128x128w8:2",
    ("dkdv", 80, 2, 32): "64x32w4:234 64x32w8:234 64x64w4:234 64x64w8:234 128x32w4:234 128x32w8:234 128x64w8:234 128x128w8:2",
    ("dkdv", 80, 2, 64): "64x32w4:234 64x32w8:234 128x32w8:234",
    ("dkdv", 80, 2, 128): "",
    ("dkdv", 80, 2, 256): "",
    ("dkdv", 80, 4, 16): "16x16w4:2 16x16w8:2 32x16w4:2 32x16w8:2 32x32w4:2",
    ("dkdv", 80, 4, 32): "16x16w4:2 16x16w8:2 32x16w4:2 32x16w8:2 32x32w8:2",
    ("dkdv", 80, 4, 64): "16x16w8:2",
    ("dkdv", 80, 4, 128): "",
    ("dkdv", 80, 4, 256): "",
    ("dq", 90, 2, 16): "64x32w4:234 64x32w8:234 64x64w4:234 64x64w8:234 128x32w4:234 128x32w8:234 128x64w4:234 128x64w8:234 128x128w8:234",
    ("dq", 90, 2, 32): "64x32w4:234 64x32w8:234 64x64w4:234 64x64w8:234 128x32w4:234 128x32w8:234 128x64w4:234 128x64w8:234 128x128w8:234",
    ("dq", 90, 2, 64): "64x32w4:234 64x32w8:234 64x64w4:234 64x64w8:234 128x32w8:234 128x64w8:234 128x128w8:234",
    ("dq", 90, 2, 128): "64x32w4:234 64x32w8:234 64x64w4:234 64x64w8:234 128x32w8:234 128x64w8:234",
    ("dq", 90, 2, 256): "64x32w8:234 64x64w8:2 128x32w8:23",
    ("dq", 90, 4, 16): "16x16w4:2 16x16w8:2 32x16w4:2 32x16w8:2 32x32w4:2 32x32w8:2",
    ("dq", 90, 4, 32): "16x16w4:2 16x16w8:2 32x16w4:2 32x16w8:2 32x32w8:2",
    ("dq", 90, 4, 64): "16x16w8:2",
    ("dq", 90, 4, 128): "",
    ("dq", 90, 4, 256): "",
    ("dq", 80, 2, 16): "64x32w4:234 64x32w8:234 64x64w4:234 64x64w8:234 128x32w4:234 128x32w8:234 128x64w4:234 128x128w8:234",
    ("dq", 80, 2, 32): "64x32w4:234 64x32w8:234 64x64w4:234 64x64w8:234 128x32w4:234 128x32w8:234 128x64w4:234 128x64w8:234 128x128w8:234",
    ("dq", 80, 2, 64): "64x32w4:2 64x32w8:234 64x64w4:234 64x64w8:234 128x32w8:234 128x64w8:234",
    ("dq", 80, 2, 128): "128x32w8:23",
    ("dq", 80, 2, 256): "",
    ("dq", 80, 4, 16): "16x16w4:2 16x16w8:2 32x16w4:2 32x16w8:2 32x32w4:2 32x32w8:2",
    ("dq", 80, 4, 32): "16x16w4:2 16x16w8:2 32x16w4:2 32x16w8:2 32x32w8:2",
    ("dq", 80, 4, 64): "16x16w8:2",
    ("dq", 80, 4, 128): "",
    ("dq", 80, 4, 256): "",
}

KERNELS = ("forward", "dkdv", "dq")


def _parse(text: str) -> frozenset:
    tiles = set()
    for item in text.split():
        shape, stages = item.split(":")
        rows, rest = shape.split("x")
        step, warps = rest.split("w")
        tiles.update((int(rows), int(step), int(warps), int(s)) for s in stages)
    return frozenset(tiles)


TILES = {key: _parse(text) for key, text in _TABLE.items()}


def table_capability(capability: int) -> int:
    """The table a GPU of compute capability ``capability`` (e.g. 90 for 9.0) uses: 90 or 80."""
    return 90 if capability >= 90 else 80


def spill_free(kernel: str, capability: int, element_size: int, block_d: int) -> frozenset:
    """The (rows, step, warps, stages) tiles of ``kernel`` known to compile without spills (empty: none).

    Raises ValueError for an unknown kernel, element size or tile width."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    key = (kernel, table_capability(capability), element_size, block_d)
    if key not in TILES:
        raise ValueError(f"no tile table for element size {element_size} and BLOCK_D {block_d} "
                         "(element size 2 or 4, BLOCK_D a power of two from 16 to 256)")
    return TILES[key]

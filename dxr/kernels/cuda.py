"""The compiled CUDA extension ``dxr._C``, when built, wrapped to take and return tensors.

The extension is optional: without it ``supports`` answers False for every op and ``dxr.ops``
dispatches elsewhere.
"""

from __future__ import annotations

import functools
import importlib


@functools.lru_cache(maxsize=None)
def extension():
    """The imported ``dxr._C`` module, or None when it was not built."""
    try:
        return importlib.import_module("dxr._C")
    except ImportError:
        return None


def supports(op: str) -> bool:
    """Whether the built extension implements ``op`` (it lists its ops in ``dxr._C.OPS``)."""
    ext = extension()
    return ext is not None and op in getattr(ext, "OPS", ())

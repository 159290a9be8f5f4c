"""The parts of ``python -m dxr.train``: ``config`` (settings and presets), ``stages`` (networks, data and
sample grids of each stage), ``data`` (resumable data order), ``checkpoint`` and ``report``."""

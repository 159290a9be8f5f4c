"""Kernel backends: ``reference`` (eager PyTorch, the specification), ``triton`` and ``cuda``."""

"""Triton kernels, one module per op, each with its ``@triton.jit`` kernels and launch functions.

On a machine without CUDA they run under Triton's interpreter when ``TRITON_INTERPRET=1`` is set
before the first module here is imported (that is how the CPU tests cover them).
"""

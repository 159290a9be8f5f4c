import os

import torch

# Without a GPU the Triton kernels run under Triton's interpreter; it must be on before the first
# @triton.jit is defined, i.e. before any dxr.kernels.triton module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("DXR_BACKEND", None)

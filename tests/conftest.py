"""Test-wide setup.

Without a GPU, Triton kernels run under its interpreter, which must be switched on before
triton decorates any kernel, so it is set here, before any test module imports the package.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

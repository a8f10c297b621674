"""Without a GPU, the fused Triton kernels are tested through the Triton interpreter. The
variable must be set before any `@triton.jit` decorator runs, i.e. before the first import of
a kernel module, and this file is imported by pytest before every test module."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

"""Shared setup of the kernel tests: run Triton kernels on the CPU interpreter when there is no GPU.

Triton decides between compiling and interpreting when a kernel is decorated, i.e. when the kernel
module is imported, so the variable must be set here, before any test module imports a kernel.
An explicit TRITON_INTERPRET in the environment is left as it is.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

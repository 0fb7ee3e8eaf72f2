"""Kernel tests run the Triton kernels through the interpreter on the CPU (docs/kernels.md#testing-without-a-gpu), and
on the GPU itself when one is present. The interpreter must be chosen before triton is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

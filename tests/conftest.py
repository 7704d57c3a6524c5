"""Test-session setup shared by every test module.

Triton kernels run under the interpreter on machines without CUDA. Triton reads
TRITON_INTERPRET when a kernel module is imported, and pytest imports every test module (and so
spyglass.kernels, through the trainer) while collecting, before any test runs: the variable must
be set here, first, or the kernel tests' order-dependent imports see compiled-mode kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

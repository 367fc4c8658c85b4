"""Test-session set-up that must happen before anything imports triton.

Without a CUDA device, the Triton kernels can only run on CPU tensors through Triton's interpreter,
which is chosen when triton is imported: set ``TRITON_INTERPRET=1`` here, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

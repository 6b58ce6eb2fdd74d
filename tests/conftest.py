"""Shared test setup. Without a GPU, Triton kernels run in Triton's interpreter on CPU
tensors (TRITON_INTERPRET must be set before triton compiles anything)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)

"""Test infrastructure shared by every test module.

- ``@pytest.mark.gpu``: needs CUDA; skipped (by this file, never inside a test) without it.
- ``@pytest.mark.interpreter``: runs Triton kernels on the CPU under ``TRITON_INTERPRET=1``.
  The variable must be set before Triton is imported, so this file sets it when no GPU is
  present. The interpreter computes bf16 arithmetic wrongly (triton#11584): interpreter tests
  use float16 and float32 only.
- `nan_like` / `poison`: output buffers filled with NaN, so an element never written fails.
"""

from __future__ import annotations

import os

import pytest

try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    HAS_CUDA = False

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_interp = pytest.mark.skip(reason="needs TRITON_INTERPRET=1 (CPU-only run)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "interpreter" in item.keywords and not INTERPRETER:
            item.add_marker(skip_interp)


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")


def poison(t: "torch.Tensor") -> "torch.Tensor":
    """Fill a float tensor with NaN in place and return it."""
    return t.fill_(float("nan"))

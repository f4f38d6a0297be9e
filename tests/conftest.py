"""Test infrastructure shared by every test module.

- ``@pytest.mark.gpu``: needs CUDA; skipped (by this file, never inside a test) without it.
- ``@pytest.mark.interpreter``: runs Triton kernels on the CPU under ``TRITON_INTERPRET=1``.
  The variable must be set before Triton is imported, so this file sets it when no GPU is
  present. The interpreter computes bf16 arithmetic wrongly (triton#11584): interpreter tests
  use float16 and float32 only.
- `poison`: fills a buffer with NaN, so an element never written fails; ``MXMOE_POISON=1``
  makes the Triton launchers allocate their buffers that way.
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

try:
    # Triton binds its language functions to the interpreter or the compiler once, at import:
    # import it now, so that a test that changes TRITON_INTERPRET later cannot flip the mode
    # under the other tests of this process.
    import triton  # noqa: F401

    # `triton.jit` also picks interpreted or compiled when a kernel is decorated: import the
    # kernel modules now too, not first inside a test that has set TRITON_INTERPRET=0.
    import mxmoe.kernels.fused_moe  # noqa: F401
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    """The test problems are tiny: torch's intra-op threads only contend with the other
    pytest-xdist worker for the cores (several times slower on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _private_probe_cache(tmp_path_factory):
    """Keep the backend probe's cache out of the user's cache directory."""
    if "MXMOE_CACHE_DIR" not in os.environ:
        os.environ["MXMOE_CACHE_DIR"] = str(tmp_path_factory.mktemp("mxmoe-cache"))
    yield


@pytest.fixture(autouse=True)
def _fresh_settings():
    """mxmoe reads its environment switches once per process (`mxmoe.settings`): start every
    test from the environment as it is (a previous test's monkeypatch has been undone)."""
    from mxmoe import settings

    settings.refresh()
    yield
    settings.refresh()


@pytest.fixture
def monkeypatch(monkeypatch):
    """pytest's monkeypatch, whose environment changes mxmoe sees at once (`settings.refresh`)."""
    from mxmoe import settings

    setenv, delenv = monkeypatch.setenv, monkeypatch.delenv

    def _setenv(*args, **kwargs):
        setenv(*args, **kwargs)
        settings.refresh()

    def _delenv(*args, **kwargs):
        delenv(*args, **kwargs)
        settings.refresh()

    monkeypatch.setenv, monkeypatch.delenv = _setenv, _delenv
    return monkeypatch


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

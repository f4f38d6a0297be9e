"""mxmoe: fused Mixture-of-Experts on MXFP4 expert weights, in Triton and PyTorch.

The public names are imported on first use (PEP 562), so that ``import mxmoe.cli`` (and
``mxmoe --help``) does not pay for torch and Triton.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> the module that defines it.
_EXPORTS = {
    "Activation": ".activations",
    "fused_experts": ".api",
    "backends": ".backends",
    "MXFP4Tensor": ".format",
    "ScaleRounding": ".format",
    "dequantize_mxfp4": ".format",
    "quantize_mxfp4": ".format",
    "MXFP4MoE": ".layer",
    "route": ".routing",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mxmoe' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))

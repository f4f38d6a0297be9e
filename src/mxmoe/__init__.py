"""mxmoe: fused Mixture-of-Experts on MXFP4 expert weights, in Triton and PyTorch.

The public names below are imported on first use (PEP 562 ``__getattr__``): ``import mxmoe``
costs no torch import, so the ``mxmoe`` command answers ``--help`` and ``--version`` at once.
``mxmoe.fused_experts`` and ``mxmoe.MXFP4MoE`` import `mxmoe.ops`, which registers the
``mxmoe::fused_experts`` operator, so it is registered before either runs or is traced. Code
that calls ``torch.ops.mxmoe.fused_experts`` itself, or loads a ``torch.export`` program that
holds it, imports `mxmoe.ops` first.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    "Activation": ".activations",
    "MXFP4MoE": ".layer",
    "MXFP4Tensor": ".format",
    "ScaleRounding": ".format",
    "backends": ".backends",
    "dequantize_mxfp4": ".format",
    "fused_experts": ".api",
    "quantize_mxfp4": ".format",
    "route": ".router",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """``mxmoe.backends`` is the function `mxmoe.backends.backends`, not its subpackage.

    Importing a subpackage binds it as an attribute of its parent, and it may be imported
    before anyone asks for ``mxmoe.backends`` (by ``mxmoe.ops``, say): a data descriptor on the
    package's class answers before that binding, which it leaves aside.
    """

    @property
    def backends(self):
        value = self.__dict__.get("_backends_function")
        if value is None:
            from .backends import backends as value
        return value

    @backends.setter
    def backends(self, value):
        if not isinstance(value, types.ModuleType):  # a replacement, e.g. a test's monkeypatch
            self.__dict__["_backends_function"] = value


sys.modules[__name__].__class__ = _Package

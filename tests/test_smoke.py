import torch

import mxmoe


def test_import_exposes_public_api():
    for name in ("MXFP4Tensor", "quantize_mxfp4", "dequantize_mxfp4", "fused_experts", "route",
                 "MXFP4MoE", "backends"):
        assert hasattr(mxmoe, name), name


def test_import_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, mxmoe; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _run_python(code: str) -> str:
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_import_is_lazy_and_each_name_arrives_on_first_use():
    # `import mxmoe` imports no torch; the operator is registered by the names that run it,
    # before they run; `mxmoe.backends` stays the function once its subpackage is imported.
    code = """
import sys, mxmoe
assert 'torch' not in sys.modules, 'import mxmoe imported torch'
assert sorted(mxmoe.__all__) == sorted(n for n in dir(mxmoe) if n in mxmoe.__all__)
import torch
for name in ("MXFP4Tensor", "quantize_mxfp4", "route", "Activation", "backends"):
    getattr(mxmoe, name)
assert not hasattr(torch.ops.mxmoe, "fused_experts"), "registered before anything needs it"
mxmoe.MXFP4MoE
assert hasattr(torch.ops.mxmoe, "fused_experts")
import mxmoe.backends.base
assert callable(mxmoe.backends) and "torch" in mxmoe.backends("cpu")
try:
    mxmoe.no_such_name
except AttributeError as exc:
    assert "no_such_name" in str(exc)
else:
    raise AssertionError("no AttributeError")
print("ok")
"""
    assert _run_python(code) == "ok"
    assert _run_python("import mxmoe, torch; mxmoe.fused_experts; "
                       "print(hasattr(torch.ops.mxmoe, 'fused_experts'))") == "True"


def test_fused_experts_torch_runs():
    torch.manual_seed(0)
    w13 = mxmoe.quantize_mxfp4(torch.randn(4, 64, 32))
    w2 = mxmoe.quantize_mxfp4(torch.randn(4, 32, 32))
    w, ids = mxmoe.route(torch.randn(3, 4), 2)
    out = mxmoe.fused_experts(torch.randn(3, 32), w13, w2, w, ids, backend="torch")
    assert out.shape == (3, 32) and torch.isfinite(out).all()

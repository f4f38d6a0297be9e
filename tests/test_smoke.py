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


def test_fused_experts_torch_runs():
    torch.manual_seed(0)
    w13 = mxmoe.quantize_mxfp4(torch.randn(4, 64, 32))
    w2 = mxmoe.quantize_mxfp4(torch.randn(4, 32, 32))
    w, ids = mxmoe.route(torch.randn(3, 4), 2)
    out = mxmoe.fused_experts(torch.randn(3, 32), w13, w2, w, ids, backend="torch")
    assert out.shape == (3, 32) and torch.isfinite(out).all()

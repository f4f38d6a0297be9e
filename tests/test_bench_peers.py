"""The triton_kernels peer path of `mxmoe bench`: selection, absence, the weight conversion
(on the CPU when triton_kernels is on the path, e.g. the git-ignored .peers/ of a checkout),
and the whole layer against the reference on a GPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from mxmoe.bench import peers
from mxmoe.reference import fused_experts_reference
from mxmoe.testing import random_moe, relative_error

ROOT = Path(__file__).resolve().parents[1]
if (ROOT / ".peers" / "triton_kernels").is_dir() and str(ROOT / ".peers") not in sys.path:
    sys.path.append(str(ROOT / ".peers"))
HAS_TRITON_KERNELS = importlib.util.find_spec("triton_kernels") is not None
needs_triton_kernels = pytest.mark.skipif(
    not HAS_TRITON_KERNELS, reason="triton_kernels is not on the path (optional peer)")


def test_unavailable_without_cuda():
    assert peers.unavailable_reason(torch.device("cpu")) == "triton_kernels needs a CUDA GPU"


def test_import_error_names_the_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_kernels", None)
    monkeypatch.setitem(sys.modules, "triton_kernels.matmul_ogs", None)
    assert peers.import_error().startswith("triton_kernels does not import (")


def test_layer_raises_peer_unavailable_on_the_cpu():
    from mxmoe.bench.problems import CPU_MODEL, make_weights

    with pytest.raises(peers.PeerUnavailable, match="CUDA"):
        peers.TritonKernelsLayer(make_weights(CPU_MODEL, torch.bfloat16, "cpu"), torch.bfloat16)


def test_default_paths_leave_out_the_peer_that_cannot_run_and_keep_a_requested_one():
    from mxmoe.backends import BACKEND_NAMES
    from mxmoe.bench.runner import EXTRA_PATHS
    from mxmoe.cli.bench import _paths

    lines = []
    default = _paths(None, torch.device("cpu"), {*BACKEND_NAMES, *EXTRA_PATHS}, lines.append)
    assert "triton_kernels" not in default and "layer" in default
    assert any(line.startswith("skipping triton_kernels: ") for line in lines)
    chosen = _paths(["torch", "triton_kernels"], torch.device("cpu"),
                    {*BACKEND_NAMES, *EXTRA_PATHS}, lines.append)
    assert chosen == ["torch", "triton_kernels"]  # its rows say why it did not run


@pytest.mark.parametrize("inter", [64, 96, 32], ids=["multiple of 64", "one pad", "I < 64"])
def test_padding_the_intermediate_size_is_exact(inter):
    p = random_moe(5, 64, inter, 3, 2, seed=inter)
    w13, w2, b13 = peers.pad_inter(p.w13, p.w2, p.w13_bias)
    assert w2.shape[-1] % peers.INTER_ALIGN == 0 and w13.shape[1] == 2 * w2.shape[-1]
    assert b13.shape == (3, w13.shape[1])
    # Exact in the weights: the original bytes, scales and biases kept, the padding all zero.
    rows, cols = p.w13.shape[1], p.w2.shape[-1]
    assert torch.equal(w13.blocks[:, :rows], p.w13.blocks)
    assert torch.equal(w13.scales[:, :rows], p.w13.scales)
    assert torch.equal(w2.blocks[..., :cols // 2], p.w2.blocks)
    assert torch.equal(w2.scales[..., :cols // 32], p.w2.scales)
    assert torch.equal(b13[:, :rows], p.w13_bias)
    assert not w13.dequantize()[:, rows:].any() and not w2.dequantize()[..., cols:].any()
    assert not b13[:, rows:].any()
    # The layer adds exact zeros, but the fp32 matmul's reduction order depends on K, so the
    # result may move by an ulp on some CPUs (seen on CI at I = 96): close, not equal.
    padded = fused_experts_reference(p.hidden_states, w13, w2, p.topk_weights, p.topk_ids,
                                     w13_bias=b13, w2_bias=p.w2_bias)
    torch.testing.assert_close(padded, fused_experts_reference(**p.kwargs()),
                               rtol=1e-5, atol=1e-6)


@needs_triton_kernels
@pytest.mark.parametrize("capability", [(9, 0), (8, 0)], ids=["hopper layouts", "strided"])
def test_weight_conversion_keeps_the_bytes_as_w_k_by_n(capability):
    p = random_moe(1, 128, 96, 3, 1, seed=7)  # N = 2I = 192, K = 128
    converted = peers.convert_weight(p.w13, p.w13_bias, capability)
    value, scale = converted.value, converted.scale
    assert list(value.shape) == [3, 128, 192]  # [E, K, N]: x [M, K] @ w[e]
    expected = "HopperMXValueLayout" if capability[0] == 9 else "StridedLayout"
    assert type(value.storage.layout).__name__ == expected
    blocks = value.storage.layout.unswizzle_data(value.storage.data)  # [E, K/2, N] bytes
    assert torch.equal(blocks, p.w13.blocks.transpose(-2, -1))
    scales = scale.storage.layout.unswizzle_data(scale.storage.data)  # [E, K/32, N(padded)]
    assert torch.equal(scales[..., :192], p.w13.scales.transpose(-2, -1))
    assert converted.bias.dtype == torch.float32 and converted.bias.shape == (3, 192)
    assert converted.precision.weight_scale is scale


@pytest.mark.gpu
@needs_triton_kernels
@pytest.mark.parametrize("m", [1, 37], ids=["one token", "M*k > E"])
def test_triton_kernels_layer_matches_reference(m):
    from mxmoe.bench.problems import custom_model, make_rotations, make_weights

    model = custom_model(256, 192, 8, 2)  # I = 192: padded to 192 (a multiple of 64)
    weights = make_weights(model, torch.bfloat16, "cuda")
    inputs = make_rotations(model, m, 1, torch.bfloat16, "cuda").inputs[0]
    layer = peers.TritonKernelsLayer(weights, torch.bfloat16)
    ref = fused_experts_reference(inputs.hidden_states, weights.w13, weights.w2,
                                  inputs.topk_weights, inputs.topk_ids,
                                  w13_bias=weights.w13_bias, w2_bias=weights.w2_bias)
    assert relative_error(layer(inputs), ref) < 2e-2

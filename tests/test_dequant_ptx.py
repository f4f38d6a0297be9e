"""The PTX nibble conversion (bf16, NVIDIA) against the portable bit manipulation, on the GPU.

Both paths feed the same dot with the same tiles, so with equal dequantized weights the layer
outputs are equal bit for bit: any difference is a conversion bug (nibble order, sign, the
subnormal code 0.5, a scale edge). Each case also matches the fp32 reference.
"""

from __future__ import annotations

import json

import pytest
import torch

import mxmoe
from helpers import make_moe, rel_err
from mxmoe.reference import fused_experts_reference

pytestmark = pytest.mark.gpu


def _every_code_and_scale(w: mxmoe.MXFP4Tensor, low: int, high: int, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    blocks = torch.randint(0, 256, w.blocks.shape, generator=g, dtype=torch.int32)
    scales = torch.randint(low, high + 1, w.scales.shape, generator=g, dtype=torch.int32)
    w.blocks.copy_(blocks.to(torch.uint8))
    w.scales.copy_(scales.to(torch.uint8))


def _ptx_equals_portable(monkeypatch, m: int, scales: tuple[int, int], layout: str):
    """The layer at M = m (H 320, I 224, E 6, k 2) with every code and the w13 scale bytes in
    ``scales``, in ``layout``: the PTX and the portable conversion agree bit for bit, and both
    match the fp32 reference."""
    kw = make_moe(m, 320, 224, 6, 2, dtype=torch.bfloat16, device="cuda", seed=m)
    low, high = scales
    _every_code_and_scale(kw["w13"], low, high, seed=1)
    _every_code_and_scale(kw["w2"], 118, 130, seed=2)
    kw["w13_bias"] = kw["w2_bias"] = None
    laid = dict(kw, w13=kw["w13"].to_layout(layout), w2=kw["w2"].to_layout(layout))
    outs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("MXMOE_DEQUANT_PTX", flag)
        outs[flag] = mxmoe.fused_experts(**laid, backend="triton_dequant")
    assert torch.equal(outs["1"], outs["0"]), (outs["1"] - outs["0"]).abs().max()
    ref = fused_experts_reference(**{k: v.float() if torch.is_tensor(v) and v.is_floating_point()
                                     else v for k, v in kw.items()})
    assert rel_err(outs["1"], ref) < 2e-2


@pytest.mark.parametrize("split_dot", [False, True], ids=["one dot", "two half-dots"])
@pytest.mark.parametrize("swap", [False, True], ids=["A x W^T", "swap-AB"])
@pytest.mark.parametrize("scales", [(118, 130), (0, 140)], ids=["typical", "down to 2^-127"])
@pytest.mark.parametrize("m", [1, 37, 300])
def test_ptx_conversion_equals_portable(monkeypatch, split_dot, swap, scales, m):
    from mxmoe.kernels.fused_moe import use_dequant_ptx

    if not use_dequant_ptx(torch.device("cuda"), torch.bfloat16):
        pytest.skip("this GPU does not take the PTX conversion")
    monkeypatch.setenv("MXMOE_CONFIG", json.dumps(dict(
        block_m=16 if m < 64 else 64, block_n=64, block_k=128, num_warps=4, num_stages=3,
        swap_ab=swap, split_dot=split_dot)))
    _ptx_equals_portable(monkeypatch, m, scales, "plain")


@pytest.mark.parametrize("scales", [(118, 130), (0, 140), (100, 128), (0, 128)],
                         ids=["typical", "down to 2^-127", "folded", "folded down to 2^-127"])
@pytest.mark.parametrize("path", ["general", "prefill", "decode"])
def test_mma_lanes_ptx_conversion_equals_portable(monkeypatch, path, scales):
    """MMA_LANES words (each operand register a rotation of the word): the PTX conversion and
    the portable one agree bit for bit in the general kernel (a forced config), the prefill
    GEMMs (auto, many pairs per expert; scales <= 128 take the folded conversion) and the
    decode GEMV (auto, one token). The cases share shapes, so one process reuses plans across
    them: the fold fact is part of the key."""
    from mxmoe.kernels.fused_moe import use_dequant_ptx

    if not use_dequant_ptx(torch.device("cuda"), torch.bfloat16):
        pytest.skip("this GPU does not take the PTX conversion")
    m = {"general": 37, "prefill": 600, "decode": 1}[path]
    if path == "general":
        monkeypatch.setenv("MXMOE_CONFIG", json.dumps(dict(
            block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=3, swap_ab=True)))
    _ptx_equals_portable(monkeypatch, m, scales, "mma_lanes")


def test_prefill_fold_follows_in_place_writes_of_the_scales(monkeypatch):
    """A plan made for scales <= 128 (folded) is not reused once the same tensor holds larger
    ones (copy_ bumps its version): both calls match the portable conversion bit for bit."""
    from mxmoe.kernels.fused_moe import use_dequant_ptx

    if not use_dequant_ptx(torch.device("cuda"), torch.bfloat16):
        pytest.skip("this GPU does not take the PTX conversion")
    kw = make_moe(600, 320, 224, 6, 2, dtype=torch.bfloat16, device="cuda", seed=5)
    kw["w13_bias"] = kw["w2_bias"] = None
    _every_code_and_scale(kw["w13"], 110, 128, seed=3)
    _every_code_and_scale(kw["w2"], 110, 128, seed=4)
    lanes = dict(kw, w13=kw["w13"].to_layout("mma_lanes"), w2=kw["w2"].to_layout("mma_lanes"))
    for high in (128, 150):
        scales = torch.randint(110, high + 1, lanes["w13"].scales.shape, dtype=torch.int32)
        lanes["w13"].scales.copy_(scales.to(torch.uint8))
        outs = {}
        for flag in ("1", "0"):
            monkeypatch.setenv("MXMOE_DEQUANT_PTX", flag)
            outs[flag] = mxmoe.fused_experts(**lanes, backend="triton_dequant")
        assert torch.equal(outs["1"], outs["0"]), (high, (outs["1"] - outs["0"]).abs().max())

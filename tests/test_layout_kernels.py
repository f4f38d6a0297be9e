"""Every dequantizing kernel reads every weight layout, and `auto` picks the kernels by layout.

A layer's weights carry their layout (`mxmoe.layouts`); the general kernel, both decode kernels
and (MMA_LANES only) the prefill kernel decode it in place. Under TRITON_INTERPRET=1, fp32, tiny
but awkward shapes (N and K tails, prime E, k = E, experts with no tokens, remote experts): each
kernel on each layout equals the reference on the same codes.
"""

from __future__ import annotations

import json

import pytest
import torch

import mxmoe
from helpers import make_moe, random_expert_map, rel_err
from mxmoe.kernels.decode import DecodeConfig
from mxmoe.kernels.fused_moe import FusedMoEPlan
from mxmoe.kernels.inner_product import InnerProduct
from mxmoe.kernels.prefill import PREFILL_MIN_PAIRS_PER_EXPERT
from mxmoe.reference import fused_experts_reference
from mxmoe.testing import decode_fused_experts
from mxmoe.validation import check_fused_experts_args

pytestmark = pytest.mark.interpreter

LAYOUTS = ["plain", "group_halves", "mma_lanes"]
TOLERANCE = 1e-5  # fp32
#: The general kernel's tiles (32 rows x 64 K: H = I = 96 leaves N and K tails), both of its
#: dequantizing strategies.
GENERAL = {"one dot": {"block_m": 16, "block_n": 32, "block_k": 64, "num_warps": 4,
                       "num_stages": 1},
           "two half-dots, swap-AB": {"block_m": 16, "block_n": 32, "block_k": 64,
                                      "num_warps": 4, "num_stages": 1, "split_dot": True,
                                      "swap_ab": True}}
DECODE = {"gemv": DecodeConfig("gemv", block_m=2, block_n=32, block_k=64, num_warps=2),
          "direct": DecodeConfig("direct", block_m=2, block_n=32, block_k=64, num_warps=2,
                                 split_k=2)}
SHAPES = [
    pytest.param(5, 96, 96, 5, 2, id="H = I = 96: N and K tails"),
    pytest.param(3, 64, 32, 7, 3, id="prime E, experts with no tokens"),
    pytest.param(1, 32, 64, 3, 3, id="one token, k = E"),
]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("MXMOE_POISON", "1")


def in_layout(kw, layout):
    return dict(kw, w13=kw["w13"].to_layout(layout), w2=kw["w2"].to_layout(layout))


@pytest.mark.parametrize("strategy", list(GENERAL))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("m, h, i, e, k", SHAPES)
def test_general_kernel_reads_every_layout(m, h, i, e, k, layout, strategy, monkeypatch):
    monkeypatch.setenv("MXMOE_CONFIG", json.dumps(GENERAL[strategy]))
    kw = make_moe(m, h, i, e, k, seed=m + e)
    out = mxmoe.fused_experts(**in_layout(kw, layout), backend="triton_dequant")
    assert rel_err(out, fused_experts_reference(**kw)) < TOLERANCE


@pytest.mark.parametrize("variant", list(DECODE))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("m, h, i, e, k", SHAPES)
def test_decode_kernels_read_every_layout(m, h, i, e, k, layout, variant):
    kw = make_moe(m, h, i, e, k, seed=m + e)
    out = decode_fused_experts(**in_layout(kw, layout), config1=DECODE[variant])
    assert rel_err(out, fused_experts_reference(**kw)) < TOLERANCE


def test_mma_lanes_with_remote_experts_on_every_kernel(monkeypatch):
    generator = torch.Generator().manual_seed(5)
    kw = make_moe(4, 64, 32, 3, 2, seed=5, e_global=7)
    expert_map = random_expert_map(7, 3, generator)
    ref = fused_experts_reference(**kw, expert_map=expert_map)
    lanes = in_layout(kw, "mma_lanes")
    for cfg in DECODE.values():
        out = decode_fused_experts(**lanes, expert_map=expert_map, config1=cfg)
        assert rel_err(out, ref) < TOLERANCE
    monkeypatch.setenv("MXMOE_CONFIG", json.dumps(GENERAL["one dot"]))
    out = mxmoe.fused_experts(**lanes, expert_map=expert_map, backend="triton_dequant")
    assert rel_err(out, ref) < TOLERANCE


def _plan_gemm(kw):
    call = check_fused_experts_args(kw["hidden_states"], kw["w13"], kw["w2"],
                                    kw["topk_weights"], kw["topk_ids"],
                                    w13_bias=kw["w13_bias"], w2_bias=kw["w2_bias"],
                                    activation="swigluoai", alpha=1.702, limit=7.0,
                                    expert_map=None)
    plan = FusedMoEPlan(call, InnerProduct.DEQUANT, "triton_dequant")
    return {step.launcher.kernel.__name__ for step in plan.launches.steps}


def test_auto_takes_the_prefill_gemms_for_mma_lanes_weights_past_the_decode_range():
    """Past PREFILL_MIN_PAIRS_PER_EXPERT pairs per expert: the prefill GEMMs for MMA_LANES
    weights (and the result is the reference's), the general kernel for the other layouts;
    within it the decode GEMMs for every layout."""
    e, k = 2, 2
    m = 8  # 8 pairs per expert
    assert m * k / e > PREFILL_MIN_PAIRS_PER_EXPERT
    kw = make_moe(m, 32, 32, e, k, seed=2)
    lanes = in_layout(kw, "mma_lanes")
    assert "prefill_gemm_kernel" in _plan_gemm(lanes)
    assert "moe_gemm_kernel" in _plan_gemm(kw)
    assert "prefill_gemm_kernel" not in _plan_gemm(in_layout(kw, "group_halves"))
    out = mxmoe.fused_experts(**lanes, backend="triton_dequant")
    assert rel_err(out, fused_experts_reference(**kw)) < TOLERANCE
    few = make_moe(1, 32, 32, 4, 1, seed=3)  # 0.25 pairs per expert
    assert 1 / 4 <= PREFILL_MIN_PAIRS_PER_EXPERT
    assert "decode_token_kernel" in _plan_gemm(in_layout(few, "mma_lanes"))


def test_forced_config_keeps_the_general_kernel(monkeypatch):
    monkeypatch.setenv("MXMOE_CONFIG", json.dumps(GENERAL["one dot"]))
    kw = make_moe(8, 32, 32, 2, 2, seed=4)
    kernels = _plan_gemm(in_layout(kw, "mma_lanes"))
    assert "moe_gemm_kernel" in kernels and "prefill_gemm_kernel" not in kernels


def test_dot_scaled_refuses_other_layouts():
    """tl.dot_scaled reads the checkpoint's order only: another layout is refused, not wrong."""
    kw = make_moe(2, 32, 32, 2, 1)
    for layout in ("group_halves", "mma_lanes"):
        with pytest.raises(ValueError, match=layout):
            mxmoe.fused_experts(**in_layout(kw, layout), backend="triton_scaled")

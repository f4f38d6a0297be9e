"""The decode GEMMs (`mxmoe.kernels.decode`: the aligned GEMV and the direct per-token GEMMs)
against the pure-torch reference, whole layer.

Under TRITON_INTERPRET=1 on the CPU: fp16 and fp32 only (the interpreter computes bf16 wrongly;
bf16 at gpt-oss shapes is checked on the GPU by scripts/gpu_decode.py). The weights are the
reference's, converted to the group_halves layout, so the tolerance measures kernel arithmetic.
Shapes are tiny (<= ~16 programs a launch) but awkward: N and K tails, one token, prime E,
k = E, experts with no tokens, remote experts.
"""

from __future__ import annotations

import pytest
import torch

from mxmoe.activations import Activation
from helpers import make_moe, random_expert_map, rel_err
from mxmoe.kernels.decode import DecodeConfig
from mxmoe.testing import decode_fused_experts
from mxmoe.reference import fused_experts_reference

pytestmark = pytest.mark.interpreter

GEMV = DecodeConfig("gemv", block_m=1, block_n=64, block_k=64, num_stages=1)
CONFIGS = {
    "gemv, 1 pair a program": GEMV,
    "gemv, 4 pairs a program, split-K": DecodeConfig("gemv", block_m=4, block_n=64,
                                                      block_k=32, split_k=2, num_stages=1),
    "gemv, 2 pairs, split 3": DecodeConfig("gemv", block_m=2, block_n=32, block_k=32,
                                           split_k=3, num_stages=1),
    # No alignment: a program per token and N tile over the token's top-k slots.
    "direct, 4 slots a step": DecodeConfig("direct", block_m=4, block_n=32, block_k=64,
                                           num_stages=1),
    "direct, 2 slots, split-K GEMM1": DecodeConfig("direct", block_m=2, block_n=16,
                                                   block_k=32, split_k=3, num_stages=1),
}
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("MXMOE_POISON", "1")


def run_both(kw, config, **options):
    halves = dict(kw, w13=kw["w13"].to_layout("group_halves"),
                  w2=kw["w2"].to_layout("group_halves"))
    out = decode_fused_experts(**halves, config1=config, **options)
    if "activation" in options:  # the reference takes the enum
        options = dict(options, activation=Activation(options["activation"]))
    ref = fused_experts_reference(**kw, **options)
    return out, ref


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("m, h, i, e, k", [
    pytest.param(1, 96, 96, 5, 2, id="one token, K = 96 and N = 2*96: tails of every tile"),
    pytest.param(2, 64, 32, 7, 3, id="prime E, experts with no tokens"),
    pytest.param(1, 32, 64, 3, 3, id="k = E"),
])
def test_layer_matches_reference(name, m, h, i, e, k):
    kw = make_moe(m, h, i, e, k, dtype=torch.float16, seed=m + e)
    out, ref = run_both(kw, CONFIGS[name])
    assert out.dtype == torch.float16
    assert rel_err(out, ref) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("activation", ["swigluoai", "silu"])
@pytest.mark.parametrize("name", ["gemv, 4 pairs a program, split-K", "gemv, 2 pairs, split 3"])
def test_activations_and_dtypes(name, activation, dtype):
    kw = make_moe(2, 64, 96, 3, 2, dtype=dtype, seed=3)
    out, ref = run_both(kw, CONFIGS[name], activation=activation)
    assert rel_err(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("on_input", [False, True], ids=["weight on output", "weight on input"])
@pytest.mark.parametrize("bias", [True, False], ids=["biases", "no biases"])
@pytest.mark.parametrize("name", ["gemv, 1 pair a program", "gemv, 2 pairs, split 3"])
def test_router_weight_and_biases(name, bias, on_input):
    kw = make_moe(2, 64, 64, 3, 2, dtype=torch.float32, seed=4, bias=bias)
    out, ref = run_both(kw, CONFIGS[name], apply_router_weight_on_input=on_input)
    assert rel_err(out, ref) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("name", ["gemv, 4 pairs a program, split-K", "gemv, 2 pairs, split 3"])
def test_expert_map_with_remote_experts(name):
    generator = torch.Generator().manual_seed(5)
    kw = make_moe(3, 64, 32, 3, 2, dtype=torch.float32, seed=5, e_global=7)
    expert_map = random_expert_map(7, 3, generator)
    out, ref = run_both(kw, CONFIGS[name], expert_map=expert_map)
    assert rel_err(out, ref) < TOLERANCE[torch.float32]


def _set_group(weight, expert, row, group, scale, codes):
    """Plain-layout weight: one 32-group's scale byte and its 32 codes (K order)."""
    weight.scales[expert, row, group] = scale
    packed = codes[0::2] | (codes[1::2] << 4)
    weight.blocks[expert, row, 16 * group: 16 * group + 16] = packed


@pytest.mark.parametrize("scale", [0, 1, 126, 127, 128, 192, 193, 254],
                         ids=lambda s: f"scale byte {s}")
@pytest.mark.parametrize("name", ["gemv, 1 pair a program", "gemv, 2 pairs, split 3"])
def test_every_scale_range_is_exact(name, scale):
    """One group of w2 with an edge scale byte and every code at once (one nonzero code at the
    largest scales, so that no product overflows): the result equals the reference."""
    kw = make_moe(2, 64, 64, 2, 1, dtype=torch.float32, seed=6)
    codes = torch.arange(32, dtype=torch.uint8) % 16
    if scale >= 193:
        codes = torch.zeros(32, dtype=torch.uint8)
        codes[5], codes[20] = 1, 9  # +0.5 in the low half, -0.5 in the high half
    for expert in range(2):
        _set_group(kw["w2"], expert, 3, 1, scale, codes)
    out, ref = run_both(kw, CONFIGS[name])
    assert torch.isfinite(ref).all()
    big = ref[:, 3].abs().max()
    rest = torch.cat([ref[:, :3], ref[:, 4:]], dim=1)
    # Column 3 may dwarf the others (scale 2**127): compare each part at its own magnitude.
    assert float((out[:, 3] - ref[:, 3]).abs().max()) <= 1e-5 * float(big)
    assert rel_err(torch.cat([out[:, :3], out[:, 4:]], dim=1), rest) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("gemm", ["w13", "w2"])
@pytest.mark.parametrize("name", ["gemv, 4 pairs a program, split-K", "gemv, 2 pairs, split 3"])
def test_nan_scale_propagates(name, gemm):
    kw = make_moe(2, 64, 64, 2, 2, dtype=torch.float32, seed=7)
    kw[gemm].scales[:, 2, 0] = 255  # every expert, weight row 2, first group
    out, ref = run_both(kw, CONFIGS[name])
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.isnan(ref).any()
    finite = ~torch.isnan(ref)  # empty for w13: GEMM2 mixes the NaN column into every output
    if finite.any():
        assert rel_err(out[finite], ref[finite]) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("name", ["gemv, 1 pair a program", "direct, 4 slots a step",
                                  "direct, 2 slots, split-K GEMM1"])
def test_both_layouts_give_the_same_layer(name):
    """The decode kernels read the plain and the group_halves layout: the same codes in another
    order, so the same sums (fp32: equal up to summation order)."""
    kw = make_moe(2, 96, 64, 5, 3, dtype=torch.float32, seed=11)
    plain = decode_fused_experts(**kw, config1=CONFIGS[name])
    halves, ref = run_both(kw, CONFIGS[name])
    assert rel_err(plain, halves) < TOLERANCE[torch.float32]
    assert rel_err(plain, ref) < TOLERANCE[torch.float32]


def test_config_rejects_what_the_gemv_cannot_run():
    with pytest.raises(ValueError, match="variant"):
        DecodeConfig("mma", block_m=16)
    with pytest.raises(ValueError, match="block_m"):
        DecodeConfig("gemv", block_m=8)


@pytest.mark.parametrize("layout", ["plain", "group_halves", "mma_lanes"])
@pytest.mark.parametrize("dtype, activation", [(torch.float16, "swigluoai"),
                                               (torch.float32, "silu")], ids=["fp16", "fp32"])
@pytest.mark.parametrize("name", ["direct, 4 slots a step", "direct, 1 slot, narrow"])
def test_activation_planes_change_no_bit(monkeypatch, name, dtype, activation, layout):
    """The direct GEMMs hand GEMM1's activation to GEMM2 as float32 planes in GEMM2's code
    order (MXMOE_DECODE_PLANES=1) or as rows of the call's dtype (the default): the same values
    multiply the same codes in the same order, so the layers are bit-identical (K = I = 96:
    a tail in every 64-wide step; a remote expert; one token and three)."""
    from mxmoe import settings

    configs = dict(CONFIGS, **{"direct, 1 slot, narrow": DecodeConfig(
        "direct", block_m=1, block_n=8, block_k=64, num_stages=1)})
    generator = torch.Generator().manual_seed(13)
    for m in (1, 3):
        kw = make_moe(m, 64, 96, 5, 2, dtype=dtype, seed=13 + m, e_global=6)
        kw = dict(kw, w13=kw["w13"].to_layout(layout), w2=kw["w2"].to_layout(layout),
                  expert_map=random_expert_map(6, 5, generator), activation=activation)
        outs = []
        for planes in ("1", "0"):
            monkeypatch.setenv("MXMOE_DECODE_PLANES", planes)
            settings.refresh()
            assert _gemm1_writes_planes(kw, configs[name]) == (planes == "1")
            outs.append(decode_fused_experts(**kw, config1=configs[name]))
        monkeypatch.delenv("MXMOE_DECODE_PLANES")
        settings.refresh()
        assert torch.equal(outs[0], outs[1])
        assert torch.isfinite(outs[0]).all() and outs[0].abs().max() > 0


def _gemm1_writes_planes(kw, config) -> bool:
    """Whether the plan of this call hands the activation over as planes (so that the test
    above compares two paths, not one twice)."""
    from mxmoe.constants import GPT_OSS_SWIGLU_ALPHA, GPT_OSS_SWIGLU_LIMIT
    from mxmoe.kernels.fused_moe import FusedMoEPlan
    from mxmoe.kernels.inner_product import InnerProduct
    from mxmoe.validation import check_fused_experts_args

    options = {key: kw.get(key) for key in ("w13_bias", "w2_bias", "expert_map")}
    call = check_fused_experts_args(kw["hidden_states"], kw["w13"], kw["w2"],
                                    kw["topk_weights"], kw["topk_ids"], **options,
                                    activation=kw["activation"], alpha=GPT_OSS_SWIGLU_ALPHA,
                                    limit=GPT_OSS_SWIGLU_LIMIT)
    plan = FusedMoEPlan(call, InnerProduct.DEQUANT, "triton_dequant", config=(config, config))
    first, second = plan.launches.steps
    assert first.arguments["OUT_PLANES"] == second.arguments["X_PLANES"]
    return first.arguments["OUT_PLANES"]

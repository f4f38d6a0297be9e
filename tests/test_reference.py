"""The pure-torch reference MoE (`fused_experts(..., backend="torch")`) against a naive loop.

The loop below is written from the model's equations (shared/FACTS.md), one token and one slot
at a time, in float64, from the same dequantized weights. So the tolerance measures only the
reference's float32 arithmetic (and the final cast to the input dtype).
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import mxmoe
from mxmoe import Activation, fused_experts
from mxmoe.activations import apply_activation, silu_and_mul, swiglu_oai
from helpers import make_moe, rel_err

FP32_TOL = 1e-5
#: The output is rounded to the input dtype: half an ulp relative, with margin.
CAST_TOL = {torch.float32: FP32_TOL, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def naive_moe(hidden_states, w13, w2, topk_weights, topk_ids, *, w13_bias=None, w2_bias=None,
              activation="swigluoai", alpha=1.702, limit=7.0, expert_map=None,
              apply_router_weight_on_input=False) -> torch.Tensor:
    """float64 ``[M, H]``, one (token, slot) at a time."""
    w13 = w13.dequantize().double()
    w2 = w2.dequantize().double()
    inter = w2.shape[2]
    x = hidden_states.double()
    out = torch.zeros_like(x)
    for m in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            expert = int(topk_ids[m, j])
            if expert_map is not None:
                expert = int(expert_map[expert])
            if expert < 0:  # held by another rank: contributes nothing, not even its bias
                continue
            weight = float(topk_weights[m, j])
            inputs = x[m] * weight if apply_router_weight_on_input else x[m]
            h = w13[expert] @ inputs
            if w13_bias is not None:
                h = h + w13_bias[expert].double()
            if activation == "swigluoai":  # rows interleave gate and up
                gate, up = h[0::2].clamp(max=limit), h[1::2].clamp(-limit, limit)
                a = gate * (1 / (1 + torch.exp(-alpha * gate))) * (up + 1)
            else:  # rows are [gate | up] halves
                gate, up = h[:inter], h[inter:]
                a = gate * (1 / (1 + torch.exp(-gate))) * up
            y = w2[expert] @ a
            if w2_bias is not None:
                y = y + w2_bias[expert].double()
            out[m] += y if apply_router_weight_on_input else weight * y
    return out


def assert_matches_naive(problem: dict, **options) -> torch.Tensor:
    out = fused_experts(**problem, **options, backend="torch")
    dtype = problem["hidden_states"].dtype
    assert out.dtype == dtype
    assert out.shape == problem["hidden_states"].shape
    ref = naive_moe(**problem, **options)
    err = rel_err(out, ref)
    assert err <= CAST_TOL[dtype], f"max relative error {err:.2e}"
    return out


# ---------------------------------------------------------------------------------------------
# Against the naive loop
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("on_input", [False, True], ids=["weight on output", "weight on input"])
@pytest.mark.parametrize("bias", [True, False], ids=["biases", "no biases"])
@pytest.mark.parametrize("activation", ["swigluoai", "silu"])
def test_matches_the_naive_loop(activation, bias, on_input):
    problem = make_moe(9, 64, 32, 4, 2, bias=bias, seed=1)
    assert_matches_naive(problem, activation=activation, apply_router_weight_on_input=on_input)


@pytest.mark.parametrize("activation", ["swigluoai", "silu"])
def test_activation_enum_and_name_give_the_same_result(activation):
    problem = make_moe(5, 64, 32, 4, 2, seed=2)
    by_name = fused_experts(**problem, activation=activation, backend="torch")
    by_enum = fused_experts(**problem, activation=Activation(activation), backend="torch")
    assert torch.equal(by_name, by_enum)


def test_swigluoai_limit_and_alpha_reach_the_clamps():
    # Inputs scaled up so that |h| passes the limit: both clamps and alpha are exercised.
    problem = make_moe(8, 64, 32, 4, 2, seed=3)
    problem["hidden_states"] = problem["hidden_states"] * 30
    assert_matches_naive(problem, alpha=1.2, limit=2.5)
    clamped = fused_experts(**problem, limit=2.5, backend="torch")
    assert not torch.equal(clamped, fused_experts(**problem, backend="torch"))


@pytest.mark.parametrize("on_input", [False, True], ids=["weight on output", "weight on input"])
def test_expert_map_leaves_out_remote_experts(on_input):
    # 8 global experts, 4 held here (global 1, 4, 2, 6 -> local 0, 1, 2, 3).
    expert_map = torch.tensor([-1, 0, 2, -1, 1, -1, 3, -1], dtype=torch.int32)
    problem = make_moe(16, 64, 32, 4, 2, e_global=8, seed=4)
    problem["topk_ids"][0] = torch.tensor([0, 3], dtype=torch.int32)  # both remote
    problem["topk_ids"][1] = torch.tensor([1, 3], dtype=torch.int32)  # one remote
    out = assert_matches_naive(problem, expert_map=expert_map,
                               apply_router_weight_on_input=on_input)
    # A token routed only to remote experts gets nothing, not even a bias.
    all_remote = (expert_map[problem["topk_ids"].long()] < 0).all(dim=1)
    assert all_remote[0] and not all_remote[1]
    assert (out[all_remote] == 0).all()
    assert (out[~all_remote] != 0).any(dim=1).all()


def test_no_tokens_returns_an_empty_h_wide_output():
    problem = make_moe(0, 64, 32, 4, 2, dtype=torch.bfloat16)
    out = fused_experts(**problem, backend="torch")
    assert out.shape == (0, 64) and out.dtype == torch.bfloat16


SHAPES = {
    # label: (M, H, I, E, k)
    "one token": (1, 64, 32, 4, 2),
    "k = E": (6, 64, 32, 3, 3),
    "prime E": (13, 96, 64, 7, 3),
    "top-1": (10, 32, 32, 5, 1),
    "H, I not multiples of 64": (4, 96, 96, 4, 2),
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("activation", ["swigluoai", "silu"])
def test_awkward_shapes_match_the_naive_loop(shape, activation):
    m, h, i, e, k = shape
    assert_matches_naive(make_moe(m, h, i, e, k, seed=5), activation=activation)


def test_experts_with_no_tokens_are_skipped():
    problem = make_moe(7, 64, 32, 5, 2, seed=6)
    problem["topk_ids"] = torch.tensor([[0, 2], [2, 0]] * 3 + [[0, 2]], dtype=torch.int32)
    assert_matches_naive(problem)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
def test_input_dtypes_return_their_own_dtype(dtype):
    assert_matches_naive(make_moe(6, 64, 32, 4, 2, dtype=dtype, seed=7))


def test_int64_ids_give_the_same_result_as_int32():
    problem = make_moe(6, 64, 32, 4, 2, seed=8)
    out32 = fused_experts(**problem, backend="torch")
    problem["topk_ids"] = problem["topk_ids"].long()
    assert torch.equal(fused_experts(**problem, backend="torch"), out32)


def test_duplicate_experts_in_one_token_each_contribute():
    # Routers pick distinct experts, but the spec is a sum over slots: a repeat counts twice.
    problem = make_moe(3, 64, 32, 4, 2, seed=9)
    problem["topk_ids"] = torch.tensor([[1, 1], [0, 3], [2, 2]], dtype=torch.int32)
    assert_matches_naive(problem)


def test_gated_rows_follow_the_activation_layout():
    # One expert, H = I = 32, x = 2 * e0, w2 = identity, so y = a. Rows 0, 1 and 32 of w13
    # pick up x[0], so h = 2 there and 0 elsewhere:
    # - swigluoai (gate = even rows, up = odd rows): gate0 = 2, up0 = 2 (row 1), and
    #   gate16 = 2 (row 32), up16 = 0 -> a0 = 2 s (2 + 1), a16 = 2 s (0 + 1), s = sigmoid(1.702*2)
    # - silu (gate = rows 0..31, up = rows 32..63): gate0 = gate1 = 2, up0 = 2 (row 32),
    #   up1 = 0 -> a0 = silu(2) * 2, a1 = 0.
    w13 = torch.zeros(1, 64, 32)
    w13[0, [0, 1, 32], 0] = 1.0
    w2 = torch.eye(32).unsqueeze(0)
    x = torch.zeros(1, 32)
    x[0, 0] = 2.0
    args = (x, mxmoe.quantize_mxfp4(w13), mxmoe.quantize_mxfp4(w2), torch.ones(1, 1),
            torch.zeros(1, 1, dtype=torch.int32))
    s = 1 / (1 + math.exp(-1.702 * 2))
    expected_oai = torch.zeros(1, 32)
    expected_oai[0, 0], expected_oai[0, 16] = 2 * s * 3, 2 * s * 1
    expected_silu = torch.zeros(1, 32)
    expected_silu[0, 0] = 2 / (1 + math.exp(-2)) * 2
    torch.testing.assert_close(fused_experts(*args, activation="swigluoai", backend="torch"),
                               expected_oai, rtol=1e-6, atol=0)
    torch.testing.assert_close(fused_experts(*args, activation="silu", backend="torch"),
                               expected_silu, rtol=1e-6, atol=0)


def test_route_and_experts_match_transformers_gpt_oss():
    # The model's own code (transformers' GptOssTopKRouter and GptOssExperts, float32) on the
    # same dequantized weights: the layouts (gate/up interleaved, weights transposed there),
    # the +1 on up, the clamps and b2 before the routing weight must all agree.
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts, GptOssTopKRouter

    m, h, i, e, k = 11, 64, 32, 4, 2
    problem = make_moe(m, h, i, e, k, seed=10)
    x = problem["hidden_states"] * 4  # large enough that some |h| passes the limit of 7
    config = GptOssConfig(hidden_size=h, intermediate_size=i, num_local_experts=e,
                          num_experts_per_tok=k, swiglu_limit=7.0)
    g = torch.Generator().manual_seed(11)
    router = GptOssTopKRouter(config)
    experts = GptOssExperts(config)
    with torch.no_grad():
        router.weight.copy_(torch.randn(e, h, generator=g))
        router.bias.copy_(torch.randn(e, generator=g))
        experts.gate_up_proj.copy_(problem["w13"].dequantize().transpose(1, 2))
        experts.gate_up_proj_bias.copy_(problem["w13_bias"])
        experts.down_proj.copy_(problem["w2"].dequantize().transpose(1, 2))
        experts.down_proj_bias.copy_(problem["w2_bias"])
        logits, scores, indices = router(x)
        expected = experts(x, router_indices=indices, routing_weights=scores)

    weights, ids = mxmoe.route(logits, k)
    assert torch.equal(ids, indices.to(torch.int32))
    out = fused_experts(x, problem["w13"], problem["w2"], weights, ids,
                        w13_bias=problem["w13_bias"], w2_bias=problem["w2_bias"],
                        backend="torch")
    assert rel_err(out, expected) <= FP32_TOL


# ---------------------------------------------------------------------------------------------
# Activation functions against their formulas
# ---------------------------------------------------------------------------------------------

VALUES = torch.tensor([-20.0, -7.5, -7.0, -3.0, -1.0, -0.1, 0.0, 0.1, 1.0, 3.0, 6.9, 7.0, 7.5,
                       20.0])


def sigmoid64(x: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + torch.exp(-x.double()))


@pytest.mark.parametrize("alpha,limit", [(1.702, 7.0), (1.0, 2.5)],
                         ids=["gpt-oss", "alpha 1, limit 2.5"])
def test_swiglu_oai_formula(alpha, limit):
    gate, up = torch.meshgrid(VALUES, VALUES, indexing="ij")
    out = swiglu_oai(gate, up, alpha, limit)
    g = gate.double().clamp(max=limit)  # the gate is clamped from above only
    u = up.double().clamp(-limit, limit)
    expected = g * sigmoid64(alpha * g) * (u + 1)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-7)


def test_swiglu_oai_clamps_gate_from_above_only_and_up_both_ways():
    one = torch.tensor([1.0])
    # gate 20 acts as 7; gate -20 stays -20 (its sigmoid makes it ~0, but not as -7 would).
    assert swiglu_oai(torch.tensor([20.0]), one, 1.702, 7.0) == swiglu_oai(
        torch.tensor([7.0]), one, 1.702, 7.0)
    assert swiglu_oai(torch.tensor([-20.0]), one, 1.0, 7.0) != swiglu_oai(
        torch.tensor([-7.0]), one, 1.0, 7.0)
    # up 20 acts as 7, up -20 as -7: (up + 1) is 8 or -6.
    gate = torch.tensor([1.0])
    base = gate * torch.sigmoid(1.702 * gate)
    torch.testing.assert_close(swiglu_oai(gate, torch.tensor([20.0]), 1.702, 7.0), base * 8)
    torch.testing.assert_close(swiglu_oai(gate, torch.tensor([-20.0]), 1.702, 7.0), base * -6)


def test_silu_and_mul_formula():
    gate, up = torch.meshgrid(VALUES, VALUES, indexing="ij")
    expected = gate.double() * sigmoid64(gate) * up.double()
    torch.testing.assert_close(silu_and_mul(gate, up).double(), expected, rtol=1e-6, atol=1e-7)


def test_apply_activation_splits_interleaved_rows_or_halves():
    h = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    oai = apply_activation(h, Activation.SWIGLUOAI, 1.702, 7.0)
    torch.testing.assert_close(oai, swiglu_oai(torch.tensor([[1.0, 3.0]]),
                                               torch.tensor([[2.0, 4.0]]), 1.702, 7.0))
    silu = apply_activation(h, Activation.SILU, 1.702, 7.0)
    torch.testing.assert_close(silu, silu_and_mul(torch.tensor([[1.0, 2.0]]),
                                                  torch.tensor([[3.0, 4.0]])))


def test_activation_parse_accepts_names_and_rejects_others():
    assert Activation.parse("silu") is Activation.SILU
    assert Activation.parse(Activation.SWIGLUOAI) is Activation.SWIGLUOAI
    with pytest.raises(ValueError, match=re.escape("['swigluoai', 'silu'], got 'gelu'")):
        Activation.parse("gelu")


# ---------------------------------------------------------------------------------------------
# Argument errors at the public boundary
# ---------------------------------------------------------------------------------------------


def _bad(**changes):
    def build():
        problem = make_moe(4, 64, 32, 4, 2)
        for key, value in changes.items():
            problem[key] = value(problem) if callable(value) else value
        return problem
    return build


@pytest.mark.parametrize(
    "build,error,fragment",
    [
        (_bad(hidden_states=lambda p: p["hidden_states"].double()), TypeError,
         "hidden_states must be bfloat16, float16 or float32, got torch.float64"),
        (_bad(hidden_states=lambda p: p["hidden_states"][:, :32]), ValueError,
         "hidden_states has H = 32"),
        (_bad(w13=lambda p: p["w13"].blocks), TypeError, "w13 must be an mxmoe.MXFP4Tensor"),
        (_bad(w2=lambda p: p["w2"][:3]), ValueError, "w2 must be [E, H, I] = (4, 64, 32)"),
        (_bad(topk_ids=lambda p: p["topk_ids"].float()), TypeError,
         "topk_ids must be int32 or int64"),
        (_bad(topk_ids=lambda p: p["topk_ids"] + 4), ValueError,
         "topk_ids values must be in [0, 4)"),
        (_bad(topk_weights=lambda p: p["topk_weights"][:, :1]), ValueError,
         "topk_weights shape (4, 1) must equal topk_ids shape (4, 2)"),
        (_bad(w13_bias=lambda p: p["w13_bias"][:, :10]), ValueError,
         "w13_bias must be [E, N] = (4, 64), got (4, 10)"),
        (_bad(w2_bias=lambda p: p["w2_bias"].int()), TypeError, "w2_bias must be a floating"),
    ],
    ids=["fp64 input", "H mismatch", "loose blocks", "w2 E mismatch", "float ids",
         "ids out of range", "weights shape", "w13_bias shape", "int bias"],
)
def test_fused_experts_rejects_bad_arguments(build, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        fused_experts(**build(), backend="torch")


def test_expert_map_values_are_checked():
    problem = make_moe(4, 64, 32, 4, 2, e_global=8)
    with pytest.raises(ValueError, match=re.escape("expert_map values must be in [-1, 4)")):
        fused_experts(**problem, expert_map=torch.arange(8, dtype=torch.int32), backend="torch")


def test_unknown_activation_is_rejected():
    with pytest.raises(ValueError, match=re.escape("activation must be one of")):
        fused_experts(**make_moe(4, 64, 32, 4, 2), activation="gelu", backend="torch")


def test_reference_keywords_are_fused_experts_own_with_its_defaults():
    import inspect

    from mxmoe.reference import FUSED_EXPERTS_OPTIONS, fused_experts_reference

    keywords = {name: p.default for name, p in inspect.signature(fused_experts).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "backend"}
    keywords["activation"] = Activation.parse(keywords["activation"])
    assert FUSED_EXPERTS_OPTIONS == keywords
    kwargs = make_moe(3, 64, 32, 4, 2)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['bias'\]"):
        fused_experts_reference(**kwargs, bias=None)

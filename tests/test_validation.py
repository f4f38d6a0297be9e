"""Bad inputs at every public entry point: each raises TypeError or ValueError with a message
that names the argument, what was seen and what was expected.

Each row of a table is one bad input, named by its reason; the row gives the exception type and
a fragment of its message. All on the CPU with the torch backend: validation runs before any
backend, and the "meta" device stands in for a second device.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from helpers import make_moe
from mxmoe import MXFP4MoE, MXFP4Tensor, fused_experts, quantize_mxfp4, route

M, H, I, E, K = 3, 64, 32, 4, 2  # noqa: E741


def _problem():
    return make_moe(M, H, I, E, K)


def _mx(blocks_shape, scales_shape, device="cpu"):
    return MXFP4Tensor(torch.zeros(blocks_shape, dtype=torch.uint8, device=device),
                       torch.full(scales_shape, 127, dtype=torch.uint8, device=device))


def _with(**changes):
    """A fused_experts problem with some arguments replaced (a callable gets the problem)."""
    def build():
        problem = _problem()
        for key, value in changes.items():
            problem[key] = value(problem) if callable(value) else value
        return problem
    return build


def _meta(t):
    return t.to("meta")


FUSED_EXPERTS_CASES = [
    # hidden_states
    pytest.param(_with(hidden_states=[[0.0] * H] * M), TypeError,
                 "hidden_states must be a torch.Tensor, got list", id="hidden_states is a list"),
    pytest.param(_with(hidden_states=lambda p: p["hidden_states"].double()), TypeError,
                 "hidden_states must be bfloat16, float16 or float32, got torch.float64",
                 id="fp64 activations"),
    pytest.param(_with(hidden_states=lambda p: p["hidden_states"].int()), TypeError,
                 "got torch.int32", id="int activations"),
    pytest.param(_with(hidden_states=lambda p: p["hidden_states"][None]), ValueError,
                 "hidden_states must be [M, H], got shape (1, 3, 64)", id="3-D activations"),
    pytest.param(_with(hidden_states=lambda p: p["hidden_states"][:, :32]), ValueError,
                 "w13 is [E, 2I, H] = (4, 64, 64) but hidden_states has H = 32",
                 id="H differs from w13"),
    # the weights
    pytest.param(_with(w13=lambda p: p["w13"].dequantize()), TypeError,
                 "w13 must be an mxmoe.MXFP4Tensor, got Tensor", id="dense w13"),
    pytest.param(_with(w2=lambda p: (p["w2"].blocks, p["w2"].scales)), TypeError,
                 "w2 must be an mxmoe.MXFP4Tensor, got tuple", id="loose (blocks, scales) w2"),
    pytest.param(_with(w13=lambda p: p["w13"][0]), ValueError,
                 "w13 must be [E, N, K], got logical shape (64, 64)", id="2-D w13"),
    pytest.param(_with(w2=lambda p: p["w2"][:3]), ValueError,
                 "w2 must be [E, H, I] = (4, 64, 32) to match w13 (4, 64, 64), got (3, 64, 32)",
                 id="w2 has fewer experts"),
    pytest.param(_with(w2=_mx((E, H, 32), (E, H, 2))), ValueError,
                 "w2 must be [E, H, I] = (4, 64, 32)", id="w2 K is not I"),
    pytest.param(_with(w2=_mx((E, 32, 16), (E, 32, 1))), ValueError,
                 "got (4, 32, 32)", id="w2 N is not H"),
    pytest.param(_with(w13=_mx((E, 63, 32), (E, 63, 2))), ValueError,
                 "w13 rows (2I) must be even and positive, got 63", id="odd 2I"),
    pytest.param(_with(w13=_mx((E, 48, 32), (E, 48, 2))), ValueError,
                 "I = 24 must be a multiple of 32", id="I not a multiple of 32"),
    pytest.param(_with(w13=_mx((0, 64, 32), (0, 64, 2)), w2=_mx((0, 64, 16), (0, 64, 1)),
                       w13_bias=None, w2_bias=None), ValueError,
                 "top_k (topk_ids.shape[1]) must be in [1, E=0], got 2",
                 id="no experts and no expert map"),
    pytest.param(_with(w2=lambda p: p["w2"].to("meta")), ValueError,
                 "w2 is on meta but w13 is on cpu: expected one device", id="w2 on another device"),
    # routing
    pytest.param(_with(topk_ids=lambda p: p["topk_ids"].float()), TypeError,
                 "topk_ids must be int32 or int64, got torch.float32", id="float ids"),
    pytest.param(_with(topk_ids=lambda p: p["topk_ids"].to(torch.int16)), TypeError,
                 "topk_ids must be int32 or int64, got torch.int16", id="int16 ids"),
    pytest.param(_with(topk_weights=lambda p: p["topk_ids"].clone()), TypeError,
                 "topk_weights must be a floating tensor, got torch.int32", id="int weights"),
    pytest.param(_with(topk_ids=lambda p: p["topk_ids"].reshape(-1),
                       topk_weights=lambda p: p["topk_weights"].reshape(-1)), ValueError,
                 "topk_ids must be [M, top_k] with M = 3, got shape (6,)", id="flat ids"),
    pytest.param(_with(topk_ids=lambda p: p["topk_ids"][:2],
                       topk_weights=lambda p: p["topk_weights"][:2]), ValueError,
                 "topk_ids must be [M, top_k] with M = 3, got shape (2, 2)", id="ids for 2 tokens"),
    pytest.param(_with(topk_weights=lambda p: p["topk_weights"][:, :1]), ValueError,
                 "topk_weights shape (3, 1) must equal topk_ids shape (3, 2)",
                 id="weights not shaped like ids"),
    pytest.param(_with(topk_ids=torch.zeros(M, 5, dtype=torch.int32),
                       topk_weights=torch.zeros(M, 5)), ValueError,
                 "top_k (topk_ids.shape[1]) must be in [1, E=4], got 5", id="top_k > E"),
    pytest.param(_with(topk_ids=torch.zeros(M, 0, dtype=torch.int32),
                       topk_weights=torch.zeros(M, 0)), ValueError,
                 "must be in [1, E=4], got 0", id="top_k = 0"),
    pytest.param(_with(topk_ids=lambda p: p["topk_ids"] + E), ValueError,
                 "topk_ids values must be in [0, 4), got range", id="id = E"),
    pytest.param(_with(topk_ids=lambda p: p["topk_ids"] - E), ValueError,
                 "topk_ids values must be in [0, 4), got range [-4,", id="negative id"),
    # expert_map
    pytest.param(_with(expert_map=torch.arange(E, dtype=torch.float32)), TypeError,
                 "expert_map must be int32 or int64, got torch.float32", id="float expert_map"),
    pytest.param(_with(expert_map=torch.arange(E)[None]), ValueError,
                 "expert_map must be [E_global], got shape (1, 4)", id="2-D expert_map"),
    pytest.param(_with(expert_map=torch.tensor([0, 1, 2, 4])), ValueError,
                 "expert_map values must be in [-1, 4) (local expert or -1 for remote), got "
                 "range [0, 4]", id="map value = E_local"),
    pytest.param(_with(expert_map=torch.tensor([0, 1, -2, 3])), ValueError,
                 "got range [-2, 3]", id="map value < -1"),
    pytest.param(_with(expert_map=torch.tensor([0])), ValueError,
                 "top_k (topk_ids.shape[1]) must be in [1, E=1], got 2", id="map shorter than k"),
    pytest.param(_with(expert_map=torch.tensor([0, 1, 2])), ValueError,
                 "topk_ids values must be in [0, 3)", id="ids past a short map"),
    pytest.param(_with(expert_map=[0, 1, 2, 3]), TypeError,
                 "expert_map must be a torch.Tensor, got list", id="list expert_map"),
    # biases
    pytest.param(_with(w13_bias=lambda p: p["w13_bias"][:, :10]), ValueError,
                 "w13_bias must be [E, N] = (4, 64), got (4, 10)", id="w13_bias shape"),
    pytest.param(_with(w2_bias=lambda p: p["w2_bias"][0]), ValueError,
                 "w2_bias must be [E, N] = (4, 64), got (64,)", id="w2_bias of one expert"),
    pytest.param(_with(w2_bias=lambda p: p["w2_bias"].int()), TypeError,
                 "w2_bias must be a floating tensor, got torch.int32", id="int bias"),
    pytest.param(_with(w13_bias=0.0), TypeError,
                 "w13_bias must be a torch.Tensor, got float", id="scalar bias"),
    # activation and its parameters
    pytest.param(_with(activation="gelu"), ValueError,
                 "activation must be one of ['swigluoai', 'silu'], got 'gelu'",
                 id="unknown activation"),
    pytest.param(_with(activation=None), ValueError,
                 "activation must be one of", id="activation None"),
    pytest.param(_with(alpha="1.702"), TypeError,
                 "alpha must be a float, got str", id="alpha as a string"),
    pytest.param(_with(alpha=True), TypeError, "alpha must be a float, got bool", id="bool alpha"),
    pytest.param(_with(alpha=math.nan), ValueError, "alpha must be finite, got nan",
                 id="NaN alpha"),
    pytest.param(_with(limit=math.inf), ValueError, "limit must be finite, got inf",
                 id="infinite limit"),
    pytest.param(_with(limit=torch.tensor(7.0)), TypeError, "limit must be a float, got Tensor",
                 id="tensor limit"),
    # flags
    pytest.param(_with(apply_router_weight_on_input="false"), TypeError,
                 "apply_router_weight_on_input must be a bool, got str 'false'",
                 id="flag as a string"),
    pytest.param(_with(apply_router_weight_on_input=1), TypeError,
                 "apply_router_weight_on_input must be a bool, got int", id="flag as an int"),
    pytest.param(_with(backend=None), TypeError, "backend must be a str", id="backend None"),
    pytest.param(_with(backend="cuda"), ValueError, "unknown backend 'cuda'",
                 id="unknown backend"),
    # devices
    pytest.param(_with(hidden_states=lambda p: _meta(p["hidden_states"])), ValueError,
                 "w13 is on cpu but hidden_states is on meta: expected one device",
                 id="activations on another device"),
    pytest.param(_with(topk_ids=lambda p: _meta(p["topk_ids"])), ValueError,
                 "topk_ids is on meta but hidden_states is on cpu", id="ids on another device"),
    pytest.param(_with(topk_weights=lambda p: _meta(p["topk_weights"])), ValueError,
                 "topk_weights is on meta", id="weights on another device"),
    pytest.param(_with(w13_bias=lambda p: _meta(p["w13_bias"])), ValueError,
                 "w13_bias is on meta but w13 is on cpu", id="bias on another device"),
    pytest.param(_with(expert_map=torch.arange(E, device="meta")), ValueError,
                 "expert_map is on meta", id="expert_map on another device"),
]


@pytest.mark.parametrize("build, error, fragment", FUSED_EXPERTS_CASES)
def test_fused_experts_rejects(build, error, fragment):
    kwargs = {"backend": "torch", **build()}
    with pytest.raises(error, match=re.escape(fragment)):
        fused_experts(**kwargs)


def test_no_local_experts_with_a_map_is_valid():
    """Expert parallelism over more ranks than experts: a rank may hold none (all -1)."""
    problem = _with(w13=_mx((0, 64, 32), (0, 64, 2)), w2=_mx((0, 64, 16), (0, 64, 1)),
                    w13_bias=None, w2_bias=None,
                    expert_map=torch.full((E,), -1, dtype=torch.int32))()
    out = fused_experts(**problem, backend="torch")
    assert torch.equal(out, torch.zeros(M, H))


def test_data_checks_always_run_on_the_cpu(monkeypatch):
    """MXMOE_VALIDATE=1 turns the data checks on for GPU tensors (a host sync); CPU data is
    always checked, whatever the switch says."""
    from mxmoe.validation import validation_requested

    for value, requested in (("1", True), ("0", False), ("", False)):
        monkeypatch.setenv("MXMOE_VALIDATE", value)
        assert validation_requested() is requested
        with pytest.raises(ValueError, match=re.escape("topk_ids values must be in [0, 4)")):
            fused_experts(**_with(topk_ids=lambda p: p["topk_ids"] + E)(), backend="torch")


# ---------------------------------------------------------------------------------------------
# MXFP4Tensor, quantize_mxfp4, route
# ---------------------------------------------------------------------------------------------

U8 = torch.uint8


@pytest.mark.parametrize("blocks, scales, error, fragment", [
    pytest.param([1, 2], torch.zeros(1, dtype=U8), TypeError,
                 "blocks and scales must be torch.Tensors, got list and Tensor", id="list blocks"),
    pytest.param(torch.zeros(4, 16, dtype=torch.int8), torch.zeros(4, 1, dtype=U8), TypeError,
                 "blocks must be uint8, got torch.int8", id="int8 blocks"),
    pytest.param(torch.zeros(4, 16, dtype=U8), torch.zeros(4, 1), TypeError,
                 "scales must be uint8 (E8M0), got torch.float32", id="float scales"),
    pytest.param(torch.zeros((), dtype=U8), torch.zeros((), dtype=U8), ValueError,
                 "blocks must have at least one dimension", id="0-d blocks"),
    pytest.param(torch.zeros(4, 16, dtype=U8), torch.zeros(4, dtype=U8), ValueError,
                 "scales shape (4,) does not match blocks shape (4, 16)", id="scales rank"),
    pytest.param(torch.zeros(4, 16, dtype=U8), torch.zeros(3, 1, dtype=U8), ValueError,
                 "expected (4,) + (K/32,)", id="leading dims differ"),
    pytest.param(torch.zeros(4, 24, dtype=U8), torch.zeros(4, 1, dtype=U8), ValueError,
                 "blocks have 24 bytes per row (K = 48) but scales have 1 per row",
                 id="K not a multiple of 32"),
    pytest.param(torch.zeros(4, 16, dtype=U8), torch.zeros(4, 1, dtype=U8, device="meta"),
                 ValueError, "expected one device", id="scales on another device"),
])
def test_mxfp4_tensor_rejects(blocks, scales, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        MXFP4Tensor(blocks, scales)


@pytest.mark.parametrize("blocks, error, fragment", [
    pytest.param(torch.zeros(4, 2, 15, dtype=U8), ValueError,
                 "blocks must be [..., K/32, 16], got (4, 2, 15)", id="15 bytes a block"),
    pytest.param(torch.zeros(16, dtype=U8), ValueError, "got (16,)", id="1-D blocks"),
    pytest.param("blocks", TypeError, "blocks must be a torch.Tensor, got str", id="str blocks"),
])
def test_from_gpt_oss_blocks_rejects(blocks, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        MXFP4Tensor.from_gpt_oss_blocks(blocks, torch.zeros(4, 2, dtype=U8))


@pytest.mark.parametrize("x, kwargs, error, fragment", [
    pytest.param([0.0] * 32, {}, TypeError, "x must be a torch.Tensor, got list", id="list"),
    pytest.param(torch.zeros(2, 32, dtype=torch.int32), {}, TypeError,
                 "x must be a floating tensor, got torch.int32", id="int tensor"),
    pytest.param(torch.tensor(1.0), {}, ValueError, "multiple of 32, got shape ()", id="0-d"),
    pytest.param(torch.zeros(2, 48), {}, ValueError, "multiple of 32, got shape (2, 48)",
                 id="K = 48"),
    pytest.param(torch.zeros(2, 32), {"scale_rounding": "nearest"}, ValueError,
                 "scale_rounding must be one of ['floor', 'ceil'], got 'nearest'",
                 id="unknown rounding"),
])
def test_quantize_rejects(x, kwargs, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        quantize_mxfp4(x, **kwargs)


@pytest.mark.parametrize("logits, top_k, kwargs, error, fragment", [
    pytest.param(torch.zeros(2, 4), 0, {}, ValueError, "top_k must be in [1, E=4], got 0",
                 id="k = 0"),
    pytest.param(torch.zeros(2, 4), 5, {}, ValueError, "top_k must be in [1, E=4], got 5",
                 id="k > E"),
    pytest.param(torch.zeros(2, 0), 1, {}, ValueError, "top_k must be in [1, E=0], got 1",
                 id="no experts"),
    pytest.param(torch.zeros(2, 4), 2.0, {}, TypeError, "top_k must be an int, got float",
                 id="float k"),
    pytest.param(torch.zeros(2, 4), True, {}, TypeError, "top_k must be an int, got bool",
                 id="bool k"),
    pytest.param(torch.zeros(2, 4, dtype=torch.int64), 2, {}, TypeError,
                 "router_logits must be a floating tensor, got torch.int64", id="int logits"),
    pytest.param(torch.zeros(8), 2, {}, ValueError,
                 "router_logits must be [M, E], got shape (8,)", id="1-D logits"),
    pytest.param([[0.0, 1.0]], 1, {}, TypeError,
                 "router_logits must be a torch.Tensor, got list", id="list logits"),
    pytest.param(torch.zeros(2, 4), 2, {"renormalize": "no"}, TypeError,
                 "renormalize must be a bool, got str 'no'", id="renormalize as a string"),
])
def test_route_rejects(logits, top_k, kwargs, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        route(logits, top_k, **kwargs)


def test_route_accepts_numpy_ints():
    np = pytest.importorskip("numpy")
    weights, ids = route(torch.randn(3, 4), np.int64(2))
    assert ids.shape == (3, 2)


# ---------------------------------------------------------------------------------------------
# The layer: constructor arguments and forward input
# ---------------------------------------------------------------------------------------------


def _layer_args():
    p = _problem()
    g = torch.Generator().manual_seed(1)
    return dict(w13=p["w13"], w2=p["w2"], router_weight=torch.randn(E, H, generator=g),
                router_bias=torch.zeros(E), w13_bias=p["w13_bias"], w2_bias=p["w2_bias"],
                top_k=K, backend="torch")


def _layer_with(**changes):
    def build():
        args = _layer_args()
        for key, value in changes.items():
            args[key] = value(args) if callable(value) else value
        return args
    return build


LAYER_CASES = [
    pytest.param(_layer_with(w13=lambda a: a["w13"].dequantize()), TypeError,
                 "w13 must be an mxmoe.MXFP4Tensor, got Tensor", id="dense w13"),
    pytest.param(_layer_with(w2=lambda a: a["w2"][:2]), ValueError,
                 "w2 must be [E, H, I] = (4, 64, 32)", id="w2 experts"),
    pytest.param(_layer_with(router_weight=lambda a: a["router_weight"][:, :32]), ValueError,
                 "router_weight must be [E, H] with H = 64, got (4, 32)", id="router H"),
    pytest.param(_layer_with(router_weight=lambda a: a["router_weight"][0]), ValueError,
                 "router_weight must be [E, H] with H = 64, got (64,)", id="1-D router"),
    pytest.param(_layer_with(router_weight=lambda a: a["router_weight"].int()), TypeError,
                 "router_weight must be a floating tensor, got torch.int32", id="int router"),
    pytest.param(_layer_with(router_weight=None), TypeError,
                 "router_weight must be a torch.Tensor, got NoneType", id="no router"),
    pytest.param(_layer_with(router_bias=torch.zeros(E + 1)), ValueError,
                 "router_bias must be [E] = (4,) like router_weight's rows, got (5,)",
                 id="router_bias length"),
    pytest.param(_layer_with(router_weight=torch.zeros(8, H), router_bias=None), ValueError,
                 "router_weight has 8 experts (rows) but w13 holds 4; pass expert_map",
                 id="more router rows than experts, no map"),
    pytest.param(_layer_with(router_weight=torch.zeros(8, H), router_bias=None,
                             expert_map=torch.arange(4)), ValueError,
                 "expert_map must be [E_global] = (8,) like router_weight's rows, got (4,)",
                 id="map shorter than router"),
    pytest.param(_layer_with(router_weight=torch.zeros(8, H), router_bias=None,
                             expert_map=torch.arange(8)), ValueError,
                 "expert_map values must be in [-1, 4)", id="map values past E_local"),
    pytest.param(_layer_with(expert_map=torch.arange(E, dtype=torch.float64)), TypeError,
                 "expert_map must be int32 or int64", id="float map"),
    pytest.param(_layer_with(top_k=0), ValueError, "top_k must be in [1, E=4], got 0",
                 id="k = 0"),
    pytest.param(_layer_with(top_k=5), ValueError, "top_k must be in [1, E=4], got 5",
                 id="k > E"),
    pytest.param(_layer_with(top_k=2.0), TypeError, "top_k must be an int, got float",
                 id="float k"),
    pytest.param(_layer_with(activation="relu"), ValueError, "activation must be one of",
                 id="unknown activation"),
    pytest.param(_layer_with(alpha=math.nan), ValueError, "alpha must be finite",
                 id="NaN alpha"),
    pytest.param(_layer_with(limit=-math.inf), ValueError, "limit must be finite",
                 id="infinite limit"),
    pytest.param(_layer_with(renormalize="yes"), TypeError, "renormalize must be a bool",
                 id="renormalize as a string"),
    pytest.param(_layer_with(backend=0), TypeError, "backend must be a str", id="int backend"),
    pytest.param(_layer_with(w13_bias=lambda a: a["w13_bias"][:, :32]), ValueError,
                 "w13_bias must be [E, N] = (4, 64), got (4, 32)", id="w13_bias shape"),
    pytest.param(_layer_with(router_weight=lambda a: a["router_weight"].to("meta")), ValueError,
                 "router_weight is on meta but w13 is on cpu", id="router on another device"),
]


@pytest.mark.parametrize("build, error, fragment", LAYER_CASES)
def test_layer_constructor_rejects(build, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        MXFP4MoE(**build())


@pytest.mark.parametrize("x, error, fragment", [
    pytest.param([[0.0] * H], TypeError, "hidden_states must be a torch.Tensor, got list",
                 id="list input"),
    pytest.param(torch.zeros(2, H, dtype=torch.int64), TypeError,
                 "hidden_states must be bfloat16, float16 or float32, got torch.int64",
                 id="int input"),
    pytest.param(torch.zeros(2, H, dtype=torch.float64), TypeError, "got torch.float64",
                 id="fp64 input"),
    pytest.param(torch.zeros(2, H + 32), ValueError,
                 "MXFP4MoE expects hidden_states [..., H=64], got (2, 96)", id="wrong H"),
    pytest.param(torch.tensor(1.0), ValueError, "got ()", id="0-d input"),
    pytest.param(torch.zeros(2, H, device="meta"), ValueError,
                 "hidden_states is on meta but the layer's weights are on cpu",
                 id="input on another device"),
])
def test_layer_forward_rejects(x, error, fragment):
    layer = MXFP4MoE(**_layer_args())
    with pytest.raises(error, match=re.escape(fragment)):
        layer(x)


def test_layer_accepts_what_it_should():
    """The checks do not reject valid layers: a remote-expert map, 1-D and 3-D inputs."""
    args = _layer_args()
    args["router_weight"] = torch.randn(6, H)
    args["router_bias"] = torch.zeros(6)
    args["expert_map"] = torch.tensor([-1, 0, 1, -1, 2, 3])
    layer = MXFP4MoE(**args)
    assert layer(torch.randn(2, 5, H)).shape == (2, 5, H)
    assert layer(torch.randn(H)).shape == (H,)
    assert layer(torch.randn(0, H)).shape == (0, H)


@pytest.mark.parametrize("entry", ["fused_experts", "MXFP4MoE"])
def test_a_transposed_w13_is_named_as_w13_not_w2(entry):
    # gpt-oss's export stores gate_up_proj [E, H, 2I]; quantized as it stands, w2 [E, H, I] is
    # the one that matches: the message must still point at w13. (H != 2I, else the two
    # layouts have one shape.)
    p = make_moe(M, 64, 64, E, K)
    p["w13"] = quantize_mxfp4(p["w13"].dequantize().transpose(1, 2).contiguous())
    fragment = "w13 must be [E, 2I, H] = (4, 128, 64) to match w2 (4, 64, 64), got (4, 64, 128)"
    with pytest.raises(ValueError, match=re.escape(fragment) + ".*looks transposed"):
        if entry == "fused_experts":
            fused_experts(**{**p, "backend": "torch"})
        else:
            MXFP4MoE(p["w13"], p["w2"], torch.zeros(E, 64), top_k=K, backend="torch")

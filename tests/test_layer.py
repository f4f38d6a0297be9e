"""`MXFP4MoE`: the layer against the reference on the same quantized weights, and as a Module."""

import pytest
import torch

import mxmoe
from mxmoe.reference import fused_experts_reference

from checkpoints import dense_moe, quiet_cpu  # noqa: F401 (autouse fixture)
from helpers import rel_err


def _reference_forward(layer: mxmoe.MXFP4MoE, x: torch.Tensor) -> torch.Tensor:
    """The layer's math written out: route the same way, then the reference experts."""
    flat = x.reshape(-1, layer.hidden_size)
    logits = torch.nn.functional.linear(flat, layer.router.weight, layer.router.bias)
    weights, ids = mxmoe.route(logits, layer.top_k)
    out = fused_experts_reference(
        flat, layer.w13, layer.w2, weights, ids, w13_bias=layer.w13_bias, w2_bias=layer.w2_bias,
        activation=layer.activation, alpha=layer.alpha, limit=layer.limit,
        expert_map=layer.expert_map,
    )
    return out.reshape(x.shape)


@pytest.mark.parametrize("activation", ["swigluoai", "silu"])
def test_layer_equals_reference_on_same_weights(activation):
    layer = dense_moe(e=5, h=64, i=96).layer(top_k=2, activation=activation)
    x = torch.randn(11, 64, generator=torch.Generator().manual_seed(3))
    assert rel_err(layer(x), _reference_forward(layer, x)) < 1e-6


def test_router_is_top_k_then_softmax_over_the_k_logits():
    moe = dense_moe(e=4)
    layer = moe.layer(top_k=2)
    x = torch.randn(6, 64)
    logits = x @ moe.router_weight.T + moe.router_bias
    top, ids = logits.topk(2, dim=-1)
    weights, got_ids = mxmoe.route(logits, 2)
    assert torch.equal(got_ids.long(), ids)
    torch.testing.assert_close(weights, torch.softmax(top, dim=-1))
    assert rel_err(layer(x), _reference_forward(layer, x)) < 1e-6


def test_leading_dims_batch_time_hidden():
    layer = dense_moe().layer(top_k=2)
    x = torch.randn(2, 3, 64)
    out = layer(x)
    assert out.shape == (2, 3, 64)
    torch.testing.assert_close(out, layer(x.reshape(6, 64)).reshape(2, 3, 64), rtol=0, atol=0)


def test_wrong_hidden_size_names_the_shape():
    layer = dense_moe().layer(top_k=2)
    with pytest.raises(ValueError, match=r"H=64.*\(3, 32\)"):
        layer(torch.randn(3, 32))


def test_state_dict_round_trip():
    source = dense_moe(seed=1).layer(top_k=2)
    target = dense_moe(seed=2).layer(top_k=2)
    state = source.state_dict()
    for name in ("w13_blocks", "w13_scales", "w2_blocks", "w2_scales", "w13_bias", "w2_bias",
                 "router.weight", "router.bias"):
        assert name in state, name
    assert state["w13_blocks"].dtype == torch.uint8
    target.load_state_dict(state)
    x = torch.randn(5, 64)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_to_moves_the_mxfp4_buffers_and_keeps_them_uint8():
    layer = dense_moe().layer(top_k=2).to(torch.float64)
    assert layer.w13_blocks.dtype == torch.uint8 and layer.w2_scales.dtype == torch.uint8
    assert layer.router.weight.dtype == torch.float64
    layer = layer.to("meta")
    for t in (layer.w13.blocks, layer.w13.scales, layer.w2.blocks, layer.w2.scales):
        assert t.device.type == "meta" and t.dtype == torch.uint8


@pytest.mark.gpu
def test_to_cuda_moves_the_mxfp4_buffers():
    layer = dense_moe().layer(top_k=2).to("cuda")
    assert layer.w13.device.type == "cuda" and layer.w2.device.type == "cuda"
    x = torch.randn(4, 64, device="cuda")
    assert torch.isfinite(layer(x)).all()


def test_expert_subsets_with_expert_map_sum_to_the_whole_layer():
    moe = dense_moe(e=5)
    whole = moe.layer(top_k=2)
    x = torch.randn(9, 64)
    total = torch.zeros(9, 64)
    for experts in (range(0, 3), range(3, 5)):
        expert_map = torch.full((5,), -1, dtype=torch.int32)
        expert_map[experts.start:experts.stop] = torch.arange(len(experts), dtype=torch.int32)
        part = mxmoe.MXFP4MoE(
            whole.w13[experts.start:experts.stop], whole.w2[experts.start:experts.stop],
            moe.router_weight, moe.router_bias, moe.w13_bias[experts.start:experts.stop],
            moe.w2_bias[experts.start:experts.stop], top_k=2, backend="torch",
            expert_map=expert_map,
        )
        total += part(x)
    assert rel_err(total, whole(x)) < 1e-6


def test_a_rank_with_no_experts_returns_zeros():
    moe = dense_moe(e=2)
    whole = moe.layer(top_k=2)
    empty = mxmoe.MXFP4MoE(
        whole.w13[0:0], whole.w2[0:0], moe.router_weight, moe.router_bias,
        moe.w13_bias[0:0], moe.w2_bias[0:0], top_k=2, backend="torch",
        expert_map=torch.full((2,), -1, dtype=torch.int32),
    )
    out = empty(torch.randn(2, 3, 64))
    assert out.shape == (2, 3, 64) and not out.any()


def test_auto_layout_is_plain_off_the_gpu_and_holds_the_same_layer():
    layer = dense_moe().layer(top_k=2)
    auto = mxmoe.MXFP4MoE(layer.w13, layer.w2, layer.router.weight, layer.router.bias,
                          layer.w13_bias, layer.w2_bias, top_k=2, layout="auto")
    assert auto.weight_layout.name == "plain"  # CPU: the torch backend reads any layout
    from mxmoe.backends import fastest_layout

    assert fastest_layout("cpu").name == "plain"
    assert fastest_layout("cuda", "triton_scaled").name == "plain"
    x = torch.randn(3, layer.hidden_size)
    assert torch.equal(auto(x), layer(x))
    assert auto.to_layout("auto") is auto and auto.weight_layout.name == "plain"


def test_setting_a_backend_that_cannot_read_the_layout_converts_the_weights():
    layer = dense_moe().layer(top_k=2).to_layout("mma_lanes")
    x = torch.randn(3, layer.hidden_size)
    before = layer(x)
    plain_bytes = layer.w13.plain().blocks.clone()
    layer.backend = "torch"  # reads every layout: nothing to do
    assert layer.weight_layout.name == "mma_lanes"
    layer.backend = "triton_scaled"  # tl.dot_scaled reads the plain layout only
    assert layer.weight_layout.name == "plain" and layer.backend == "triton_scaled"
    assert torch.equal(layer.w13.blocks, plain_bytes)
    layer.backend = "torch"
    assert torch.equal(layer(x), before)


def test_auto_only_resolves_to_a_backend_that_reads_the_layout():
    from mxmoe.backends import _decide_auto

    for layout in ("plain", "group_halves", "mma_lanes"):
        assert _decide_auto(torch.device("cpu"), None, layout) == "torch"


def test_fastest_layout_follows_the_backend_override(monkeypatch):
    """MXMOE_BACKEND=triton_scaled makes auto tl.dot_scaled, which reads the plain layout only."""
    import types

    from mxmoe import settings
    from mxmoe.backends import fastest_layout

    def device(capability):
        monkeypatch.setattr(settings, "device_facts", lambda _: settings.DeviceFacts(
            "cuda", "Test GPU", capability, 132, False))

    def switches(override):
        monkeypatch.setattr(settings, "current", lambda: types.SimpleNamespace(
            backend_override=override, interpret=False))

    device((9, 0))
    switches("")
    assert fastest_layout("cuda").name == "mma_lanes"
    assert fastest_layout("cuda", "triton_dequant").name == "mma_lanes"
    assert fastest_layout("cuda", "torch").name == "plain"
    switches("triton_scaled")
    assert fastest_layout("cuda").name == "plain"
    switches("")
    device((8, 0))
    assert fastest_layout("cuda").name == "plain"  # Ampere: no prefill GEMMs there yet


# --- the planned eager forward (gradients off) against the general path (gradients on) --------

def _general(layer, x):
    """The forward's general path: with gradients on (and the router's Parameters wanting them)
    the layer does not take its planned forward."""
    with torch.enable_grad():
        return layer.forward_with_routing(x)[0].detach()


def test_planned_forward_equals_the_general_path_bit_for_bit():
    layer = dense_moe(e=5, h=64, i=96).layer(top_k=2)
    from mxmoe.layer import _EAGER_PLANS

    for m in (1, 7, 1, 0):  # a repeated signature reuses its plan; no tokens too
        x = torch.randn(m, 64, generator=torch.Generator().manual_seed(m))
        with torch.no_grad():
            planned, logits, weights = layer.forward_with_routing(x)
        assert torch.equal(planned, _general(layer, x))
        assert logits.shape == (m, 5) and weights.shape == (m, 2)
    assert len(_EAGER_PLANS[layer]) == 3


def _replace_w2_bias(layer):
    layer.w2_bias = layer.w2_bias * 3


def _replace_w2_bias_behind_setattr(layer):
    layer._buffers["w2_bias"] = layer.w2_bias * 3


def _new_router_parameter(layer):
    layer.router.weight = torch.nn.Parameter(layer.router.weight.flip(0))


def _router_in_place_to_float64(layer):
    layer.router.double()


def _load_other_weights_in_place(layer):
    other = dense_moe(e=5, h=64, i=96, seed=9).layer(top_k=2)
    layer.load_state_dict(other.state_dict())


CHANGES = {
    "top_k": lambda layer: setattr(layer, "top_k", 3),
    "renormalize": lambda layer: setattr(layer, "renormalize", False),
    "backend": lambda layer: setattr(layer, "backend", "torch"),
    "limit": lambda layer: setattr(layer, "limit", 0.5),
    "w2_bias replaced": _replace_w2_bias,
    "w2_bias replaced in _buffers": _replace_w2_bias_behind_setattr,
    "router Parameter replaced": _new_router_parameter,
    "router converted in place": _router_in_place_to_float64,
    "weights loaded in place": _load_other_weights_in_place,
    "layer .half()": lambda layer: layer.half(),
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_planned_forward_follows_a_change_of_the_layer(change):
    layer = dense_moe(e=5, h=64, i=96).layer(top_k=2)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = layer(x)
    change(layer)
    x = x.half() if change is CHANGES["layer .half()"] else x
    with torch.no_grad():
        after = layer(x)
    expected = _general(layer, x)
    assert torch.equal(after, expected)
    if change is not CHANGES["backend"]:  # (on the CPU "auto" is the torch backend already)
        assert not torch.equal(after.to(before.dtype), before)  # the change changed the output


def test_assigning_an_attribute_drops_the_layers_plans():
    from mxmoe.layer import _EAGER_PLANS

    layer = dense_moe(e=5, h=64, i=96).layer(top_k=2)
    with torch.no_grad():
        layer(torch.randn(3, 64))
    assert _EAGER_PLANS[layer]
    layer.backend = "torch"
    assert layer not in _EAGER_PLANS

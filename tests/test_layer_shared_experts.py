"""`MXFP4MoE` with DeepSeek-V3's options, built from random weights (no checkpoint, no
transformers): grouped sigmoid routing and a shared-experts MLP (`GatedMLP`, `MXFP4GatedMLP`)
against a per-token loop over the dequantized weights, on the CPU and on the GPU."""

from __future__ import annotations

import pytest
import torch

import mxmoe
from mxmoe.layer import GatedMLP, MXFP4GatedMLP
from mxmoe.router import route_grouped_sigmoid
from mxmoe.routing import GroupedSigmoidRouting

from checkpoints import quiet_cpu  # noqa: F401 (autouse fixture)
from helpers import rel_err

E, H, I, TOP_K, SHARED_I = 8, 64, 32, 2, 64  # noqa: E741
ROUTING = GroupedSigmoidRouting(n_group=4, topk_group=2, scaling_factor=2.5)


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        w13=mxmoe.quantize_mxfp4(torch.randn(E, 2 * I, H, generator=g) * 0.2),
        w2=mxmoe.quantize_mxfp4(torch.randn(E, H, I, generator=g) * 0.2),
        router=torch.randn(E, H, generator=g) * 0.3,
        bias=torch.randn(E, generator=g) * 0.3,
        shared13=mxmoe.quantize_mxfp4(torch.randn(1, 2 * SHARED_I, H, generator=g) * 0.2),
        shared2=mxmoe.quantize_mxfp4(torch.randn(1, H, SHARED_I, generator=g) * 0.2),
    )


def _layer(w, backend="torch", device="cpu", shared=True):
    return mxmoe.MXFP4MoE(
        w["w13"], w["w2"], w["router"], top_k=TOP_K, activation="silu", backend=backend,
        routing=ROUTING, router_correction_bias=w["bias"],
        shared_experts=MXFP4GatedMLP(w["shared13"], w["shared2"]) if shared else None,
    ).to(device)


def _gated(x, w13, w2, inter):
    gate, up = w13[:inter], w13[inter:]
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ w2.T


def _reference(w, x):
    """Per token: the grouped router's choice, the weighted silu experts, the shared MLP."""
    w13, w2 = w["w13"].dequantize(), w["w2"].dequantize()
    weights, ids = route_grouped_sigmoid(x @ w["router"].T, w["bias"], TOP_K, ROUTING)
    out = _gated(x, w["shared13"].dequantize()[0], w["shared2"].dequantize()[0], SHARED_I)
    for t in range(x.shape[0]):
        for weight, e in zip(weights[t].tolist(), ids[t].tolist()):
            out[t] += weight * _gated(x[t], w13[e], w2[e], I)
    return out


def test_layer_equals_the_per_token_loop():
    w = _weights()
    x = torch.randn(11, H, generator=torch.Generator().manual_seed(1))
    assert rel_err(_layer(w)(x), _reference(w, x)) < 1e-5


def test_mxfp4_gated_mlp_is_a_one_expert_moe_of_weight_one():
    w = _weights(2)
    x = torch.randn(3, 4, H, generator=torch.Generator().manual_seed(2))
    mlp = MXFP4GatedMLP(w["shared13"], w["shared2"], backend="torch")
    want = _gated(x, w["shared13"].dequantize()[0], w["shared2"].dequantize()[0], SHARED_I)
    assert mlp(x).shape == x.shape and rel_err(mlp(x), want) < 1e-6


def test_float_gated_mlp_casts_to_its_weights_and_back():
    g = torch.Generator().manual_seed(3)
    gate, up, down = (torch.randn(*s, generator=g) for s in ((I, H), (I, H), (H, I)))
    mlp = GatedMLP(gate, up, down)
    x = torch.randn(5, H, generator=g)
    assert rel_err(mlp(x), _gated(x, torch.cat([gate, up]), down, I)) < 1e-6
    half = GatedMLP(gate.half(), up.half(), down.half())
    assert half(x).dtype == torch.float32 and rel_err(half(x), mlp(x)) < 1e-2


def test_gated_mlp_shapes_are_checked():
    with pytest.raises(ValueError, match=r"down must be \[64, 32\] like gate \[I, H\]"):
        GatedMLP(torch.zeros(I, H), torch.zeros(I, H), torch.zeros(H, 2 * I))
    w = _weights()
    with pytest.raises(ValueError, match="must hold one expert"):
        MXFP4GatedMLP(w["w13"], w["w2"])


def test_state_dict_holds_the_bias_and_the_shared_experts():
    w = _weights()
    layer = _layer(w)
    state = layer.state_dict()
    assert torch.equal(state["router_correction_bias"], w["bias"])
    assert torch.equal(state["shared_experts.w13_blocks"], layer.shared_experts.w13_blocks)
    fresh = _layer(_weights(5))
    fresh.load_state_dict(state)
    x = torch.randn(4, H, generator=torch.Generator().manual_seed(6))
    assert torch.equal(fresh(x), layer(x))


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 7, 300], ids=["decode", "few tokens", "prefill"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_layer_equals_the_torch_layer(tokens, dtype):
    """The fastest backend and layout on the GPU, routed and shared experts in its kernels,
    against the fp32 torch layer on the same rounded inputs."""
    w = _weights(7)
    ours = _layer(w, backend="auto", device="cuda").to_layout("auto")
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    got = ours(x.cuda()).float().cpu()
    assert rel_err(got, _layer(w)(x.float())) < 2e-2
    assert ours.shared_experts.weight_layout == ours.weight_layout

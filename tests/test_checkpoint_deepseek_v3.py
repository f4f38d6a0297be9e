"""DeepSeek-V3 MXFP4A16 checkpoints written by compressed-tensors itself (tests/ct_checkpoints.py:
8 routed experts in 2 groups, 1 shared expert, layer 0 dense), read by
`MXFP4MoE.from_pretrained`: the bytes are the file's, routed and shared; the router is
DeepSeek-V3's; the layer equals transformers' `DeepseekV3MoE` of the decompressed model; every
way the checkpoint or its config can be wrong for it is named."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mxmoe
from mxmoe.layer import GatedMLP, MXFP4GatedMLP
from mxmoe.routing import GroupedSigmoidRouting

from checkpoints import quiet_cpu  # noqa: F401 (autouse fixture)
from helpers import rel_err

C = pytest.importorskip("ct_checkpoints")
pytest.importorskip("transformers.models.deepseek_v3")

MOE_LAYERS = [1, 2]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return C.quantize_and_save(C.tiny_model("deepseek_v3"),
                               tmp_path_factory.mktemp("deepseek_v3") / "ckpt")


@pytest.fixture(scope="module")
def decompressed(ckpt):
    return C.load_decompressed(ckpt.path)


@pytest.fixture(scope="module")
def float_shared_ckpt(tmp_path_factory):
    """The same model with its shared experts left in float (ignored by the scheme)."""
    return C.quantize_and_save(C.tiny_model("deepseek_v3"),
                               tmp_path_factory.mktemp("deepseek_v3_float_shared") / "ckpt",
                               ignore=("re:.*shared_experts.*",))


def _file_tensor(path, name):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return f.get_tensor(name)


def _copy(path, tmp_path, *, edit_tensors=None, edit_config=None):
    out = tmp_path / "edited"
    shutil.copytree(path, out)
    if edit_tensors is not None:
        tensors = load_file(str(out / "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(out / "model.safetensors"))
    if edit_config is not None:
        config = json.loads((out / "config.json").read_text())
        edit_config(config)
        (out / "config.json").write_text(json.dumps(config))
    return out


def _mlp(layer):
    return f"model.layers.{layer}.mlp"


PROJ = ("gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("layer_index", MOE_LAYERS)
def test_packed_bytes_are_the_files_routed_and_shared(ckpt, layer_index):
    layer = mxmoe.MXFP4MoE.from_pretrained(ckpt.path, layer_index, backend="torch",
                                           layout=None)
    prefix = _mlp(layer_index)
    for suffix, ours13, ours2 in (("weight_packed", layer.w13_blocks, layer.w2_blocks),
                                  ("weight_scale", layer.w13_scales, layer.w2_scales)):
        for j in range(C.DS_E):
            gate, up, down = (_file_tensor(ckpt.path, f"{prefix}.experts.{j}.{p}.{suffix}")
                              for p in PROJ)
            assert torch.equal(ours13[j], torch.cat([gate, up]))
            assert torch.equal(ours2[j], down)
    shared = layer.shared_experts
    assert isinstance(shared, MXFP4GatedMLP)
    for suffix, ours13, ours2 in (("weight_packed", shared.w13_blocks, shared.w2_blocks),
                                  ("weight_scale", shared.w13_scales, shared.w2_scales)):
        gate, up, down = (_file_tensor(ckpt.path, f"{prefix}.shared_experts.{p}.{suffix}")
                          for p in PROJ)
        assert torch.equal(ours13[0], torch.cat([gate, up]))
        assert torch.equal(ours2[0], down)


def test_router_is_deepseek_v3s_in_float32(ckpt):
    layer = mxmoe.MXFP4MoE.from_pretrained(ckpt.path, 1)  # dtype bf16 by default
    assert layer.routing == GroupedSigmoidRouting(C.DS_GROUPS, C.DS_TOPK_GROUP, C.DS_SCALING)
    assert layer.renormalize and layer.top_k == C.TOP_K
    assert layer.activation is mxmoe.Activation.SILU and layer.router.bias is None
    # The router stays float32 whatever dtype says, as transformers keeps it.
    assert layer.router.weight.dtype == torch.float32
    assert torch.equal(layer.router.weight.detach(),
                       _file_tensor(ckpt.path, f"{_mlp(1)}.gate.weight"))
    assert torch.equal(layer.router_correction_bias,
                       _file_tensor(ckpt.path, f"{_mlp(1)}.gate.e_score_correction_bias"))
    assert layer.router_correction_bias.abs().min() > 0  # random, so the choice depends on it


@pytest.mark.parametrize("layer_index", MOE_LAYERS)
def test_layer_equals_the_transformers_block_on_the_decompressed_model(ckpt, decompressed,
                                                                       layer_index):
    ours = mxmoe.MXFP4MoE.from_pretrained(ckpt.path, layer_index, dtype=torch.float32,
                                          backend="torch")
    block = decompressed.model.layers[layer_index].mlp
    x = torch.randn(3, 7, C.H, generator=torch.Generator().manual_seed(layer_index))
    expected = block(x)
    assert isinstance(expected, torch.Tensor)
    assert rel_err(ours(x), expected) < 1e-5


def test_each_part_of_the_layer_matters_on_these_inputs(ckpt, decompressed):
    # So that the equality above can fail: without the correction bias, or without the shared
    # experts, or without the scaling factor, the layer is far from transformers' block.
    x = torch.randn(4, 6, C.H, generator=torch.Generator().manual_seed(11))
    expected = decompressed.model.layers[1].mlp(x)
    layer = mxmoe.MXFP4MoE.from_pretrained(ckpt.path, 1, dtype=torch.float32, backend="torch")
    bias = layer.router_correction_bias.clone()
    layer.router_correction_bias.zero_()
    assert rel_err(layer(x), expected) > 1e-2
    layer.router_correction_bias.copy_(bias)
    shared = layer.shared_experts
    layer.shared_experts = None
    assert rel_err(layer(x), expected) > 1e-2
    layer.shared_experts = shared
    routing = layer.routing
    layer.routing = GroupedSigmoidRouting(routing.n_group, routing.topk_group, 1.0)
    assert rel_err(layer(x), expected) > 1e-2
    layer.routing = routing
    assert rel_err(layer(x), expected) < 1e-5


def test_without_norm_topk_prob_the_scores_are_not_renormalised(ckpt, tmp_path):
    path = _copy(ckpt.path, tmp_path, edit_config=lambda c: c.update(norm_topk_prob=False))
    ours = mxmoe.MXFP4MoE.from_pretrained(path, 1, dtype=torch.float32, backend="torch")
    assert not ours.renormalize
    theirs = C.load_decompressed(path).model.layers[1].mlp
    assert not theirs.gate.norm_topk_prob
    x = torch.randn(2, 5, C.H, generator=torch.Generator().manual_seed(3))
    assert rel_err(ours(x), theirs(x)) < 1e-5
    renormalized = mxmoe.MXFP4MoE.from_pretrained(ckpt.path, 1, dtype=torch.float32,
                                                  backend="torch")
    assert rel_err(renormalized(x), theirs(x)) > 1e-2


def test_mxfp4_shared_experts_equal_the_dequantized_gated_mlp(ckpt):
    shared = mxmoe.MXFP4MoE.from_pretrained(ckpt.path, 2, dtype=torch.float32,
                                            backend="torch").shared_experts
    gate, up = shared.w13[0].dequantize().split(C.DS_I)
    down = shared.w2[0].dequantize()
    x = torch.randn(5, C.H, generator=torch.Generator().manual_seed(4))
    want = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
    assert rel_err(shared(x), want) < 1e-6


def test_shared_experts_follow_the_layers_layout_and_backend(ckpt):
    layer = mxmoe.MXFP4MoE.from_pretrained(ckpt.path, 1, dtype=torch.float32, backend="torch",
                                           layout=None)
    shared = layer.shared_experts
    assert shared.weight_layout.name == layer.weight_layout.name == "plain"
    x = torch.randn(3, C.H, generator=torch.Generator().manual_seed(8))
    want, plain = layer(x), shared.w13_blocks.clone()
    layer.to_layout("mma_lanes")
    assert shared.weight_layout.name == "mma_lanes"
    assert not torch.equal(shared.w13_blocks, plain)  # really permuted
    assert torch.equal(shared.w13.plain().blocks, plain)
    layer.backend = "auto"
    assert shared.backend == "auto"
    assert rel_err(layer(x), want) < 1e-6
    layer.backend = "triton_scaled"  # reads the plain layout only: both convert back
    assert shared.backend == "triton_scaled" and shared.weight_layout.name == "plain"
    assert torch.equal(shared.w13_blocks, plain)


def test_float_shared_experts_stay_torch_linears(float_shared_ckpt):
    path = float_shared_ckpt.path
    ours = mxmoe.MXFP4MoE.from_pretrained(path, 1, dtype=torch.float32, backend="torch")
    assert isinstance(ours.shared_experts, GatedMLP)
    assert torch.equal(ours.shared_experts.gate_proj.weight.detach(),
                       _file_tensor(path, f"{_mlp(1)}.shared_experts.gate_proj.weight"))
    theirs = C.load_decompressed(path).model.layers[1].mlp
    x = torch.randn(3, 7, C.H, generator=torch.Generator().manual_seed(2))
    assert rel_err(ours(x), theirs(x)) < 1e-5
    bf16 = mxmoe.MXFP4MoE.from_pretrained(path, 1, backend="torch")
    assert bf16.shared_experts.gate_proj.weight.dtype == torch.bfloat16


def test_a_dense_layer_is_named(ckpt, tmp_path):
    with pytest.raises(ValueError, match=r"layer 0 of this DeepSeek-V3 is a dense MLP "
                                         r"\(config.json first_k_dense_replace = 1"):
        mxmoe.MXFP4MoE.from_pretrained(ckpt.path, 0)
    path = _copy(ckpt.path, tmp_path, edit_config=lambda c: c.update(moe_layer_freq=2))
    with pytest.raises(ValueError, match=r"layer 1 of this DeepSeek-V3 is a dense MLP .*"
                                         r"moe_layer_freq = 2"):
        mxmoe.MXFP4MoE.from_pretrained(path, 1)
    assert mxmoe.MXFP4MoE.from_pretrained(path, 2).top_k == C.TOP_K


@pytest.mark.parametrize("name", [
    "model.layers.1.mlp.gate.e_score_correction_bias",
    "model.layers.1.mlp.shared_experts.down_proj.weight_scale",
    "model.layers.1.mlp.experts.5.up_proj.weight_packed",
], ids=["correction bias", "shared experts' scales", "a routed expert's codes"])
def test_a_missing_tensor_is_named(ckpt, tmp_path, name):
    path = _copy(ckpt.path, tmp_path, edit_tensors=lambda t: t.pop(name))
    with pytest.raises(ValueError, match=f"missing tensor '{name}'"):
        mxmoe.MXFP4MoE.from_pretrained(path, 1)


def test_partly_quantized_shared_experts_are_named(ckpt, tmp_path):
    prefix = f"{_mlp(1)}.shared_experts.up_proj"

    def unquantize_up(tensors):
        del tensors[f"{prefix}.weight_packed"], tensors[f"{prefix}.weight_scale"]
        tensors[f"{prefix}.weight"] = torch.zeros(C.DS_I, C.H)

    path = _copy(ckpt.path, tmp_path, edit_tensors=unquantize_up)
    with pytest.raises(ValueError, match="the shared experts are partly quantized"):
        mxmoe.MXFP4MoE.from_pretrained(path, 1)


def test_a_shared_experts_width_other_than_configs_is_named(ckpt, tmp_path):
    path = _copy(ckpt.path, tmp_path, edit_config=lambda c: c.update(n_shared_experts=2))
    name = f"{_mlp(1)}.shared_experts.gate_proj.weight_packed"
    with pytest.raises(ValueError, match=rf"tensor '{name}' has shape \[32, 32\], expected "
                                         rf"\[64, 32\] \(moe_intermediate_size 32 \* config.json "
                                         rf"n_shared_experts 2 = 64"):
        mxmoe.MXFP4MoE.from_pretrained(path, 1)


@pytest.mark.parametrize("key, value", [("scoring_func", "softmax"),
                                        ("topk_method", "greedy")])
def test_another_router_is_refused(ckpt, tmp_path, key, value):
    path = _copy(ckpt.path, tmp_path, edit_config=lambda c: c.update({key: value}))
    with pytest.raises(ValueError, match=rf"config.json {key} = '{value}'; mxmoe runs "
                                         rf"DeepSeek-V3's router"):
        mxmoe.MXFP4MoE.from_pretrained(path, 1)


def test_deepseek_v3s_own_router_keys_are_accepted(ckpt, tmp_path):
    path = _copy(ckpt.path, tmp_path, edit_config=lambda c: c.update(
        scoring_func="sigmoid", topk_method="noaux_tc", moe_layer_freq=1))
    assert mxmoe.MXFP4MoE.from_pretrained(path, 1).routing.n_group == C.DS_GROUPS


def test_groups_that_do_not_fit_the_experts_are_named(ckpt, tmp_path):
    path = _copy(ckpt.path, tmp_path, edit_config=lambda c: c.update(n_group=3))
    with pytest.raises(ValueError, match="routing.n_group must divide E = 8, got 3"):
        mxmoe.MXFP4MoE.from_pretrained(path, 1)


def test_layer_arguments_are_checked():
    w = torch.zeros(2, 64, 64)
    moe = dict(router_weight=torch.zeros(2, 64), top_k=1, activation="silu")
    with pytest.raises(ValueError, match="needs router_correction_bias"):
        mxmoe.MXFP4MoE.from_dense(w13=w, w2=w[:, :, :32], **moe,
                                  routing=GroupedSigmoidRouting(1, 1), router_bias=None)
    with pytest.raises(ValueError, match="pass routing=GroupedSigmoidRouting"):
        mxmoe.MXFP4MoE.from_dense(w13=w, w2=w[:, :, :32], **moe, router_bias=None,
                                  router_correction_bias=torch.zeros(2))
    with pytest.raises(TypeError, match="shared_experts must be a torch.nn.Module"):
        mxmoe.MXFP4MoE.from_dense(w13=w, w2=w[:, :, :32], **moe, router_bias=None,
                                  shared_experts=lambda x: x)


@pytest.mark.parametrize("ep_world", [2, 4])
def test_expert_parallel_parts_summed_plus_the_shared_experts_equal_the_whole_layer(ckpt,
                                                                                    ep_world):
    # What each rank of an expert-parallel group reads, run without process groups: its
    # forward is its partial routed output (global ids from the grouped router, mapped to its
    # experts); the shared experts are whole on every rank and added once after the sum. (I =
    # 32 is one MXFP4 block: no slices of I to split.)
    from mxmoe.checkpoints import SafetensorsCheckpoint
    from mxmoe.checkpoints.compressed_tensors import read_ct_spec, read_layer
    from mxmoe.checkpoints.ranks import RankPart
    from mxmoe.distributed import expert_range, make_expert_map

    x = torch.randn(9, C.H, generator=torch.Generator().manual_seed(12))
    whole = mxmoe.MXFP4MoE.from_pretrained(ckpt.path, 1, dtype=torch.float32, backend="torch")
    total = torch.zeros_like(x)
    with SafetensorsCheckpoint(ckpt.path) as c:
        spec = read_ct_spec(c, 1)
        for rank in range(ep_world):
            experts = expert_range(C.DS_E, ep_world, rank)
            part = RankPart(experts, None, make_expert_map(C.DS_E, experts), True)
            moe = read_layer(c, spec, part, dtype=torch.float32)
            assert moe.w13.shape[0] == len(experts) and moe.routing == whole.routing
            assert isinstance(moe.shared_experts, MXFP4GatedMLP)
            partial = mxmoe.MXFP4MoE(**dict(moe.layer_arguments(), shared_experts=None),
                                     backend="torch")
            total += partial(x)
    assert rel_err(total + whole.shared_experts(x), whole(x)) < 1e-5


def test_compiled_layer_with_grouped_routing_and_shared_experts_equals_eager(ckpt):
    layer = mxmoe.MXFP4MoE.from_pretrained(ckpt.path, 2, dtype=torch.float32, backend="torch")
    x = torch.randn(6, C.H, generator=torch.Generator().manual_seed(13))
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert rel_err(compiled(x), layer(x)) < 1e-6


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["triton_dequant", "triton_scaled"])
def test_triton_backends_equal_the_torch_layer_interpreted(ckpt, backend):
    """fp16 activations: the interpreter computes bf16 wrongly (FACTS). The routed and the
    shared experts both run through the backend's kernels."""
    want = mxmoe.MXFP4MoE.from_pretrained(ckpt.path, 1, dtype=torch.float16, backend="torch")
    ours = mxmoe.MXFP4MoE.from_pretrained(ckpt.path, 1, dtype=torch.float16, backend=backend)
    assert ours.shared_experts.backend == backend
    x = torch.randn(5, C.H, generator=torch.Generator().manual_seed(14)).half()
    assert rel_err(ours(x), want(x)) < 2e-3
    assert rel_err(ours.shared_experts(x), want.shared_experts(x)) < 2e-3


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 7, 300], ids=["decode", "few tokens", "prefill"])
def test_cuda_layer_equals_the_torch_layer(ckpt, tokens):
    """bf16 on the GPU, the fastest layout and backend, against the fp32 torch layer on the same
    bf16 inputs (so the router sees the same values and picks the same experts)."""
    ours = mxmoe.MXFP4MoE.from_pretrained(ckpt.path, 1, device="cuda")
    want_layer = mxmoe.MXFP4MoE.from_pretrained(ckpt.path, 1, dtype=torch.float32,
                                                backend="torch")
    x = torch.randn(tokens, C.H, generator=torch.Generator().manual_seed(tokens)).bfloat16()
    got = ours(x.to("cuda")).float().cpu()
    assert rel_err(got, want_layer(x.float())) < 2e-2

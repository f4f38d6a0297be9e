"""`use_mxmoe` on transformers' DeepSeek-V3, loaded from an MXFP4A16 checkpoint that
compressed-tensors wrote (tests/ct_checkpoints.py): the patched model generates what the
unpatched one does, its MoE blocks hold the file's bytes and DeepSeek-V3's router, its dense
layer stays, and the blocks return and record what transformers' do."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from torch import nn

from checkpoints import quiet_cpu  # noqa: F401 (autouse fixture)
from helpers import rel_err

C = pytest.importorskip("ct_checkpoints")
modeling = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")

from mxmoe.integrations.transformers import DeepseekV3MXFP4MoE, use_mxmoe  # noqa: E402
from mxmoe.layer import MXFP4GatedMLP  # noqa: E402
from mxmoe.routing import GroupedSigmoidRouting  # noqa: E402

PROMPT = torch.tensor([[3, 17, 42, 5, 60, 11, 8]])
PROJ = ("gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return C.quantize_and_save(C.tiny_model("deepseek_v3"),
                               tmp_path_factory.mktemp("deepseek_v3") / "ckpt")


@pytest.fixture(scope="module")
def model(ckpt):
    return C.load_decompressed(ckpt.path)


@pytest.fixture(scope="module")
def patched(model):
    return use_mxmoe(copy.deepcopy(model), backend="torch")


def _file_bytes(ckpt, name):
    with safe_open(str(ckpt.path / "model.safetensors"), "pt") as f:
        return f.get_tensor(name)


def _assert_routed_experts_hold_the_files_bytes(ckpt, layers):
    for index, layer in enumerate(layers):
        if index == 0:
            continue  # dense
        mlp = layer.mlp
        assert isinstance(mlp, DeepseekV3MXFP4MoE)
        for j in range(C.DS_E):
            for suffix, w13, w2 in (("weight_packed", mlp.w13_blocks, mlp.w2_blocks),
                                    ("weight_scale", mlp.w13_scales, mlp.w2_scales)):
                gate, up, down = (_file_bytes(ckpt, f"model.layers.{index}.mlp.experts.{j}."
                                                    f"{p}.{suffix}") for p in PROJ)
                assert torch.equal(w13[j], torch.cat([gate, up]))
                assert torch.equal(w2[j], down)


def test_greedy_generation_of_the_patched_model_equals_the_unpatched(model, patched):
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    want = model.generate(PROMPT, **kwargs)
    got = patched.generate(PROMPT, **kwargs)
    assert torch.equal(got, want)
    assert len(set(want[0, PROMPT.shape[1]:].tolist())) > 1  # not one token repeated


def test_patched_logits_match_unpatched(model, patched):
    assert rel_err(patched(PROMPT).logits, model(PROMPT).logits) < 1e-5


def test_moe_layers_are_patched_and_the_dense_one_stays(model, patched):
    assert isinstance(patched.model.layers[0].mlp, modeling.DeepseekV3MLP)
    for index in (1, 2):
        mlp = patched.model.layers[index].mlp
        gate = model.model.layers[index].mlp.gate
        assert isinstance(mlp, DeepseekV3MXFP4MoE)
        assert mlp.routing == GroupedSigmoidRouting(C.DS_GROUPS, C.DS_TOPK_GROUP, C.DS_SCALING)
        assert mlp.renormalize and mlp.top_k == C.TOP_K
        assert torch.equal(mlp.router_correction_bias, gate.e_score_correction_bias)
        assert mlp.router.weight.dtype == torch.float32
        # transformers' own (float) shared-experts module, kept as it is.
        assert isinstance(mlp.shared_experts, modeling.DeepseekV3MLP)


def test_requantized_experts_are_the_files_bytes(ckpt, patched):
    _assert_routed_experts_hold_the_files_bytes(ckpt, patched.model.layers)


def test_compressed_experts_and_shared_experts_are_taken_as_they_are(ckpt, model):
    # The in-memory model compressed-tensors compressed: per-expert Linears and compressed
    # shared-expert Linears, whose bytes become an MXFP4GatedMLP.
    compressed = use_mxmoe(copy.deepcopy(ckpt.compressed), backend="torch")
    _assert_routed_experts_hold_the_files_bytes(ckpt, compressed.model.layers)
    shared = compressed.model.layers[1].mlp.shared_experts
    assert isinstance(shared, MXFP4GatedMLP)
    gate, up, down = (_file_bytes(ckpt, f"model.layers.1.mlp.shared_experts.{p}.weight_packed")
                      for p in PROJ)
    assert torch.equal(shared.w13_blocks[0], torch.cat([gate, up]))
    assert torch.equal(shared.w2_blocks[0], down)
    x = torch.randn(2, 5, C.H, generator=torch.Generator().manual_seed(6))
    assert rel_err(compressed.model.layers[1].mlp(x), model.model.layers[1].mlp(x)) < 1e-5


def test_block_returns_a_plain_tensor_like_transformers_block(model, patched):
    x = torch.randn(2, 5, C.H, generator=torch.Generator().manual_seed(1))
    want = model.model.layers[2].mlp(x)
    got = patched.model.layers[2].mlp(x)
    assert isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor)
    assert got.shape == want.shape and rel_err(got, want) < 1e-5


def test_router_logits_still_recorded(model, patched):
    want = model(PROMPT, output_router_logits=True).router_logits
    got = patched(PROMPT, output_router_logits=True).router_logits
    assert len(got) == len(want) == C.DS_LAYERS - 1
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w)


def test_patching_twice_only_changes_the_backend(patched):
    mlp = patched.model.layers[1].mlp
    assert use_mxmoe(patched, backend="auto") is patched
    assert patched.model.layers[1].mlp is mlp and mlp.backend == "auto"
    use_mxmoe(patched, backend="torch")


def test_unrecognised_experts_raise_and_replace_nothing(model):
    broken = copy.deepcopy(model)
    first = broken.model.layers[1].mlp
    broken.model.layers[2].mlp.experts = nn.Identity()
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.experts: expected "):
        use_mxmoe(broken)
    assert broken.model.layers[1].mlp is first


def test_groups_that_do_not_fit_are_named(model):
    broken = copy.deepcopy(model)
    broken.model.layers[1].mlp.gate.num_group = 3
    with pytest.raises(ValueError, match="routing.n_group must divide E = 8, got 3"):
        use_mxmoe(broken)

"""`use_mxmoe` on transformers' Qwen3-MoE and Mixtral, loaded from MXFP4A16 checkpoints that
compressed-tensors wrote (tests/ct_checkpoints.py): the patched model generates what the
unpatched one does, its blocks hold the file's bytes, return what transformers' blocks return
and still record the router logits."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from torch import nn

from checkpoints import quiet_cpu  # noqa: F401 (autouse fixture)
from helpers import rel_err

C = pytest.importorskip("ct_checkpoints")

from mxmoe.integrations.transformers import SparseMXFP4MoE, use_mxmoe  # noqa: E402

NAMES = {"qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
         "mixtral": ("block_sparse_moe", "w1", "w3", "w2")}


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def ckpt(request, tmp_path_factory):
    return C.quantize_and_save(C.tiny_model(request.param),
                               tmp_path_factory.mktemp(request.param) / "ckpt")


@pytest.fixture(scope="module")
def model(ckpt):
    return C.load_decompressed(ckpt.path)


@pytest.fixture(scope="module")
def patched(model):
    return use_mxmoe(copy.deepcopy(model), backend="torch")


PROMPT = torch.tensor([[3, 17, 42, 5, 60, 11, 8]])


def _file_bytes(ckpt, layer, j, proj, suffix):
    prefix, *projections = NAMES[ckpt.family]
    with safe_open(str(ckpt.path / "model.safetensors"), "pt") as f:
        return f.get_tensor(f"model.layers.{layer}.{prefix}.experts.{j}.{projections[proj]}."
                            f"{suffix}")


def _assert_holds_the_files_bytes(ckpt, layers):
    for index, layer in enumerate(layers):
        mlp = layer.mlp
        assert isinstance(mlp, SparseMXFP4MoE)
        for j in range(C.E):
            for suffix, w13, w2 in (("weight_packed", mlp.w13_blocks, mlp.w2_blocks),
                                    ("weight_scale", mlp.w13_scales, mlp.w2_scales)):
                gate, up, down = (_file_bytes(ckpt, index, j, p, suffix) for p in range(3))
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


def test_requantized_experts_are_the_files_bytes(ckpt, patched):
    # transformers dequantized the experts; requantizing them gives back the exact bytes.
    _assert_holds_the_files_bytes(ckpt, patched.model.layers)


def test_linearized_compressed_experts_are_taken_as_they_are(ckpt):
    # The in-memory model compressed-tensors compressed (experts as per-expert Linears).
    compressed = copy.deepcopy(ckpt.compressed)
    use_mxmoe(compressed, backend="torch")
    _assert_holds_the_files_bytes(ckpt, compressed.model.layers)


def test_block_returns_a_plain_tensor_like_transformers_block(model, patched):
    x = torch.randn(2, 5, C.H, generator=torch.Generator().manual_seed(1))
    want = model.model.layers[0].mlp(x)
    got = patched.model.layers[0].mlp(x)
    assert isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor)
    assert got.shape == want.shape and rel_err(got, want) < 1e-5


def test_router_logits_still_recorded(model, patched):
    want = model(PROMPT, output_router_logits=True).router_logits
    got = patched(PROMPT, output_router_logits=True).router_logits
    assert len(got) == len(want) == C.LAYERS
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_patching_twice_only_changes_the_backend(patched):
    mlp = patched.model.layers[0].mlp
    assert use_mxmoe(patched, backend="auto") is patched
    assert patched.model.layers[0].mlp is mlp and mlp.backend == "auto"
    use_mxmoe(patched, backend="torch")


def test_unrecognised_experts_raise_and_replace_nothing(model):
    broken = copy.deepcopy(model)
    first = broken.model.layers[0].mlp
    broken.model.layers[1].mlp.experts = nn.Identity()
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts: expected "):
        use_mxmoe(broken)
    assert broken.model.layers[0].mlp is first


def test_wrong_expert_shape_is_named(model):
    broken = copy.deepcopy(model)
    experts = broken.model.layers[0].mlp.experts
    experts.gate_up_proj = nn.Parameter(experts.gate_up_proj.data[:, :96].clone())
    with pytest.raises(ValueError, match=r"experts\.gate_up_proj: expected shape \(4, 128, 64\)"):
        use_mxmoe(broken)

"""`mxmoe.integrations.transformers.use_mxmoe` on a tiny random transformers gpt-oss model.

The experts of the model are first rounded to MXFP4-representable values, so quantizing them is
lossless and the patched model must compute what the unpatched one does: any difference is the
order of floating-point sums, not quantization.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import mxmoe

transformers = pytest.importorskip("transformers")
from transformers import GptOssConfig, GptOssForCausalLM  # noqa: E402

from mxmoe.integrations.transformers import GptOssMXFP4MoE, use_mxmoe  # noqa: E402

from helpers import rel_err  # noqa: E402

VOCAB = 128


def _round_to_mxfp4(w: torch.Tensor) -> torch.Tensor:
    """transformers' ``[E, K, N]`` expert weight, made MXFP4-representable along K."""
    return mxmoe.quantize_mxfp4(w.transpose(1, 2)).dequantize(w.dtype).transpose(1, 2)


@pytest.fixture(scope="module")
def model() -> GptOssForCausalLM:
    config = GptOssConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
        # Larger than the default 0.02 so that logits (and greedy tokens) vary.
        initializer_range=0.1,
        pad_token_id=0,
        eos_token_id=None,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            experts = layer.mlp.experts
            experts.gate_up_proj.copy_(_round_to_mxfp4(experts.gate_up_proj))
            experts.down_proj.copy_(_round_to_mxfp4(experts.down_proj))
            experts.gate_up_proj_bias.normal_(0.0, 0.1)
            experts.down_proj_bias.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))


def _patched(model, **kwargs):
    return use_mxmoe(copy.deepcopy(model), backend="torch", **kwargs)


@torch.no_grad()
def test_patched_logits_match_unpatched(model, prompt):
    patched = _patched(model)
    assert all(isinstance(layer.mlp, GptOssMXFP4MoE) for layer in patched.model.layers)
    ref = model(prompt).logits
    out = patched(prompt).logits
    assert rel_err(out, ref) < 1e-5


@torch.no_grad()
def test_greedy_generation_yields_the_same_tokens(model, prompt):
    patched = _patched(model)
    ref = model.generate(prompt, do_sample=False, max_new_tokens=8)
    out = patched.generate(prompt, do_sample=False, max_new_tokens=8)
    assert torch.equal(out, ref)
    assert ref[:, prompt.shape[1]:].unique().numel() > 2, "degenerate test: too few tokens"


@torch.no_grad()
def test_router_logits_and_aux_loss_still_recorded(model, prompt):
    patched = _patched(model)
    ref = model(prompt, output_router_logits=True)
    out = patched(prompt, output_router_logits=True)
    assert len(out.router_logits) == len(ref.router_logits) == 2
    for got, want in zip(out.router_logits, ref.router_logits):
        assert rel_err(got, want) < 1e-5  # layer 1's input differs by summation order
    assert rel_err(out.aux_loss, ref.aux_loss) < 1e-5


def test_block_returns_what_gpt_oss_mlp_returned(model):
    """(hidden [B, S, H], router scores [B*S, k]) like GptOssMLP, values included."""
    patched = _patched(model)
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        want_hidden, want_scores = model.model.layers[0].mlp(x)
        hidden, scores = patched.model.layers[0].mlp(x)
    assert hidden.shape == want_hidden.shape and scores.shape == want_scores.shape
    assert rel_err(hidden, want_hidden) < 1e-5
    assert torch.allclose(scores, want_scores, atol=1e-6)


def test_patched_experts_take_4_25_of_16_bits(model):
    """The experts' weights shrink to 4.25 bits from bf16's 16 (biases stay as they were)."""
    patched = _patched(model)
    for dense_layer, layer in zip(model.model.layers, patched.model.layers):
        experts = dense_layer.mlp.experts
        bf16_bytes = 2 * (experts.gate_up_proj.numel() + experts.down_proj.numel())
        packed = layer.mlp
        packed_bytes = sum(t.nbytes for t in (packed.w13_blocks, packed.w13_scales,
                                              packed.w2_blocks, packed.w2_scales))
        assert packed_bytes / bf16_bytes == pytest.approx(4.25 / 16, abs=1e-12)
    names = [name for name, _ in patched.named_parameters()]
    assert not any("gate_up_proj" in n or "down_proj" in n for n in names), "dense experts kept"


def test_patching_twice_only_changes_the_backend(model):
    patched = _patched(model)
    mlps = [layer.mlp for layer in patched.model.layers]
    use_mxmoe(patched, backend="auto")
    assert [layer.mlp for layer in patched.model.layers] == mlps
    assert all(mlp.backend == "auto" for mlp in mlps)


def test_not_a_gpt_oss_model_raises():
    with pytest.raises(TypeError, match="GptOssForCausalLM"):
        use_mxmoe(nn.Linear(4, 4))


def test_unrecognised_block_raises_and_replaces_nothing(model):
    broken = copy.deepcopy(model)
    first = broken.model.layers[0].mlp
    broken.model.layers[1].mlp = nn.Identity()
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp: expected a gpt-oss MoE block"):
        use_mxmoe(broken)
    assert broken.model.layers[0].mlp is first


def test_unrecognised_experts_raise(model):
    broken = copy.deepcopy(model)
    broken.model.layers[0].mlp.experts = nn.Identity()
    with pytest.raises(ValueError, match="expected GptOssExperts or Mxfp4GptOssExperts"):
        use_mxmoe(broken)


def test_wrong_expert_shape_raises(model):
    broken = copy.deepcopy(model)
    experts = broken.model.layers[0].mlp.experts
    experts.down_proj = nn.Parameter(experts.down_proj.data.transpose(1, 2).contiguous()[:, :32])
    with pytest.raises(ValueError, match=r"experts\.down_proj: expected shape \(4, 64, 64\)"):
        use_mxmoe(broken)


def test_mxfp4_checkpoint_loaded_dequantized_gives_back_its_own_bytes(model, tmp_path):
    """The path a real gpt-oss checkpoint takes without triton_kernels: transformers loads the
    ``*_blocks``/``*_scales`` tensors dequantized to bf16 (``Mxfp4Config(dequantize=True)``),
    and use_mxmoe's quantization recovers the checkpoint's bytes exactly."""
    import json

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, Mxfp4Config

    tensors, packed = {}, {}
    for name, value in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            q = mxmoe.quantize_mxfp4(value.transpose(1, 2))  # [E, N, K], checkpoint orientation
            packed[name] = q
            tensors[f"{name}_blocks"] = q.blocks.unflatten(-1, (-1, 16)).contiguous()
            tensors[f"{name}_scales"] = q.scales
        else:
            tensors[name] = value.contiguous()
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (tmp_path / "config.json").write_text(json.dumps(config))

    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.bfloat16, quantization_config=Mxfp4Config(dequantize=True)
    )
    assert loaded.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    use_mxmoe(loaded, backend="torch")
    for i, layer in enumerate(loaded.model.layers):
        w13 = packed[f"model.layers.{i}.mlp.experts.gate_up_proj"]
        w2 = packed[f"model.layers.{i}.mlp.experts.down_proj"]
        assert torch.equal(layer.mlp.w13_blocks, w13.blocks)
        assert torch.equal(layer.mlp.w13_scales, w13.scales)
        assert torch.equal(layer.mlp.w2_blocks, w2.blocks)
        assert torch.equal(layer.mlp.w2_scales, w2.scales)


# --- experts already in MXFP4 (transformers' Mxfp4 integration, model not dequantized) -------

class _IdentityLayout:
    """Stands in for a triton_kernels layout: a swizzle that moves nothing."""

    def unswizzle_data(self, data):
        return data


def _triton_kernels_tensor(data: torch.Tensor):
    """Stands in for a triton_kernels tensor: ``.storage.data`` under ``.storage.layout``."""
    return SimpleNamespace(storage=SimpleNamespace(data=data, layout=_IdentityLayout()))


def _mxfp4_model(model, source: str):
    """``model`` with every block turned into transformers' Mxfp4GptOssMLP, holding the same
    (MXFP4-representable) experts as MXFP4 data: as checkpoint-layout ``*_blocks``/``*_scales``
    tensors, or as transformers swizzles them for triton_kernels (``[E, K/2, N]`` and
    ``[E, K/32, N]``; identity swizzle here)."""
    from transformers.integrations.mxfp4 import Mxfp4GptOssExperts, Mxfp4GptOssMLP

    converted = copy.deepcopy(model)
    packed = {}
    for i, layer in enumerate(converted.model.layers):
        dense = layer.mlp.experts
        experts = Mxfp4GptOssExperts(converted.config)
        with torch.no_grad():
            experts.gate_up_proj_bias.copy_(dense.gate_up_proj_bias)
            experts.down_proj_bias.copy_(dense.down_proj_bias)
        for proj in ("gate_up_proj", "down_proj"):
            q = mxmoe.quantize_mxfp4(getattr(dense, proj).transpose(1, 2))  # [E, N, K]
            packed[i, proj] = q
            del experts._parameters[proj]
            if source == "blocks":
                setattr(experts, f"{proj}_blocks", q.blocks.unflatten(-1, (-1, 16)).clone())
                setattr(experts, f"{proj}_scales", q.scales.clone())
                setattr(experts, proj, None)
            else:
                setattr(experts, proj, _triton_kernels_tensor(q.blocks.transpose(1, 2).clone()))
                setattr(experts, f"{proj}_precision_config", SimpleNamespace(
                    weight_scale=_triton_kernels_tensor(q.scales.transpose(1, 2).clone())))
        layer.mlp = Mxfp4GptOssMLP(layer.mlp.router, experts)
    return converted, packed


@pytest.mark.parametrize("source", ["blocks", "swizzled"])
@torch.no_grad()
def test_mxfp4_experts_are_taken_as_they_are(model, prompt, source):
    converted, packed = _mxfp4_model(model, source)
    patched = use_mxmoe(converted, backend="torch")
    for i, layer in enumerate(patched.model.layers):
        assert layer.mlp.second_output == "router_logits"  # what Mxfp4GptOssMLP returns
        assert torch.equal(layer.mlp.w13_blocks, packed[i, "gate_up_proj"].blocks)
        assert torch.equal(layer.mlp.w13_scales, packed[i, "gate_up_proj"].scales)
        assert torch.equal(layer.mlp.w2_blocks, packed[i, "down_proj"].blocks)
        assert torch.equal(layer.mlp.w2_scales, packed[i, "down_proj"].scales)
    assert rel_err(patched(prompt).logits, model(prompt).logits) < 1e-5


def test_mxfp4_experts_without_data_raise(model):
    from transformers.integrations.mxfp4 import Mxfp4GptOssExperts, Mxfp4GptOssMLP

    broken = copy.deepcopy(model)
    layer = broken.model.layers[0]
    layer.mlp = Mxfp4GptOssMLP(layer.mlp.router, Mxfp4GptOssExperts(broken.config))
    with pytest.raises(ValueError, match="without recognisable MXFP4 data for gate_up_proj"):
        use_mxmoe(broken)

"""Tiny Qwen3-MoE, Mixtral and DeepSeek-V3 checkpoints quantized to MXFP4A16 by
compressed-tensors itself.

What llm-compressor does for ``QuantizationModifier(targets="Linear", scheme="MXFP4A16",
ignore=["lm_head", "re:.*mlp.gate$"])``, step by step with compressed-tensors' own functions
(llm-compressor itself pins transformers <= 5.17 and pulls datasets, accelerate and auto-round,
too heavy for a test extra): the experts are linearized into per-expert Linears as
llm-compressor's ``linearize`` does, the scheme is applied (``apply_quantization_config``), each
weight's scale is what llm-compressor's min-max observer gets (``calculate_qparams`` on the
32-group min and max), ``ModelCompressor.compress_model`` packs the weights and E8M0 scales,
and ``ModelCompressor.update_config`` writes the ``quantization_config`` into config.json.
Mixtral's tensors are saved under its own checkpoint names (``block_sparse_moe.experts.j.w1``
...), as transformers' save mapping gives them back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")

from compressed_tensors.compressors import ModelCompressor  # noqa: E402
from compressed_tensors.quantization import (QuantizationConfig,  # noqa: E402
                                             apply_quantization_config, preset_name_to_scheme)
from compressed_tensors.quantization.utils.helpers import calculate_qparams  # noqa: E402

E, H, I, TOP_K, LAYERS, VOCAB = 4, 64, 64, 2, 2, 96
#: The tiny DeepSeek-V3: 8 routed experts in 2 groups (1 kept), 1 shared expert, moe width 32,
#: 3 layers of which the first is dense (first_k_dense_replace = 1).
DS_E, DS_I, DS_GROUPS, DS_TOPK_GROUP, DS_LAYERS, DS_SCALING = 8, 32, 2, 1, 3, 2.5


def tiny_model(family: str, *, norm_topk_prob: bool = True, seed: int = 0):
    """A random fp32 transformers model of ``family`` ("qwen3_moe" | "mixtral" |
    "deepseek_v3"); a DeepSeek-V3's correction biases are random too (transformers starts them
    at zero, where they would not change the choice)."""
    if family == "deepseek_v3":
        return _tiny_deepseek_v3(norm_topk_prob, seed)
    common = dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                  num_experts_per_tok=TOP_K, initializer_range=0.1, pad_token_id=0,
                  eos_token_id=None, tie_word_embeddings=False)
    if family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=I,
                                             num_experts=E, norm_topk_prob=norm_topk_prob,
                                             **common)
        cls = transformers.Qwen3MoeForCausalLM
    else:
        config = transformers.MixtralConfig(intermediate_size=I, num_local_experts=E, **common)
        cls = transformers.MixtralForCausalLM
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return cls(config).float().eval()


def _tiny_deepseek_v3(norm_topk_prob: bool, seed: int):
    config = transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=H, intermediate_size=128, moe_intermediate_size=DS_I,
        num_hidden_layers=DS_LAYERS, num_attention_heads=2, num_key_value_heads=2,
        n_shared_experts=1, n_routed_experts=DS_E, n_group=DS_GROUPS, topk_group=DS_TOPK_GROUP,
        num_experts_per_tok=TOP_K, first_k_dense_replace=1, norm_topk_prob=norm_topk_prob,
        routed_scaling_factor=DS_SCALING, q_lora_rank=None, kv_lora_rank=32,
        qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32, num_mtp_layers=0,
        initializer_range=0.1, pad_token_id=0, eos_token_id=None, tie_word_embeddings=False)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(config).float().eval()
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.3)
    return model


class _Expert(nn.Module):
    def __init__(self, gate, up, down):
        super().__init__()
        for name, w in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
            linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
            linear.weight.data = w.clone()
            setattr(self, name, linear)


@dataclass
class CTCheckpoint:
    path: Path
    family: str
    compressed: nn.Module  # the linearized model after compress_model (in-memory compressed)


def quantize_and_save(model, directory: Path, *, ignore: tuple[str, ...] = ()) -> CTCheckpoint:
    """Quantize ``model``'s Linears (not lm_head, not the routers, not those ``ignore`` names
    in compressed-tensors' syntax) to MXFP4A16 and save it."""
    family = model.config.model_type
    for layer in model.model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is None:  # a dense MLP (DeepSeek-V3's first_k_dense_replace layers)
            continue
        gate_up, down = experts.gate_up_proj.data, experts.down_proj.data
        inter = gate_up.shape[1] // 2
        layer.mlp.experts = nn.ModuleList(
            _Expert(gate_up[j, :inter], gate_up[j, inter:], down[j]) for j in range(len(down)))
    scheme = preset_name_to_scheme("MXFP4A16", ["Linear"])
    config = QuantizationConfig(config_groups={"group_0": scheme},
                                ignore=["lm_head", "re:.*mlp.gate$", *ignore],
                                format="mxfp4-pack-quantized")
    apply_quantization_config(model, config)
    for module in model.modules():
        if isinstance(module, nn.Linear) and hasattr(module, "weight_scale"):
            groups = module.weight.reshape(module.weight.shape[0], -1, 32)
            scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), scheme.weights)
            module.weight_scale.data = scale.to(module.weight_scale.dtype)
    compressor = ModelCompressor.from_pretrained_model(model, "mxfp4-pack-quantized")
    compressor.compress_model(model)
    tensors = {}
    for name, t in model.state_dict().items():
        if family == "mixtral":
            name = name.replace(".mlp.", ".block_sparse_moe.")
            name = re.sub(r"\.experts\.(\d+)\.(gate|up|down)_proj\.",
                          lambda m: f".experts.{m[1]}.{dict(gate='w1', up='w3', down='w2')[m[2]]}.",
                          name)
        tensors[name] = t.contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(directory)
    compressor.update_config(str(directory))
    return CTCheckpoint(directory, family, model)


def load_decompressed(path: Path):
    """The checkpoint as transformers loads it, experts dequantized, in fp32."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
    return model.float().eval()

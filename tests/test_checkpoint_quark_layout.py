"""The Quark reader on a checkpoint written by hand in the layout Quark 0.13 exports (as
`mxmoe.checkpoints.quark` states it; tests/test_checkpoint_quark.py checks that against Quark
itself when the extra ``quark`` is installed): it runs without Quark, so every test run reads the
format, and Quark's rule for which layer config applies to an expert is pinned."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import mxmoe
from mxmoe import quantize_mxfp4
from mxmoe.checkpoints.quark import check_quantization_config, expert_layer_config

from checkpoints import quiet_cpu  # noqa: F401 (autouse fixture)

E, H, I, TOP_K = 4, 64, 32, 2  # noqa: E741
PREFIX = "model.layers.0.mlp"
#: The weight spec of Quark 0.13's "mxfp4_weight_only" as its export writes it.
MXFP4_WEIGHT = {"dtype": "fp4", "qscheme": "per_group", "group_size": 32, "ch_axis": -1,
                "scale_format": "e8m0", "scale_type": "float", "is_dynamic": False,
                "observer_cls": "PerBlockMXObserver", "round_method": "half_even",
                "scale_calculation_mode": "even", "mx_element_dtype": None, "symmetric": None}


def _layer_config(weight=MXFP4_WEIGHT, input_tensors=None) -> dict:
    return {"weight": weight, "bias": None, "input_tensors": input_tensors,
            "output_tensors": None, "target_device": None}


def quark_config(**changes) -> dict:
    qc = {"quant_method": "quark", "version": "0.13", "global_quant_config": _layer_config(),
          "layer_quant_config": {}, "layer_type_quant_config": {}, "kv_cache_quant_config": {},
          "exclude": [f"{PREFIX}.gate", "lm_head"], "quant_mode": "eager_mode",
          "export": {"weight_format": "real_quantized", "pack_method": "reorder"}}
    qc.update(changes)
    return qc


def _write(tmp_path, qc: dict):
    """One Qwen3-MoE layer: per-expert ``weight`` (packed codes) and ``weight_scale`` (E8M0
    bytes), a float router; returns (path, w13 [E, 2I, H], w2 [E, H, I]) as MXFP4Tensors."""
    g = torch.Generator().manual_seed(0)
    w13 = quantize_mxfp4(torch.randn(E, 2 * I, H, generator=g))
    w2 = quantize_mxfp4(torch.randn(E, H, I, generator=g))
    tensors = {f"{PREFIX}.gate.weight": torch.randn(E, H, generator=g)}
    for j in range(E):
        for proj, rows, w in (("gate_proj", slice(0, I), w13), ("up_proj", slice(I, 2 * I), w13),
                              ("down_proj", slice(None), w2)):
            tensors[f"{PREFIX}.experts.{j}.{proj}.weight"] = w.blocks[j, rows].clone()
            tensors[f"{PREFIX}.experts.{j}.{proj}.weight_scale"] = w.scales[j, rows].clone()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    config = {"model_type": "qwen3_moe", "hidden_size": H, "moe_intermediate_size": I,
              "num_experts": E, "num_experts_per_tok": TOP_K, "num_hidden_layers": 1,
              "norm_topk_prob": True, "quantization_config": qc}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path, w13, w2


def test_the_files_bytes_are_stacked_gate_then_up(tmp_path):
    path, w13, w2 = _write(tmp_path, quark_config())
    layer = mxmoe.MXFP4MoE.from_pretrained(path, 0, backend="torch")
    assert torch.equal(layer.w13_blocks, w13.blocks) and torch.equal(layer.w13_scales, w13.scales)
    assert torch.equal(layer.w2_blocks, w2.blocks) and torch.equal(layer.w2_scales, w2.scales)
    assert layer.top_k == TOP_K and layer.renormalize


def test_the_first_matching_layer_pattern_decides_then_the_type_then_the_global():
    # Quark's get_layer_quant_config: exclude wins, then layer_quant_config in order.
    by_name, by_type = _layer_config(dict(MXFP4_WEIGHT, group_size=16)), _layer_config()
    qc = quark_config(layer_quant_config={"*down_proj": by_name, "*experts*": by_type},
                      layer_type_quant_config={"Linear": by_type},
                      exclude=["*experts.3.*"])
    assert expert_layer_config(qc, f"{PREFIX}.experts.0.down_proj") == \
        (by_name, "layer_quant_config['*down_proj']")
    assert expert_layer_config(qc, f"{PREFIX}.experts.0.up_proj")[1] == \
        "layer_quant_config['*experts*']"
    assert expert_layer_config(qc, f"{PREFIX}.experts.3.up_proj") == \
        (None, "exclude pattern '*experts.3.*'")
    assert expert_layer_config(quark_config(layer_type_quant_config={"Linear": by_type}),
                               "x")[1] == "layer_type_quant_config['Linear']"
    assert expert_layer_config(quark_config(), "x")[1] == "global_quant_config"


def test_mxfp4_activations_are_refused(tmp_path):
    path, _, _ = _write(tmp_path, quark_config(global_quant_config=_layer_config(
        input_tensors=dict(MXFP4_WEIGHT, is_dynamic=True))))
    with pytest.raises(ValueError, match="quantizes the activations too"):
        mxmoe.MXFP4MoE.from_pretrained(path, 0)


def test_an_excluded_expert_is_named():
    qc = quark_config(exclude=["*experts.2.down_proj"])
    modules = [f"{PREFIX}.experts.{j}.{p}" for j in range(E)
               for p in ("gate_proj", "up_proj", "down_proj")]
    with pytest.raises(ValueError, match=r"exclude pattern '\*experts\.2\.down_proj' leaves "
                                         r"'model\.layers\.0\.mlp\.experts\.2\.down_proj' "
                                         r"unquantized"):
        check_quantization_config(qc, modules, "ckpt")

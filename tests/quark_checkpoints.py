"""Tiny Qwen3-MoE, Mixtral and DeepSeek-V3 checkpoints quantized to MXFP4 by AMD Quark itself
(the optional extra ``quark``; tests using this module are skipped without it).

What Quark's LLM PTQ flow (``quark.experimental.cli.torch_llm_ptq``) does for a scheme, on a
random transformers model of tests/ct_checkpoints.py: ``preprocess_for_quantization`` unfuses
the experts into per-expert Linears, ``LLMTemplate.get(model_type).get_config(scheme=...)``
gives the config (lm_head and the routers, ``*.gate``, excluded), ``ModelQuantizer`` quantizes
(weight scales from the weights: no calibration data) and freezes, and ``export_safetensors``
writes the packed ``real_quantized`` checkpoint. `load_dequantized` is the checkpoint as Quark
reloads it (``import_model_from_safetensors``), its weights dequantized by Quark's own
``weight_quantizer``, put back into a plain transformers model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

C = pytest.importorskip("ct_checkpoints")
pytest.importorskip("quark.torch")

from quark.torch import (LLMTemplate, ModelQuantizer, export_safetensors,  # noqa: E402
                         import_model_from_safetensors)
from quark.torch.export.nn.modules.qparamslinear import QParamsLinear  # noqa: E402
from quark.torch.utils.llm import preprocess_for_quantization  # noqa: E402

E, H, I, TOP_K, LAYERS = C.E, C.H, C.I, C.TOP_K, C.LAYERS
tiny_model = C.tiny_model
#: Quark's scheme for MXFP4 weights with the activations left alone.
WEIGHT_ONLY = "mxfp4_weight_only"


@dataclass
class QuarkCheckpoint:
    path: Path
    family: str
    scheme: str


def quantize_and_save(model, directory: Path, scheme: str = WEIGHT_ONLY) -> QuarkCheckpoint:
    """Quantize ``model``'s Linears (not lm_head, not the routers) with Quark's ``scheme`` and
    export the packed checkpoint into ``directory``."""
    family = model.config.model_type
    preprocess_for_quantization(model)
    quantizer = ModelQuantizer(LLMTemplate.get(family).get_config(scheme=scheme))
    model = quantizer.freeze(quantizer.quantize_model(model, None))
    with torch.no_grad():
        export_safetensors(model, directory, custom_mode="quark", weight_format="real_quantized",
                           pack_method="reorder")
    return QuarkCheckpoint(directory, family, scheme)


def load_reloaded(path: Path, family: str):
    """The checkpoint as Quark reloads it: per-expert ``QParamsLinear`` that dequantize in
    their forward (the skeleton's own random weights are all replaced)."""
    skeleton = tiny_model(family, seed=1)
    return import_model_from_safetensors(skeleton, str(path), device="cpu").float().eval()


def dequantized_weights(reloaded) -> dict[str, torch.Tensor]:
    """Module name -> the float weight Quark's quantizer decodes from the packed one."""
    with torch.no_grad():
        return {name: m.weight_quantizer(m.weight.data).float()
                for name, m in reloaded.named_modules() if isinstance(m, QParamsLinear)}


def load_dequantized(path: Path, family: str):
    """A plain fp32 transformers model (fused experts) holding Quark's dequantization of every
    quantized weight of the checkpoint, and its float tensors as they are."""
    reloaded = load_reloaded(path, family)
    weights = dequantized_weights(reloaded)
    floats = {k: v for k, v in reloaded.state_dict().items() if v.is_floating_point()}
    model = tiny_model(family, seed=2)
    state = model.state_dict()
    for name in state:
        module = name.rsplit(".", 1)[0]
        experts = range(state[name].shape[0])
        if name.endswith("experts.gate_up_proj"):
            state[name] = torch.stack([torch.cat([weights[f"{module}.{j}.gate_proj"],
                                                  weights[f"{module}.{j}.up_proj"]])
                                       for j in experts])
        elif name.endswith("experts.down_proj"):
            state[name] = torch.stack([weights[f"{module}.{j}.down_proj"] for j in experts])
        elif module in weights and name.endswith(".weight"):
            state[name] = weights[module]
        else:
            state[name] = floats[name]
    model.load_state_dict(state)
    return model.float().eval()

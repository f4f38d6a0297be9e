"""Checkpoint I/O: one MoE layer read lazily from a safetensors checkpoint, whole or a rank's
slice, in whichever MXFP4 format wrote it.

| format | detected by | module |
|---|---|---|
| gpt-oss, HF transformers names | ``quant_method: mxfp4`` or ``model.layers.{i}.mlp.experts.gate_up_proj_blocks`` | `gpt_oss` |
| gpt-oss, OpenAI's original names | ``block.{i}.mlp.mlp1_weight.blocks`` | `gpt_oss` |
| compressed-tensors ``mxfp4-pack-quantized`` (llm-compressor MXFP4A16; Qwen3-MoE, Mixtral, DeepSeek-V3) | ``quant_method: compressed-tensors`` | `compressed_tensors` |
| AMD Quark ``real_quantized`` export, weights ``fp4`` per_group 32 ``e8m0`` (``mxfp4_weight_only``; Qwen3-MoE, Mixtral, DeepSeek-V3) | ``quant_method: quark`` | `quark` |

The last two store one Linear per expert (`per_expert`). `detect_format` says which applies;
`read_pretrained` reads one layer's MoE for this rank (`PretrainedMoE`, the arguments
``MXFP4MoE.from_pretrained`` builds the layer from): each format gives a spec (names and sizes,
checked from the headers and config.json, nothing read) and a ``read_layer`` of this rank's
part.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..activations import Activation

from . import compressed_tensors, gpt_oss, quark
from .device import resolve_device
from .files import SafetensorsCheckpoint
from .gpt_oss import (CONFIG_KEYS, NAMINGS, GptOssCheckpoint, GptOssMoEWeights,
                      load_gpt_oss_moe, read_spec)
from .pretrained import PretrainedMoE
from .ranks import rank_part

__all__ = [
    "SafetensorsCheckpoint", "GptOssCheckpoint", "GptOssMoEWeights", "load_gpt_oss_moe",
    "read_pretrained", "PretrainedMoE", "detect_format", "FORMATS", "NAMINGS", "CONFIG_KEYS",
    "read_spec",
]

#: What `detect_format` returns -> (the format's spec reader, its layer reader).
_READERS = {
    "gpt-oss": (gpt_oss.read_spec, gpt_oss.read_layer),
    "compressed-tensors": (compressed_tensors.read_ct_spec, compressed_tensors.read_layer),
    "quark": (quark.read_quark_spec, quark.read_layer),
}
FORMATS = tuple(_READERS)


def detect_format(ckpt: SafetensorsCheckpoint, layer: int) -> str:
    """``"gpt-oss"``, ``"compressed-tensors"`` or ``"quark"``, from config.json's
    ``quantization_config`` and the tensor names; ValueError naming what was found otherwise."""
    qc = ckpt.config.get("quantization_config") or {}
    if not isinstance(qc, dict):
        raise ValueError(f"{ckpt.path}: config.json quantization_config must be an object")
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        return "compressed-tensors"
    if method == "quark":
        return "quark"
    if method not in (None, "mxfp4"):
        raise ValueError(
            f"{ckpt.path}: config.json quantization_config.quant_method = {method!r} is not an "
            f"MXFP4 format mxmoe reads (gpt-oss 'mxfp4', 'compressed-tensors' "
            f"mxfp4-pack-quantized, 'quark' fp4 per_group e8m0)"
        )
    # gpt-oss's own MXFP4 (or no config at all): its names decide, with a message that lists
    # what was looked for when they are absent.
    gpt_oss.detect_naming(ckpt, layer)
    return "gpt-oss"


def read_pretrained(
    path: str | Path,
    layer: int,
    *,
    format: str | None = None,
    activation: Activation | str | None = None,
    top_k: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    ep_group=None,
    tp_group=None,
) -> PretrainedMoE:
    """One layer's MoE as this rank holds it (`MXFP4MoE.from_pretrained`'s arguments, but
    ``backend``): the format detected (or ``format``), its spec checked, this rank's part of the
    experts (``ep_group``) and of I (``tp_group``) read, and nothing else."""
    resolve_device(device)
    if format is not None and format not in _READERS:
        raise ValueError(f"format must be one of {list(_READERS)} or None (detected), got "
                         f"{format!r}")
    with SafetensorsCheckpoint(path) as ckpt:
        read_spec_of, read_layer = _READERS[format or detect_format(ckpt, layer)]
        spec = read_spec_of(ckpt, layer)
        part = rank_part(spec.num_experts, spec.intermediate, ep_group, tp_group)
        return read_layer(ckpt, spec, part, top_k=top_k, activation=activation, device=device,
                          dtype=dtype)

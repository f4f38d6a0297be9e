"""Checkpoint I/O: one MoE layer read lazily from a safetensors checkpoint, whole or a rank's
slice, in whichever MXFP4 format wrote it.

| format | detected by | module |
|---|---|---|
| gpt-oss, HF transformers names | ``quant_method: mxfp4`` or ``model.layers.{i}.mlp.experts.gate_up_proj_blocks`` | `gpt_oss` |
| gpt-oss, OpenAI's original names | ``block.{i}.mlp.mlp1_weight.blocks`` | `gpt_oss` |
| compressed-tensors ``mxfp4-pack-quantized`` (llm-compressor MXFP4A16; Qwen3-MoE, Mixtral) | ``quant_method: compressed-tensors`` | `compressed_tensors` |

AMD Quark checkpoints (``quant_method: quark``) are recognised and refused with a message:
their reader is not written yet. `detect_format` says which applies; `layer_from_pretrained`
builds the layer (``MXFP4MoE.from_pretrained``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .device import resolve_device
from .files import SafetensorsCheckpoint
from .gpt_oss import (CONFIG_KEYS, NAMINGS, GptOssCheckpoint, GptOssMoEWeights,
                      layer_from_gpt_oss, load_gpt_oss_moe, read_spec)

__all__ = [
    "SafetensorsCheckpoint", "GptOssCheckpoint", "GptOssMoEWeights", "load_gpt_oss_moe",
    "layer_from_gpt_oss", "layer_from_pretrained", "detect_format", "FORMATS",
    "NAMINGS", "CONFIG_KEYS", "read_spec",
]

#: What `detect_format` returns.
FORMATS = ("gpt-oss", "compressed-tensors")


def detect_format(ckpt: SafetensorsCheckpoint, layer: int) -> str:
    """``"gpt-oss"`` or ``"compressed-tensors"``, from config.json's ``quantization_config``
    and the tensor names; ValueError naming what was found otherwise."""
    qc = ckpt.config.get("quantization_config") or {}
    if not isinstance(qc, dict):
        raise ValueError(f"{ckpt.path}: config.json quantization_config must be an object")
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        return "compressed-tensors"
    if method == "quark":
        raise ValueError(
            f"{ckpt.path}: an AMD Quark checkpoint (quant_method 'quark'): mxmoe does not read "
            f"Quark's export yet; re-export it with llm-compressor (MXFP4A16) or convert the "
            f"bf16 model with `mxmoe quantize`"
        )
    if method not in (None, "mxfp4"):
        raise ValueError(
            f"{ckpt.path}: config.json quantization_config.quant_method = {method!r} is not an "
            f"MXFP4 format mxmoe reads (gpt-oss 'mxfp4', 'compressed-tensors' "
            f"mxfp4-pack-quantized)"
        )
    # gpt-oss's own MXFP4 (or no config at all): its names decide, with a message that lists
    # what was looked for when they are absent.
    GptOssCheckpoint.detect_naming(ckpt, layer)
    return "gpt-oss"


def layer_from_pretrained(
    cls,
    path: str | Path,
    layer: int,
    *,
    top_k: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    backend: str = "auto",
    ep_group=None,
    tp_group=None,
):
    """`MXFP4MoE.from_pretrained`: detect the format and family, read this rank's part."""
    resolve_device(device)
    with SafetensorsCheckpoint(path) as ckpt:
        fmt = detect_format(ckpt, layer)
    if fmt == "gpt-oss":
        return layer_from_gpt_oss(cls, path, layer, top_k=top_k, device=device, dtype=dtype,
                                  backend=backend, ep_group=ep_group, tp_group=tp_group)
    from .compressed_tensors import load_ct_moe, read_ct_spec
    from .ranks import check_top_k, rank_part

    with SafetensorsCheckpoint(path) as ckpt:
        spec = read_ct_spec(ckpt, layer)
        family = spec.family
        top_k = check_top_k(top_k if top_k is not None else family.top_k, spec.num_experts,
                            source=f"{ckpt.path} has no config.json with "
                                   f"{family.key('top_k')!r}",
                            hint=f"{family.name}'s config.json gives num_experts_per_tok")
        part = rank_part(spec.num_experts, spec.intermediate, ep_group, tp_group)
        weights = load_ct_moe(ckpt, spec, part.experts, part.intermediate, device=device,
                              dtype=dtype)
    expert_map = part.expert_map
    if expert_map is not None:
        expert_map = expert_map.to(weights.w13.device)
    return cls(
        weights.w13,
        weights.w2,
        weights.router_weight,
        weights.router_bias,
        top_k=top_k,
        activation=family.activation,
        renormalize=family.renormalize,
        backend=backend,
        expert_map=expert_map,
        ep_group=ep_group,
        tp_group=tp_group,
    )

"""compressed-tensors MXFP4 checkpoints (llm-compressor's scheme ``MXFP4A16``, format
``mxfp4-pack-quantized``): one MoE layer of a Qwen3-MoE, Mixtral or DeepSeek-V3 model, read
lazily.

Per expert ``j`` of layer ``i`` and projection (gate, up, down), under the layer's MoE prefix
(`per_expert` gives the names and how they are stacked):

    {prefix}.experts.{j}.{proj}.weight_packed   uint8 [N, K/2]   even element in the low nibble
    {prefix}.experts.{j}.{proj}.weight_scale    uint8 [N, K/32]  E8M0, 2**(s - 127)
    {prefix}.gate.weight                        float [E, H]     the router, not quantized

These are the bytes `MXFP4Tensor` holds (compressed-tensors 0.19-0.20 pack
``code[2j] | code[2j+1] << 4`` and store ``127 + floor(log2 scale)``): the experts are stacked,
never requantized.
"""

from __future__ import annotations

from ._foreign import ZERO_POINT
from .files import SafetensorsCheckpoint
from .per_expert import NAMINGS, PerExpertFormat, PerExpertMoESpec, load_per_expert_moe, \
    read_layer, read_per_expert_spec

__all__ = ["FORMAT", "WEIGHT_ARGS", "NAMINGS", "CT_TENSORS", "CTMoESpec",
           "check_quantization_config", "quantization_config", "read_ct_spec", "load_ct_moe",
           "read_layer"]

FORMAT = "mxfp4-pack-quantized"
#: A config group's ``weights`` in scheme MXFP4A16: 4-bit E2M1 in groups of 32, uint8 (E8M0)
#: scales. What a reader checks; a writer adds compressed-tensors' other fields.
WEIGHT_ARGS = {"num_bits": 4, "type": "float", "group_size": 32, "strategy": "group",
               "symmetric": True}
#: compressed-tensors' tensor names, and the tensors that mark another scheme than MXFP4A16.
CT_TENSORS = PerExpertFormat(
    name="compressed-tensors", blocks="weight_packed", scales="weight_scale",
    foreign=(("weight_global_scale", "a global scale: NVFP4, not MXFP4"),
             ZERO_POINT,
             ("input_global_scale", "an activation scale: not MXFP4A16")),
    router_hint=" (llm-compressor: ignore 're:.*mlp.gate$')")
CTMoESpec = PerExpertMoESpec
load_ct_moe = load_per_expert_moe


def check_quantization_config(qc: dict, where: str) -> None:
    """Refuse a compressed-tensors config that is not MXFP4 weights with 16-bit activations.

    Every config group in an MXFP4 format must quantize weights as 4-bit floats in groups of
    32 with uint8 (E8M0) scales, symmetric, and leave the activations alone (``MXFP4A16``):
    ``MXFP4`` (MXFP4 activations too), NVFP4 (groups of 16, FP8 scales) and others are named.
    """
    fmt = qc.get("format")
    groups = qc.get("config_groups") or {}
    mx_groups = [name for name, g in groups.items() if (g.get("format") or fmt) == FORMAT]
    if not mx_groups:
        formats = sorted({str(g.get("format") or fmt) for g in groups.values()} or {str(fmt)})
        hint = " (NVFP4: groups of 16 with FP8 scales)" if "nvfp4-pack-quantized" in formats \
            else ""
        raise ValueError(f"{where}: compressed-tensors format {', '.join(formats)}{hint} is not "
                         f"{FORMAT!r}: mxmoe reads MXFP4 weights (scheme MXFP4A16) only")
    for name in mx_groups:
        g = groups[name]
        w = g.get("weights") or {}
        want = WEIGHT_ARGS
        bad = {k: w.get(k) for k, v in want.items() if w.get(k) != v}
        if bad:
            raise ValueError(f"{where}: config group {name!r} has weights {bad}, expected "
                             f"{ {k: want[k] for k in bad} } (MXFP4: 4-bit E2M1, one E8M0 "
                             f"scale per 32)")
        if g.get("input_activations"):
            act = g["input_activations"]
            raise ValueError(
                f"{where}: config group {name!r} quantizes the activations too "
                f"({act.get('num_bits')}-bit {act.get('type')}, scheme MXFP4 or MXFP4xFP8): "
                f"mxmoe runs MXFP4 weights with bf16/fp16/fp32 activations (MXFP4A16)"
            )


def quantization_config(ignore: list[str]) -> dict:
    """config.json's ``quantization_config`` for a checkpoint whose Linears are MXFP4A16
    except the modules in ``ignore``: what compressed-tensors 0.20 writes for llm-compressor's
    scheme (targets ``Linear``, ``ignore`` naming each float Linear), so that vLLM,
    transformers' ``CompressedTensorsConfig`` and llm-compressor read it."""
    weights = {**WEIGHT_ARGS, "dynamic": False, "scale_dtype": "torch.uint8"}
    group = {"format": FORMAT, "targets": ["Linear"], "weights": weights,
             "input_activations": None, "output_activations": None}
    return {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "moe_sparsity_config": None,
        "sparsity_config": {},
        "transform_config": {},
    }


def read_ct_spec(ckpt: SafetensorsCheckpoint, layer: int) -> PerExpertMoESpec:
    """Check the quantization_config, find the layer's tensors, check every shape and dtype
    against the others and config."""
    check_quantization_config(ckpt.config.get("quantization_config") or {}, str(ckpt.path))
    return read_per_expert_spec(ckpt, layer, CT_TENSORS)

"""AMD Quark MXFP4 checkpoints (``quant_method: quark``, weights ``fp4`` per_group 32 with
``e8m0`` scales, activations unquantized: Quark's scheme ``mxfp4_weight_only``): one MoE layer
of a Qwen3-MoE, Mixtral or DeepSeek-V3 model, read lazily.

Quark quantizes the experts as one Linear each (``preprocess_for_quantization`` unfuses
transformers' expert tensors) and ``export_safetensors(weight_format="real_quantized")`` writes,
per expert ``j`` and projection (`per_expert` gives the names and how they are stacked):

    {prefix}.experts.{j}.{proj}.weight         uint8 [N, K/2]   even element in the low nibble
    {prefix}.experts.{j}.{proj}.weight_scale   uint8 [N, K/32]  E8M0, 2**(s - 127)
    {prefix}.gate.weight                       float [E, H]     the router, excluded ("*.gate")

These are the bytes `MXFP4Tensor` holds, as Quark 0.13 writes them: ``Pack_fp4.pack`` packs
``code[2j] | code[2j+1] << 4`` along K (its ``reorder`` flag does not touch fp4), ``fp4`` is not
among the dtypes whose group scales are transposed (``PER_GROUP_INT_TRANSPOSE_DTYPES``), and
``to_e8m0_uint8`` stores ``127 + round(log2 scale)``, read back as ``2**(s - 127)``
(``StaticRealQuantizer.unpack_params``). The experts are stacked, never requantized.

Which config applies to an expert is Quark's ``get_layer_quant_config`` rule: an ``exclude``
pattern (fnmatch on the module name) leaves it float; else the first matching
``layer_quant_config`` pattern, else ``layer_type_quant_config["Linear"]``, else
``global_quant_config``. Every expert's must be MXFP4 weights with no activation or output
quantization (Quark's ``mxfp4`` scheme quantizes the activations to MXFP4 too: refused). DeepSeek-V3's shared
experts (``{prefix}.shared_experts.{proj}``, quantized by Quark's ``deepseek_v3`` template) are
held to the same rule when they carry a ``weight_scale``, and read as float Linears when an
``exclude`` left them without one.
"""

from __future__ import annotations

from fnmatch import fnmatch

from ._foreign import ZERO_POINT
from .files import SafetensorsCheckpoint
from .per_expert import NAMINGS, PerExpertFormat, PerExpertMoESpec, load_per_expert_moe, \
    read_layer, read_per_expert_spec

__all__ = ["WEIGHT_SPEC", "QUARK_TENSORS", "expert_layer_config", "check_quantization_config",
           "read_quark_spec", "load_quark_moe", "read_layer"]

#: What a layer config's ``weight`` says for MXFP4 (Quark's ``OCP_MXFP4Spec``): E2M1 codes in
#: groups of 32 along the last axis (K of an [N, K] weight), one E8M0 scale each.
WEIGHT_SPEC = {"dtype": "fp4", "qscheme": "per_group", "group_size": 32, "scale_format": "e8m0"}
#: ``ch_axis`` values that put the groups along K of an [N, K] Linear weight.
_K_AXES = (-1, 1)
#: Quark's tensor names (transformers' ``QuarkHfQuantizer`` keys), and those that mark another
#: scheme than MXFP4 weights alone.
QUARK_TENSORS = PerExpertFormat(
    name="Quark", blocks="weight", scales="weight_scale",
    foreign=(ZERO_POINT,
             ("input_scale", "an activation scale: the activations are quantized too"),
             ("output_scale", "an output scale: the outputs are quantized too")),
    router_hint=" (Quark: exclude '*.gate', as its qwen3_moe and mixtral templates do)")
load_quark_moe = load_per_expert_moe


def expert_layer_config(qc: dict, module: str) -> tuple[dict | None, str]:
    """(the layer config Quark applies to the Linear ``module``, where it came from); None for
    an excluded module, with the exclude pattern."""
    for pattern in qc.get("exclude") or []:
        if fnmatch(module, pattern):
            return None, f"exclude pattern {pattern!r}"
    for pattern, config in (qc.get("layer_quant_config") or {}).items():
        if fnmatch(module, pattern):
            return config, f"layer_quant_config[{pattern!r}]"
    by_type = (qc.get("layer_type_quant_config") or {}).get("Linear")
    if by_type is not None:
        return by_type, "layer_type_quant_config['Linear']"
    return qc.get("global_quant_config") or {}, "global_quant_config"


def _describe(spec) -> str:
    specs = spec if isinstance(spec, list) else [spec]
    return " then ".join(f"{s.get('dtype')} {s.get('qscheme')}" for s in specs)


def _check_layer_config(config: dict, source: str, where: str) -> None:
    weight = config.get("weight")
    if weight is None:
        raise ValueError(f"{where}: quantization_config {source} leaves the expert weights "
                         f"unquantized: mxmoe reads MXFP4 experts")
    if isinstance(weight, list):
        raise ValueError(f"{where}: quantization_config {source} quantizes the weights in "
                         f"{len(weight)} steps ({_describe(weight)}), not MXFP4")
    bad = {k: weight.get(k) for k, v in WEIGHT_SPEC.items() if weight.get(k) != v}
    if bad:
        hint = ""
        if weight.get("dtype") == "mx":
            hint = " (dtype 'mx' keeps each scale inline with its 32 codes: not read)"
        raise ValueError(f"{where}: quantization_config {source} has weight {bad}, expected "
                         f"{ {k: WEIGHT_SPEC[k] for k in bad} } (MXFP4: 4-bit E2M1, one E8M0 "
                         f"scale per 32){hint}")
    if weight.get("ch_axis", -1) not in _K_AXES:
        raise ValueError(f"{where}: quantization_config {source} has weight ch_axis = "
                         f"{weight.get('ch_axis')!r}: its groups of 32 run along N, not K")
    for key, what in (("input_tensors", "activations"), ("output_tensors", "outputs")):
        if config.get(key):
            raise ValueError(
                f"{where}: quantization_config {source} quantizes the {what} too "
                f"({_describe(config[key])}; Quark's 'mxfp4' or 'mxfp4_fp8' schemes): mxmoe "
                f"runs MXFP4 weights with bf16/fp16/fp32 activations ('mxfp4_weight_only')")


def check_quantization_config(qc: dict, modules: list[str], where: str) -> None:
    """Refuse a Quark config under which any of the expert Linears ``modules`` is not MXFP4
    weights alone, or whose export is not the packed one (``real_quantized``)."""
    export = qc.get("export") or {}
    weight_format = export.get("weight_format", "real_quantized")
    if weight_format != "real_quantized":
        raise ValueError(f"{where}: a Quark export with weight_format {weight_format!r} "
                         f"(float weights with their scales): mxmoe reads the packed "
                         f"'real_quantized' export")
    checked = set()
    for module in modules:
        config, source = expert_layer_config(qc, module)
        if config is None:
            raise ValueError(f"{where}: quantization_config {source} leaves {module!r} "
                             f"unquantized: mxmoe reads MXFP4 experts")
        if source not in checked:
            _check_layer_config(config, source, where)
            checked.add(source)


def _expert_modules(ckpt: SafetensorsCheckpoint, layer: int) -> list[str]:
    # Quark names a float Linear's weight and a packed one alike: ``.weight`` finds both.
    for prefix, projections in NAMINGS:
        prefix = prefix.format(i=layer)
        modules, j = [], 0
        while f"{prefix}.experts.{j}.{projections[0]}.weight" in ckpt:
            modules += [f"{prefix}.experts.{j}.{proj}" for proj in projections]
            j += 1
        if modules:
            shared = [f"{prefix}.shared_experts.{proj}" for proj in projections]
            return modules + [m for m in shared if f"{m}.weight_scale" in ckpt]
    return []


def read_quark_spec(ckpt: SafetensorsCheckpoint, layer: int) -> PerExpertMoESpec:
    """Check the quantization_config for this layer's experts, find their tensors, check every
    shape and dtype against the others and config."""
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"layer must be a non-negative int, got {layer!r}")
    qc = ckpt.config.get("quantization_config") or {}
    check_quantization_config(qc, _expert_modules(ckpt, layer), str(ckpt.path))
    return read_per_expert_spec(ckpt, layer, QUARK_TENSORS)

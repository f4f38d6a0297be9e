"""compressed-tensors MXFP4 checkpoints (llm-compressor's scheme ``MXFP4A16``, format
``mxfp4-pack-quantized``): one MoE layer of a Qwen3-MoE or Mixtral model, read lazily.

Per expert ``j`` of layer ``i`` and projection (gate, up, down), under the layer's MoE prefix:

    {prefix}.experts.{j}.{proj}.weight_packed   uint8 [N, K/2]   even element in the low nibble
    {prefix}.experts.{j}.{proj}.weight_scale    uint8 [N, K/32]  E8M0, 2**(s - 127)
    {prefix}.gate.weight                        float [E, H]     the router, not quantized

with gate/up ``[I, H]`` and down ``[H, I]``. The prefix and projection names are either
``model.layers.{i}.mlp`` with ``gate_proj``/``up_proj``/``down_proj`` (Qwen3-MoE, and what
transformers 5 calls Mixtral's) or ``model.layers.{i}.block_sparse_moe`` with ``w1``/``w3``/``w2``
(Mixtral's own names). These are the bytes `MXFP4Tensor` holds (compressed-tensors 0.19-0.20
pack ``code[2j] | code[2j+1] << 4`` and store ``127 + floor(log2 scale)``): the experts are
stacked, never requantized. w13 is ``[gate | up]`` along its rows (``activation="silu"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..activations import Activation
from ..constants import MXFP4_BLOCK_SIZE
from ..format import MXFP4Tensor
from .device import resolve_device
from .families import MoEFamily, family_of
from .files import SafetensorsCheckpoint
from .pretrained import PretrainedMoE
from .ranks import RankPart, check_top_k

__all__ = ["FORMAT", "WEIGHT_ARGS", "CTMoESpec", "check_quantization_config",
           "quantization_config", "read_ct_spec", "load_ct_moe", "read_layer"]

FORMAT = "mxfp4-pack-quantized"
#: A config group's ``weights`` in scheme MXFP4A16: 4-bit E2M1 in groups of 32, uint8 (E8M0)
#: scales. What a reader checks; a writer adds compressed-tensors' other fields.
WEIGHT_ARGS = {"num_bits": 4, "type": "float", "group_size": 32, "strategy": "group",
               "symmetric": True}
#: (MoE prefix, (gate, up, down) projection names), tried in this order.
NAMINGS = (
    ("model.layers.{i}.mlp", ("gate_proj", "up_proj", "down_proj")),
    ("model.layers.{i}.block_sparse_moe", ("w1", "w3", "w2")),
    ("model.layers.{i}.mlp", ("w1", "w3", "w2")),
    ("model.layers.{i}.block_sparse_moe", ("gate_proj", "up_proj", "down_proj")),
)
_FLOAT_DTYPES = ("BF16", "F16", "F32")
#: Scales as compressed-tensors writes them (uint8), or typed E8M0: the same bytes.
_SCALE_DTYPES = ("U8", "F8_E8M0")


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


@dataclass
class CTMoESpec:
    """One layer's tensor names and validated global sizes, from headers and config only."""

    layer: int
    prefix: str
    projections: tuple[str, str, str]  # gate, up, down
    num_experts: int  # E
    hidden: int  # H
    intermediate: int  # I
    router: str
    router_bias: str | None
    family: MoEFamily

    def name(self, expert: int, proj: int, suffix: str) -> str:
        return f"{self.prefix}.experts.{expert}.{self.projections[proj]}.{suffix}"


def _detect_naming(ckpt: SafetensorsCheckpoint, layer: int) -> tuple[str, tuple[str, str, str]]:
    for prefix, projections in NAMINGS:
        prefix = prefix.format(i=layer)
        if f"{prefix}.experts.0.{projections[0]}.weight_packed" in ckpt:
            return prefix, projections
    tried = sorted({f"{p.format(i=layer)}.experts.0.{g[0]}.weight_packed" for p, g in NAMINGS})
    dense = [f"{p.format(i=layer)}.experts.0.{g[0]}.weight" for p, g in NAMINGS]
    hint = ""
    if any(name in ckpt for name in dense):
        hint = "; its experts are not quantized here (a float .weight)"
    raise ValueError(f"layer {layer}: no compressed-tensors MXFP4 expert tensors in {ckpt.path} "
                     f"(looked for {tried}){hint}")


def read_ct_spec(ckpt: SafetensorsCheckpoint, layer: int) -> CTMoESpec:
    """Find the layer's tensors, check every shape and dtype against the others and config."""
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"layer must be a non-negative int, got {layer!r}")
    where = str(ckpt.path)
    check_quantization_config(ckpt.config.get("quantization_config") or {}, where)
    family = family_of(ckpt.config, layer, where)
    prefix, projections = _detect_naming(ckpt, layer)

    num_experts = 0
    while f"{prefix}.experts.{num_experts}.{projections[0]}.weight_packed" in ckpt:
        num_experts += 1
    if family.num_experts is not None and family.num_experts != num_experts:
        missing = f"{prefix}.experts.{num_experts}.{projections[0]}.weight_packed"
        raise ValueError(f"config.json has {family.key('experts')} = {family.num_experts} but "
                         f"layer {layer} has {num_experts} experts: tensor {missing!r} is "
                         f"missing from {ckpt.path}")

    def header(name: str, dtypes: tuple[str, ...]) -> tuple[int, ...]:
        if name not in ckpt:
            raise ValueError(f"layer {layer}: missing tensor {name!r} in {ckpt.path}")
        dtype, shape = ckpt.header(name)
        if dtype not in dtypes:
            raise ValueError(f"tensor {name!r} has dtype {dtype}, expected {' or '.join(dtypes)}")
        return shape

    first = f"{prefix}.experts.0.{projections[0]}.weight_packed"
    gate_shape = header(first, ("U8",))
    if len(gate_shape) != 2:
        raise ValueError(f"tensor {first!r} has shape {list(gate_shape)}, expected [I, H/2]")
    inter, hidden = gate_shape[0], gate_shape[1] * 2
    for what, size in (("hidden", hidden), ("intermediate", inter)):
        if size % MXFP4_BLOCK_SIZE:
            raise ValueError(f"tensor {first!r} has shape {list(gate_shape)}: {what} = {size} is "
                             f"not a multiple of {MXFP4_BLOCK_SIZE}")
        given = getattr(family, what)
        if given is not None and given != size:
            raise ValueError(f"config.json has {family.key(what)} = {given} but tensor {first!r} "
                             f"has shape {list(gate_shape)} ({what} = {size})")
    spec = CTMoESpec(layer, prefix, projections, num_experts, hidden, inter,
                     router=f"{prefix}.gate.weight", router_bias=None, family=family)
    expected = {0: (inter, hidden), 1: (inter, hidden), 2: (hidden, inter)}
    for e in range(num_experts):
        for proj, (n, k) in expected.items():
            packed, scale = spec.name(e, proj, "weight_packed"), spec.name(e, proj, "weight_scale")
            for extra, meaning in (("weight_global_scale", "a global scale: NVFP4, not MXFP4"),
                                   ("weight_zero_point", "a zero point: asymmetric, not MXFP4"),
                                   ("input_global_scale", "an activation scale: not MXFP4A16")):
                if spec.name(e, proj, extra) in ckpt:
                    raise ValueError(f"tensor {spec.name(e, proj, extra)!r} is {meaning}")
            for name, shape, dtypes in ((packed, (n, k // 2), ("U8",)),
                                        (scale, (n, k // MXFP4_BLOCK_SIZE), _SCALE_DTYPES)):
                got = header(name, dtypes)
                if got != shape:
                    raise ValueError(
                        f"tensor {name!r} has shape {list(got)}, expected {list(shape)} "
                        f"(E={num_experts}, H={hidden}, I={inter} from {first!r})")
    if f"{prefix}.gate.weight_packed" in ckpt:
        raise ValueError(f"tensor {prefix + '.gate.weight_packed'!r}: the router is quantized; "
                         f"mxmoe needs a float router (llm-compressor: ignore 're:.*mlp.gate$')")
    router_shape = header(spec.router, _FLOAT_DTYPES)
    if router_shape != (num_experts, hidden):
        raise ValueError(f"tensor {spec.router!r} has shape {list(router_shape)}, expected "
                         f"{[num_experts, hidden]}")
    if f"{prefix}.gate.bias" in ckpt:
        spec.router_bias = f"{prefix}.gate.bias"
        if header(spec.router_bias, _FLOAT_DTYPES) != (num_experts,):
            raise ValueError(f"tensor {spec.router_bias!r} has shape "
                             f"{list(ckpt.header(spec.router_bias)[1])}, expected [{num_experts}]")
    return spec


@dataclass
class CTMoEWeights:
    w13: MXFP4Tensor  # [E_local, 2 * I_local, H], rows [gate | up]
    w2: MXFP4Tensor  # [E_local, H, I_local]
    router_weight: torch.Tensor  # [E, H]
    router_bias: torch.Tensor | None  # [E]
    spec: CTMoESpec
    experts: range
    intermediate: range


def load_ct_moe(ckpt: SafetensorsCheckpoint, spec: CTMoESpec, experts: range | None = None,
                intermediate: range | None = None, *, device=None,
                dtype: torch.dtype = torch.bfloat16) -> CTMoEWeights:
    """Stack this rank's experts (``experts``, all if None) and slice of I (``intermediate``,
    along whole 32-blocks; all if None) into ``w13``/``w2``; the bytes are the file's."""
    from .gpt_oss import _check_slice

    experts = _check_slice("experts", experts, spec.num_experts)
    inter = _check_slice("intermediate", intermediate, spec.intermediate, MXFP4_BLOCK_SIZE)
    device = resolve_device(device)
    rows = slice(inter.start, inter.stop)
    packed_cols = slice(inter.start // 2, inter.stop // 2)
    scale_cols = slice(inter.start // MXFP4_BLOCK_SIZE, inter.stop // MXFP4_BLOCK_SIZE)

    def read(name, *index):
        return (ckpt.slice(name)[index] if index else ckpt.slice(name)[:]).contiguous()

    def read_bytes(name, *index):
        t = read(name, *index)
        return t if t.dtype == torch.uint8 else t.view(torch.uint8)  # typed E8M0: same bytes

    def stack(parts):
        if not parts:
            return None
        return torch.stack(parts).to(device)

    w13_blocks, w13_scales, w2_blocks, w2_scales = [], [], [], []
    for e in experts:
        w13_blocks.append(torch.cat([read_bytes(spec.name(e, p, "weight_packed"), rows)
                                     for p in (0, 1)]))
        w13_scales.append(torch.cat([read_bytes(spec.name(e, p, "weight_scale"), rows)
                                     for p in (0, 1)]))
        w2_blocks.append(read_bytes(spec.name(e, 2, "weight_packed"), slice(None), packed_cols))
        w2_scales.append(read_bytes(spec.name(e, 2, "weight_scale"), slice(None), scale_cols))
    n_local, i_local, h = len(experts), len(inter), spec.hidden
    if n_local == 0:
        w13 = MXFP4Tensor(torch.empty(0, 2 * i_local, h // 2, dtype=torch.uint8, device=device),
                          torch.empty(0, 2 * i_local, h // MXFP4_BLOCK_SIZE, dtype=torch.uint8,
                                      device=device))
        w2 = MXFP4Tensor(torch.empty(0, h, i_local // 2, dtype=torch.uint8, device=device),
                         torch.empty(0, h, i_local // MXFP4_BLOCK_SIZE, dtype=torch.uint8,
                                     device=device))
    else:
        w13 = MXFP4Tensor(stack(w13_blocks), stack(w13_scales))
        w2 = MXFP4Tensor(stack(w2_blocks), stack(w2_scales))
    router_bias = None
    if spec.router_bias is not None:
        router_bias = read(spec.router_bias).to(device).to(dtype)
    return CTMoEWeights(w13, w2, read(spec.router).to(device).to(dtype), router_bias, spec,
                        experts, inter)


def read_layer(ckpt: SafetensorsCheckpoint, spec: CTMoESpec, part: RankPart, *,
               top_k: int | None = None, activation: Activation | str | None = None,
               device: torch.device | str | None = None,
               dtype: torch.dtype = torch.bfloat16) -> PretrainedMoE:
    """This rank's ``part`` of the layer ``spec`` describes, for `MXFP4MoE.from_pretrained`:
    router and activation as the family's (``activation`` may only repeat it)."""
    family = spec.family
    if activation is not None and Activation.parse(activation) is not family.activation:
        raise ValueError(f"{ckpt.path}: a {family.name} checkpoint's experts are "
                         f"{family.activation.value} with [gate | up] rows, not "
                         f"{Activation.parse(activation).value}")
    top_k = check_top_k(top_k if top_k is not None else family.top_k, spec.num_experts,
                        source=f"{ckpt.path} has no config.json with {family.key('top_k')!r}",
                        hint=f"{family.name}'s config.json gives num_experts_per_tok")
    w = load_ct_moe(ckpt, spec, part.experts, part.intermediate, device=device, dtype=dtype)
    return PretrainedMoE(w.w13, w.w2, w.router_weight, w.router_bias, None, None, top_k=top_k,
                         activation=family.activation, renormalize=family.renormalize,
                         expert_map=part.expert_map_on(w.w13.device))

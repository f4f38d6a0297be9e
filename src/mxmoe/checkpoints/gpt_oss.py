"""Checkpoint I/O: one gpt-oss MoE layer read lazily from safetensors, whole or a rank's slice.

Two namings are recognised, per layer ``i`` (shapes with E experts, hidden H, intermediate I):

    HF transformers (prefix model.layers.{i}.mlp.)   OpenAI original (prefix block.{i}.mlp.)
    experts.gate_up_proj_blocks    mlp1_weight.blocks     uint8 [E, 2I, H/32, 16]
    experts.gate_up_proj_scales    mlp1_weight.scales     uint8 [E, 2I, H/32]
    experts.gate_up_proj_bias      mlp1_bias              float [E, 2I]
    experts.down_proj_blocks       mlp2_weight.blocks     uint8 [E, H, I/32, 16]
    experts.down_proj_scales       mlp2_weight.scales     uint8 [E, H, I/32]
    experts.down_proj_bias         mlp2_bias              float [E, H]
    router.weight / router.bias    gate.weight / gate.bias  float [E, H], [E]

The w13 rows interleave gate and up ("swigluoai"). Only the tensors of the layer are opened, and
of those only the slices asked for (``safe_open(...).get_slice``): a rank of an expert- or
tensor-parallel group reads its own experts' rows and its own slice of I, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..activations import Activation
from ..constants import BYTES_PER_BLOCK, GPT_OSS_SWIGLU_ALPHA, GPT_OSS_SWIGLU_LIMIT, MXFP4_BLOCK_SIZE
from ..distributed import w13_row_ranges
from ..format import MXFP4Tensor
from .device import resolve_device
from .files import SafetensorsCheckpoint
from .pretrained import PretrainedMoE
from .ranks import RankPart, check_top_k

__all__ = ["GptOssCheckpoint", "GptOssMoEWeights", "detect_naming", "read_spec",
           "load_gpt_oss_moe", "read_layer"]

#: role -> tensor name, per naming.
NAMINGS: dict[str, dict[str, str]] = {
    "transformers": {
        "w13_blocks": "model.layers.{i}.mlp.experts.gate_up_proj_blocks",
        "w13_scales": "model.layers.{i}.mlp.experts.gate_up_proj_scales",
        "w13_bias": "model.layers.{i}.mlp.experts.gate_up_proj_bias",
        "w2_blocks": "model.layers.{i}.mlp.experts.down_proj_blocks",
        "w2_scales": "model.layers.{i}.mlp.experts.down_proj_scales",
        "w2_bias": "model.layers.{i}.mlp.experts.down_proj_bias",
        "router_weight": "model.layers.{i}.mlp.router.weight",
        "router_bias": "model.layers.{i}.mlp.router.bias",
    },
    "openai": {
        "w13_blocks": "block.{i}.mlp.mlp1_weight.blocks",
        "w13_scales": "block.{i}.mlp.mlp1_weight.scales",
        "w13_bias": "block.{i}.mlp.mlp1_bias",
        "w2_blocks": "block.{i}.mlp.mlp2_weight.blocks",
        "w2_scales": "block.{i}.mlp.mlp2_weight.scales",
        "w2_bias": "block.{i}.mlp.mlp2_bias",
        "router_weight": "block.{i}.mlp.gate.weight",
        "router_bias": "block.{i}.mlp.gate.bias",
    },
}

#: config.json keys, per naming: experts per token, swiglu limit/alpha, and sizes to cross-check.
CONFIG_KEYS = {
    "transformers": {"top_k": "num_experts_per_tok", "limit": "swiglu_limit",
                     "alpha": "swiglu_alpha", "experts": "num_local_experts",
                     "hidden": "hidden_size", "intermediate": "intermediate_size"},
    "openai": {"top_k": "experts_per_token", "limit": "swiglu_limit", "alpha": "swiglu_alpha",
               "experts": "num_experts", "hidden": "hidden_size",
               "intermediate": "intermediate_size"},
}

_FLOAT_DTYPES = ("BF16", "F16", "F32")


def detect_naming(ckpt: SafetensorsCheckpoint, layer: int) -> str:
    """``"transformers"`` or ``"openai"``: whose names ``ckpt`` uses for ``layer``; ValueError
    saying what was looked for (and which layers it has, or that it is dense) otherwise."""
    for naming, names in NAMINGS.items():
        if names["w13_blocks"].format(i=layer) in ckpt:
            return naming
    tried = [names["w13_blocks"].format(i=layer) for names in NAMINGS.values()]
    hint = ""
    dense = f"model.layers.{layer}.mlp.experts.gate_up_proj"
    if dense in ckpt:
        hint = (f"; it holds the dense {dense!r}: convert it with `mxmoe quantize`, or build "
                f"the layer with MXFP4MoE.from_dense")
    else:
        layers = _layers_present(ckpt)
        if layers:
            hint = f"; layers with MXFP4 experts here: {layers[0]}..{layers[-1]}"
    raise ValueError(
        f"layer {layer}: no MXFP4 MoE tensors in {ckpt.path} (looked for {tried}){hint}"
    )


def _layers_present(ckpt: SafetensorsCheckpoint) -> list[int]:
    found = set()
    for names in NAMINGS.values():
        prefix, suffix = names["w13_blocks"].split("{i}")
        for name in ckpt.names():
            if name.startswith(prefix) and name.endswith(suffix):
                middle = name[len(prefix):len(name) - len(suffix)]
                if middle.isdigit():
                    found.add(int(middle))
    return sorted(found)


class GptOssCheckpoint(SafetensorsCheckpoint):
    """A safetensors checkpoint (see `SafetensorsCheckpoint`) read as gpt-oss's."""

    def detect_naming(self, layer: int) -> str:
        """``"transformers"`` or ``"openai"``: whose names this checkpoint uses for ``layer``."""
        return detect_naming(self, layer)


@dataclass
class GptOssMoESpec:
    """One layer's tensor names and validated global sizes, from headers and config only."""

    layer: int
    naming: str
    names: dict[str, str]
    num_experts: int  # E
    hidden: int  # H
    intermediate: int  # I
    top_k: int | None  # from config.json, None when absent
    alpha: float
    limit: float


@dataclass
class GptOssMoEWeights:
    """One layer's MoE weights as read: local slices of the experts, the whole router.

    ``experts`` are the global experts held (rows of ``w13``/``w2``), ``intermediate`` the slice
    of I held; ``w2_bias`` is None when not kept (tensor-parallel ranks other than 0).
    """

    w13: MXFP4Tensor  # [E_local, 2 * I_local, H]
    w2: MXFP4Tensor  # [E_local, H, I_local]
    w13_bias: torch.Tensor  # [E_local, 2 * I_local]
    w2_bias: torch.Tensor | None  # [E_local, H]
    router_weight: torch.Tensor  # [E, H]
    router_bias: torch.Tensor  # [E]
    spec: GptOssMoESpec
    experts: range
    intermediate: range
    activation: Activation


def read_spec(ckpt: SafetensorsCheckpoint, layer: int) -> GptOssMoESpec:
    """Find the layer's tensors, check every shape and dtype against the others and config.json."""
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"layer must be a non-negative int, got {layer!r}")
    naming = detect_naming(ckpt, layer)
    names = {role: pattern.format(i=layer) for role, pattern in NAMINGS[naming].items()}
    missing = [name for name in names.values() if name not in ckpt]
    if missing:
        raise ValueError(f"layer {layer} ({naming} naming): missing tensor(s) {missing} in "
                         f"{ckpt.path}")
    shapes = {}
    for role, name in names.items():
        sl = ckpt.slice(name)
        shapes[role] = tuple(sl.get_shape())
        want = ("U8",) if role.endswith(("_blocks", "_scales")) else _FLOAT_DTYPES
        if sl.get_dtype() not in want:
            raise ValueError(f"tensor {name!r} has dtype {sl.get_dtype()}, expected "
                             f"{' or '.join(want)}")

    w13_blocks = shapes["w13_blocks"]
    if len(w13_blocks) != 4 or w13_blocks[3] != BYTES_PER_BLOCK or w13_blocks[1] % 2:
        raise ValueError(f"tensor {names['w13_blocks']!r} has shape {w13_blocks}, expected "
                         f"[E, 2I, H/32, {BYTES_PER_BLOCK}] with an even 2I")
    num_experts, two_i, h_blocks, _ = w13_blocks
    inter, hidden = two_i // 2, h_blocks * MXFP4_BLOCK_SIZE
    if inter % MXFP4_BLOCK_SIZE:
        raise ValueError(f"tensor {names['w13_blocks']!r} has shape {w13_blocks}: I = {inter} "
                         f"is not a multiple of {MXFP4_BLOCK_SIZE}, so w2 cannot be MXFP4")
    i_blocks = inter // MXFP4_BLOCK_SIZE
    expected = {
        "w13_scales": (num_experts, two_i, h_blocks),
        "w13_bias": (num_experts, two_i),
        "w2_blocks": (num_experts, hidden, i_blocks, BYTES_PER_BLOCK),
        "w2_scales": (num_experts, hidden, i_blocks),
        "w2_bias": (num_experts, hidden),
        "router_weight": (num_experts, hidden),
        "router_bias": (num_experts,),
    }
    for role, shape in expected.items():
        if shapes[role] != shape:
            raise ValueError(
                f"tensor {names[role]!r} has shape {list(shapes[role])}, expected {list(shape)} "
                f"(E={num_experts}, H={hidden}, I={inter} from {names['w13_blocks']!r} "
                f"{list(w13_blocks)})"
            )

    keys = CONFIG_KEYS[naming]
    config = ckpt.config
    for what, size in (("experts", num_experts), ("hidden", hidden), ("intermediate", inter)):
        key = keys[what]
        if key in config and config[key] != size:
            raise ValueError(f"config.json has {key} = {config[key]} but tensor "
                             f"{names['w13_blocks']!r} has shape {list(w13_blocks)} ({what} = "
                             f"{size})")
    top_k = config.get(keys["top_k"])
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
        raise ValueError(f"config.json {keys['top_k']} must be an int, got {top_k!r}")
    return GptOssMoESpec(layer, naming, names, num_experts, hidden, inter, top_k,
                         alpha=float(config.get(keys["alpha"], GPT_OSS_SWIGLU_ALPHA)),
                         limit=float(config.get(keys["limit"], GPT_OSS_SWIGLU_LIMIT)))


def load_gpt_oss_moe(
    path: str | Path,
    layer: int,
    *,
    experts: range | None = None,
    intermediate: range | None = None,
    keep_w2_bias: bool = True,
    activation: Activation | str = Activation.SWIGLUOAI,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> GptOssMoEWeights:
    """Read one layer's MoE, or the slice of it one rank holds, with no process group involved.

    Args:
        path: checkpoint directory or ``.safetensors`` file (see `GptOssCheckpoint`).
        layer: the layer index ``i``.
        experts: the global experts to read (rows on dim 0 of every expert tensor); all if None.
            May be empty (a rank of an expert-parallel group larger than E).
        intermediate: the slice of I to read, along whole 32-element blocks; all if None. Reads
            the w13 rows `w13_row_ranges` gives for ``activation`` and the matching w2 columns.
        keep_w2_bias: False drops the w2 bias (tensor-parallel ranks other than 0, so that it
            is added once after the all-reduce).
        activation: the layout of the w13 rows: gpt-oss checkpoints are ``"swigluoai"``
            (interleaved gate/up); ``"silu"`` for ``[gate | up]`` halves.
        device: where the tensors go (default CPU). MXFP4 bytes move as uint8, never widened.
        dtype: of the biases and the router.

    Raises:
        ValueError: a tensor missing or of the wrong shape or dtype (naming it, the shape seen
            and the shape expected), or a slice outside the layer.
    """
    with GptOssCheckpoint(path) as ckpt:
        spec = read_spec(ckpt, layer)
        return _load(ckpt, spec, experts, intermediate, keep_w2_bias, activation, device, dtype)


def _check_slice(what: str, value: range | None, size: int, step: int = 1) -> range:
    if value is None:
        return range(0, size)
    if not isinstance(value, range) or value.step != 1:
        raise ValueError(f"{what} must be a range with step 1, got {value!r}")
    if not 0 <= value.start <= value.stop <= size:
        raise ValueError(f"{what} {value!r} is outside [0, {size})")
    if value.start % step or value.stop % step:
        raise ValueError(f"{what} {value!r} must start and stop on multiples of {step} (whole "
                         f"MXFP4 scale blocks)")
    return value


def _load(ckpt, spec, experts, intermediate, keep_w2_bias, activation, device, dtype):
    activation = Activation.parse(activation)
    experts = _check_slice("experts", experts, spec.num_experts)
    inter = _check_slice("intermediate", intermediate, spec.intermediate, MXFP4_BLOCK_SIZE)
    device = resolve_device(device)
    names = spec.names
    e = slice(experts.start, experts.stop)
    rows = [slice(r.start, r.stop) for r in w13_row_ranges(spec.intermediate, inter, activation)]
    cols = slice(inter.start // MXFP4_BLOCK_SIZE, inter.stop // MXFP4_BLOCK_SIZE)

    def read(role, *index):
        # Bytes stay uint8 (and floats stay as stored) until on the device: no widening detour.
        return ckpt.slice(names[role])[index].contiguous().to(device)

    def read_rows(role):
        parts = [read(role, e, r) for r in rows]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    w13 = MXFP4Tensor.from_gpt_oss_blocks(read_rows("w13_blocks"), read_rows("w13_scales"))
    w2 = MXFP4Tensor.from_gpt_oss_blocks(read("w2_blocks", e, slice(None), cols),
                                         read("w2_scales", e, slice(None), cols))
    return GptOssMoEWeights(
        w13=w13.contiguous(),
        w2=w2.contiguous(),
        w13_bias=read_rows("w13_bias").to(dtype),
        w2_bias=read("w2_bias", e).to(dtype) if keep_w2_bias else None,
        router_weight=read("router_weight").to(dtype),
        router_bias=read("router_bias").to(dtype),
        spec=spec,
        experts=experts,
        intermediate=inter,
        activation=activation,
    )


def read_layer(ckpt: SafetensorsCheckpoint, spec: GptOssMoESpec, part: RankPart, *,
               top_k: int | None = None, activation: Activation | str | None = None,
               device: torch.device | str | None = None,
               dtype: torch.dtype = torch.bfloat16) -> PretrainedMoE:
    """This rank's ``part`` of the layer ``spec`` describes, for `MXFP4MoE.from_pretrained`
    (``activation``: the w13 rows' layout, gpt-oss's ``"swigluoai"`` unless given)."""
    top_k = check_top_k(
        top_k if top_k is not None else spec.top_k, spec.num_experts, hint="gpt-oss uses 4",
        source=f"{ckpt.path} has no config.json with {CONFIG_KEYS[spec.naming]['top_k']!r}")
    w = _load(ckpt, spec, part.experts, part.intermediate, part.keep_w2_bias,
              activation or Activation.SWIGLUOAI, device, dtype)
    return PretrainedMoE(w.w13, w.w2, w.router_weight, w.router_bias, w.w13_bias, w.w2_bias,
                         top_k=top_k, activation=w.activation, alpha=spec.alpha,
                         limit=spec.limit, expert_map=part.expert_map_on(w.w13.device))

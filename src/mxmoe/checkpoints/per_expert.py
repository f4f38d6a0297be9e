"""MoE layers stored as one MXFP4 Linear per expert: the layout compressed-tensors and AMD Quark
both export for Qwen3-MoE and Mixtral, read lazily and stacked.

Per expert ``j`` of layer ``i`` and projection (gate, up, down), under the layer's MoE prefix:

    {prefix}.experts.{j}.{proj}.{blocks}   uint8 [N, K/2]   even element in the low nibble
    {prefix}.experts.{j}.{proj}.{scales}   uint8 [N, K/32]  E8M0, 2**(s - 127)
    {prefix}.gate.weight                   float [E, H]     the router, not quantized

with gate/up ``[I, H]`` and down ``[H, I]``; ``blocks`` and ``scales`` are the format's tensor
suffixes (compressed-tensors ``weight_packed``/``weight_scale``, Quark ``weight``/
``weight_scale``). The prefix and projection names are either ``model.layers.{i}.mlp`` with
``gate_proj``/``up_proj``/``down_proj`` (Qwen3-MoE, and what transformers 5 calls Mixtral's) or
``model.layers.{i}.block_sparse_moe`` with ``w1``/``w3``/``w2`` (Mixtral's own names). These are
the bytes `MXFP4Tensor` holds: the experts are stacked, never requantized. w13 is ``[gate | up]``
along its rows (``activation="silu"``).

DeepSeek-V3 (``model.layers.{i}.mlp``, ``gate_proj``/``up_proj``/``down_proj``) adds

    {prefix}.gate.e_score_correction_bias          float [E]        the router's choice bias
    {prefix}.shared_experts.{proj}.{blocks,scales}  as an expert's, with
                                                    I_s = moe_intermediate_size * n_shared_experts
    {prefix}.shared_experts.{proj}.weight          float, where the shared experts stay unquantized

MXFP4 shared experts become an `MXFP4GatedMLP` of the file's bytes, float ones a `GatedMLP` in the
``dtype`` asked for; both are read whole on every rank. The router and its correction bias are
read in float32 whatever ``dtype`` says, as transformers keeps them
(``_keep_in_fp32_modules_strict``): the sigmoid scores choose the experts, and bf16 would
change the choice.
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

__all__ = ["NAMINGS", "PerExpertFormat", "PerExpertMoESpec", "PerExpertMoEWeights",
           "read_per_expert_spec", "load_per_expert_moe", "read_layer"]

#: (MoE prefix, (gate, up, down) projection names), tried in this order.
NAMINGS = (
    ("model.layers.{i}.mlp", ("gate_proj", "up_proj", "down_proj")),
    ("model.layers.{i}.block_sparse_moe", ("w1", "w3", "w2")),
    ("model.layers.{i}.mlp", ("w1", "w3", "w2")),
    ("model.layers.{i}.block_sparse_moe", ("gate_proj", "up_proj", "down_proj")),
)
_FLOAT_DTYPES = ("BF16", "F16", "F32")
#: Scales as both formats write them (uint8), or typed E8M0: the same bytes.
_SCALE_DTYPES = ("U8", "F8_E8M0")


@dataclass(frozen=True)
class PerExpertFormat:
    """What tells one per-expert format's tensors apart, for the reader and its messages."""

    name: str  # in messages: "compressed-tensors", "Quark"
    blocks: str  # suffix of the packed E2M1 codes
    scales: str  # suffix of the E8M0 scales
    #: (suffix, what it means) of tensors beside an expert's that make it not MXFP4 weights.
    foreign: tuple[tuple[str, str], ...] = ()
    #: How to keep the router in float with the tool that writes the format.
    router_hint: str = ""

    @property
    def marker(self) -> str:
        """The suffix whose presence makes an expert quantized: its blocks, unless they are
        named ``weight`` like a float Linear's (Quark), then its scales."""
        return self.scales if self.blocks == "weight" else self.blocks


@dataclass
class PerExpertMoESpec:
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
    format: PerExpertFormat
    #: DeepSeek-V3: the router's e_score_correction_bias.
    correction_bias: str | None = None
    #: DeepSeek-V3: the shared experts' module prefix, and whether they are MXFP4 (else float).
    shared: str | None = None
    shared_quantized: bool = False

    def shared_name(self, proj: int, suffix: str) -> str:
        return f"{self.shared}.{self.projections[proj]}.{suffix}"

    def name(self, expert: int, proj: int, suffix: str) -> str:
        return f"{self.prefix}.experts.{expert}.{self.projections[proj]}.{suffix}"

    def blocks(self, expert: int, proj: int) -> str:
        return self.name(expert, proj, self.format.blocks)

    def scales(self, expert: int, proj: int) -> str:
        return self.name(expert, proj, self.format.scales)


def _find_naming(ckpt: SafetensorsCheckpoint, layer: int,
                 fmt: PerExpertFormat) -> tuple[str, tuple[str, str, str]]:
    for prefix, projections in NAMINGS:
        prefix = prefix.format(i=layer)
        if f"{prefix}.experts.0.{projections[0]}.{fmt.marker}" in ckpt:
            return prefix, projections
    tried = sorted({f"{p.format(i=layer)}.experts.0.{g[0]}.{fmt.marker}" for p, g in NAMINGS})
    dense = [f"{p.format(i=layer)}.experts.0.{g[0]}.weight" for p, g in NAMINGS]
    hint = ""
    if any(name in ckpt for name in dense):
        hint = "; its experts are not quantized here (a float .weight)"
    raise ValueError(f"layer {layer}: no {fmt.name} MXFP4 expert tensors in {ckpt.path} "
                     f"(looked for {tried}){hint}")


def read_per_expert_spec(ckpt: SafetensorsCheckpoint, layer: int,
                         fmt: PerExpertFormat) -> PerExpertMoESpec:
    """Find the layer's tensors, check every shape and dtype against the others and config
    (the format's quantization_config is the caller's to check)."""
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"layer must be a non-negative int, got {layer!r}")
    family = family_of(ckpt.config, layer, str(ckpt.path))
    prefix, projections = _find_naming(ckpt, layer, fmt)

    num_experts = 0
    while f"{prefix}.experts.{num_experts}.{projections[0]}.{fmt.marker}" in ckpt:
        num_experts += 1
    if family.num_experts is not None and family.num_experts != num_experts:
        missing = f"{prefix}.experts.{num_experts}.{projections[0]}.{fmt.marker}"
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

    first = f"{prefix}.experts.0.{projections[0]}.{fmt.blocks}"
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
    spec = PerExpertMoESpec(layer, prefix, projections, num_experts, hidden, inter,
                            router=f"{prefix}.gate.weight", router_bias=None, family=family,
                            format=fmt)
    expected = {0: (inter, hidden), 1: (inter, hidden), 2: (hidden, inter)}
    for e in range(num_experts):
        for proj, (n, k) in expected.items():
            for extra, meaning in fmt.foreign:
                if spec.name(e, proj, extra) in ckpt:
                    raise ValueError(f"tensor {spec.name(e, proj, extra)!r} is {meaning}")
            for name, shape, dtypes in ((spec.blocks(e, proj), (n, k // 2), ("U8",)),
                                        (spec.scales(e, proj), (n, k // MXFP4_BLOCK_SIZE),
                                         _SCALE_DTYPES)):
                got = header(name, dtypes)
                if got != shape:
                    raise ValueError(
                        f"tensor {name!r} has shape {list(got)}, expected {list(shape)} "
                        f"(E={num_experts}, H={hidden}, I={inter} from {first!r})")
    quantized_router = f"{prefix}.gate.{fmt.marker}"
    if quantized_router in ckpt:
        raise ValueError(f"tensor {quantized_router!r}: the router is quantized; mxmoe needs a "
                         f"float router{fmt.router_hint}")
    router_shape = header(spec.router, _FLOAT_DTYPES)
    if router_shape != (num_experts, hidden):
        raise ValueError(f"tensor {spec.router!r} has shape {list(router_shape)}, expected "
                         f"{[num_experts, hidden]}")
    if f"{prefix}.gate.bias" in ckpt:
        spec.router_bias = f"{prefix}.gate.bias"
        if header(spec.router_bias, _FLOAT_DTYPES) != (num_experts,):
            raise ValueError(f"tensor {spec.router_bias!r} has shape "
                             f"{list(ckpt.header(spec.router_bias)[1])}, expected [{num_experts}]")
    if family.routing is not None:
        spec.correction_bias = f"{prefix}.gate.e_score_correction_bias"
        if header(spec.correction_bias, _FLOAT_DTYPES) != (num_experts,):
            raise ValueError(f"tensor {spec.correction_bias!r} has shape "
                             f"{list(ckpt.header(spec.correction_bias)[1])}, expected "
                             f"[{num_experts}]")
    if family.shared_experts:
        _check_shared(ckpt, spec, header)
    return spec


def _check_shared(ckpt: SafetensorsCheckpoint, spec: PerExpertMoESpec, header) -> None:
    """Find the shared experts' tensors (MXFP4 or float) and check them against H and the
    config's width; fills ``spec.shared`` and ``spec.shared_quantized``."""
    fmt, hidden = spec.format, spec.hidden
    inter = spec.intermediate * spec.family.shared_experts
    spec.shared = f"{spec.prefix}.shared_experts"
    marked = [spec.shared_name(p, fmt.marker) in ckpt for p in range(3)]
    if any(marked) and not all(marked):
        odd = spec.shared_name(marked.index(not marked[0]), fmt.marker)
        raise ValueError(f"layer {spec.layer}: the shared experts are partly quantized (tensor "
                         f"{odd!r} differs from {spec.shared_name(0, fmt.marker)!r}); mxmoe "
                         f"reads all three projections MXFP4 or all float")
    spec.shared_quantized = all(marked)
    expected = {0: (inter, hidden), 1: (inter, hidden), 2: (hidden, inter)}
    why = (f"moe_intermediate_size {spec.intermediate} * config.json n_shared_experts "
           f"{spec.family.shared_experts} = {inter}, H = {hidden}")
    for proj, (n, k) in expected.items():
        if spec.shared_quantized:
            for extra, meaning in fmt.foreign:
                if spec.shared_name(proj, extra) in ckpt:
                    raise ValueError(f"tensor {spec.shared_name(proj, extra)!r} is {meaning}")
            if n % MXFP4_BLOCK_SIZE or k % MXFP4_BLOCK_SIZE:
                raise ValueError(f"layer {spec.layer}: shared experts of width {inter}, not a "
                                 f"multiple of {MXFP4_BLOCK_SIZE}, cannot be MXFP4")
            wanted = ((spec.shared_name(proj, fmt.blocks), (n, k // 2), ("U8",)),
                      (spec.shared_name(proj, fmt.scales), (n, k // MXFP4_BLOCK_SIZE),
                       _SCALE_DTYPES))
        else:
            wanted = ((spec.shared_name(proj, "weight"), (n, k), _FLOAT_DTYPES),)
        for name, shape, dtypes in wanted:
            got = header(name, dtypes)
            if got != shape:
                raise ValueError(f"tensor {name!r} has shape {list(got)}, expected "
                                 f"{list(shape)} ({why})")


@dataclass
class PerExpertMoEWeights:
    w13: MXFP4Tensor  # [E_local, 2 * I_local, H], rows [gate | up]
    w2: MXFP4Tensor  # [E_local, H, I_local]
    router_weight: torch.Tensor  # [E, H]
    router_bias: torch.Tensor | None  # [E]
    spec: PerExpertMoESpec
    experts: range
    intermediate: range
    correction_bias: torch.Tensor | None = None  # [E] float32 (DeepSeek-V3)
    shared_experts: torch.nn.Module | None = None  # whole, on every rank (DeepSeek-V3)


def load_per_expert_moe(ckpt: SafetensorsCheckpoint, spec: PerExpertMoESpec,
                        experts: range | None = None, intermediate: range | None = None, *,
                        device=None, dtype: torch.dtype = torch.bfloat16) -> PerExpertMoEWeights:
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

    w13_blocks, w13_scales, w2_blocks, w2_scales = [], [], [], []
    for e in experts:
        w13_blocks.append(torch.cat([read_bytes(spec.blocks(e, p), rows) for p in (0, 1)]))
        w13_scales.append(torch.cat([read_bytes(spec.scales(e, p), rows) for p in (0, 1)]))
        w2_blocks.append(read_bytes(spec.blocks(e, 2), slice(None), packed_cols))
        w2_scales.append(read_bytes(spec.scales(e, 2), slice(None), scale_cols))
    n_local, i_local, h = len(experts), len(inter), spec.hidden
    if n_local == 0:
        w13 = MXFP4Tensor(torch.empty(0, 2 * i_local, h // 2, dtype=torch.uint8, device=device),
                          torch.empty(0, 2 * i_local, h // MXFP4_BLOCK_SIZE, dtype=torch.uint8,
                                      device=device))
        w2 = MXFP4Tensor(torch.empty(0, h, i_local // 2, dtype=torch.uint8, device=device),
                         torch.empty(0, h, i_local // MXFP4_BLOCK_SIZE, dtype=torch.uint8,
                                     device=device))
    else:
        w13 = MXFP4Tensor(torch.stack(w13_blocks).to(device), torch.stack(w13_scales).to(device))
        w2 = MXFP4Tensor(torch.stack(w2_blocks).to(device), torch.stack(w2_scales).to(device))
    # DeepSeek-V3's router stays float32 (see the module's docstring).
    router_dtype = torch.float32 if spec.family.routing is not None else dtype
    router_bias = None
    if spec.router_bias is not None:
        router_bias = read(spec.router_bias).to(device).to(router_dtype)
    correction_bias = None
    if spec.correction_bias is not None:
        correction_bias = read(spec.correction_bias).to(device).to(torch.float32)
    shared = None
    if spec.shared is not None:
        shared = _load_shared(spec, read, read_bytes, device, dtype)
    return PerExpertMoEWeights(w13, w2, read(spec.router).to(device).to(router_dtype),
                               router_bias, spec, experts, inter, correction_bias, shared)


def _load_shared(spec: PerExpertMoESpec, read, read_bytes, device, dtype) -> torch.nn.Module:
    from ..layer import GatedMLP, MXFP4GatedMLP

    if not spec.shared_quantized:
        return GatedMLP(*(read(spec.shared_name(p, "weight")).to(device).to(dtype)
                          for p in range(3)))
    fmt = spec.format
    blocks = [read_bytes(spec.shared_name(p, fmt.blocks)) for p in range(3)]
    scales = [read_bytes(spec.shared_name(p, fmt.scales)) for p in range(3)]
    w13 = MXFP4Tensor(torch.cat(blocks[:2])[None].to(device),
                      torch.cat(scales[:2])[None].to(device))
    w2 = MXFP4Tensor(blocks[2][None].to(device), scales[2][None].to(device))
    return MXFP4GatedMLP(w13, w2, activation=Activation.SILU)


def read_layer(ckpt: SafetensorsCheckpoint, spec: PerExpertMoESpec, part: RankPart, *,
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
    w = load_per_expert_moe(ckpt, spec, part.experts, part.intermediate, device=device,
                            dtype=dtype)
    return PretrainedMoE(w.w13, w.w2, w.router_weight, w.router_bias, None, None, top_k=top_k,
                         activation=family.activation, renormalize=family.renormalize,
                         expert_map=part.expert_map_on(w.w13.device), routing=family.routing,
                         router_correction_bias=w.correction_bias,
                         shared_experts=w.shared_experts)

"""Run a Hugging Face transformers MoE model on mxmoe: ``use_mxmoe(model)``, for gpt-oss,
Qwen3-MoE, Mixtral and DeepSeek-V3.

Qwen3-MoE and Mixtral (`Qwen3MoeSparseMoeBlock`, `MixtralSparseMoeBlock`) become a
`SparseMXFP4MoE`: their experts ``gate_up_proj [E, 2I, H]`` (rows ``[gate | up]``) and
``down_proj [E, H, I]`` are mxmoe's ``w13``/``w2`` as they are (``activation="silu"``),
quantized losslessly when transformers dequantized an MXFP4 checkpoint (compressed-tensors
``dequantize=True``, or its default, which in transformers 5 dequantizes the 3D experts too);
experts held as per-expert Linears (llm-compressor's linearized ``experts.{j}.gate_proj`` ...)
are stacked, their ``weight_packed``/``weight_scale`` bytes taken as they are when compressed.
The router keeps its weight and its rule (Mixtral renormalises the top-k, Qwen3-MoE when
``norm_topk_prob``); the block returns a plain tensor, as transformers 5's does.

DeepSeek-V3 (`DeepseekV3MoE`) becomes a `DeepseekV3MXFP4MoE`: its experts as Qwen3-MoE's, its
router's float32 weight, ``e_score_correction_bias`` and group settings driving
`mxmoe.router.route_grouped_sigmoid`, and its own ``shared_experts`` module kept as it is (float
Linears, or compressed-tensors' compressed ones) and added to the routed output. Its dense
layers (`DeepseekV3MLP`, below ``first_k_dense_replace``) stay as they are; the block returns a
plain tensor, as transformers' does.

gpt-oss:

`use_mxmoe` replaces the MoE block (``mlp``) of every gpt-oss decoder layer with a
`GptOssMXFP4MoE` (an `MXFP4MoE`) built from that block's own weights:

- dense experts (`GptOssExperts`: bf16/fp32 ``gate_up_proj [E, H, 2I]`` whose columns interleave
  gate and up, ``down_proj [E, I, H]``) are transposed to mxmoe's ``w13 [E, 2I, H]`` and
  ``w2 [E, H, I]`` and quantized with `quantize_mxfp4` (OCP rule). A model loaded from an MXFP4
  checkpoint with ``Mxfp4Config(dequantize=True)`` requantizes losslessly: every dequantized
  weight is MXFP4-representable;
- MXFP4 experts (`Mxfp4GptOssExperts`, the model loaded without dequantizing) are taken as they
  are: the ``gate_up_proj_blocks``/``_scales`` tensors where they exist, or the blocks and scales
  that transformers swizzled into OpenAI triton_kernels tensors, un-swizzled the way transformers
  itself does to save them (``Mxfp4ReverseDeserialize``).

The router keeps its weights (a Linear with bias, top-k, softmax over the k logits). The new
block returns what the replaced one returned: ``(hidden [B, S, H], router_scores [B*S, k])`` for
`GptOssMLP`, ``(hidden, router_logits [B*S, E])`` for `Mxfp4GptOssMLP`; the decoder layer uses
the first. Checked against transformers 5.24's gpt-oss modules; any other structure raises.

The expert weights of the patched model are frozen MXFP4 buffers (gradients still reach the
hidden states, the router and the biases, slowly: see `mxmoe.ops`), and its state dict holds
mxmoe's buffers (``mlp.w13_blocks`` ...), not a transformers checkpoint: do not
``save_pretrained`` it. The router is kept as a `GptOssTopKRouter` subclass so that
``output_router_logits`` still records its logits.
"""

from __future__ import annotations

import torch
from torch import nn

from ..constants import BYTES_PER_BLOCK, MXFP4_BLOCK_SIZE
from ..format import MXFP4Tensor, quantize_mxfp4
from ..layer import MXFP4GatedMLP, MXFP4MoE
from ..routing import GroupedSigmoidRouting
from ..validation import check_grouped_routing

try:
    import transformers
    from transformers.models.gpt_oss import modeling_gpt_oss
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "mxmoe.integrations.transformers needs transformers with gpt-oss (>= 4.55): "
        "pip install 'mxmoe[transformers]'"
    ) from exc

__all__ = ["GptOssMXFP4MoE", "SparseMXFP4MoE", "DeepseekV3MXFP4MoE", "use_mxmoe"]

#: The first transformers release with gpt-oss.
MIN_TRANSFORMERS_VERSION = (4, 55)


def _mxfp4_classes() -> tuple[type | None, type | None]:
    """(Mxfp4GptOssMLP, Mxfp4GptOssExperts) of transformers' MXFP4 integration, if it has them."""
    try:
        from transformers.integrations import mxfp4
    except ImportError:
        return None, None
    return getattr(mxfp4, "Mxfp4GptOssMLP", None), getattr(mxfp4, "Mxfp4GptOssExperts", None)


class _RouterLogits(modeling_gpt_oss.GptOssTopKRouter):
    """The router Linear (with bias), typed as `GptOssTopKRouter` so that transformers records
    its output for ``output_router_logits``. Returns the logits only; mxmoe does the top-k."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, top_k: int):
        nn.Module.__init__(self)  # GptOssTopKRouter's own __init__ wants a config
        self.top_k = top_k
        self.num_experts, self.hidden_dim = weight.shape
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(hidden_states, self.weight, self.bias)


class GptOssMXFP4MoE(MXFP4MoE):
    """`MXFP4MoE` with the return contract of the gpt-oss block it replaced.

    ``forward(hidden [B, S, H]) -> (hidden [B, S, H], second)`` where ``second`` is the router
    scores ``[B*S, k]`` (``second_output="router_scores"``, as `GptOssMLP`) or the router
    logits ``[B*S, E]`` (``"router_logits"``, as `Mxfp4GptOssMLP`).
    """

    SECOND_OUTPUTS = ("router_scores", "router_logits")

    def __init__(self, *args, second_output: str = "router_scores", **kwargs):
        super().__init__(*args, **kwargs)
        self.router = _RouterLogits(self.router.weight.detach(), self.router.bias.detach(),
                                    self.top_k)
        if second_output not in self.SECOND_OUTPUTS:
            raise ValueError(
                f"second_output must be one of {self.SECOND_OUTPUTS}, got {second_output!r}"
            )
        self.second_output = second_output

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, logits, topk_weights = self.forward_with_routing(hidden_states)
        if self.second_output == "router_logits":
            return out, logits
        return out, topk_weights.to(logits.dtype)


def _version_tuple(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _check_tensor(where: str, name: str, t, shape: tuple, *, floating: bool | None) -> None:
    """Raise naming ``where.name`` unless ``t`` is a loaded tensor of ``shape`` whose dtype is
    floating (``floating=True``) or uint8 (``False``)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{where}.{name}: expected a tensor {shape}, got {type(t).__name__}")
    if t.is_meta:
        raise ValueError(
            f"{where}.{name} is on the meta device (not loaded, or offloaded by a device_map): "
            f"load the model's weights onto a device before use_mxmoe"
        )
    if tuple(t.shape) != shape:
        raise ValueError(f"{where}.{name}: expected shape {shape}, got {tuple(t.shape)}")
    if floating is True and not t.is_floating_point():
        raise ValueError(f"{where}.{name}: expected a floating tensor, got {t.dtype}")
    if floating is False and t.dtype != torch.uint8:
        raise ValueError(f"{where}.{name}: expected uint8 MXFP4 data, got {t.dtype}")


def _quantize_experts(w: torch.Tensor) -> MXFP4Tensor:
    """``[E, N, K]`` float -> MXFP4, one expert at a time (bounds the float32 temporaries)."""
    parts = [quantize_mxfp4(w[e]) for e in range(w.shape[0])]
    return MXFP4Tensor(torch.stack([p.blocks for p in parts]),
                       torch.stack([p.scales for p in parts]))


def _unswizzle(t):
    """The plain strided tensor behind an OpenAI triton_kernels tensor (its storage's layout
    undone), as transformers' ``Mxfp4ReverseDeserialize`` does it."""
    return t.storage.layout.unswizzle_data(t.storage.data)


def _is_triton_kernels_tensor(t) -> bool:
    storage = getattr(t, "storage", None)
    layout = getattr(storage, "layout", None)
    return callable(getattr(layout, "unswizzle_data", None)) and hasattr(storage, "data")


def _mxfp4_expert_weight(where: str, experts, proj: str, n: int, k: int) -> MXFP4Tensor:
    """``[E, n, k]`` MXFP4 weight ``proj`` of `Mxfp4GptOssExperts`, without dequantizing."""
    num_experts = experts.num_experts
    blocks = getattr(experts, f"{proj}_blocks", None)
    scales = getattr(experts, f"{proj}_scales", None)
    if all(isinstance(t, torch.Tensor) and not t.is_meta for t in (blocks, scales)):
        # Checkpoint layout: the parameters of transformers < 5 before (or instead of) swizzling.
        _check_tensor(where, f"{proj}_blocks", blocks,
                      (num_experts, n, k // MXFP4_BLOCK_SIZE, BYTES_PER_BLOCK), floating=False)
        _check_tensor(where, f"{proj}_scales", scales,
                      (num_experts, n, k // MXFP4_BLOCK_SIZE), floating=False)
        return MXFP4Tensor.from_gpt_oss_blocks(blocks.detach(), scales.detach())
    weight = getattr(experts, proj, None)
    config = getattr(experts, f"{proj}_precision_config", None)
    weight_scale = getattr(config, "weight_scale", None)
    if _is_triton_kernels_tensor(weight) and _is_triton_kernels_tensor(weight_scale):
        # Swizzled for matmul_ogs from [E, K/2, N] and [E, K/32, N]: un-swizzle, transpose back.
        blocks = _unswizzle(weight).transpose(-1, -2)
        scales = _unswizzle(weight_scale).transpose(-1, -2)
        _check_tensor(where, f"{proj} (un-swizzled blocks)", blocks,
                      (num_experts, n, k // 2), floating=False)
        _check_tensor(where, f"{proj}_precision_config.weight_scale (un-swizzled)", scales,
                      (num_experts, n, k // MXFP4_BLOCK_SIZE), floating=False)
        return MXFP4Tensor(blocks.contiguous(), scales.contiguous())
    raise ValueError(
        f"{where}: Mxfp4GptOssExperts without recognisable MXFP4 data for {proj}: expected "
        f"{proj}_blocks/{proj}_scales tensors, or {proj} and {proj}_precision_config.weight_scale "
        f"as triton_kernels tensors (storage.layout.unswizzle_data); got {proj} of type "
        f"{type(weight).__name__} (weights not loaded yet?)"
    )


def _replacement_for(where: str, mlp, backend: str):
    """A zero-argument function that builds ``mlp``'s replacement; raises now if ``mlp`` is not
    a recognised gpt-oss MoE block (so nothing is replaced unless every block is recognised)."""
    mxfp4_mlp_cls, mxfp4_experts_cls = _mxfp4_classes()
    known_mlps = tuple(c for c in (modeling_gpt_oss.GptOssMLP, mxfp4_mlp_cls) if c is not None)
    if not isinstance(mlp, known_mlps):
        raise ValueError(
            f"{where}: expected a gpt-oss MoE block ({', '.join(c.__name__ for c in known_mlps)} "
            f"with .router and .experts), got {type(mlp).__name__}"
        )
    router, experts = getattr(mlp, "router", None), getattr(mlp, "experts", None)
    if not isinstance(router, modeling_gpt_oss.GptOssTopKRouter):
        raise ValueError(f"{where}.router: expected GptOssTopKRouter, got {type(router).__name__}")
    dense = isinstance(experts, modeling_gpt_oss.GptOssExperts)
    packed = mxfp4_experts_cls is not None and isinstance(experts, mxfp4_experts_cls)
    if not (dense or packed):
        raise ValueError(
            f"{where}.experts: expected GptOssExperts or Mxfp4GptOssExperts, got "
            f"{type(experts).__name__}"
        )
    for owner, names in ((router, ("top_k", "num_experts", "weight", "bias")),
                         (experts, ("num_experts", "hidden_size", "intermediate_size", "alpha",
                                    "limit", "gate_up_proj_bias", "down_proj_bias"))):
        missing = [n for n in names if not hasattr(owner, n)]
        if missing:
            raise ValueError(
                f"{where}: {type(owner).__name__} lacks {missing}: not the gpt-oss structure "
                f"this version of mxmoe knows (transformers {transformers.__version__})"
            )
    num_experts, hidden, inter = experts.num_experts, experts.hidden_size, experts.intermediate_size
    if router.num_experts != num_experts:
        raise ValueError(
            f"{where}: router has {router.num_experts} experts, experts have {num_experts}"
        )
    for name, size in (("hidden_size", hidden), ("intermediate_size", inter)):
        if size % MXFP4_BLOCK_SIZE != 0:
            raise ValueError(
                f"{where}: {name} = {size} is not a multiple of {MXFP4_BLOCK_SIZE}, the MXFP4 "
                f"block: mxmoe cannot hold these experts"
            )
    _check_tensor(f"{where}.router", "weight", router.weight, (num_experts, hidden), floating=True)
    _check_tensor(f"{where}.router", "bias", router.bias, (num_experts,), floating=True)
    _check_tensor(f"{where}.experts", "gate_up_proj_bias", experts.gate_up_proj_bias,
                  (num_experts, 2 * inter), floating=True)
    _check_tensor(f"{where}.experts", "down_proj_bias", experts.down_proj_bias,
                  (num_experts, hidden), floating=True)
    if dense:
        _check_tensor(f"{where}.experts", "gate_up_proj", experts.gate_up_proj,
                      (num_experts, hidden, 2 * inter), floating=True)
        _check_tensor(f"{where}.experts", "down_proj", experts.down_proj,
                      (num_experts, inter, hidden), floating=True)
    else:
        # Fail now, before any block is replaced, if the MXFP4 data is not recognisable.
        _mxfp4_expert_weight(f"{where}.experts", experts, "gate_up_proj", 2 * inter, hidden)
        _mxfp4_expert_weight(f"{where}.experts", experts, "down_proj", hidden, inter)

    def build() -> GptOssMXFP4MoE:
        with torch.no_grad():
            if dense:
                # transformers multiplies x @ W; mxmoe stores W^T, rows along the output.
                w13 = _quantize_experts(experts.gate_up_proj.transpose(1, 2))  # [E, 2I, H]
                w2 = _quantize_experts(experts.down_proj.transpose(1, 2))  # [E, H, I]
            else:
                w13 = _mxfp4_expert_weight(where, experts, "gate_up_proj", 2 * inter, hidden)
                w2 = _mxfp4_expert_weight(where, experts, "down_proj", hidden, inter)
            return GptOssMXFP4MoE(
                w13,
                w2,
                router.weight.detach(),
                router.bias.detach(),
                experts.gate_up_proj_bias.detach().clone(),
                experts.down_proj_bias.detach().clone(),
                top_k=int(router.top_k),
                activation="swigluoai",
                alpha=float(experts.alpha),
                limit=float(experts.limit),
                renormalize=True,  # softmax over the top-k logits
                backend=backend,
                layout="auto",
                second_output="router_scores" if isinstance(
                    mlp, modeling_gpt_oss.GptOssMLP) else "router_logits",
            )

    return build


def _silu_families() -> list[tuple[str, type, type, type, type, type]]:
    """(family, pretrained base, decoder layer, sparse block, router, experts) of the silu MoE
    families this transformers has."""
    found = []
    for family, module_name, prefix in (("qwen3_moe", "qwen3_moe", "Qwen3Moe"),
                                        ("mixtral", "mixtral", "Mixtral")):
        try:
            module = __import__(f"transformers.models.{module_name}.modeling_{module_name}",
                                fromlist=["_"])
        except ImportError:
            continue
        classes = [getattr(module, f"{prefix}{suffix}", None) for suffix in (
            "PreTrainedModel", "DecoderLayer", "SparseMoeBlock", "TopKRouter", "Experts")]
        if all(c is not None for c in classes):
            found.append((family, *classes))
    return found


class SparseMXFP4MoE(MXFP4MoE):
    """`MXFP4MoE` in place of a Qwen3-MoE or Mixtral sparse block: ``forward(hidden [B, S, H])
    -> hidden [B, S, H]``, a plain tensor as the replaced block returned. Its router is typed
    as the family's router class, so that ``output_router_logits`` still records it."""

    def __init__(self, *args, router_class: type, **kwargs):
        super().__init__(*args, **kwargs)
        router = _router_logits_class(router_class)(self.router.weight.detach(), self.top_k)
        self.router = router


_ROUTER_CLASSES: dict[type, type] = {}


def _router_logits_class(base: type) -> type:
    """A subclass of ``base`` (a transformers TopKRouter) holding only the Linear: returns the
    logits; mxmoe does the softmax and top-k."""
    if base not in _ROUTER_CLASSES:

        def __init__(self, weight: torch.Tensor, top_k: int):
            nn.Module.__init__(self)  # the router's own __init__ wants a config
            self.top_k = top_k
            self.num_experts, self.hidden_dim = weight.shape
            self.weight = nn.Parameter(weight)

        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return nn.functional.linear(hidden_states, self.weight)

        _ROUTER_CLASSES[base] = type(f"{base.__name__}Logits", (base,),
                                     {"__init__": __init__, "forward": forward})
    return _ROUTER_CLASSES[base]


#: Per-expert projection names (gate, up, down) of linearized experts.
_LINEAR_EXPERT_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


def _linear_weight(where: str, linear, n: int, k: int) -> MXFP4Tensor:
    """``[n, k]`` MXFP4 of one per-expert Linear: its compressed-tensors bytes
    (``weight_packed``/``weight_scale``) as they are, else its float ``weight`` quantized."""
    packed = getattr(linear, "weight_packed", None)
    if isinstance(packed, torch.Tensor):
        scale = getattr(linear, "weight_scale", None)
        if getattr(linear, "weight_global_scale", None) is not None:
            raise ValueError(f"{where}: has weight_global_scale (NVFP4), not MXFP4")
        _check_tensor(where, "weight_packed", packed, (n, k // 2), floating=False)
        _check_tensor(where, "weight_scale", scale, (n, k // MXFP4_BLOCK_SIZE), floating=False)
        return MXFP4Tensor(packed.detach(), scale.detach())
    weight = getattr(linear, "weight", None)
    _check_tensor(where, "weight", weight, (n, k), floating=True)
    return quantize_mxfp4(weight.detach())


def _silu_expert_weights(where: str, experts, experts_class, num_experts: int, hidden: int,
                         inter: int):
    """A zero-argument function giving ``(w13, w2)`` of a silu block's experts; raises now
    when they are not recognisable."""
    if isinstance(experts, experts_class):
        _check_tensor(where, "gate_up_proj", experts.gate_up_proj,
                      (num_experts, 2 * inter, hidden), floating=True)
        _check_tensor(where, "down_proj", experts.down_proj, (num_experts, hidden, inter),
                      floating=True)
        # Already mxmoe's orientation: w13 [E, 2I, H] with rows [gate | up], w2 [E, H, I].
        return lambda: (_quantize_experts(experts.gate_up_proj.detach()),
                        _quantize_experts(experts.down_proj.detach()))
    if isinstance(experts, nn.ModuleList) and len(experts) == num_experts:
        for names in _LINEAR_EXPERT_NAMES:
            if all(hasattr(experts[0], n) for n in names):
                break
        else:
            raise ValueError(f"{where}.0: expected per-expert Linears named "
                             f"{' / '.join('/'.join(n) for n in _LINEAR_EXPERT_NAMES)}")
        gate, up, down = names
        shapes = {gate: (inter, hidden), up: (inter, hidden), down: (hidden, inter)}

        def weights(check_only: bool = False):
            parts = {n: [] for n in names}
            for j, expert in enumerate(experts):
                for n in names:
                    parts[n].append(_linear_weight(f"{where}.{j}.{n}", getattr(expert, n, None),
                                                   *shapes[n]))
            if check_only:
                return None
            w13 = MXFP4Tensor(
                torch.stack([torch.cat([g.blocks, u.blocks]) for g, u in
                             zip(parts[gate], parts[up])]),
                torch.stack([torch.cat([g.scales, u.scales]) for g, u in
                             zip(parts[gate], parts[up])]))
            w2 = MXFP4Tensor(torch.stack([d.blocks for d in parts[down]]),
                             torch.stack([d.scales for d in parts[down]]))
            return w13, w2

        if not any(isinstance(getattr(getattr(experts[0], n), "weight_packed", None),
                              torch.Tensor) for n in names):
            weights(check_only=True)  # float weights: check the shapes now
        return weights
    raise ValueError(
        f"{where}: expected {experts_class.__name__} (3D gate_up_proj/down_proj) or a "
        f"ModuleList of {num_experts} per-expert Linears, got {type(experts).__name__}"
    )


def _experts_intermediate_size(experts, experts_class, down_names) -> int:
    """I of a block's experts before their weights are read: the fused class's ``down_proj``
    [E, H, I], else the first expert's down Linear (named one of ``down_names``; compressed
    bytes hold two codes each), 0 for anything else (the block-size check then refuses it).
    One rule for every family the integration patches, so that they agree on what I is."""
    if isinstance(experts, experts_class):
        return experts.down_proj.shape[-1]
    if isinstance(experts, nn.ModuleList) and len(experts):
        down = next((getattr(experts[0], n) for n in down_names if hasattr(experts[0], n)),
                    None)
        packed = getattr(down, "weight_packed", None)
        return (packed.shape[-1] * 2 if isinstance(packed, torch.Tensor)
                else getattr(getattr(down, "weight", None), "shape", (0,))[-1])
    return 0


def _check_block_multiples(where: str, sizes) -> None:
    """Refuse a block whose sizes ((config name, value) pairs) are not whole MXFP4 blocks: the
    same message for every family, named as the family's config names them."""
    for name, size in sizes:
        if size % MXFP4_BLOCK_SIZE != 0:
            raise ValueError(f"{where}: {name} = {size} is not a multiple of {MXFP4_BLOCK_SIZE}, "
                             f"the MXFP4 block: mxmoe cannot hold these experts")


def _silu_replacement_for(where: str, mlp, family, router_class, experts_class, backend):
    router = getattr(mlp, "gate", None)
    if not isinstance(router, router_class):
        raise ValueError(f"{where}.gate: expected {router_class.__name__}, got "
                         f"{type(router).__name__}")
    weight = getattr(router, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{where}.gate.weight: expected a float [E, H] tensor")
    num_experts, hidden = weight.shape
    _check_tensor(f"{where}.gate", "weight", weight, (num_experts, hidden), floating=True)
    experts = getattr(mlp, "experts", None)
    inter = _experts_intermediate_size(experts, experts_class,
                                       [names[2] for names in _LINEAR_EXPERT_NAMES])
    _check_block_multiples(where, (("hidden_size", hidden), ("intermediate_size", inter)))
    get_weights = _silu_expert_weights(f"{where}.experts", experts, experts_class, num_experts,
                                       hidden, inter)
    renormalize = True if family == "mixtral" else bool(getattr(router, "norm_topk_prob", False))

    def build() -> SparseMXFP4MoE:
        with torch.no_grad():
            w13, w2 = get_weights()
            return SparseMXFP4MoE(
                w13, w2, weight.detach(), top_k=int(router.top_k), activation="silu",
                renormalize=renormalize, backend=backend, router_class=router_class,
                layout="auto",
            )

    return build


def _deepseek_v3_classes():
    """transformers' DeepSeek-V3 module, or None when this transformers lacks it."""
    try:
        from transformers.models.deepseek_v3 import modeling_deepseek_v3 as module
    except ImportError:
        return None
    names = ("DeepseekV3PreTrainedModel", "DeepseekV3DecoderLayer", "DeepseekV3MoE",
             "DeepseekV3TopkRouter", "DeepseekV3Experts")
    return module if all(hasattr(module, n) for n in names) else None


class DeepseekV3MXFP4MoE(MXFP4MoE):
    """`MXFP4MoE` in place of a DeepSeek-V3 MoE block (grouped sigmoid routing, shared
    experts): ``forward(hidden [B, S, H]) -> hidden [B, S, H]``, a plain tensor as the replaced
    block returned. Its router is typed as `DeepseekV3TopkRouter` and returns the float32
    logits, so that ``output_router_logits`` still records them."""

    def __init__(self, *args, router_class: type, **kwargs):
        super().__init__(*args, **kwargs)
        self.router = _router_logits_class(router_class)(self.router.weight.detach(), self.top_k)


def _shared_experts(where: str, shared, hidden: int):
    """The shared experts of the new block: compressed-tensors' compressed Linears
    (``weight_packed``/``weight_scale`` in gate_proj, up_proj, down_proj) as an `MXFP4GatedMLP`
    of their bytes, any other module (float Linears) kept as it is."""
    if not isinstance(shared, nn.Module):
        raise ValueError(f"{where}: expected a module, got {type(shared).__name__}")
    linears = [getattr(shared, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(getattr(lin, "weight_packed", None), torch.Tensor) for lin in linears):
        return shared
    inter = linears[0].weight_packed.shape[0]
    gate, up, down = (_linear_weight(f"{where}.{n}", lin, *shape) for n, lin, shape in zip(
        ("gate_proj", "up_proj", "down_proj"), linears,
        ((inter, hidden), (inter, hidden), (hidden, inter))))
    return MXFP4GatedMLP(
        MXFP4Tensor(torch.cat([gate.blocks, up.blocks])[None],
                    torch.cat([gate.scales, up.scales])[None]),
        MXFP4Tensor(down.blocks[None], down.scales[None]), activation="silu")


def _deepseek_replacement_for(where: str, mlp, module, backend: str):
    router = getattr(mlp, "gate", None)
    if not isinstance(router, module.DeepseekV3TopkRouter):
        raise ValueError(f"{where}.gate: expected DeepseekV3TopkRouter, got "
                         f"{type(router).__name__}")
    missing = [n for n in ("weight", "e_score_correction_bias", "top_k", "num_group",
                           "topk_group", "norm_topk_prob", "routed_scaling_factor")
               if not hasattr(router, n)]
    if missing:
        raise ValueError(f"{where}.gate: DeepseekV3TopkRouter lacks {missing}: not the "
                         f"structure this version of mxmoe knows (transformers "
                         f"{transformers.__version__})")
    weight = router.weight
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{where}.gate.weight: expected a float [E, H] tensor")
    num_experts, hidden = weight.shape
    _check_tensor(f"{where}.gate", "weight", weight, (num_experts, hidden), floating=True)
    _check_tensor(f"{where}.gate", "e_score_correction_bias", router.e_score_correction_bias,
                  (num_experts,), floating=True)
    shared = _shared_experts(f"{where}.shared_experts", getattr(mlp, "shared_experts", None),
                             hidden)
    experts = getattr(mlp, "experts", None)
    inter = _experts_intermediate_size(experts, module.DeepseekV3Experts, ["down_proj"])
    _check_block_multiples(where, (("hidden_size", hidden), ("moe_intermediate_size", inter)))
    get_weights = _silu_expert_weights(f"{where}.experts", experts, module.DeepseekV3Experts,
                                       num_experts, hidden, inter)
    routing = GroupedSigmoidRouting(n_group=int(router.num_group),
                                    topk_group=int(router.topk_group),
                                    scaling_factor=float(router.routed_scaling_factor))
    check_grouped_routing(routing, num_experts, int(router.top_k))

    def build() -> DeepseekV3MXFP4MoE:
        with torch.no_grad():
            w13, w2 = get_weights()
            return DeepseekV3MXFP4MoE(
                w13, w2, weight.detach().float(), top_k=int(router.top_k), activation="silu",
                renormalize=bool(router.norm_topk_prob), backend=backend,
                router_class=module.DeepseekV3TopkRouter, layout="auto", routing=routing,
                router_correction_bias=router.e_score_correction_bias.detach().float().clone(),
                shared_experts=shared,
            )

    return build


def _use_mxmoe_deepseek(model, module, backend):
    layers = [(name, m) for name, m in model.named_modules()
              if isinstance(m, module.DeepseekV3DecoderLayer)]
    builders = []
    for name, layer in layers:
        mlp = getattr(layer, "mlp", None)
        if isinstance(mlp, DeepseekV3MXFP4MoE):
            mlp.backend = backend
        elif isinstance(mlp, module.DeepseekV3MoE):
            builders.append((layer, _deepseek_replacement_for(f"{name}.mlp", mlp, module,
                                                              backend)))
    if not builders and not any(isinstance(getattr(m, "mlp", None), DeepseekV3MXFP4MoE)
                                for _, m in layers):
        raise ValueError(f"{type(model).__name__} has no DeepseekV3MoE to patch")
    _replace_all(builders)
    return model


def _check_version() -> None:
    version = _version_tuple(transformers.__version__)
    if version < MIN_TRANSFORMERS_VERSION:
        raise ValueError(
            f"use_mxmoe needs transformers >= "
            f"{'.'.join(map(str, MIN_TRANSFORMERS_VERSION))} (gpt-oss), found "
            f"{transformers.__version__}"
        )


def _replace_all(builders) -> None:
    builders.reverse()
    while builders:
        # One block at a time, dropping each builder (and with it the old block's weights)
        # before the next block is quantized.
        layer, build = builders.pop()
        layer.mlp = build()
        del layer, build


def _use_mxmoe_silu(model, family, layer_class, block_class, router_class, experts_class,
                    backend):
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, layer_class)]
    builders = []
    for name, layer in layers:
        mlp = getattr(layer, "mlp", None)
        if isinstance(mlp, SparseMXFP4MoE):
            mlp.backend = backend
        elif isinstance(mlp, block_class):
            builders.append((layer, _silu_replacement_for(f"{name}.mlp", mlp, family,
                                                          router_class, experts_class, backend)))
    if not builders and not any(isinstance(getattr(m, "mlp", None), SparseMXFP4MoE)
                                for _, m in layers):
        raise ValueError(f"{type(model).__name__} has no {block_class.__name__} to patch")
    _replace_all(builders)
    return model


def use_mxmoe(model, *, backend: str = "auto"):
    """Run the MoE blocks of a transformers gpt-oss, Qwen3-MoE, Mixtral or DeepSeek-V3 model
    on mxmoe, in place.

    Args:
        model: a transformers gpt-oss, Qwen3-MoE, Mixtral or DeepSeek-V3 model
            (`GptOssForCausalLM`, `Qwen3MoeForCausalLM`, `MixtralForCausalLM`,
            `DeepseekV3ForCausalLM`, their base models, or another of their `PreTrainedModel`
            classes), with its weights loaded on their device.
        backend: the mxmoe backend of every block (``"auto"``, ``"torch"``, ...).

    Returns:
        ``model``, whose MoE blocks (``mlp``) are now `GptOssMXFP4MoE`, `SparseMXFP4MoE` or
        `DeepseekV3MXFP4MoE` (Qwen3-MoE's dense ``mlp_only_layers`` and DeepSeek-V3's dense
        layers stay as they are), their weights in the layout
        their kernels read fastest on the weights' device (`mxmoe.backends.fastest_layout`).
        Blocks already patched only take the new ``backend``.

    Raises:
        TypeError: ``model`` is none of those models.
        ValueError: a block's structure, shapes or data are not what this module knows; nothing
            is replaced then.
    """
    _check_version()
    for family, base, layer_class, block_class, router_class, experts_class in _silu_families():
        if isinstance(model, base):
            return _use_mxmoe_silu(model, family, layer_class, block_class, router_class,
                                   experts_class, backend)
    deepseek = _deepseek_v3_classes()
    if deepseek is not None and isinstance(model, deepseek.DeepseekV3PreTrainedModel):
        return _use_mxmoe_deepseek(model, deepseek, backend)
    if not isinstance(model, modeling_gpt_oss.GptOssPreTrainedModel):
        raise TypeError(
            f"use_mxmoe expects a transformers gpt-oss (GptOssForCausalLM, GptOssModel or "
            f"another GptOssPreTrainedModel), Qwen3-MoE (Qwen3MoeForCausalLM ...), Mixtral "
            f"(MixtralForCausalLM ...) or DeepSeek-V3 (DeepseekV3ForCausalLM ...) model, got "
            f"{type(model).__name__}"
        )
    layers = [(name, m) for name, m in model.named_modules()
              if isinstance(m, modeling_gpt_oss.GptOssDecoderLayer)]
    if any(not hasattr(layer, "mlp") for _, layer in layers):
        raise ValueError(
            "a GptOssDecoderLayer has no .mlp: not the gpt-oss structure use_mxmoe knows"
        )
    if not layers:
        raise ValueError(f"{type(model).__name__} has no GptOssDecoderLayer modules to patch")

    builders = []
    for name, layer in layers:
        if isinstance(layer.mlp, GptOssMXFP4MoE):
            layer.mlp.backend = backend
            continue
        builders.append((layer, _replacement_for(f"{name}.mlp", layer.mlp, backend)))
    _replace_all(builders)
    return model

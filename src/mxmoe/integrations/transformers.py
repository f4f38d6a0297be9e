"""Run a Hugging Face transformers gpt-oss model on mxmoe: ``use_mxmoe(model)``.

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
from ..layer import MXFP4MoE

try:
    import transformers
    from transformers.models.gpt_oss import modeling_gpt_oss
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "mxmoe.integrations.transformers needs transformers with gpt-oss (>= 4.55): "
        "pip install 'mxmoe[transformers]'"
    ) from exc

__all__ = ["GptOssMXFP4MoE", "use_mxmoe"]

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
                second_output="router_scores" if isinstance(
                    mlp, modeling_gpt_oss.GptOssMLP) else "router_logits",
            )

    return build


def use_mxmoe(model, *, backend: str = "auto"):
    """Run the MoE blocks of a transformers gpt-oss model on mxmoe, in place.

    Args:
        model: a transformers gpt-oss model (`GptOssForCausalLM`, `GptOssModel`, or another
            `GptOssPreTrainedModel`), with its weights loaded on their device.
        backend: the mxmoe backend of every block (``"auto"``, ``"torch"``, ...).

    Returns:
        ``model``, whose decoder layers' ``mlp`` are now `GptOssMXFP4MoE`. Blocks already
        patched only take the new ``backend``.

    Raises:
        TypeError: ``model`` is not a gpt-oss model.
        ValueError: a block's structure, shapes or data are not what this module knows; nothing
            is replaced then.
    """
    version = _version_tuple(transformers.__version__)
    if version < MIN_TRANSFORMERS_VERSION:
        raise ValueError(
            f"use_mxmoe needs transformers >= "
            f"{'.'.join(map(str, MIN_TRANSFORMERS_VERSION))} (gpt-oss), found "
            f"{transformers.__version__}"
        )
    if not isinstance(model, modeling_gpt_oss.GptOssPreTrainedModel):
        raise TypeError(
            f"use_mxmoe expects a transformers gpt-oss model (GptOssForCausalLM, GptOssModel or "
            f"another GptOssPreTrainedModel), got {type(model).__name__}"
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
    builders.reverse()
    while builders:
        # One block at a time, dropping each builder (and with it the old block's weights)
        # before the next block is quantized.
        layer, build = builders.pop()
        layer.mlp = build()
        del layer, build
    return model

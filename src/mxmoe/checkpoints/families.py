"""MoE families: what ``config.json`` says about a layer's router and experts.

| family | ``model_type`` | experts / intermediate keys | router | activation |
|---|---|---|---|---|
| gpt-oss | ``gpt_oss`` (or OpenAI's config) | ``num_local_experts`` / ``intermediate_size`` | Linear with bias, softmax over the top-k logits | swigluoai (w13 rows interleave gate/up) |
| Qwen3-MoE | ``qwen3_moe`` | ``num_experts`` (or ``num_local_experts``) / ``moe_intermediate_size`` | no bias, softmax -> top-k, renormalised iff ``norm_topk_prob`` | silu, ``[gate | up]`` halves |
| Mixtral | ``mixtral`` | ``num_local_experts`` / ``intermediate_size`` | no bias, softmax -> top-k -> renormalised | silu, ``[gate | up]`` halves |

Softmax over the top-k logits equals softmax over all E then dividing the chosen k by their
sum: both are ``route(..., renormalize=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..activations import Activation
from ..constants import GPT_OSS_SWIGLU_ALPHA, GPT_OSS_SWIGLU_LIMIT

__all__ = ["MoEFamily", "family_of", "FAMILIES"]


@dataclass(frozen=True)
class MoEFamily:
    """A layer's routing and activation, and its sizes as config.json gives them (None when
    absent: the tensors decide, and are cross-checked against what is given)."""

    name: str
    num_experts: int | None
    hidden: int | None
    intermediate: int | None
    top_k: int | None
    renormalize: bool
    activation: Activation
    alpha: float = GPT_OSS_SWIGLU_ALPHA
    limit: float = GPT_OSS_SWIGLU_LIMIT
    #: config.json key of each size, for messages.
    keys: tuple[tuple[str, str], ...] = ()

    def key(self, what: str) -> str:
        return dict(self.keys).get(what, what)


#: model_type -> (experts keys, intermediate key); silu families whose MoE layers mxmoe runs.
#: Qwen3-MoE's own configs say num_experts; transformers 5 writes num_local_experts.
_SILU_FAMILIES = {
    "qwen3_moe": (("num_experts", "num_local_experts"), "moe_intermediate_size"),
    "mixtral": (("num_local_experts",), "intermediate_size"),
}
FAMILIES = ("gpt_oss", *_SILU_FAMILIES)


def _int_or_none(config: dict, key: str, where: str) -> int | None:
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {key} must be an int, got {value!r}")
    return value


def family_of(config: dict, layer: int, where: str) -> MoEFamily:
    """The family of a silu-gated (Qwen3-MoE, Mixtral) checkpoint's ``config.json``.

    Raises ValueError for another ``model_type`` (naming the supported ones), a non-silu
    ``hidden_act``, or a ``layer`` that config.json makes a dense MLP (Qwen3-MoE's
    ``mlp_only_layers`` / ``decoder_sparse_step``) or puts past ``num_hidden_layers``.
    """
    config = config.get("text_config", config) if config.get("model_type") not in \
        _SILU_FAMILIES else config
    model_type = config.get("model_type")
    if model_type not in _SILU_FAMILIES:
        raise ValueError(
            f"{where}: config.json model_type {model_type!r} is not an MoE family mxmoe knows "
            f"in this format (known: {', '.join(_SILU_FAMILIES)}; gpt-oss checkpoints are read "
            f"in their own MXFP4 format)"
        )
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{where}: config.json hidden_act = {act!r}; mxmoe's gated experts "
                         f"for {model_type} are silu(gate) * up")
    layers = _int_or_none(config, "num_hidden_layers", where)
    if layers is not None and layer >= layers:
        raise ValueError(f"layer {layer} is out of range: config.json has num_hidden_layers = "
                         f"{layers}")
    if model_type == "qwen3_moe":
        dense = config.get("mlp_only_layers") or []
        step = _int_or_none(config, "decoder_sparse_step", where) or 1
        if layer in dense or (layer + 1) % step:
            raise ValueError(f"layer {layer} of this Qwen3-MoE is a dense MLP (config.json "
                             f"mlp_only_layers = {dense}, decoder_sparse_step = {step}), not MoE")
    experts_keys, inter_key = _SILU_FAMILIES[model_type]
    experts_key = next((k for k in experts_keys if k in config), experts_keys[0])
    renormalize = True if model_type == "mixtral" else bool(config.get("norm_topk_prob", False))
    keys = (("experts", experts_key), ("hidden", "hidden_size"),
            ("intermediate", inter_key), ("top_k", "num_experts_per_tok"))
    return MoEFamily(
        name=model_type,
        num_experts=_int_or_none(config, experts_key, where),
        hidden=_int_or_none(config, "hidden_size", where),
        intermediate=_int_or_none(config, inter_key, where),
        top_k=_int_or_none(config, "num_experts_per_tok", where),
        renormalize=renormalize,
        activation=Activation.SILU,
        keys=keys,
    )

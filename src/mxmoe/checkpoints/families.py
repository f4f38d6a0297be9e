"""MoE families: what ``config.json`` says about a layer's router and experts.

| family | ``model_type`` | experts / intermediate keys | router | activation |
|---|---|---|---|---|
| gpt-oss | ``gpt_oss`` (or OpenAI's config) | ``num_local_experts`` / ``intermediate_size`` | Linear with bias, softmax over the top-k logits | swigluoai (w13 rows interleave gate/up) |
| Qwen3-MoE | ``qwen3_moe`` | ``num_experts`` (or ``num_local_experts``) / ``moe_intermediate_size`` | no bias, softmax -> top-k, renormalised iff ``norm_topk_prob`` | silu, ``[gate | up]`` halves |
| Mixtral | ``mixtral`` | ``num_local_experts`` / ``intermediate_size`` | no bias, softmax -> top-k -> renormalised | silu, ``[gate | up]`` halves |
| DeepSeek-V3 | ``deepseek_v3`` | ``n_routed_experts`` (or ``num_local_experts``) / ``moe_intermediate_size`` | float32, no bias; sigmoid, ``e_score_correction_bias`` for the choice, ``n_group`` groups of which ``topk_group`` kept, renormalised iff ``norm_topk_prob``, times ``routed_scaling_factor`` | silu, ``[gate | up]`` halves; plus a shared silu MLP of width ``moe_intermediate_size * n_shared_experts`` |

Softmax over the top-k logits equals softmax over all E then dividing the chosen k by their
sum: both are ``route(..., renormalize=True)``. DeepSeek-V3's router is
`mxmoe.router.route_grouped_sigmoid` (``scoring_func: sigmoid``, ``topk_method: noaux_tc``;
another value of either is refused); its layers below ``first_k_dense_replace``, and those off
``moe_layer_freq`` (DeepSeek's own config key; transformers ignores it), are dense MLPs. Where
its config.json leaves a routing key out, transformers' default applies (n_group 8, topk_group
4, routed_scaling_factor 2.5, norm_topk_prob true, n_shared_experts 1, first_k_dense_replace 3).
The moe_intermediate_size the tensors give times n_shared_experts is the shared MLP's width.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..activations import Activation
from ..constants import GPT_OSS_SWIGLU_ALPHA, GPT_OSS_SWIGLU_LIMIT
from ..routing import GroupedSigmoidRouting

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
    #: DeepSeek-V3's grouped sigmoid router (its router float32, with a correction bias);
    #: None: softmax top-k.
    routing: GroupedSigmoidRouting | None = None
    #: The shared-experts MLP added to every token's output is this many experts wide
    #: (DeepSeek-V3's n_shared_experts; 0: none).
    shared_experts: int = 0

    def key(self, what: str) -> str:
        return dict(self.keys).get(what, what)


#: model_type -> (experts keys, intermediate key); silu families whose MoE layers mxmoe runs.
#: Qwen3-MoE's own configs say num_experts; transformers 5 writes num_local_experts.
_SILU_FAMILIES = {
    "qwen3_moe": (("num_experts", "num_local_experts"), "moe_intermediate_size"),
    "mixtral": (("num_local_experts",), "intermediate_size"),
    "deepseek_v3": (("n_routed_experts", "num_local_experts"), "moe_intermediate_size"),
}
#: transformers' DeepseekV3Config defaults, for the keys a config.json may leave out.
_DEEPSEEK_V3_DEFAULTS = {"n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5,
                         "norm_topk_prob": True, "n_shared_experts": 1,
                         "first_k_dense_replace": 3, "moe_layer_freq": 1}
#: What DeepSeek-V3's router is in its own config.json's words; another value is another router.
_DEEPSEEK_V3_ROUTER = {"scoring_func": "sigmoid", "topk_method": "noaux_tc"}
FAMILIES = ("gpt_oss", *_SILU_FAMILIES)


def _int_or_none(config: dict, key: str, where: str) -> int | None:
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {key} must be an int, got {value!r}")
    return value


def family_of(config: dict, layer: int, where: str) -> MoEFamily:
    """The family of a silu-gated (Qwen3-MoE, Mixtral, DeepSeek-V3) checkpoint's
    ``config.json``.

    Raises ValueError for another ``model_type`` (naming the supported ones), a non-silu
    ``hidden_act``, a DeepSeek-V3 router other than sigmoid / noaux_tc, or a ``layer`` that
    config.json makes a dense MLP (Qwen3-MoE's ``mlp_only_layers`` / ``decoder_sparse_step``,
    DeepSeek-V3's ``first_k_dense_replace`` / ``moe_layer_freq``) or puts past
    ``num_hidden_layers``.
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
    extra = {}
    if model_type == "deepseek_v3":
        config = {**_DEEPSEEK_V3_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
        extra = _deepseek_v3(config, layer, where)
        renormalize = bool(config["norm_topk_prob"])
    return MoEFamily(
        name=model_type,
        num_experts=_int_or_none(config, experts_key, where),
        hidden=_int_or_none(config, "hidden_size", where),
        intermediate=_int_or_none(config, inter_key, where),
        top_k=_int_or_none(config, "num_experts_per_tok", where),
        renormalize=renormalize,
        activation=Activation.SILU,
        keys=keys,
        **extra,
    )


def _deepseek_v3(config: dict, layer: int, where: str) -> dict:
    """DeepSeek-V3's router and shared experts (``config`` with transformers' defaults filled
    in); raises for a dense layer or a router that is not sigmoid / noaux_tc."""
    for key, want in _DEEPSEEK_V3_ROUTER.items():
        if key in config and config[key] != want:
            raise ValueError(f"{where}: config.json {key} = {config[key]!r}; mxmoe runs "
                             f"DeepSeek-V3's router, {key} = {want!r}")
    first_dense = _int_or_none(config, "first_k_dense_replace", where)
    freq = _int_or_none(config, "moe_layer_freq", where)
    if freq < 1:
        raise ValueError(f"{where}: config.json moe_layer_freq must be >= 1, got {freq}")
    if layer < first_dense or layer % freq:
        raise ValueError(f"layer {layer} of this DeepSeek-V3 is a dense MLP (config.json "
                         f"first_k_dense_replace = {first_dense}, moe_layer_freq = {freq}), "
                         f"not MoE")
    factor = config["routed_scaling_factor"]
    if isinstance(factor, bool) or not isinstance(factor, (int, float)):
        raise ValueError(f"{where}: routed_scaling_factor must be a number, got {factor!r}")
    routing = GroupedSigmoidRouting(n_group=_int_or_none(config, "n_group", where),
                                    topk_group=_int_or_none(config, "topk_group", where),
                                    scaling_factor=float(factor))
    shared = _int_or_none(config, "n_shared_experts", where)
    if shared < 0:
        raise ValueError(f"{where}: config.json n_shared_experts must be >= 0, got {shared}")
    return dict(routing=routing, shared_experts=shared)

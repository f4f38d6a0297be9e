"""Checks at the public boundary: once per call, on shapes, dtypes and devices only.

Nothing here reads tensor data, so these checks also run unchanged while `torch.compile`
traces. The data checks (ids in range, expert-map values; `check_routing_values`) run inside the
``mxmoe::fused_experts`` operator (`mxmoe.ops`), where the data is real in eager and compiled
code alike: when the data is on the CPU, or when asked for with ``MXMOE_VALIDATE=1`` (on a GPU
reading the data synchronises the host); see `routing_values_checked`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .activations import Activation
from .constants import MXFP4_BLOCK_SIZE
from .format import MXFP4Tensor
from .problem import MoECall, MoEProblem
from .routing import GroupedSigmoidRouting

ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ID_DTYPES = (torch.int32, torch.int64)


def _shape(t) -> tuple:
    return tuple(t.shape)


def _require_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _require_bool(name: str, value) -> None:
    # Only a real bool: a string such as "false" is truthy and would silently mean True.
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def _require_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def check_swiglu_params(alpha, limit) -> None:
    """alpha and limit: finite real numbers (a NaN one would make every output NaN)."""
    for name, value in (("alpha", alpha), ("limit", limit)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
        # Under torch.compile a float attribute may be traced as a symbol, which math.isfinite
        # cannot take; eager calls and the layer's constructor check it.
        if not torch.compiler.is_compiling() and not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")


def check_backend_name(backend) -> None:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str such as 'auto', got {type(backend).__name__}")


def check_route_args(router_logits, top_k, renormalize: bool = True) -> None:
    _require_tensor("router_logits", router_logits)
    if not router_logits.is_floating_point():
        raise TypeError(f"router_logits must be a floating tensor, got {router_logits.dtype}")
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [M, E], got shape {_shape(router_logits)}")
    top_k = _require_int("top_k", top_k)
    num_experts = router_logits.shape[1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, E={num_experts}], got {top_k}")
    _require_bool("renormalize", renormalize)


def check_grouped_routing(routing, num_experts: int, top_k: int) -> None:
    """A `GroupedSigmoidRouting` that fits E experts and top-k: ``n_group`` divides E,
    ``1 <= topk_group <= n_group``, and the kept groups hold at least top-k experts."""
    if not isinstance(routing, GroupedSigmoidRouting):
        raise TypeError(f"routing must be an mxmoe.routing.GroupedSigmoidRouting, got "
                        f"{type(routing).__name__}")
    n_group = _require_int("routing.n_group", routing.n_group)
    topk_group = _require_int("routing.topk_group", routing.topk_group)
    if n_group < 1 or num_experts % n_group:
        raise ValueError(f"routing.n_group must divide E = {num_experts}, got {n_group}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"routing.topk_group must be in [1, n_group={n_group}], got "
                         f"{topk_group}")
    candidates = topk_group * (num_experts // n_group)
    if top_k > candidates:
        raise ValueError(f"top_k = {top_k} is more than the {candidates} experts of the "
                         f"topk_group = {topk_group} groups kept (E = {num_experts}, "
                         f"n_group = {n_group})")
    factor = routing.scaling_factor
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real):
        raise TypeError(f"routing.scaling_factor must be a float, got {type(factor).__name__} "
                        f"{factor!r}")
    if not torch.compiler.is_compiling() and not math.isfinite(factor):
        raise ValueError(f"routing.scaling_factor must be finite, got {factor}")


def check_correction_bias(correction_bias, num_experts: int, device: torch.device) -> None:
    """DeepSeek-V3's ``e_score_correction_bias``: a floating ``[E]`` tensor on ``device``."""
    _require_tensor("correction_bias", correction_bias)
    if not correction_bias.is_floating_point():
        raise TypeError(f"correction_bias must be a floating tensor, got "
                        f"{correction_bias.dtype}")
    if _shape(correction_bias) != (num_experts,):
        raise ValueError(f"correction_bias must be [E] = ({num_experts},), got "
                         f"{_shape(correction_bias)}")
    if correction_bias.device != device:
        raise ValueError(f"correction_bias is on {correction_bias.device} but the router "
                         f"logits are on {device}: expected one device")


def check_grouped_route_args(router_logits, correction_bias, top_k, routing,
                             renormalize) -> None:
    """`mxmoe.router.route_grouped_sigmoid`'s arguments."""
    check_route_args(router_logits, top_k, renormalize)
    num_experts = router_logits.shape[1]
    check_grouped_routing(routing, num_experts, top_k)
    check_correction_bias(correction_bias, num_experts, router_logits.device)


@dataclass(frozen=True)
class ExpertShapes:
    """The sizes implied by a pair of expert weights ``w13 [E, 2I, H]``, ``w2 [E, H, I]``."""

    num_experts: int  # E (local)
    hidden: int  # H
    intermediate: int  # I


def check_expert_weights(w13, w2, w13_bias, w2_bias) -> ExpertShapes:
    """Types, ranks, shapes and devices of the expert weights and biases (no data read)."""
    for name, w in (("w13", w13), ("w2", w2)):
        if not isinstance(w, MXFP4Tensor):
            raise TypeError(
                f"{name} must be an mxmoe.MXFP4Tensor, got {type(w).__name__} "
                f"(wrap packed weights with MXFP4Tensor(blocks, scales))"
            )
        if w.dim() != 3:
            raise ValueError(f"{name} must be [E, N, K], got logical shape {tuple(w.shape)}")
    num_experts, two_i, hidden = w13.shape
    if hidden == 0:
        raise ValueError(f"w13 is [E, 2I, H] = {tuple(w13.shape)}: H must be positive")
    if two_i == 0 or two_i % 2 != 0:
        raise ValueError(f"w13 rows (2I) must be even and positive, got {two_i}")
    inter = two_i // 2
    if inter % MXFP4_BLOCK_SIZE != 0:
        raise ValueError(
            f"w13 is [E, 2I, H] = {tuple(w13.shape)}: I = {inter} must be a multiple of "
            f"{MXFP4_BLOCK_SIZE} (it is the K of w2)"
        )
    expected_w2 = (num_experts, hidden, inter)
    w2_shape = tuple(w2.shape)
    if (w2_shape != expected_w2 and len(w2_shape) == 3 and w2_shape[0] == num_experts
            and two_i == w2_shape[1] and hidden == 2 * w2_shape[2]):
        # The w13 of gpt-oss's transposed export, [E, H, 2I]: w2 [E, H, I] is right, w13 not.
        raise ValueError(
            f"w13 must be [E, 2I, H] = {(num_experts, 2 * w2_shape[2], w2_shape[1])} to match "
            f"w2 {w2_shape}, got {tuple(w13.shape)}: it looks transposed ([E, H, 2I]); pass "
            f"the rows as output features (transpose(1, 2) before quantizing)"
        )
    if w2_shape != expected_w2:
        raise ValueError(
            f"w2 must be [E, H, I] = {expected_w2} to match w13 {tuple(w13.shape)}, got "
            f"{tuple(w2.shape)}"
        )
    if w2.device != w13.device:
        raise ValueError(f"w2 is on {w2.device} but w13 is on {w13.device}: expected one device")
    for name, bias, n in (("w13_bias", w13_bias, two_i), ("w2_bias", w2_bias, hidden)):
        if bias is None:
            continue
        _require_tensor(name, bias)
        if not bias.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {bias.dtype}")
        if _shape(bias) != (num_experts, n):
            raise ValueError(f"{name} must be [E, N] = {(num_experts, n)}, got {_shape(bias)}")
        if bias.device != w13.device:
            raise ValueError(
                f"{name} is on {bias.device} but w13 is on {w13.device}: expected one device"
            )
    return ExpertShapes(num_experts=num_experts, hidden=hidden, intermediate=inter)


def check_expert_map_arg(expert_map) -> int:
    """dtype and rank of ``expert_map [E_global]``; returns E_global (no data read)."""
    _require_tensor("expert_map", expert_map)
    if expert_map.dtype not in ID_DTYPES:
        raise TypeError(f"expert_map must be int32 or int64, got {expert_map.dtype}")
    if expert_map.dim() != 1:
        raise ValueError(f"expert_map must be [E_global], got shape {_shape(expert_map)}")
    return expert_map.shape[0]


def check_expert_map_values(expert_map: torch.Tensor, num_local_experts: int) -> None:
    """expert_map values in [-1, E_local). Reads the data."""
    if expert_map.numel():
        lo, hi = int(expert_map.min()), int(expert_map.max())
        if lo < -1 or hi >= num_local_experts:
            raise ValueError(
                f"expert_map values must be in [-1, {num_local_experts}) (local expert "
                f"or -1 for remote), got range [{lo}, {hi}]"
            )


def validation_requested() -> bool:
    from . import settings

    return settings.current().validate


def routing_values_checked(device: torch.device) -> bool:
    """Whether `check_routing_values` runs for data on ``device``: always on the CPU, on other
    devices only with ``MXMOE_VALIDATE=1``."""
    return device.type == "cpu" or validation_requested()


def check_fused_experts_args(
    hidden_states,
    w13,
    w2,
    topk_weights,
    topk_ids,
    *,
    w13_bias,
    w2_bias,
    activation,
    alpha,
    limit,
    expert_map,
    apply_router_weight_on_input=False,
    backend="auto",
) -> MoECall:
    """Validate a `fused_experts` call; raise TypeError/ValueError naming what was wrong; return
    the call as one object.

    Shapes, dtypes and devices only; the data checks run in the operator (module docstring).
    """
    _require_tensor("hidden_states", hidden_states)
    if hidden_states.dtype not in ACTIVATION_DTYPES:
        raise TypeError(
            f"hidden_states must be bfloat16, float16 or float32, got {hidden_states.dtype}"
        )
    if hidden_states.dim() != 2:
        raise ValueError(f"hidden_states must be [M, H], got shape {_shape(hidden_states)}")
    shapes = check_expert_weights(w13, w2, w13_bias, w2_bias)
    num_experts, hidden, inter = shapes.num_experts, shapes.hidden, shapes.intermediate
    act = Activation.parse(activation)

    num_tokens = hidden_states.shape[0]
    if hidden_states.shape[1] != hidden:
        raise ValueError(
            f"w13 is [E, 2I, H] = {tuple(w13.shape)} but hidden_states has H = "
            f"{hidden_states.shape[1]}"
        )

    _require_tensor("topk_ids", topk_ids)
    _require_tensor("topk_weights", topk_weights)
    if topk_ids.dtype not in ID_DTYPES:
        raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if not topk_weights.is_floating_point():
        raise TypeError(f"topk_weights must be a floating tensor, got {topk_weights.dtype}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens:
        raise ValueError(
            f"topk_ids must be [M, top_k] with M = {num_tokens}, got shape {_shape(topk_ids)}"
        )
    if _shape(topk_weights) != _shape(topk_ids):
        raise ValueError(
            f"topk_weights shape {_shape(topk_weights)} must equal topk_ids shape "
            f"{_shape(topk_ids)}"
        )
    top_k = topk_ids.shape[1]

    num_global = num_experts
    if expert_map is not None:
        num_global = check_expert_map_arg(expert_map)
    if top_k < 1 or top_k > num_global:
        raise ValueError(f"top_k (topk_ids.shape[1]) must be in [1, E={num_global}], got {top_k}")

    check_swiglu_params(alpha, limit)
    _require_bool("apply_router_weight_on_input", apply_router_weight_on_input)
    check_backend_name(backend)

    device = hidden_states.device
    named = [("w13", w13.blocks), ("w2", w2.blocks), ("topk_weights", topk_weights),
             ("topk_ids", topk_ids), ("w13_bias", w13_bias), ("w2_bias", w2_bias),
             ("expert_map", expert_map)]
    for name, t in named:
        if t is not None and t.device != device:
            raise ValueError(
                f"{name} is on {t.device} but hidden_states is on {device}: expected one device"
            )

    problem = MoEProblem(
        num_tokens=num_tokens,
        hidden=hidden,
        intermediate=inter,
        num_local_experts=num_experts,
        num_global_experts=num_global,
        top_k=top_k,
        activation=act,
    )
    return MoECall(
        hidden_states=hidden_states, w13=w13, w2=w2, topk_weights=topk_weights,
        topk_ids=topk_ids, w13_bias=w13_bias, w2_bias=w2_bias, expert_map=expert_map,
        alpha=float(alpha), limit=float(limit),
        apply_router_weight_on_input=apply_router_weight_on_input, backend=backend,
        problem=problem,
    )


def check_routing_values(topk_ids: torch.Tensor, expert_map, problem: MoEProblem) -> None:
    """Data checks: ids in [0, E_global), expert_map values in [-1, E_local). Reads the data."""
    if topk_ids.numel():
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi >= problem.num_global_experts:
            raise ValueError(
                f"topk_ids values must be in [0, {problem.num_global_experts}), got range "
                f"[{lo}, {hi}]"
            )
    if expert_map is not None:
        check_expert_map_values(expert_map, problem.num_local_experts)


def check_layer_args(
    w13, w2, router_weight, router_bias, w13_bias, w2_bias, *, top_k, activation, alpha, limit,
    renormalize, backend, expert_map,
) -> ExpertShapes:
    """Validate `mxmoe.MXFP4MoE`'s constructor arguments. Construction is off the hot path, so
    the expert map's values are read here wherever they are."""
    shapes = check_expert_weights(w13, w2, w13_bias, w2_bias)
    _require_tensor("router_weight", router_weight)
    if not router_weight.is_floating_point():
        raise TypeError(f"router_weight must be a floating tensor, got {router_weight.dtype}")
    if router_weight.dim() != 2 or router_weight.shape[1] != shapes.hidden:
        raise ValueError(
            f"router_weight must be [E, H] with H = {shapes.hidden}, got "
            f"{_shape(router_weight)}"
        )
    num_global = router_weight.shape[0]
    if router_bias is not None:
        _require_tensor("router_bias", router_bias)
        if not router_bias.is_floating_point():
            raise TypeError(f"router_bias must be a floating tensor, got {router_bias.dtype}")
        if _shape(router_bias) != (num_global,):
            raise ValueError(
                f"router_bias must be [E] = ({num_global},) like router_weight's rows, got "
                f"{_shape(router_bias)}"
            )
    if expert_map is None:
        if num_global != shapes.num_experts:
            raise ValueError(
                f"router_weight has {num_global} experts (rows) but w13 holds "
                f"{shapes.num_experts}; pass expert_map [E_global] when the experts are split "
                f"over ranks"
            )
    else:
        map_len = check_expert_map_arg(expert_map)
        if map_len != num_global:
            raise ValueError(
                f"expert_map must be [E_global] = ({num_global},) like router_weight's rows, "
                f"got {_shape(expert_map)}"
            )
        check_expert_map_values(expert_map, shapes.num_experts)
    top_k = _require_int("top_k", top_k)
    if not 1 <= top_k <= num_global:
        raise ValueError(f"top_k must be in [1, E={num_global}], got {top_k}")
    Activation.parse(activation)
    check_swiglu_params(alpha, limit)
    _require_bool("renormalize", renormalize)
    check_backend_name(backend)
    named = [("router_weight", router_weight), ("router_bias", router_bias),
             ("expert_map", expert_map)]
    for name, t in named:
        if t is not None and t.device != w13.device:
            raise ValueError(
                f"{name} is on {t.device} but w13 is on {w13.device}: expected one device"
            )
    return shapes


def check_layer_input(hidden_states, hidden: int, device: torch.device) -> None:
    """`MXFP4MoE.forward`'s input: ``[..., H]`` bf16/fp16/fp32 on the layer's device."""
    _require_tensor("hidden_states", hidden_states)
    if hidden_states.dtype not in ACTIVATION_DTYPES:
        raise TypeError(
            f"hidden_states must be bfloat16, float16 or float32, got {hidden_states.dtype}"
        )
    if hidden_states.dim() < 1 or hidden_states.shape[-1] != hidden:
        raise ValueError(
            f"MXFP4MoE expects hidden_states [..., H={hidden}], got {_shape(hidden_states)}"
        )
    if hidden_states.device != device:
        raise ValueError(
            f"hidden_states is on {hidden_states.device} but the layer's weights are on "
            f"{device}: expected one device"
        )

"""One fused-experts call as one object: `MoECall` (its tensors and parameters) and
`MoEProblem` (its sizes, hashable, what configs and `auto` are keyed on).

A call is built once, at the public boundary after validation (`mxmoe.validation`), and handed
down whole: to the custom operator, the backend, the launcher. Nothing below recomputes it.

The custom operator's schema only knows tensors and scalars, so a call crosses it flattened:
`OP_ARGS` is the one list of the operator's arguments, and `MoECall.op_args` /
`MoECall.from_op_args` the one place that flattens and rebuilds it (each weight as its blocks,
scales and layout name).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .activations import Activation
from .format import MXFP4Tensor

__all__ = ["MoEProblem", "MoECall", "OP_ARGS", "op_schema"]


@dataclass(frozen=True)
class MoEProblem:
    """The sizes of one fused-experts call."""

    num_tokens: int  # M
    hidden: int  # H
    intermediate: int  # I
    num_local_experts: int  # E_local (rows of w13/w2)
    num_global_experts: int  # E_global (what topk_ids index)
    top_k: int
    activation: Activation

    @property
    def num_pairs(self) -> int:
        """(token, slot) pairs: M * top_k."""
        return self.num_tokens * self.top_k

    @property
    def pairs_per_expert(self) -> float:
        """The mean number of pairs a local expert gets: what decides memory- vs compute-bound."""
        return self.num_pairs / max(1, self.num_local_experts)


#: The operator's arguments, in order: (name, schema type). Written once; `MoECall.op_args`
#: and `MoECall.from_op_args` follow it.
OP_ARGS: tuple[tuple[str, str], ...] = (
    ("hidden_states", "Tensor"),  # [M, H]
    ("topk_weights", "Tensor"),  # [M, k]
    ("topk_ids", "Tensor"),  # [M, k]
    ("w13_blocks", "Tensor"),  # [E, 2I, H/2] uint8, in w13_layout
    ("w13_scales", "Tensor"),  # [E, 2I, H/32] uint8
    ("w2_blocks", "Tensor"),  # [E, H, I/2] uint8, in w2_layout
    ("w2_scales", "Tensor"),  # [E, H, I/32] uint8
    ("w13_bias", "Tensor?"),  # [E, 2I]
    ("w2_bias", "Tensor?"),  # [E, H]
    ("expert_map", "Tensor?"),  # [E_global]
    ("w13_layout", "str"),
    ("w2_layout", "str"),
    ("activation", "str"),
    ("alpha", "float"),
    ("limit", "float"),
    ("apply_router_weight_on_input", "bool"),
    ("backend", "str"),
)
OP_ARG_NAMES = tuple(name for name, _ in OP_ARGS)


def op_schema(returns: str, prefix: str = "") -> str:
    """The schema text ``(args) -> returns`` of an operator over `OP_ARGS` (after ``prefix``)."""
    args = ", ".join(f"{kind} {name}" for name, kind in OP_ARGS)
    return f"({prefix}{args}) -> {returns}"


@dataclass(frozen=True)
class MoECall:
    """One validated `fused_experts` call."""

    hidden_states: torch.Tensor  # [M, H] bf16/fp16/fp32
    w13: MXFP4Tensor  # [E, 2I, H]
    w2: MXFP4Tensor  # [E, H, I]
    topk_weights: torch.Tensor  # [M, k] float
    topk_ids: torch.Tensor  # [M, k] int32/int64, global expert ids
    w13_bias: torch.Tensor | None  # [E, 2I]
    w2_bias: torch.Tensor | None  # [E, H]
    expert_map: torch.Tensor | None  # [E_global] -> local id or -1
    alpha: float
    limit: float
    apply_router_weight_on_input: bool
    backend: str  # a backend name or "auto"
    problem: MoEProblem

    @property
    def activation(self) -> Activation:
        return self.problem.activation

    @property
    def device(self) -> torch.device:
        return self.hidden_states.device

    @staticmethod
    def sizes(hidden_states, w13, topk_ids, expert_map, activation: Activation) -> MoEProblem:
        """The `MoEProblem` of arguments whose shapes were validated."""
        num_experts, two_i = w13.blocks.shape[:2]
        return MoEProblem(
            num_tokens=hidden_states.shape[0],
            hidden=hidden_states.shape[1],
            intermediate=two_i // 2,
            num_local_experts=num_experts,
            num_global_experts=num_experts if expert_map is None else expert_map.shape[0],
            top_k=topk_ids.shape[1],
            activation=activation,
        )

    def op_args(self) -> tuple:
        """The operator's arguments (`OP_ARGS` order)."""
        return (
            self.hidden_states, self.topk_weights, self.topk_ids,
            self.w13.blocks, self.w13.scales, self.w2.blocks, self.w2.scales,
            self.w13_bias, self.w2_bias, self.expert_map,
            self.w13.layout.name, self.w2.layout.name,
            self.activation.value, float(self.alpha), float(self.limit),
            bool(self.apply_router_weight_on_input), self.backend,
        )

    @classmethod
    def from_op_args(cls, *args) -> "MoECall":
        """Rebuild a call from the operator's arguments (trusted: validated before the op)."""
        (hidden_states, topk_weights, topk_ids, w13_blocks, w13_scales, w2_blocks, w2_scales,
         w13_bias, w2_bias, expert_map, w13_layout, w2_layout, activation, alpha, limit,
         on_input, backend) = args
        w13 = MXFP4Tensor(w13_blocks, w13_scales, w13_layout)
        w2 = MXFP4Tensor(w2_blocks, w2_scales, w2_layout)
        act = Activation.parse(activation)
        return cls(
            hidden_states=hidden_states, w13=w13, w2=w2, topk_weights=topk_weights,
            topk_ids=topk_ids, w13_bias=w13_bias, w2_bias=w2_bias, expert_map=expert_map,
            alpha=alpha, limit=limit, apply_router_weight_on_input=on_input, backend=backend,
            problem=cls.sizes(hidden_states, w13, topk_ids, expert_map, act),
        )

"""Gated activations of the first expert GEMM: each one a plugged-in unit.

An activation owns everything that depends on it: its pure-torch forward (the specification)
and backward, the row map of w13 ``[E, 2I, H]`` (gate and up rows interleaved, or ``[gate | up]``
halves) and the name of its Triton epilogue in `mxmoe.kernels._epilogues`. The reference, the
backward operator, the kernels, tensor-parallel sharding and the checkpoint loaders all ask the
activation; none of them encodes a row layout of its own.

Adding one: a member of `Activation`, its `_Spec` in `_SPECS`, its ``@triton.jit`` epilogue in
`mxmoe/kernels/_epilogues.py`, and tests (docs/architecture.md).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Activation", "swiglu_oai", "silu_and_mul", "apply_activation", "split_gate_up"]


def swiglu_oai(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss: ``min(gate, limit) * sigmoid(alpha * min(gate, limit)) * (clamp(up) + 1)``."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


def _swiglu_oai_backward(gate, up, grad_a, alpha, limit):
    # a = g * sigmoid(alpha * g) * (u + 1), g = min(gate, limit), u = clamp(up, +-limit);
    # a clamp passes the gradient where its input is inside the bounds, bounds included.
    g = gate.clamp(max=limit)
    u = up.clamp(min=-limit, max=limit)
    sig = torch.sigmoid(alpha * g)
    grad_gate = grad_a * (sig + alpha * g * sig * (1 - sig)) * (u + 1) * (gate <= limit)
    grad_up = grad_a * g * sig * ((up >= -limit) & (up <= limit))
    return grad_gate, grad_up


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """vLLM's silu-and-mul: ``silu(gate) * up``."""
    return torch.nn.functional.silu(gate) * up


def _silu_and_mul_backward(gate, up, grad_a, alpha, limit):
    sig = torch.sigmoid(gate)
    return grad_a * up * sig * (1 + gate * (1 - sig)), grad_a * gate * sig


@dataclass(frozen=True)
class _Spec:
    #: w13 rows: True = gate and up interleaved (gate even rows, up odd rows); False = halves.
    interleaved: bool
    #: (gate, up, alpha, limit) -> activation, pure torch.
    forward: Callable
    #: (gate, up, grad_a, alpha, limit) -> (grad_gate, grad_up).
    backward: Callable
    #: the ``@triton.jit`` function ``(gate, up, alpha, limit) -> fp32`` in `kernels._epilogues`.
    epilogue: str


class Activation(str, enum.Enum):
    """The gated activation, and with it the layout of the rows of w13 ``[E, 2I, H]``."""

    #: gpt-oss: rows interleave gate and up (gate = even rows, up = odd rows);
    #: gate = min(gate, limit), up = clamp(up, -limit, limit),
    #: out = gate * sigmoid(alpha * gate) * (up + 1).
    SWIGLUOAI = "swigluoai"
    #: vLLM's silu-and-mul: rows are [gate | up] halves; out = silu(gate) * up.
    SILU = "silu"

    @classmethod
    def parse(cls, value: "Activation | str") -> "Activation":
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            raise ValueError(
                f"activation must be one of {[a.value for a in cls]}, got {value!r}"
            ) from None

    @property
    def spec(self) -> _Spec:
        return _SPECS[self]

    @property
    def interleaved(self) -> bool:
        """Whether w13's gate and up rows interleave (else they are two halves)."""
        return self.spec.interleaved

    @property
    def epilogue(self) -> str:
        """The name of this activation's Triton epilogue in `mxmoe.kernels._epilogues`."""
        return self.spec.epilogue

    def split(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first GEMM's output ``[..., 2I]`` -> gate and up ``[..., I]``."""
        if self.interleaved:
            return h[..., 0::2], h[..., 1::2]
        half = h.shape[-1] // 2
        return h[..., :half], h[..., half:]

    def join(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The inverse of `split`: gate and up ``[..., I]`` -> ``[..., 2I]`` in w13's row order."""
        if self.interleaved:
            return torch.stack([gate, up], dim=-1).flatten(-2)
        return torch.cat([gate, up], dim=-1)

    def forward(self, h: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
        """``[..., 2I] -> [..., I]`` in the dtype of ``h``."""
        gate, up = self.split(h)
        return self.spec.forward(gate, up, alpha, limit)

    def backward(self, h: torch.Tensor, grad_a: torch.Tensor, alpha: float, limit: float
                 ) -> torch.Tensor:
        """``d act(h) / d h`` applied to ``grad_a [..., I]``: ``[..., 2I]`` in w13's row order."""
        gate, up = self.split(h)
        return self.join(*self.spec.backward(gate, up, grad_a, alpha, limit))

    def row_ranges(self, intermediate: int, inter: range) -> list[range]:
        """Rows of w13 ``[E, 2I, H]`` (and of its bias) that hold the intermediate slice
        ``inter``, in the order a local shard stacks them (again in this row layout)."""
        if self.interleaved:
            return [range(2 * inter.start, 2 * inter.stop)]
        return [inter, range(intermediate + inter.start, intermediate + inter.stop)]


_SPECS: dict[Activation, _Spec] = {
    Activation.SWIGLUOAI: _Spec(interleaved=True, forward=swiglu_oai,
                                backward=_swiglu_oai_backward, epilogue="swiglu_oai"),
    Activation.SILU: _Spec(interleaved=False,
                           forward=lambda gate, up, alpha, limit: silu_and_mul(gate, up),
                           backward=_silu_and_mul_backward, epilogue="silu_and_mul"),
}


def split_gate_up(h: torch.Tensor, activation: Activation) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the first GEMM's output ``[..., 2I]`` into gate and up ``[..., I]``."""
    return Activation.parse(activation).split(h)


def apply_activation(
    h: torch.Tensor, activation: Activation, alpha: float, limit: float
) -> torch.Tensor:
    """``[..., 2I] -> [..., I]`` in the dtype of ``h``."""
    return Activation.parse(activation).forward(h, alpha, limit)

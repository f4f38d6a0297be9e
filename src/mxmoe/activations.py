"""Gated activations of the first expert GEMM, as pure-torch functions (the specification)."""

from __future__ import annotations

import enum

import torch

__all__ = ["Activation", "swiglu_oai", "silu_and_mul", "apply_activation"]


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
        try:
            return cls(value)
        except ValueError:
            raise ValueError(
                f"activation must be one of {[a.value for a in cls]}, got {value!r}"
            ) from None


def split_gate_up(h: torch.Tensor, activation: Activation) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the first GEMM's output ``[..., 2I]`` into gate and up ``[..., I]``."""
    if activation is Activation.SWIGLUOAI:
        return h[..., 0::2], h[..., 1::2]
    half = h.shape[-1] // 2
    return h[..., :half], h[..., half:]


def swiglu_oai(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


def apply_activation(
    h: torch.Tensor, activation: Activation, alpha: float, limit: float
) -> torch.Tensor:
    """``[..., 2I] -> [..., I]`` in the dtype of ``h``."""
    gate, up = split_gate_up(h, activation)
    if activation is Activation.SWIGLUOAI:
        return swiglu_oai(gate, up, alpha, limit)
    return silu_and_mul(gate, up)

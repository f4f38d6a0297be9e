"""The roofline floor of one MoE layer: the time no implementation on this device can beat.

    floor(M) = max(bytes / copy_rate, flops / matmul_rate)

- bytes: the packed weights, their scales and the biases of the experts the routing actually
  touches (distinct experts in ``topk_ids``), w13 and w2. Activations are left out: at decode
  sizes they are tiny, at prefill sizes the layer is compute bound.
- flops: the useful ones, ``2·M·k·(H·2I + I·H)`` (no padding, no dequantization work).
- copy_rate: device-to-device copy bandwidth counting bytes read + written; matmul_rate: the
  bf16 8192³ matmul rate (`ceilings`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..constants import MXFP4_BLOCK_SIZE


def expert_bytes(hidden: int, inter: int, bias_itemsize: int) -> int:
    """Bytes one expert occupies: w13 ``[2I, H]`` and w2 ``[H, I]`` packed (4 bits a weight)
    plus one scale byte per 32 weights, plus the biases ``[2I]`` and ``[H]``."""
    weights = 2 * inter * hidden + hidden * inter
    return weights // 2 + weights // MXFP4_BLOCK_SIZE + (2 * inter + hidden) * bias_itemsize


def dense_expert_bytes(hidden: int, inter: int, itemsize: int) -> int:
    """Bytes of one expert stored dense (the bf16 baseline's weights) with its biases."""
    return (3 * hidden * inter + 2 * inter + hidden) * itemsize


def layer_flops(num_tokens: int, hidden: int, inter: int, top_k: int) -> int:
    """Useful FLOPs of the two expert GEMMs: ``2·M·k·(H·2I + I·H)``."""
    return 2 * num_tokens * top_k * (hidden * 2 * inter + inter * hidden)


@dataclass(frozen=True)
class Floor:
    seconds: float
    memory_seconds: float
    compute_seconds: float
    bytes: float
    flops: float

    @property
    def bound(self) -> str:
        return "memory" if self.memory_seconds >= self.compute_seconds else "compute"


def layer_floor(*, num_tokens: int, hidden: int, inter: int, top_k: int,
                touched_experts: float, bias_itemsize: int,
                copy_bytes_per_s: float, matmul_flops_per_s: float,
                bytes_per_expert: int | None = None) -> Floor:
    """The floor of one layer call. ``touched_experts`` may be a mean over several routings;
    ``bytes_per_expert`` replaces the MXFP4 `expert_bytes` (e.g. by `dense_expert_bytes`)."""
    if copy_bytes_per_s <= 0 or matmul_flops_per_s <= 0:
        raise ValueError(
            f"ceilings must be positive, got copy {copy_bytes_per_s} B/s and matmul "
            f"{matmul_flops_per_s} FLOP/s"
        )
    if bytes_per_expert is None:
        bytes_per_expert = expert_bytes(hidden, inter, bias_itemsize)
    nbytes = touched_experts * bytes_per_expert
    flops = layer_flops(num_tokens, hidden, inter, top_k)
    memory_s = nbytes / copy_bytes_per_s
    compute_s = flops / matmul_flops_per_s
    return Floor(max(memory_s, compute_s), memory_s, compute_s, nbytes, flops)

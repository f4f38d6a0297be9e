"""`backend="bf16"`: dequantize the weights once to the activation dtype and run a dense fused MoE.

The memory-for-speed baseline: the dense copy costs 2 bytes a weight (3.8x the packed 4.25 bits;
gpt-oss-20b's experts: ~12 GiB instead of ~3.2 GiB). It is made on first use and kept, keyed
on the packed blocks tensor (a layer's buffer), until that tensor is modified or freed. It runs
only when asked for by name; `auto` never picks it.
"""

from __future__ import annotations

import weakref

import torch

from ..format import MXFP4Tensor
from ._triton_common import triton_unavailable_reason
from .base import Backend, MoEArgs

# blocks tensor -> {(dtype, blocks version, scales version): dense weights}
_DENSE_CACHE: "weakref.WeakKeyDictionary[torch.Tensor, dict]" = weakref.WeakKeyDictionary()


def dense_weights(weight: MXFP4Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The cached dense copy of ``weight`` in ``dtype`` (made on first use)."""
    per_blocks = _DENSE_CACHE.setdefault(weight.blocks, {})
    key = (dtype, weight.blocks._version, weight.scales.data_ptr(), weight.scales._version)
    dense = per_blocks.get(key)
    if dense is None:
        per_blocks.clear()  # drop copies of an older version of these weights
        dense = weight.dequantize(dtype).contiguous()
        per_blocks[key] = dense
    return dense


def clear_dense_cache() -> None:
    """Free every cached dense copy."""
    _DENSE_CACHE.clear()


class BF16Backend(Backend):
    name = "bf16"
    description = "dense copy of the weights in the activation dtype (3.8x the memory), Triton MoE"
    keeps_weights_packed = False
    needs_probe = True

    def unavailable_reason(self, device: torch.device) -> str | None:
        return triton_unavailable_reason(device)

    def run(self, args: MoEArgs) -> torch.Tensor:
        from ..kernels.fused_moe import fused_moe

        dtype = args.hidden_states.dtype
        return fused_moe(
            args,
            mode="dense",
            w13_dense=dense_weights(args.w13, dtype),
            w2_dense=dense_weights(args.w2, dtype),
        )

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

# id(blocks) -> (weakref to blocks, version key, dense weights). Keyed by id, not by the tensor:
# tensors compare elementwise, which a dict key lookup cannot use.
_DENSE_CACHE: dict[int, tuple] = {}


def dense_weights(weight: MXFP4Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The cached dense copy of ``weight`` in ``dtype`` (made on first use)."""
    blocks = weight.blocks
    key = (dtype, blocks.data_ptr(), blocks._version, weight.scales.data_ptr(),
           weight.scales._version)
    entry = _DENSE_CACHE.get(id(blocks))
    if entry is not None and entry[0]() is blocks and entry[1] == key:
        return entry[2]
    # One expert at a time: dequantizing works in float32 with int64 lookups, ~20 bytes a weight.
    dense = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    for expert in range(weight.shape[0]):
        dense[expert] = weight[expert].dequantize(dtype)
    blocks_id = id(blocks)
    ref = weakref.ref(blocks, lambda _ref: _DENSE_CACHE.pop(blocks_id, None))
    _DENSE_CACHE[blocks_id] = (ref, key, dense)
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

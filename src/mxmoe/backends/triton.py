"""The Triton backends: one class, parameterised by the GEMM's inner product.

``triton_dequant``: MXFP4 tiles dequantized to bf16/fp16 in registers inside the K loop.
``triton_scaled``: the same kernels with `tl.dot_scaled` as the inner product.
``bf16``: a dense copy of the weights in the activation dtype (the memory-for-speed baseline:
2 bytes a weight, 3.8x the packed 4.25 bits; gpt-oss-20b's experts ~12 GiB instead of ~3.2 GiB),
made on first use and kept, keyed on the packed blocks tensor (a layer's buffer), until that
tensor is modified or freed. It runs only when asked for by name; `auto` never picks it.
"""

from __future__ import annotations

import weakref

import torch

from .. import settings
from ..format import MXFP4Tensor
from ..kernels.inner_product import InnerProduct
from ..layouts import GROUP_HALVES, MMA_LANES, PLAIN
from ..problem import MoECall
from .base import Backend


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why Triton kernels cannot run on ``device`` (static checks only; the probe runs them)."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"Triton is not importable ({exc})"
    interpreting = settings.current().interpret
    if device.type == "cuda":
        if interpreting:
            return "TRITON_INTERPRET=1 is set: Triton runs on the CPU only"
        return None
    if device.type == "cpu":
        if interpreting:
            return None
        return "no GPU: Triton kernels run on the CPU only under TRITON_INTERPRET=1"
    return f"Triton does not run on {device.type} devices"


class TritonBackend(Backend):
    """The fused MoE in Triton (`mxmoe.kernels.fused_moe`) with one inner product."""

    needs_probe = True

    def __init__(self, name: str, inner_product: InnerProduct, description: str):
        self.name = name
        self.inner_product = inner_product
        self.description = description
        self.keeps_weights_packed = inner_product is not InnerProduct.DENSE
        # tl.dot_scaled reads the checkpoint's byte order only; the dequantizing kernels decode
        # every layout; the dense copy is made from any layout.
        self.layouts = ((PLAIN.name,) if inner_product is InnerProduct.SCALED
                        else (PLAIN.name, GROUP_HALVES.name, MMA_LANES.name))

    def unavailable_reason(self, device: torch.device) -> str | None:
        return triton_unavailable_reason(device)

    def _check_layouts(self, call: MoECall) -> None:
        """The kernels read the bytes as they lie: a layout they do not know would be decoded
        as another one, silently wrong (the dense copy is made through `to_plain`)."""
        if self.inner_product is InnerProduct.DENSE:
            return
        for name, weight in (("w13", call.w13), ("w2", call.w2)):
            if weight.layout.name not in self.layouts:
                raise ValueError(
                    f"backend {self.name!r} reads the weight layouts {list(self.layouts)}; "
                    f"{name} is in {weight.layout.name!r}: convert it with "
                    f"MXFP4Tensor.to_layout (or use the kernels that read it)")

    def run(self, call: MoECall) -> torch.Tensor:
        from ..kernels.fused_moe import fused_moe

        self._check_layouts(call)
        if self.inner_product is InnerProduct.DENSE:
            dtype = call.hidden_states.dtype
            return fused_moe(call, self.inner_product, self.name,
                             dense=(dense_weights(call.w13, dtype), dense_weights(call.w2, dtype)))
        return fused_moe(call, self.inner_product, self.name)


    def plan(self, call: MoECall):
        from ..kernels.fused_moe import FusedMoEPlan

        self._check_layouts(call)
        dense = None
        if self.inner_product is InnerProduct.DENSE:
            dtype = call.hidden_states.dtype
            dense = (dense_weights(call.w13, dtype), dense_weights(call.w2, dtype))
        config = self._tuned_config(call, dense)
        plan = FusedMoEPlan(call, self.inner_product, self.name, dense=dense, config=config)
        if dense is not None:
            def run_dense(x, topk_weights, topk_ids, w13, w2, w13_bias, w2_bias, expert_map):
                dense13, dense2 = dense_weights(w13, dtype), dense_weights(w2, dtype)
                return plan.run(x, topk_weights, topk_ids, dense13, dense13, dense2, dense2,
                                w13_bias, w2_bias, expert_map)

            return run_dense

        def run_packed(x, topk_weights, topk_ids, w13, w2, w13_bias, w2_bias, expert_map):
            return plan.run(x, topk_weights, topk_ids, w13.blocks, w13.scales, w2.blocks,
                            w2.scales, w13_bias, w2_bias, expert_map)

        return run_packed

    def _tuned_config(self, call: MoECall, dense):
        """First-use tuning (``MXMOE_AUTOTUNE=1``, `mxmoe.autotune`): the general kernel's
        fastest config for this size class, timed now on the call's own tensors and kept in the
        user cache; None (the lookup decides) when tuning is off, already done, impossible now
        (capturing, compiling) or when the decode or the prefill kernels run: they have configs
        of their own, and a general-kernel config given to the plan would force the general
        kernel onto the call instead."""
        from .. import autotune
        from ..kernels.fused_moe import FusedMoEPlan, uses_decode_kernels, uses_prefill_kernels

        switches = settings.current()
        if (not autotune.enabled() or call.device.type != "cuda" or switches.interpret
                or switches.forced_config or uses_decode_kernels(call, self.inner_product)
                or uses_prefill_kernels(call, self.inner_product)):
            return None
        p = call.problem
        key = autotune.TuneKey.of(self.name, settings.device_facts(call.device), p.num_tokens,
                                  p.hidden, p.intermediate, p.num_local_experts, p.top_k)
        if dense is not None:
            weights = (dense[0], dense[0], dense[1], dense[1])
        else:
            weights = (call.w13.blocks, call.w13.scales, call.w2.blocks, call.w2.scales)

        def time_candidate(cfg) -> float:
            plan = FusedMoEPlan(call, self.inner_product, self.name, dense=dense, config=cfg)
            return autotune.graph_seconds(
                lambda: plan.run(call.hidden_states, call.topk_weights, call.topk_ids, *weights,
                                 call.w13_bias, call.w2_bias, call.expert_map),
                _TUNING_REPLAYS)

        return autotune.maybe_tune(key, autotune.candidates(key), time_candidate)


#: CUDA-graph replays timed per first-use tuning candidate (its median is kept).
_TUNING_REPLAYS = 5


def triton_dequant() -> TritonBackend:
    return TritonBackend("triton_dequant", InnerProduct.DEQUANT,
                         "Triton fused MoE, MXFP4 tiles dequantized to bf16/fp16 inside the GEMM loop")


def triton_scaled() -> TritonBackend:
    return TritonBackend("triton_scaled", InnerProduct.SCALED,
                         "Triton fused MoE with tl.dot_scaled(bf16/fp16 x e2m1) as the inner product")


def bf16() -> TritonBackend:
    return TritonBackend("bf16", InnerProduct.DENSE,
                         "dense copy of the weights in the activation dtype (3.8x the memory), "
                         "Triton MoE")


# id(blocks) -> (weakref to blocks, version key, dense weights). Keyed by id, not by the tensor:
# tensors compare elementwise, which a dict key lookup cannot use.
_DENSE_CACHE: dict[int, tuple] = {}


def dense_weights(weight: MXFP4Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The cached dense copy of ``weight`` in ``dtype`` (made on first use)."""
    blocks = weight.blocks
    key = (dtype, blocks.data_ptr(), blocks._version, weight.scales.data_ptr(),
           weight.scales._version, weight.layout.name)
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

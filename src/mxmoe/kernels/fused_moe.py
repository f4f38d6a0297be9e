"""Launcher of the fused MoE: align -> GEMM1 + activation -> GEMM2 + weight -> top-k sum.

No host synchronisation anywhere: sizes come from shapes only, so a forward can be captured in
a CUDA graph. Every launch goes through `Launcher` (compiled kernels launched directly).
"""

from __future__ import annotations

import json

import torch
import triton.language as tl

from .. import settings
from ..layouts import GROUP_HALVES
from ..problem import MoECall
from ..routing import max_aligned_blocks
from . import configs
from ._epilogues import epilogue_of
from ._moe_gemm import moe_gemm_kernel, split_activation_kernel, topk_sum_kernel
from .align import align
from .decode import DecodeConfig, DecodeGemm, choose_decode_configs
from .inner_product import InnerProduct
from .launch import Launcher, cdiv

__all__ = ["fused_moe", "choose_config", "use_dequant_ptx"]

_DOT_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
#: The tuned tables still name the inner product of each backend by its old kernel-mode key.
_TABLE_MODES = {"triton_dequant": "dequant", "triton_scaled": "scaled", "bf16": "dense"}

_gemm = Launcher(moe_gemm_kernel)
_split_activation = Launcher(split_activation_kernel)
_topk_sum = Launcher(topk_sum_kernel)


def _new_buffer(shape, dtype, device) -> torch.Tensor:
    """torch.empty, or NaN-filled under MXMOE_POISON=1 so that an unwritten element shows."""
    if settings.current().poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def use_dequant_ptx(device: torch.device, dot_dtype: torch.dtype) -> bool:
    """Whether the dequantizing GEMM takes the PTX nibble conversion (`_mxfp4_to_bf16_ptx`):
    bf16 on an NVIDIA GPU of compute capability 8.0 or newer (fma.rn.bf16x2), compiled rather
    than interpreted. MXMOE_DEQUANT_PTX=0 turns it off (the portable bit manipulation in fp32)."""
    switches = settings.current()
    if not switches.dequant_ptx or switches.interpret:
        return False
    if dot_dtype != torch.bfloat16 or device.type != "cuda":
        return False
    facts = settings.device_facts(device)
    return not facts.is_hip and facts.capability >= (8, 0)


def _dot_dtype(activation_dtype: torch.dtype, inner: InnerProduct) -> torch.dtype:
    """The tensor-core operand dtype: the activation dtype, except that tl.dot_scaled takes
    only bf16/fp16 operands, so float32 activations go through it as bf16."""
    if inner is InnerProduct.SCALED and activation_dtype == torch.float32:
        return torch.bfloat16
    return activation_dtype


def choose_config(call: MoECall, backend: str) -> configs.MoEConfig:
    """``MXMOE_CONFIG`` if set, else the tuned table's entry, else the heuristics."""
    switches = settings.current()
    if switches.forced_config:
        return configs.MoEConfig(**json.loads(switches.forced_config))
    p = call.problem
    if call.device.type == "cuda" and not switches.interpret:
        tuned = configs.lookup(settings.device_facts(call.device).name, _TABLE_MODES[backend],
                               p.num_tokens, p.hidden, p.intermediate, p.num_local_experts,
                               p.top_k)
        if tuned is not None:
            return tuned
    return configs.heuristic_config(p.num_tokens, p.top_k, p.num_local_experts,
                                    switches.interpret)


def _k_slices(k: int, cfg) -> tuple[int, int]:
    """(slices, K per slice): at most ``cfg.split_k`` slices of whole K tiles, none empty."""
    k_tiles = cdiv(k, cfg.block_k)
    per_split = cdiv(k_tiles, max(1, min(cfg.split_k, k_tiles)))
    return cdiv(k_tiles, per_split), per_split * cfg.block_k


class _Gemm:
    """What both GEMMs of one call share: the alignment, the inner product, the dtypes."""

    def __init__(self, call: MoECall, inner: InnerProduct, aligned, max_blocks: int,
                 topk_weights: torch.Tensor, dequant_ptx: bool, act_fn):
        self.call = call
        self.inner = inner
        self.aligned = aligned
        self.max_blocks = max_blocks
        self.num_pairs = call.problem.num_pairs
        self.topk_weights = topk_weights
        self.dot_dtype = _dot_dtype(call.hidden_states.dtype, inner)
        self.dequant_ptx = dequant_ptx
        self.act_fn = act_fn

    def launch(self, a, a_row_div, weight, bias, out, *, n, k, gated, router_weight, cfg,
               splits=1, k_per_split=None):
        """One grouped GEMM: ``out[pair] = epilogue(a[pair // a_row_div] @ weight[e]^T)``.
        With ``splits`` > 1, ``out`` is (splits, num_pairs, N) float32 and ``gated`` must be
        False: the caller sums the planes."""
        if splits > 1 and (gated or out.dim() != 3 or out.shape[0] != splits):
            raise ValueError("split-K GEMMs write (splits, pairs, N) float32 planes, ungated")
        n_out = n // 2 if gated else n
        cols_per_tile = cfg.block_n // 2 if gated else cfg.block_n
        grid = (self.max_blocks * splits * cdiv(n_out, cols_per_tile),)
        out_rows = out if out.dim() == 2 else out[0]
        # Strides read once per tensor (each .stride(i) is a call into torch).
        sa, so = a.stride(), out_rows.stride()
        sb = bias.stride() if bias is not None else (0, 0)
        dense = self.inner is InnerProduct.DENSE
        w = weight if dense else weight.blocks  # (E, N, K/2) uint8, or (E, N, K) dense
        s = weight if dense else weight.scales  # (E, N, K/32) uint8; unused when dense
        halves = not dense and weight.layout == GROUP_HALVES
        sw, ss = w.stride(), s.stride()
        _gemm(
            grid,
            a_ptr=a, b_ptr=w, b_scale_ptr=s, bias_ptr=bias if bias is not None else out,
            out_ptr=out, topk_weights_ptr=self.topk_weights,
            sorted_ids_ptr=self.aligned.sorted_ids, expert_ids_ptr=self.aligned.expert_ids,
            num_post_padded_ptr=self.aligned.num_tokens_post_padded,
            N=n, K=k, num_pairs=self.num_pairs, max_blocks=self.max_blocks,
            stride_am=sa[0], stride_ak=sa[1],
            stride_be=sw[0], stride_bn=sw[1], stride_bk=sw[2],
            stride_se=ss[0], stride_sn=ss[1], stride_sk=ss[2],
            stride_bias_e=sb[0], stride_bias_n=sb[1], stride_om=so[0], stride_on=so[1],
            stride_os=out.stride(0) if splits > 1 else 0, k_per_split=k_per_split or k,
            alpha=self.call.alpha, limit=self.call.limit,
            A_ROW_DIV=a_row_div, WEIGHT_MODE=int(self.inner), W_LAYOUT=int(halves),
            GATED=gated, INTERLEAVED=self.call.activation.interleaved, ACT_FN=self.act_fn,
            ROUTER_WEIGHT=router_weight, HAS_BIAS=bias is not None,
            SPLIT_DOT=cfg.split_dot, DEQUANT_PTX=self.dequant_ptx, SWAP_AB=cfg.swap_ab,
            DOT_DTYPE=_DOT_DTYPES[self.dot_dtype],
            DOT_PRECISION="ieee" if self.dot_dtype == torch.float32 else None,
            DOT_FORMAT="fp16" if self.dot_dtype == torch.float16 else "bf16",
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=splits,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )


# ROUTER_WEIGHT of moe_gemm_kernel: where the routing weight multiplies the accumulator.
_WEIGHT_NONE, _WEIGHT_BEFORE_BIAS, _WEIGHT_AFTER_BIAS = 0, 1, 2


def _configs(call: MoECall, inner: InnerProduct, backend: str, config):
    """(GEMM class, config of GEMM1, config of GEMM2): the decode GEMMs when the weights are in
    their layout and pairs per expert are few, else the general kernel's tuned config."""
    if isinstance(config, tuple):
        return DecodeGemm, config[0], config[1]
    if isinstance(config, DecodeConfig):
        return DecodeGemm, config, config
    if config is None and inner is InnerProduct.DEQUANT and not settings.current().forced_config:
        if call.w13.layout == GROUP_HALVES and call.w2.layout == GROUP_HALVES:
            decode = choose_decode_configs(call.problem)
            if decode is not None:
                return DecodeGemm, decode[0], decode[1]
    cfg = config or choose_config(call, backend)
    return _Gemm, cfg, cfg.gemm2()


def fused_moe(call: MoECall, inner: InnerProduct, backend: str, *,
              dense: tuple[torch.Tensor, torch.Tensor] | None = None,
              config=None) -> torch.Tensor:
    """``[M, H]`` in the activation dtype.

    Args:
        call: the validated call (M > 0, E_local > 0).
        inner: the GEMMs' inner product.
        backend: the backend's name, which its tuned configs are keyed on.
        dense: ``(w13 [E, 2I, H], w2 [E, H, I])`` in the dot dtype, for `InnerProduct.DENSE`.
        config: instead of the lookup (tuning, tests): a `MoEConfig` for the general kernel,
            or a `DecodeConfig` (or one per GEMM, as a pair) for the decode GEMMs.
    """
    p = call.problem
    x = call.hidden_states
    dtype = x.dtype
    gemm_class, cfg, cfg2 = _configs(call, inner, backend, config)
    num_pairs = p.num_pairs
    max_blocks = max_aligned_blocks(num_pairs, p.num_local_experts, cfg.block_m)
    out = _new_buffer((p.num_tokens, p.hidden), dtype, x.device)
    if max_blocks == 0:
        return out.zero_()

    # The kernels index topk_ids and expert_map as flat unit-stride arrays. reshape(-1) alone
    # can return a strided view (a [M, 1] column sliced from a wider tensor), so copy if needed.
    topk_ids = call.topk_ids.reshape(-1).contiguous()
    expert_map = call.expert_map.contiguous() if call.expert_map is not None else None
    aligned = align(topk_ids, cfg.block_m, p.num_local_experts, p.num_global_experts, expert_map)
    topk_weights = call.topk_weights.reshape(-1)
    if topk_weights.dtype != torch.float32 or not topk_weights.is_contiguous():
        topk_weights = topk_weights.to(torch.float32).contiguous()
    on_input = call.apply_router_weight_on_input
    w13, w2 = dense if inner is InnerProduct.DENSE else (call.w13, call.w2)
    dequant_ptx = (inner is InnerProduct.DEQUANT
                   and use_dequant_ptx(call.device, _dot_dtype(dtype, inner)))
    act_fn = epilogue_of(call.activation)
    if gemm_class is DecodeGemm:
        gemm = DecodeGemm(call, aligned, max_blocks, topk_weights, dequant_ptx, act_fn)
    else:
        gemm = _Gemm(call, inner, aligned, max_blocks, topk_weights, dequant_ptx, act_fn)

    act = _new_buffer((num_pairs, p.intermediate), dtype, x.device)
    weight1 = _WEIGHT_BEFORE_BIAS if on_input else _WEIGHT_NONE
    splits1, k_per_split1 = _k_slices(p.hidden, cfg)
    if splits1 == 1:
        gemm.launch(x, p.top_k, w13, call.w13_bias, act, n=2 * p.intermediate, k=p.hidden,
                    gated=True, router_weight=weight1, cfg=cfg)
    else:
        partial = _new_buffer((splits1, num_pairs, 2 * p.intermediate), torch.float32, x.device)
        gemm.launch(x, p.top_k, w13, call.w13_bias, partial, n=2 * p.intermediate, k=p.hidden,
                    gated=False, router_weight=weight1, cfg=cfg, splits=splits1,
                    k_per_split=k_per_split1)
        block_i = 64 if settings.current().interpret else 1024
        _split_activation(
            (num_pairs, cdiv(p.intermediate, block_i)),
            partial_ptr=partial, out_ptr=act, inter_size=p.intermediate,
            stride_ps=partial.stride(0), stride_pm=partial.stride(1),
            stride_pn=partial.stride(2), stride_om=act.stride(0), stride_on=act.stride(1),
            alpha=call.alpha, limit=call.limit, INTERLEAVED=call.activation.interleaved,
            ACT_FN=gemm.act_fn, NUM_SPLITS=splits1, BLOCK_I=block_i,
        )

    splits2, k_per_split2 = _k_slices(p.intermediate, cfg2)
    # GEMM2's per-pair rows; with split-K one float32 plane per K slice, summed by topk_sum.
    inter = (_new_buffer((num_pairs, p.hidden), dtype, x.device) if splits2 == 1 else
             _new_buffer((splits2, num_pairs, p.hidden), torch.float32, x.device))
    gemm.launch(act, 1, w2, call.w2_bias, inter, n=p.hidden, k=p.intermediate, gated=False,
                router_weight=_WEIGHT_NONE if on_input else _WEIGHT_AFTER_BIAS, cfg=cfg2,
                splits=splits2, k_per_split=k_per_split2)
    inter_rows = inter if splits2 == 1 else inter[0]
    has_map = expert_map is not None
    block_h = 64 if settings.current().interpret else 1024
    _topk_sum(
        (p.num_tokens, cdiv(p.hidden, block_h)),
        inter_ptr=inter, topk_ids_ptr=topk_ids,
        expert_map_ptr=expert_map if has_map else topk_ids, out_ptr=out, H=p.hidden,
        num_global_experts=p.num_global_experts, num_local_experts=p.num_local_experts,
        stride_im=inter_rows.stride(0), stride_ih=inter_rows.stride(1),
        stride_om=out.stride(0), stride_oh=out.stride(1),
        stride_is=inter.stride(0) if splits2 > 1 else 0,
        TOP_K=p.top_k, HAS_MAP=has_map, BLOCK_H=block_h, NUM_SPLITS=splits2,
    )
    return out

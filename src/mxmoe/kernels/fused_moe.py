"""Launchers of the fused MoE: align -> GEMM1 + activation -> GEMM2 + weight -> top-k sum.

No host synchronisation anywhere: sizes come from shapes only, so a forward can be captured in
a CUDA graph.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..backends.base import MoEArgs
from ..routing import Alignment, max_aligned_blocks
from . import configs
from ._align import align_count_kernel, align_kernel, align_offsets_kernel, align_scatter_kernel
from ._moe_gemm import moe_gemm_kernel, split_activation_kernel, topk_sum_kernel

#: Up to this many (token, slot) pairs the alignment runs as one Triton program; above, as three
#: launches over chunks of pairs (count, offsets, scatter) that spread over the GPU.
ALIGN_ONE_PROGRAM_MAX_PAIRS = 1024
#: Chunks of pairs of the multi-program alignment (its offsets program holds a chunk x expert
#: table in registers), and the pairs each step of the alignments' loops takes (each step holds
#: a pairs x experts one-hot table): both shrink with many experts to stay in registers.
ALIGN_MAX_CHUNKS = 64
ALIGN_SUB = 128
_ALIGN_TABLE_ELEMENTS = 32768  # as measured on the H100 with 256 bins (gpt-oss-120b)


def _align_sizes(num_bins: int) -> tuple[int, int]:
    """(pairs per loop step, most chunks) for ``num_bins`` expert bins (powers of two)."""
    if _interpreting():
        return 16, 4
    fit = max(1, _ALIGN_TABLE_ELEMENTS // num_bins)
    return max(16, min(ALIGN_SUB, fit)), max(4, min(ALIGN_MAX_CHUNKS, fit))

_MODES = {"dequant": 0, "scaled": 1, "dense": 2}
_ACTIVATIONS = {"swigluoai": 1, "silu": 2}
_DOT_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _new_buffer(shape, dtype, device) -> torch.Tensor:
    """torch.empty, or NaN-filled under MXMOE_POISON=1 so that an unwritten element shows."""
    if os.environ.get("MXMOE_POISON", "0") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def use_dequant_ptx(device: torch.device, dot_dtype: torch.dtype) -> bool:
    """Whether the dequant mode takes the PTX nibble conversion (`_mxfp4_to_bf16_ptx`): bf16 on
    an NVIDIA GPU of compute capability 8.0 or newer (fma.rn.bf16x2), compiled rather than
    interpreted. MXMOE_DEQUANT_PTX=0 turns it off (the portable bit manipulation in fp32)."""
    if os.environ.get("MXMOE_DEQUANT_PTX", "1") == "0" or _interpreting():
        return False
    if dot_dtype != torch.bfloat16 or device.type != "cuda" or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def _dot_dtype(activation_dtype: torch.dtype, mode: str) -> torch.dtype:
    """The tensor-core operand dtype: the activation dtype, except that tl.dot_scaled takes
    only bf16/fp16 operands, so float32 activations go through it as bf16."""
    if mode == "scaled" and activation_dtype == torch.float32:
        return torch.bfloat16
    return activation_dtype


def choose_config(args: MoEArgs, mode: str) -> configs.MoEConfig:
    forced = os.environ.get("MXMOE_CONFIG")
    if forced:
        import json

        return configs.MoEConfig(**json.loads(forced))
    p = args.problem
    device = args.hidden_states.device
    if device.type == "cuda" and not _interpreting():
        name = torch.cuda.get_device_name(device)
        tuned = configs.lookup(name, mode, p.num_tokens, p.hidden, p.intermediate,
                               p.num_local_experts, p.top_k)
        if tuned is not None:
            return tuned
    return configs.heuristic_config(p.num_tokens, p.top_k, p.num_local_experts, _interpreting())


def align(topk_ids: torch.Tensor, block_m: int, num_local: int, num_global: int,
          expert_map: torch.Tensor | None) -> Alignment:
    """Sort the pairs by local expert, padded to ``block_m`` (see `mxmoe.routing.Alignment`)."""
    num_pairs = topk_ids.numel()
    max_blocks = max_aligned_blocks(num_pairs, num_local, block_m)
    device = topk_ids.device
    sorted_ids = torch.empty(max_blocks * block_m, dtype=torch.int32, device=device)
    expert_ids = torch.empty(max_blocks, dtype=torch.int32, device=device)
    total = torch.empty(1, dtype=torch.int32, device=device)
    flat = topk_ids.reshape(-1).contiguous()  # unit stride: the kernels index it flat
    expert_map = expert_map.contiguous() if expert_map is not None else None
    emap = expert_map if expert_map is not None else flat
    num_bins = triton.next_power_of_2(num_local + 1)
    sub, max_chunks = _align_sizes(num_bins)
    if num_pairs <= ALIGN_ONE_PROGRAM_MAX_PAIRS:
        align_kernel[(1,)](
            flat, emap, sorted_ids, expert_ids, total,
            num_pairs, num_global, num_local, max_blocks,
            HAS_MAP=expert_map is not None, BLOCK_M=block_m, NUM_BINS=num_bins,
            CHUNK=sub, num_warps=4,
        )
        return Alignment(sorted_ids, expert_ids, total, block_m)

    pairs_per_chunk = triton.cdiv(triton.cdiv(num_pairs, max_chunks), sub) * sub
    chunks = triton.cdiv(num_pairs, pairs_per_chunk)
    num_rows = max_blocks * block_m
    work = torch.empty(2 * max_chunks * num_bins + num_bins, dtype=torch.int32, device=device)
    chunk_counts = work[: max_chunks * num_bins]
    chunk_base = work[max_chunks * num_bins: 2 * max_chunks * num_bins]
    ends = work[2 * max_chunks * num_bins:]
    has_map = expert_map is not None
    align_count_kernel[(chunks,)](
        flat, emap, sorted_ids, chunk_counts,
        num_pairs, num_global, num_local, pairs_per_chunk, num_rows,
        triton.cdiv(triton.cdiv(num_rows, chunks), sub) * sub,
        HAS_MAP=has_map, NUM_BINS=num_bins, SUB=sub, num_warps=4,
    )
    align_offsets_kernel[(1,)](
        chunk_counts, chunk_base, ends, total, chunks, num_local,
        BLOCK_M=block_m, NUM_BINS=num_bins, MAX_CHUNKS=max_chunks,
        num_warps=8 if num_bins >= 128 else 4,
    )
    align_scatter_kernel[(chunks,)](
        flat, emap, sorted_ids, expert_ids, chunk_base, ends, total,
        num_pairs, num_global, num_local, pairs_per_chunk, max_blocks,
        triton.cdiv(triton.cdiv(max_blocks, chunks), sub) * sub,
        HAS_MAP=has_map, BLOCK_M=block_m, NUM_BINS=num_bins, SUB=sub, num_warps=4,
    )
    return Alignment(sorted_ids, expert_ids, total, block_m)


def _k_slices(k: int, cfg: configs.MoEConfig) -> tuple[int, int]:
    """(slices, K per slice): at most ``cfg.split_k`` slices of whole K tiles, none empty."""
    k_tiles = triton.cdiv(k, cfg.block_k)
    per_split = triton.cdiv(k_tiles, max(1, min(cfg.split_k, k_tiles)))
    return triton.cdiv(k_tiles, per_split), per_split * cfg.block_k


def _launch_gemm(a, a_row_div, weight, bias, out, topk_weights, aligned, max_blocks,
                 num_pairs, n, k, *, mode, activation, router_weight, alpha, limit, dot_dtype,
                 cfg: configs.MoEConfig, dequant_ptx: bool, splits: int = 1,
                 k_per_split: int | None = None):
    """One grouped GEMM. With ``splits`` > 1, ``out`` is (splits, num_pairs, N) float32 and
    ``activation`` must be 0: the caller sums the planes."""
    assert splits == 1 or (activation == 0 and out.dim() == 3 and out.shape[0] == splits)
    n_out = n // 2 if activation else n
    cols_per_tile = cfg.block_n // 2 if activation else cfg.block_n
    grid = (max_blocks * splits * triton.cdiv(n_out, cols_per_tile),)
    out_rows = out if out.dim() == 2 else out[0]
    dense = mode == "dense"
    w = weight if dense else weight.blocks
    s = weight if dense else weight.scales  # unused when dense
    moe_gemm_kernel[grid](
        a, w, s, bias if bias is not None else out, out, topk_weights,
        aligned.sorted_ids, aligned.expert_ids, aligned.num_tokens_post_padded,
        n, k, num_pairs, max_blocks,
        a.stride(0), a.stride(1),
        w.stride(0), w.stride(1), w.stride(2),
        s.stride(0), s.stride(1), s.stride(2),
        bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0,
        out_rows.stride(0), out_rows.stride(1),
        out.stride(0) if splits > 1 else 0, k_per_split or k,
        alpha, limit,
        A_ROW_DIV=a_row_div,
        WEIGHT_MODE=_MODES[mode],
        ACTIVATION=activation,
        ROUTER_WEIGHT=router_weight,
        HAS_BIAS=bias is not None,
        SPLIT_DOT=cfg.split_dot,
        DEQUANT_PTX=dequant_ptx,
        SWAP_AB=cfg.swap_ab,
        DOT_DTYPE=_DOT_DTYPES[dot_dtype],
        DOT_PRECISION="ieee" if dot_dtype == torch.float32 else None,
        DOT_FORMAT="fp16" if dot_dtype == torch.float16 else "bf16",
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        SPLIT_K=splits,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def fused_moe(args: MoEArgs, *, mode: str, w13_dense: torch.Tensor | None = None,
              w2_dense: torch.Tensor | None = None, config: configs.MoEConfig | None = None,
              ) -> torch.Tensor:
    """``[M, H]`` in the activation dtype. ``mode``: "dequant", "scaled" or "dense"."""
    p = args.problem
    x = args.hidden_states
    dtype = x.dtype
    cfg = config or choose_config(args, mode)
    num_pairs = p.num_tokens * p.top_k
    max_blocks = max_aligned_blocks(num_pairs, p.num_local_experts, cfg.block_m)
    out = _new_buffer((p.num_tokens, p.hidden), dtype, x.device)
    if max_blocks == 0:
        return out.zero_()

    # The kernels index topk_ids and expert_map as flat unit-stride arrays. reshape(-1) alone
    # can return a strided view (a [M, 1] column sliced from a wider tensor), so copy if needed.
    topk_ids = args.topk_ids.reshape(-1).contiguous()
    expert_map = args.expert_map.contiguous() if args.expert_map is not None else None
    aligned = align(topk_ids, cfg.block_m, p.num_local_experts, p.num_global_experts, expert_map)
    topk_weights = args.topk_weights.reshape(-1).to(torch.float32).contiguous()
    on_input = args.apply_router_weight_on_input
    w13 = w13_dense if mode == "dense" else args.w13
    w2 = w2_dense if mode == "dense" else args.w2

    dot_dtype = _dot_dtype(dtype, mode)
    gemm_kw = dict(aligned=aligned, max_blocks=max_blocks, num_pairs=num_pairs, alpha=args.alpha,
                   limit=args.limit, mode=mode, dot_dtype=dot_dtype,
                   dequant_ptx=mode == "dequant" and use_dequant_ptx(x.device, dot_dtype))
    act = _new_buffer((num_pairs, p.intermediate), dtype, x.device)
    activation = _ACTIVATIONS[p.activation.value]
    splits1, k_per_split1 = _k_slices(p.hidden, cfg)
    if splits1 == 1:
        _launch_gemm(x, p.top_k, w13, args.w13_bias, act, topk_weights, n=2 * p.intermediate,
                     k=p.hidden, activation=activation, router_weight=1 if on_input else 0,
                     cfg=cfg, **gemm_kw)
    else:
        partial = _new_buffer((splits1, num_pairs, 2 * p.intermediate), torch.float32, x.device)
        _launch_gemm(x, p.top_k, w13, args.w13_bias, partial, topk_weights,
                     n=2 * p.intermediate, k=p.hidden, activation=0,
                     router_weight=1 if on_input else 0, cfg=cfg, splits=splits1,
                     k_per_split=k_per_split1, **gemm_kw)
        block_i = 1024 if not _interpreting() else 64
        split_activation_kernel[(num_pairs, triton.cdiv(p.intermediate, block_i))](
            partial, act, p.intermediate,
            partial.stride(0), partial.stride(1), partial.stride(2),
            act.stride(0), act.stride(1), args.alpha, args.limit,
            ACTIVATION=activation, NUM_SPLITS=splits1, BLOCK_I=block_i,
        )

    cfg2 = cfg.gemm2()
    splits2, k_per_split2 = _k_slices(p.intermediate, cfg2)
    # GEMM2's per-pair rows; with split-K one float32 plane per K slice, summed by topk_sum.
    inter = (_new_buffer((num_pairs, p.hidden), dtype, x.device) if splits2 == 1 else
             _new_buffer((splits2, num_pairs, p.hidden), torch.float32, x.device))
    _launch_gemm(act, 1, w2, args.w2_bias, inter, topk_weights, n=p.hidden, k=p.intermediate,
                 activation=0, router_weight=0 if on_input else 2, cfg=cfg2, splits=splits2,
                 k_per_split=k_per_split2, **gemm_kw)
    inter_rows = inter if splits2 == 1 else inter[0]
    has_map = expert_map is not None
    block_h = 1024 if not _interpreting() else 64
    topk_sum_kernel[(p.num_tokens, triton.cdiv(p.hidden, block_h))](
        inter, topk_ids, expert_map if has_map else topk_ids, out,
        p.hidden, p.num_global_experts, p.num_local_experts,
        inter_rows.stride(0), inter_rows.stride(1), out.stride(0), out.stride(1),
        inter.stride(0) if splits2 > 1 else 0,
        TOP_K=p.top_k, HAS_MAP=has_map, BLOCK_H=block_h, NUM_SPLITS=splits2,
    )
    return out

"""The launch arguments both grouped-GEMM kernels share (`_grouped`: one contract with the
alignment and one epilogue), built once for either: `GroupedGemm.contract_arguments`.

`fused_moe._Gemm` (the general kernel) and `decode.DecodeGemm` (the GEMV) add what only their
kernel takes.
"""

from __future__ import annotations

import torch

from .launch import cdiv


class GroupedGemm:
    """What both GEMMs of one plan share: the call, the alignment, the routing weights, the
    activation's epilogue. Tensors are `launch.Ref`s."""

    def __init__(self, call, aligned, max_blocks: int, topk_weights, act_fn):
        self.call = call
        self.aligned = aligned
        self.max_blocks = max_blocks
        self.num_pairs = call.problem.num_pairs
        self.topk_weights = topk_weights
        self.act_fn = act_fn

    def contract_arguments(self, a, a_row_div, blocks, scales, bias, out, *, n, k, gated,
                           router_weight, cfg, splits, k_per_split) -> tuple[tuple, dict]:
        """(grid, arguments) of one grouped GEMM ``out[pair] = epilogue(a[pair // a_row_div]
        @ weight[e]^T)``: ``blocks`` / ``scales`` as the kernel reads them, ``bias`` [E, N] or
        None, ``out`` [num_pairs, N // 2 if gated else N], or with ``splits`` > 1 (ungated)
        [splits, num_pairs, N] float32 planes that the caller sums."""
        if splits > 1 and (gated or out.dim() != 3 or out.shape[0] != splits
                           or out.dtype != torch.float32):
            raise ValueError("split-K GEMMs write (splits, pairs, N) float32 planes, ungated")
        tiles, shared = gemm_tensor_arguments(a, blocks, scales, bias, out, n=n, k=k,
                                              gated=gated, cfg=cfg, splits=splits,
                                              k_per_split=k_per_split)
        aligned = self.aligned
        grid = (self.max_blocks * splits * tiles,)
        return grid, dict(
            shared, topk_weights_ptr=self.topk_weights, sorted_ids_ptr=aligned.sorted_ids,
            expert_ids_ptr=aligned.expert_ids,
            num_post_padded_ptr=aligned.num_tokens_post_padded,
            num_pairs=self.num_pairs, max_blocks=self.max_blocks,
            alpha=self.call.alpha, limit=self.call.limit,
            A_ROW_DIV=a_row_div, GATED=gated, INTERLEAVED=self.call.activation.interleaved,
            ACT_FN=self.act_fn, ROUTER_WEIGHT=router_weight, HAS_BIAS=bias is not None,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=splits,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )


def gemm_tensor_arguments(a, blocks, scales, bias, out, *, n, k, gated, cfg, splits,
                          k_per_split) -> tuple[int, dict]:
    """(N tiles, arguments) every grouped-GEMM kernel of the fused MoE takes alike: the tensors
    and their strides, N, K and the K slice (the kernels' shared parameter names)."""
    n_out = n // 2 if gated else n
    cols_per_tile = cfg.block_n // 2 if gated else cfg.block_n
    out_rows = out if out.dim() == 2 else out.plane(0)
    sa, so = a.stride(), out_rows.stride()
    sb = bias.stride() if bias is not None else (0, 0)
    sw, ss = blocks.stride(), scales.stride()
    return cdiv(n_out, cols_per_tile), dict(
        a_ptr=a, b_ptr=blocks, b_scale_ptr=scales, bias_ptr=bias if bias is not None else out,
        out_ptr=out, N=n, K=k,
        stride_am=sa[0], stride_ak=sa[1],
        stride_be=sw[0], stride_bn=sw[1], stride_bk=sw[2],
        stride_se=ss[0], stride_sn=ss[1], stride_sk=ss[2],
        stride_bias_e=sb[0], stride_bias_n=sb[1], stride_om=so[0], stride_on=so[1],
        stride_os=out.stride(0) if splits > 1 else 0, k_per_split=k_per_split or k,
    )

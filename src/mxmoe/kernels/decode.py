"""Launchers of the decode GEMMs (`_decode_gemm`): the memory-bound regime of the fused MoE.

Two variants of `DecodeConfig`, both reading the weights as int32 words in either layout:
- "gemv": `DecodeGemm.step` has the contract of `fused_moe._Gemm.step` (same alignment, same
  epilogues, same split-K planes).
- "direct": `TokenGemm.step`, no alignment: a program per token and N tile over the token's
  top-k experts; GEMM2 sums the pairs itself, so a layer is two launches (plus the split-K
  activation when GEMM1 is split).
`fused_moe` picks them when pairs per expert are few (`choose_decode_configs`).
`mxmoe.testing.decode_fused_experts` runs a whole layer on them with given configs (tests,
benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .. import settings
from ..layouts import GROUP_HALVES, MMA_LANES, PLAIN
from ..problem import MoEProblem
from ._decode_gemm import (LAYOUT_GROUP_HALVES, LAYOUT_MMA_LANES, LAYOUT_PLAIN, decode_gemv_kernel,
                           decode_token_kernel)
from .grouped_gemm import GroupedGemm, gemm_tensor_arguments
from .launch import TRITON_DTYPES, Launcher, Step

__all__ = ["DecodeConfig", "VARIANTS", "DecodeGemm", "TokenGemm", "choose_decode_config",
           "choose_decode_configs", "default_decode_config", "direct_configs", "plane_words",
           "word_layout"]

#: Both CUDA-core fp32 FMA: "gemv" on the aligned pairs (1..4 of one expert a program), "direct"
#: on each token's top-k slots without alignment. (A tensor-core swap-AB variant was measured
#: slower and removed: benchmarks/NOTES.md section 14.)
VARIANTS = ("gemv", "direct")

#: The layouts the decode kernels read, and their W_LAYOUT.
_WORD_LAYOUTS = {PLAIN: LAYOUT_PLAIN.value, GROUP_HALVES: LAYOUT_GROUP_HALVES.value,
                 MMA_LANES: LAYOUT_MMA_LANES.value}


def word_layout(layout) -> int:
    """The decode kernels' W_LAYOUT for a weight layout (ValueError for one they cannot read)."""
    try:
        return _WORD_LAYOUTS[layout]
    except KeyError:
        names = ", ".join(repr(lay.name) for lay in _WORD_LAYOUTS)
        raise ValueError(f"the decode GEMMs read the {names} layouts, got {layout.name!r}"
                         ) from None


@dataclass(frozen=True)
class DecodeConfig:
    """Tiles and launch parameters of one decode GEMM.

    ``block_m``: "gemv": the alignment's block (pairs per program), 1, 2 or 4; "direct": the
    token's top-k slots decoded per step (their weight tiles loaded together), 1 to 8.
    ``split_k`` K slices each run as their own program and write fp32 planes that a follow-up
    kernel sums in a fixed order ("direct": GEMM1 only, as GEMM2 sums the pairs itself).
    """

    variant: str = "gemv"
    block_m: int = 1
    block_n: int = 32
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"DecodeConfig.variant must be one of {VARIANTS}, got "
                             f"{self.variant!r}")
        for name in ("block_m", "block_n", "block_k", "num_warps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"DecodeConfig.{name} must be a power of two, got {value!r}")
        if self.block_k < 32:
            raise ValueError(f"DecodeConfig.block_k must be at least 32 (one scale group), got "
                             f"{self.block_k}")
        if self.block_n < 2:
            raise ValueError(f"DecodeConfig.block_n must be at least 2 (a gate/up pair), got "
                             f"{self.block_n}")
        most = 8 if self.variant == "direct" else 4
        if self.block_m > most:
            raise ValueError(f"DecodeConfig.block_m must be at most {most} for the "
                             f"{self.variant!r} variant, got {self.block_m}")
        if not isinstance(self.split_k, int) or self.split_k < 1:
            raise ValueError(f"DecodeConfig.split_k must be a positive int, got {self.split_k!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"DecodeConfig.num_stages must be a positive int, got "
                             f"{self.num_stages!r}")


def default_decode_config(pairs_per_expert: float) -> DecodeConfig:
    """The aligned GEMV's config measured best on the H200 (scripts/gpu_decode.py,
    benchmarks/NOTES.md section 14): narrow N tiles, GEMM1 in 4 K slices (GEMM2's config is
    `decode_config2`). Used when a "gemv" run is asked for; the default path is "direct"."""
    if settings.current().interpret:
        return DecodeConfig("gemv", block_m=1, block_n=32, block_k=64, num_stages=1)
    return DecodeConfig("gemv", block_m=1, block_n=64, block_k=128, num_warps=4, num_stages=3,
                        split_k=4)


def decode_config2(pairs_per_expert: float) -> DecodeConfig:
    """The aligned GEMV's GEMM2 config (the same alignment block as GEMM1's)."""
    if settings.current().interpret:
        return default_decode_config(pairs_per_expert)
    return DecodeConfig("gemv", block_m=1, block_n=64, block_k=64, num_warps=4, num_stages=3,
                        split_k=3)


def direct_configs(num_tokens: int) -> tuple[DecodeConfig, DecodeConfig]:
    """(GEMM1, GEMM2) configs of the direct GEMMs, measured best on the H200 at gpt-oss shapes
    (scripts/gpu_direct.py, both modes; benchmarks/NOTES.md section 16). GEMM1: all four slots
    of a token a step over 4-8 rows (2-4 output columns) and 512 K, so a program keeps 4-8 KB
    of weights in flight and the grid has 720-1440 programs at M = 1 (24.4 us at 20b); from 8
    tokens, wider tiles in two K slices. GEMM2: at M = 1 one slot a step over 8 rows and 1024 K
    (360 programs, 19.9 us; 90 programs took 45 us); more tokens give more programs, so two
    slots over 16 or 32 rows."""
    if settings.current().interpret:
        return (DecodeConfig("direct", block_m=2, block_n=16, block_k=64, num_stages=1),
                DecodeConfig("direct", block_m=2, block_n=16, block_k=64, num_stages=1))
    if num_tokens == 1:
        first = DecodeConfig("direct", block_m=4, block_n=4, block_k=512)
    elif num_tokens < 8:
        first = DecodeConfig("direct", block_m=4, block_n=8, block_k=512)
    else:
        first = DecodeConfig("direct", block_m=4, block_n=32, block_k=128, split_k=2)
    if num_tokens == 1:
        second = DecodeConfig("direct", block_m=1, block_n=8, block_k=1024)
    elif num_tokens == 2:
        second = DecodeConfig("direct", block_m=2, block_n=16, block_k=256)
    else:
        second = DecodeConfig("direct", block_m=2, block_n=32, block_k=256)
    return first, second


#: Up to this many pairs per expert the direct decode GEMMs run; above, the general kernel.
#: Measured on the H200 (benchmarks/NOTES.md section 16): ahead of the general kernel by 4-28%
#: up to 0.5 pairs per expert (20b M <= 4, 120b M <= 16), behind it from 1.0 (20b M = 8:
#: 235 against 208 us; 120b M = 32: 853 against 721): the GEMV decodes every weight once per
#: pair, so its cost grows with the pairs where the tensor-core kernel's does not.
DECODE_MAX_PAIRS_PER_EXPERT = 0.5


def choose_decode_config(problem: MoEProblem) -> DecodeConfig | None:
    """GEMM1's decode config for this problem, or None when the general kernel should run."""
    configs = choose_decode_configs(problem)
    return None if configs is None else configs[0]


def choose_decode_configs(problem: MoEProblem) -> tuple[DecodeConfig, DecodeConfig] | None:
    """(GEMM1, GEMM2) decode configs for this problem, or None for the general kernel."""
    if problem.pairs_per_expert > DECODE_MAX_PAIRS_PER_EXPERT:
        return None
    return direct_configs(problem.num_tokens)


_gemv = Launcher(decode_gemv_kernel)


class DecodeGemm(GroupedGemm):
    """The decode GEMMs of one plan: `fused_moe._Gemm`'s interface, GROUP_HALVES weights."""

    def step(self, a, a_row_div, blocks, scales, layout, bias, out, *, n, k, gated,
             router_weight, cfg, splits=1, k_per_split=None) -> Step:
        """``a`` [A_rows, K] (row of pair p: ``p // a_row_div``); ``blocks`` [E, N, K/2] uint8
        and ``scales`` [E, N, K/32] of an MXFP4 weight in the GROUP_HALVES ``layout``; the rest
        as `GroupedGemm.contract_arguments`. All `Ref`s. ``router_weight``: 0 none, 1 before
        the bias, 2 after it."""
        w_layout = word_layout(layout)
        if cfg.variant != "gemv":
            raise ValueError(f"DecodeGemm runs the 'gemv' variant, got {cfg.variant!r}")
        if self.aligned.block_m != cfg.block_m:
            raise ValueError(f"the alignment's block_m {self.aligned.block_m} is not the "
                             f"decode config's {cfg.block_m}")
        # The GEMV reads the bytes as int32 words (E, N, K/8).
        grid, arguments = self.contract_arguments(
            a, a_row_div, blocks.viewed_as(torch.int32), scales, bias, out, n=n, k=k,
            gated=gated, router_weight=router_weight, cfg=cfg, splits=splits,
            k_per_split=k_per_split)
        per_slice = k_per_split or k
        return Step(_gemv, grid, dict(
            arguments, EVEN_K=k % cfg.block_k == 0 and per_slice % cfg.block_k == 0,
            W_LAYOUT=w_layout))


_token = Launcher(decode_token_kernel)


def plane_words(k: int) -> int:
    """Words a row's activation plane holds for K = ``k`` (a multiple of 32): k / 8, rounded
    up to 16 so that every plane starts 64-byte aligned (Triton specialises strides divisible
    by 16: the loads of a code's activations are then 16-byte vectors)."""
    return -(-(k // 8) // 16) * 16


class TokenGemm:
    """The "direct" decode GEMMs of one plan: a program per (token, N tile, K slice) over the
    token's top-k slots, no alignment. Tensors are `launch.Ref`s."""

    def __init__(self, call, topk_ids, topk_weights, expert_map, act_fn):
        self.call = call
        self.topk_ids = topk_ids
        self.topk_weights = topk_weights
        self.expert_map = expert_map
        self.act_fn = act_fn

    def step(self, a, a_row_div, blocks, scales, layout, bias, out, *, n, k, gated,
             router_weight, cfg, sum_pairs=False, splits=1, k_per_split=None,
             out_planes_layout=None) -> Step:
        """``out[pair] = epilogue(a[pair // a_row_div] @ weight[e]^T)`` (``out`` [num_pairs,
        N // 2 if gated else N], or with ``splits`` > 1 (ungated) [splits, num_pairs, N]
        float32 planes), or with ``sum_pairs`` ``out[t] = sum_j epilogue_j(...)`` over the
        token's slots ([num_tokens, N], unsplit). ``blocks`` [E, N, K/2] uint8 and ``scales``
        [E, N, K/32] of an MXFP4 weight in ``layout``; ``router_weight``: 0 none, 1 before the
        bias, 2 after it.

        Activation planes (`fused_moe` with MXMOE_DECODE_PLANES=1): ``a`` may be [rows, 8,
        `plane_words` (K)] float32 planes; gated with ``out_planes_layout`` (the layout of the
        weight that will read them), ``out`` is [num_pairs, 8, `plane_words` (N / 2)] float32
        planes, the activation rounded to the call's dtype."""
        w_layout = word_layout(layout)
        if cfg.variant != "direct":
            raise ValueError(f"TokenGemm runs the 'direct' variant, got {cfg.variant!r}")
        x_planes = a.dim() == 3
        out_planes = out_planes_layout is not None
        if splits > 1 and (gated or sum_pairs or out.dim() != 3 or out.shape[0] != splits
                           or out.dtype != torch.float32 or x_planes):
            raise ValueError("split-K direct GEMMs write (splits, pairs, N) float32 planes, "
                             "ungated, per pair")
        if x_planes and (a.dtype != torch.float32 or a.shape[1:] != (8, plane_words(k))):
            raise ValueError(f"activation planes are (rows, 8, {plane_words(k)}) float32, got "
                             f"{a.dtype} {a.shape}")
        if out_planes and (not gated or sum_pairs or out.dtype != torch.float32
                           or out.shape[1:] != (8, plane_words(n // 2))):
            raise ValueError(f"GEMM1 writes gated activation planes (pairs, 8, "
                             f"{plane_words(n // 2)}) float32, got {out.dtype} {out.shape}")
        p = self.call.problem
        # The GEMV reads the bytes as int32 words (E, N, K/8).
        rows_a = a.plane(0) if x_planes else a  # (the planes' own strides are set below)
        rows_out = out.plane(0) if out_planes else out
        tiles, shared = gemm_tensor_arguments(rows_a, blocks.viewed_as(torch.int32), scales,
                                              bias, rows_out, n=n, k=k, gated=gated, cfg=cfg,
                                              splits=splits, k_per_split=k_per_split)
        if x_planes:
            shared.update(a_ptr=a, stride_am=a.stride(0), stride_ak=1)
        if out_planes:
            shared.update(out_ptr=out, stride_om=out.stride(0), stride_on=1)
        per_slice = k_per_split or k
        has_map = self.expert_map is not None
        return Step(_token, (p.num_tokens * splits * tiles,), dict(
            shared, stride_ap=a.stride(1) if x_planes else 0,
            stride_op=out.stride(1) if out_planes else 0, X_PLANES=x_planes,
            OUT_PLANES=out_planes, ROUND_DTYPE=TRITON_DTYPES[self.call.hidden_states.dtype],
            OUT_LAYOUT=word_layout(out_planes_layout) if out_planes else 0,
            topk_weights_ptr=self.topk_weights, topk_ids_ptr=self.topk_ids,
            expert_map_ptr=self.expert_map if has_map else self.topk_ids,
            num_tokens=p.num_tokens, num_global_experts=p.num_global_experts,
            num_local_experts=p.num_local_experts, alpha=self.call.alpha, limit=self.call.limit,
            TOP_K=p.top_k, A_ROW_DIV=a_row_div, SUM_PAIRS=sum_pairs, GATED=gated,
            INTERLEAVED=self.call.activation.interleaved, ACT_FN=self.act_fn,
            ROUTER_WEIGHT=router_weight, HAS_BIAS=bias is not None, HAS_MAP=has_map,
            BLOCK_J=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=splits,
            EVEN_K=k % cfg.block_k == 0 and per_slice % cfg.block_k == 0, W_LAYOUT=w_layout,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        ))


def with_split(cfg: DecodeConfig, split_k: int) -> DecodeConfig:
    """``cfg`` with another split_k (for sweeps)."""
    return replace(cfg, split_k=split_k)

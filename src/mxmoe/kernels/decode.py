"""Launchers of the decode GEMMs (`_decode_gemm`): the memory-bound regime of the fused MoE.

`DecodeGemm.step` has the contract of `fused_moe._Gemm.step` (same alignment, same
epilogues, same split-K planes), with the weights in the GROUP_HALVES layout; `fused_moe` picks
it when the weights are in that layout and pairs per expert are few (`choose_decode_config`).
`mxmoe.testing.decode_fused_experts` runs a whole layer on it with given configs (tests,
benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .. import settings
from ..layouts import GROUP_HALVES
from ..problem import MoEProblem
from ._decode_gemm import decode_gemv_kernel
from .grouped_gemm import GroupedGemm
from .launch import Launcher, Step

__all__ = ["DecodeConfig", "VARIANTS", "DecodeGemm", "choose_decode_config",
           "default_decode_config"]

#: "gemv": CUDA-core fp32 FMA (1..4 pairs per expert), the one variant since the tensor-core
#: swap-AB one was measured slower (benchmarks/NOTES.md section 14).
VARIANTS = ("gemv",)


@dataclass(frozen=True)
class DecodeConfig:
    """Tiles and launch parameters of one decode GEMM.

    ``block_m`` is the alignment's block (pairs per program): 1, 2 or 4. ``split_k`` K slices
    each run as their own program and write fp32 planes that a follow-up kernel sums in a
    fixed order.
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
        if self.block_m > 4:
            raise ValueError(f"DecodeConfig.block_m must be 1, 2 or 4, got {self.block_m}")
        if not isinstance(self.split_k, int) or self.split_k < 1:
            raise ValueError(f"DecodeConfig.split_k must be a positive int, got {self.split_k!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"DecodeConfig.num_stages must be a positive int, got "
                             f"{self.num_stages!r}")


def default_decode_config(pairs_per_expert: float) -> DecodeConfig:
    """The GEMV config measured best on the H200 (scripts/gpu_decode.py, benchmarks/NOTES.md
    section 14): narrow N tiles, GEMM1 in 4 K slices (GEMM2's config is `decode_config2`)."""
    if settings.current().interpret:
        return DecodeConfig("gemv", block_m=1, block_n=32, block_k=64, num_stages=1)
    return DecodeConfig("gemv", block_m=1, block_n=64, block_k=128, num_warps=4, num_stages=3,
                        split_k=4)


def decode_config2(pairs_per_expert: float) -> DecodeConfig:
    """GEMM2's decode config (the same alignment block as GEMM1's)."""
    if settings.current().interpret:
        return default_decode_config(pairs_per_expert)
    return DecodeConfig("gemv", block_m=1, block_n=64, block_k=64, num_warps=4, num_stages=3,
                        split_k=3)


#: Up to this many pairs per expert the decode kernels run (when the weights are in the
#: GROUP_HALVES layout); above, the general kernel. Measured on the H200: benchmarks/NOTES.md.
#: (H200: the GEMV is 16% faster than the general kernel at 20b M = 1, level at 0.25 pairs
#: per expert, slower above.)
DECODE_MAX_PAIRS_PER_EXPERT = 0.25


def choose_decode_config(problem: MoEProblem) -> DecodeConfig | None:
    """The decode GEMMs' config for this problem, or None when the general kernel should run."""
    if problem.pairs_per_expert > DECODE_MAX_PAIRS_PER_EXPERT:
        return None
    return default_decode_config(problem.pairs_per_expert)


def choose_decode_configs(problem: MoEProblem) -> tuple[DecodeConfig, DecodeConfig] | None:
    """(GEMM1, GEMM2) decode configs for this problem, or None for the general kernel."""
    first = choose_decode_config(problem)
    if first is None:
        return None
    return first, decode_config2(problem.pairs_per_expert)


_gemv = Launcher(decode_gemv_kernel)


class DecodeGemm(GroupedGemm):
    """The decode GEMMs of one plan: `fused_moe._Gemm`'s interface, GROUP_HALVES weights."""

    def step(self, a, a_row_div, blocks, scales, layout, bias, out, *, n, k, gated,
             router_weight, cfg, splits=1, k_per_split=None) -> Step:
        """``a`` [A_rows, K] (row of pair p: ``p // a_row_div``); ``blocks`` [E, N, K/2] uint8
        and ``scales`` [E, N, K/32] of an MXFP4 weight in the GROUP_HALVES ``layout``; the rest
        as `GroupedGemm.contract_arguments`. All `Ref`s. ``router_weight``: 0 none, 1 before
        the bias, 2 after it."""
        if layout != GROUP_HALVES:
            raise ValueError(f"the decode GEMMs read the {GROUP_HALVES.name!r} layout, got "
                             f"{layout.name!r}")
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
            arguments, EVEN_K=k % cfg.block_k == 0 and per_slice % cfg.block_k == 0))


def with_split(cfg: DecodeConfig, split_k: int) -> DecodeConfig:
    """``cfg`` with another split_k (for sweeps)."""
    return replace(cfg, split_k=split_k)

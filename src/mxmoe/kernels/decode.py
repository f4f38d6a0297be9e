"""Launchers of the decode GEMMs (`_decode_gemm`): the memory-bound regime of the fused MoE.

`launch_decode_gemm` has the contract of one `fused_moe._launch_gemm` call (same alignment, same
epilogues, same split-K planes), with the weights in the GROUP_HALVES layout. `decode_fused_experts`
is a whole layer built from it (align -> GEMM1 -> GEMM2 -> top-k sum), for tests and benchmarks;
the fused MoE's dispatcher picks these kernels when pairs per expert are few.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ..activations import Activation
from ..format import MXFP4Tensor
from ..layouts import GROUP_HALVES
from ..routing import Alignment, max_aligned_blocks
from ._decode_gemm import decode_gemv_kernel, decode_mma_kernel
from ._moe_gemm import split_activation_kernel, topk_sum_kernel
from .fused_moe import _interpreting, _new_buffer, align, use_dequant_ptx

__all__ = ["DecodeConfig", "VARIANTS", "launch_decode_gemm", "decode_fused_experts",
           "k_slices", "default_decode_config"]

#: "gemv": CUDA-core fp32 FMA (1..4 pairs per expert); "mma": tensor-core swap-AB (16 and up).
VARIANTS = ("gemv", "mma")
_ACTIVATIONS = {Activation.SWIGLUOAI: 1, Activation.SILU: 2}
_DOT_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@dataclass(frozen=True)
class DecodeConfig:
    """Tiles and launch parameters of one decode GEMM.

    ``block_m`` is the alignment's block (pairs per program): any power of two for "gemv",
    at least 16 for "mma" (the dot's narrow side). ``split_k`` K slices each run as their own
    program and write fp32 planes that a follow-up kernel sums in a fixed order.
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
        if self.variant == "mma" and (self.block_m < 16 or self.block_n < 16):
            raise ValueError(f"DecodeConfig: the mma variant needs block_m and block_n >= 16 "
                             f"(tl.dot), got {self.block_m} and {self.block_n}")
        if not isinstance(self.split_k, int) or self.split_k < 1:
            raise ValueError(f"DecodeConfig.split_k must be a positive int, got {self.split_k!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"DecodeConfig.num_stages must be a positive int, got "
                             f"{self.num_stages!r}")


def default_decode_config(pairs_per_expert: float) -> DecodeConfig:
    """A starting point before tuning (scripts/gpu_decode.py sweeps around it)."""
    if _interpreting():
        return DecodeConfig("gemv", block_m=1, block_n=32, block_k=64, num_stages=1)
    if pairs_per_expert <= 4:
        block_m = 1 << max(0, int(pairs_per_expert - 1).bit_length())
        return DecodeConfig("gemv", block_m=block_m, block_n=32, block_k=256, num_warps=4,
                            num_stages=3)
    return DecodeConfig("mma", block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=3)


def k_slices(k: int, cfg: DecodeConfig) -> tuple[int, int]:
    """(slices, K per slice): at most ``cfg.split_k`` slices of whole K tiles, none empty."""
    k_tiles = triton.cdiv(k, cfg.block_k)
    per_split = triton.cdiv(k_tiles, max(1, min(cfg.split_k, k_tiles)))
    return triton.cdiv(k_tiles, per_split), per_split * cfg.block_k


def launch_decode_gemm(a: torch.Tensor, a_row_div: int, weight: MXFP4Tensor,
                       bias: torch.Tensor | None, out: torch.Tensor, topk_weights: torch.Tensor,
                       aligned: Alignment, max_blocks: int, num_pairs: int, n: int, k: int, *,
                       activation: int, router_weight: int, alpha: float, limit: float,
                       cfg: DecodeConfig, dequant_ptx: bool = False, splits: int = 1,
                       k_per_split: int | None = None) -> None:
    """One grouped GEMM of the fused MoE, as `fused_moe._launch_gemm`.

    ``a`` [A_rows, K] (row of pair p: ``p // a_row_div``); ``weight`` [E, N, K] MXFP4 in the
    GROUP_HALVES layout; ``bias`` [E, N] or None; ``out`` [num_pairs, N // 2 if gated else N],
    or with ``splits`` > 1 (``activation`` 0) [splits, num_pairs, N] float32 planes that the
    caller sums. ``activation``: 0 none, 1 swigluoai (interleaved gate/up rows), 2 silu
    ([gate | up] halves); ``router_weight``: 0 none, 1 before the bias, 2 after it.
    ``dequant_ptx`` (mma variant, bf16 on NVIDIA sm_80+): the PTX nibble conversion.
    """
    if not isinstance(weight, MXFP4Tensor) or weight.layout != GROUP_HALVES:
        raise ValueError(f"launch_decode_gemm: weight must be an MXFP4Tensor in the "
                         f"{GROUP_HALVES.name!r} layout, got "
                         f"{getattr(weight, 'layout', type(weight).__name__)}")
    if n % 32 or k % 32:
        raise ValueError(f"launch_decode_gemm: N and K must be multiples of 32, got N={n}, K={k}")
    if aligned.block_m != cfg.block_m:
        raise ValueError(f"launch_decode_gemm: the alignment's block_m {aligned.block_m} is not "
                         f"the config's {cfg.block_m}")
    if splits > 1 and (activation or out.dim() != 3 or out.shape[0] != splits
                       or out.dtype != torch.float32):
        raise ValueError(f"launch_decode_gemm: with {splits} K slices out must be float32 "
                         f"[{splits}, num_pairs, N] and activation 0, got {tuple(out.shape)} "
                         f"{out.dtype}, activation {activation}")
    n_out = n // 2 if activation else n
    cols_per_tile = cfg.block_n // 2 if activation else cfg.block_n
    grid = (max_blocks * splits * triton.cdiv(n_out, cols_per_tile),)
    out_rows = out if out.dim() == 2 else out[0]
    w, s = weight.blocks, weight.scales
    common = dict(
        a_ptr=a, w_ptr=w, w_scale_ptr=s, bias_ptr=bias if bias is not None else out,
        out_ptr=out, topk_weights_ptr=topk_weights, sorted_ids_ptr=aligned.sorted_ids,
        expert_ids_ptr=aligned.expert_ids, num_post_padded_ptr=aligned.num_tokens_post_padded,
        N=n, K=k, num_pairs=num_pairs, max_blocks=max_blocks,
        stride_am=a.stride(0), stride_ak=a.stride(1),
        stride_we=w.stride(0), stride_wn=w.stride(1), stride_wk=w.stride(2),
        stride_se=s.stride(0), stride_sn=s.stride(1), stride_sk=s.stride(2),
        stride_bias_e=bias.stride(0) if bias is not None else 0,
        stride_bias_n=bias.stride(1) if bias is not None else 0,
        stride_om=out_rows.stride(0), stride_on=out_rows.stride(1),
        stride_os=out.stride(0) if splits > 1 else 0, k_per_split=k_per_split or k,
        alpha=alpha, limit=limit,
        A_ROW_DIV=a_row_div, ACTIVATION=activation, ROUTER_WEIGHT=router_weight,
        HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, SPLIT_K=splits, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if cfg.variant == "gemv":
        decode_gemv_kernel[grid](**common)
    else:
        dot_dtype = a.dtype
        decode_mma_kernel[grid](
            **common, DEQUANT_PTX=dequant_ptx, DOT_DTYPE=_DOT_DTYPES[dot_dtype],
            DOT_PRECISION="ieee" if dot_dtype == torch.float32 else None,
        )


def decode_fused_experts(
    hidden_states: torch.Tensor,
    w13: MXFP4Tensor,
    w2: MXFP4Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    activation: Activation | str = Activation.SWIGLUOAI,
    alpha: float = 1.702,
    limit: float = 7.0,
    expert_map: torch.Tensor | None = None,
    apply_router_weight_on_input: bool = False,
    config1: DecodeConfig | None = None,
    config2: DecodeConfig | None = None,
) -> torch.Tensor:
    """The whole MoE layer on the decode GEMMs: ``[M, H]`` in the activation dtype.

    Args as `mxmoe.reference.fused_experts_reference` (assumed valid, as after
    `mxmoe.fused_experts`' checks), with ``w13`` [E, 2I, H] and ``w2`` [E, H, I] in the
    GROUP_HALVES layout. ``config1`` / ``config2``: the two GEMMs' configs (one ``block_m``:
    they share the alignment); defaults from `default_decode_config`.
    """
    for name, w in (("w13", w13), ("w2", w2)):
        if not isinstance(w, MXFP4Tensor) or w.layout != GROUP_HALVES:
            raise ValueError(f"decode_fused_experts: {name} must be an MXFP4Tensor in the "
                             f"{GROUP_HALVES.name!r} layout, got {w!r}")
    x = hidden_states
    m, hidden = x.shape
    top_k = topk_ids.shape[1]
    num_local = w13.shape[0]
    inter = w2.shape[2]
    num_pairs = m * top_k
    activation = Activation(activation)
    cfg1 = config1 or default_decode_config(num_pairs / max(1, num_local))
    cfg2 = config2 or cfg1
    if cfg1.block_m != cfg2.block_m:
        raise ValueError(f"decode_fused_experts: config1.block_m {cfg1.block_m} != "
                         f"config2.block_m {cfg2.block_m} (the GEMMs share one alignment)")
    max_blocks = max_aligned_blocks(num_pairs, num_local, cfg1.block_m)
    out = _new_buffer((m, hidden), x.dtype, x.device)
    if max_blocks == 0:
        return out.zero_()
    num_global = expert_map.numel() if expert_map is not None else num_local
    flat_ids = topk_ids.reshape(-1).contiguous()
    expert_map = expert_map.contiguous() if expert_map is not None else None
    aligned = align(flat_ids, cfg1.block_m, num_local, num_global, expert_map)
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    on_input = apply_router_weight_on_input
    ptx = use_dequant_ptx(x.device, x.dtype)
    kw = dict(aligned=aligned, max_blocks=max_blocks, num_pairs=num_pairs, alpha=alpha,
              limit=limit, dequant_ptx=ptx)
    gated = _ACTIVATIONS[activation]

    act = _new_buffer((num_pairs, inter), x.dtype, x.device)
    splits1, per1 = k_slices(hidden, cfg1)
    if splits1 == 1:
        launch_decode_gemm(x, top_k, w13, w13_bias, act, weights, n=2 * inter, k=hidden,
                           activation=gated, router_weight=1 if on_input else 0, cfg=cfg1, **kw)
    else:
        partial = _new_buffer((splits1, num_pairs, 2 * inter), torch.float32, x.device)
        launch_decode_gemm(x, top_k, w13, w13_bias, partial, weights, n=2 * inter, k=hidden,
                           activation=0, router_weight=1 if on_input else 0, cfg=cfg1,
                           splits=splits1, k_per_split=per1, **kw)
        block_i = 64 if _interpreting() else 1024
        split_activation_kernel[(num_pairs, triton.cdiv(inter, block_i))](
            partial, act, inter, partial.stride(0), partial.stride(1), partial.stride(2),
            act.stride(0), act.stride(1), alpha, limit,
            ACTIVATION=gated, NUM_SPLITS=splits1, BLOCK_I=block_i,
        )

    splits2, per2 = k_slices(inter, cfg2)
    rows = (_new_buffer((num_pairs, hidden), x.dtype, x.device) if splits2 == 1 else
            _new_buffer((splits2, num_pairs, hidden), torch.float32, x.device))
    launch_decode_gemm(act, 1, w2, w2_bias, rows, weights, n=hidden, k=inter, activation=0,
                       router_weight=0 if on_input else 2, cfg=cfg2, splits=splits2,
                       k_per_split=per2, **kw)
    rows2d = rows if splits2 == 1 else rows[0]
    has_map = expert_map is not None
    block_h = 64 if _interpreting() else 1024
    topk_sum_kernel[(m, triton.cdiv(hidden, block_h))](
        rows, flat_ids, expert_map if has_map else flat_ids, out,
        hidden, num_global, num_local,
        rows2d.stride(0), rows2d.stride(1), out.stride(0), out.stride(1),
        rows.stride(0) if splits2 > 1 else 0,
        TOP_K=top_k, HAS_MAP=has_map, BLOCK_H=block_h, NUM_SPLITS=splits2,
    )
    return out


def with_split(cfg: DecodeConfig, split_k: int) -> DecodeConfig:
    """``cfg`` with another split_k (for sweeps)."""
    return replace(cfg, split_k=split_k)

"""Launch steps of the prefill GEMM (`_prefill_gemm`): the compute-bound regime of the fused MoE.

`PrefillGemm.step` has the contract of `fused_moe._Gemm.step` (same alignment, same epilogues;
no split-K: the prefill has work items enough), with the weights in the MMA_LANES layout. It can
also read A and write the output in *sorted* rows (row i of the alignment): the plan
(`fused_moe.FusedMoEPlan` with a `PrefillConfig`) runs a whole layer that way, GEMM1 writing
its activations in expert order so that GEMM2 reads contiguous token tiles (TMA on Hopper), and
optionally gathers GEMM1's tokens into expert order first (`PrefillConfig.gather_a`).

`choose_prefill_config` is the dispatch: which calls take these GEMMs, with which tiles.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .. import settings
from ..layouts import MMA_LANES
from ._prefill_gemm import gather_rows_kernel, prefill_gemm_kernel
from .decode import DECODE_MAX_PAIRS_PER_EXPERT
from .launch import TRITON_DTYPES, DescriptorRef, Launcher, Ref, Step, cdiv

__all__ = ["PrefillConfig", "PrefillGemm", "choose_prefill_config", "default_prefill_config",
           "reads_prefill_layout", "PREFILL_MIN_PAIRS_PER_EXPERT", "ROWS_PAIR", "ROWS_SORTED"]

#: A_ROWS / OUT_ROWS of the kernel (`_prefill_gemm`), as plain ints for the launch: pair rows
#: (``a[pair // a_row_div]``, ``out[pair]``) or sorted rows (row i of the alignment).
ROWS_PAIR, ROWS_SORTED = 0, 1
#: ROUTER_WEIGHT of the kernel: none, before the bias, after it (`_moe_gemm`'s values).
WEIGHT_NONE, WEIGHT_BEFORE_BIAS, WEIGHT_AFTER_BIAS = 0, 1, 2


@dataclass(frozen=True)
class PrefillConfig:
    """Tiles and launch parameters of the prefill GEMM.

    ``block_m`` tokens (the alignment's block; wgmma's N: 64..256 on Hopper) by ``block_n``
    weight rows (a multiple of 16; 64 per consumer warpgroup) by ``block_k`` (a multiple of 32).
    ``group_m`` M blocks walk the N tiles together; ``programs`` caps the persistent grid
    (None: ``per_sm`` programs per SM; 2 helps small tiles hide their latency). ``tma``: GEMM2 (and GEMM1 with ``gather_a``) load their token tiles
    through tensor descriptors; ``gather_a``: GEMM1's tokens are first copied into expert order;
    ``flatten``: Triton flattens the tile and K loops into one pipelined loop (the next tile's
    loads start during this tile's epilogue). ``weights_tma``: the codes and scales by TMA
    boxes too (not for gated GEMMs with ``[gate | up]`` halves, which keep their loads): faster
    for tiles of up to 64 tokens, slower for the large ones (NOTES.md section 20).
    """

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 4
    programs: int | None = None
    per_sm: int = 1
    tma: bool = False
    gather_a: bool = False
    flatten: bool = False
    weights_tma: bool = False

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k", "num_warps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"PrefillConfig.{name} must be a power of two, got {value!r}")
        if self.block_m < 16 or self.block_n < 16:
            raise ValueError(f"PrefillConfig: block_m and block_n must be at least 16 (tl.dot; "
                             f"the gate/up rows of a column sit 8 apart), got {self.block_m}, "
                             f"{self.block_n}")
        if self.block_k < 32:
            raise ValueError(f"PrefillConfig.block_k must be at least 32 (one scale group), got "
                             f"{self.block_k}")
        for name in ("group_m", "num_stages", "per_sm"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PrefillConfig.{name} must be a positive int, got {value!r}")
        if self.programs is not None and (not isinstance(self.programs, int) or self.programs < 1):
            raise ValueError(f"PrefillConfig.programs must be None or a positive int, got "
                             f"{self.programs!r}")


#: Past this many pairs per expert (on average) `auto` takes the prefill GEMMs, when the weights
#: are in MMA_LANES and the device runs them (`choose_prefill_config`): everywhere past the
#: decode GEMMs (`decode.DECODE_MAX_PAIRS_PER_EXPERT`). Measured on the H200 (benchmarks/
#: NOTES.md section 17): the general kernel reads MMA_LANES 1.3-1.8x slower than the plain
#: layout, while the prefill GEMMs at 8 pairs per expert are within 10% of the general kernel
#: on plain weights (20b M = 64: 0.325 ms against 0.342; 120b M = 256: 1.35 against 1.23) and
#: from 16 faster (20b M = 128: 0.368 against 0.456; 120b M = 1024: 1.59 against 2.21).
PREFILL_MIN_PAIRS_PER_EXPERT = DECODE_MAX_PAIRS_PER_EXPERT

#: (at least this many pairs per expert, tiles), the largest first: each the fastest measured on
#: the H200 from there up to the previous entry (NOTES.md sections 16, 17 and 20). Fewer tokens a
#: tile where experts hold fewer pairs (less padding in each expert's last tile). Up to 64
#: tokens a tile the codes and scales come by TMA boxes 128-256 wide in K (fewer, larger copies
#: and no per-row predicates: 9-11% faster than cp.async for 16 tokens, 14-15% for 64, 34-39%
#: for 32, where one warpgroup a program and two programs an SM also beat 8 warps on 32 x 256);
#: 128 x 256, then 256 x 128 once experts hold many pairs, with cp.async weights (TMA boxes
#: were slower there).
#:
#: Every entry gathers GEMM1's tokens into expert order (``gather_a``), so that both GEMMs read
#: their token tiles by TMA: with ``cp.async`` token tiles Triton 3.6 lets the next K step's
#: upcast overwrite the registers that the last wgmmas still read (`mxmoe.kernels.sass.
#: register_operand_hazards`), which made the 256 x 128 tile's results change from run to run
#: on the H200 (rel err 0.8-1.3e-2 instead of 4.3e-3); with TMA token tiles the SASS has no such
#: write. The gather costs 0-4% (NOTES.md section 20); tests/test_sass.py keeps every entry free
#: of the hazard with the installed Triton.
PREFILL_TILES = (
    (192, PrefillConfig(block_m=256, block_n=128, block_k=64, num_warps=8, num_stages=4,
                        tma=True, gather_a=True)),
    (64, PrefillConfig(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=4,
                       tma=True, gather_a=True)),
    (32, PrefillConfig(block_m=64, block_n=256, block_k=128, num_warps=8, num_stages=3,
                       tma=True, gather_a=True, weights_tma=True)),
    (16, PrefillConfig(block_m=32, block_n=128, block_k=256, num_warps=4, num_stages=3,
                       tma=True, gather_a=True, weights_tma=True, per_sm=2)),
    (0, PrefillConfig(block_m=16, block_n=128, block_k=256, num_warps=4, num_stages=3,
                      tma=True, gather_a=True, weights_tma=True, per_sm=2)),
)


#: For a gated GEMM whose w13 rows are ``[gate | up]`` halves (silu models), whose codes stay
#: cp.async loads (a TMA box holds consecutive rows): each shipped tile that reads its weights by
#: TMA boxes -> the cp.async tile of the same token count it replaced (NOTES.md sections 17 and
#: 20; the 128-256-wide K steps chosen for TMA boxes were slower by cp.async: 20b M = 64, 282
#: against 228 µs). Same ``block_m``, so the alignment fits both GEMMs.
_HALVES_TILES = {
    cfg: PrefillConfig(block_m=cfg.block_m, block_n=256 if cfg.block_m > 16 else 128,
                       block_k=64 if cfg.block_m > 16 else 128, num_warps=8 if cfg.block_m > 16
                       else 4, num_stages=6 if cfg.block_m > 16 else 4, tma=True,
                       gather_a=True, per_sm=1 if cfg.block_m > 16 else 2)
    for _, cfg in PREFILL_TILES if cfg.weights_tma
}


def gemm_tile(cfg: PrefillConfig, gated: bool, interleaved: bool) -> PrefillConfig:
    """The tile one GEMM of ``cfg`` runs: ``cfg``, except that a gated GEMM with ``[gate | up]``
    halves runs a shipped TMA-weight tile as its cp.async predecessor (`_HALVES_TILES`). Other
    configs (given by a caller) run as given."""
    if gated and not interleaved:
        return _HALVES_TILES.get(cfg, cfg)
    return cfg


def retires_dots(dense: bool, token_tma: bool, dequant_ptx: bool) -> bool:
    """Whether a compiled (NVIDIA) prefill GEMM retires each K step's wgmmas (``RETIRE_DOTS``):
    only the PTX upcast with TMA token tiles is known to compile (Triton 3.6) without writing
    the registers of wgmmas in flight (tests/test_sass.py); every other combination with
    weights in registers waits for them before the next step's upcast."""
    return not dense and not (token_tma and dequant_ptx)


def default_prefill_config(pairs_per_expert: float) -> PrefillConfig:
    """The tiles for this many pairs per expert (`PREFILL_TILES`; the interpreter's are tiny)."""
    if settings.current().interpret:
        return PrefillConfig(block_m=16, block_n=32, block_k=64, group_m=2, num_warps=4,
                             num_stages=1, programs=4)
    return next(cfg for least, cfg in PREFILL_TILES if pairs_per_expert >= least)


def reads_prefill_layout(call) -> bool:
    """Whether both weights are in the layout the prefill GEMM reads."""
    return call.w13.layout == MMA_LANES and call.w2.layout == MMA_LANES


def choose_prefill_config(call) -> PrefillConfig | None:
    """The prefill GEMMs' config for a call that should take them, else None: weights in
    MMA_LANES, more than `PREFILL_MIN_PAIRS_PER_EXPERT` pairs per expert, on an NVIDIA GPU of
    compute capability 9.0 or newer (where its tiles were measured, and their shared memory
    fits: sm_86/89 parts have ~100 KB) or the interpreter. Elsewhere the general kernel reads
    MMA_LANES too."""
    if not reads_prefill_layout(call):
        return None
    problem = call.problem
    if problem.pairs_per_expert <= PREFILL_MIN_PAIRS_PER_EXPERT:
        return None
    if not settings.current().interpret:
        device = call.device
        if device.type != "cuda":
            return None
        facts = settings.device_facts(device)
        if facts.is_hip or facts.capability < (9, 0):
            return None
    return default_prefill_config(problem.pairs_per_expert)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_programs(device: torch.device, work_items: int, cfg: PrefillConfig) -> int:
    """The persistent grid: ``cfg.programs``, else the SM count, never more than the work."""
    if cfg.programs is not None:
        return max(1, min(cfg.programs, work_items))
    if device.type != "cuda" or settings.current().interpret:
        return max(1, min(4, work_items))
    return max(1, min(cfg.per_sm * _sm_count(device.index or 0), work_items))


def _k_major_view(scales):
    """The (E, K/32, N) unit-stride view of MMA_LANES' K-major scales ([E, N, K/32] logically,
    stride 1 along N): what a TMA descriptor of them boxes."""
    e, n, groups = scales.shape
    se, sn, sk = scales.stride()
    if sn != 1:
        raise ValueError(f"the scales' TMA boxes need K-major scales (stride 1 along N), got "
                         f"strides {scales.stride()}")
    if groups == 1:
        sk = n  # torch gives a size-1 dimension any stride; a descriptor wants aligned ones
    return Ref(scales.source, scales.dtype, (e, groups, n), (se, sk, sn), scales.offset)


def _check_weight(layout, packed_shape: tuple, n: int, k: int, gated: bool) -> None:
    if layout != MMA_LANES:
        raise ValueError(f"the prefill GEMM reads the {MMA_LANES.name!r} layout, got "
                         f"{getattr(layout, 'name', layout)!r}")
    if packed_shape[-2] != n or packed_shape[-1] * 2 != k:
        raise ValueError(f"packed weight shape {packed_shape} does not match N = {n}, K = {k}")
    if gated and n % 2:
        raise ValueError(f"a gated GEMM needs an even N (gate and up rows), got {n}")


# Planned launches go direct, TMA steps too (a host descriptor of the call's address: launch.py).
_gemm = Launcher(prefill_gemm_kernel)
_gather = Launcher(gather_rows_kernel)


class PrefillGemm:
    """The prefill GEMMs of one plan: `fused_moe._Gemm`'s interface, MMA_LANES weights, and the
    token gather. Tensors are `launch.Ref`s; ``aligned`` the plan's alignment (block_m = the
    config's), ``max_blocks`` its expert_ids' length, ``topk_weights`` flat float32."""

    def __init__(self, call, aligned, max_blocks: int, topk_weights, dequant_ptx: bool, act_fn):
        self.call, self.aligned, self.topk_weights = call, aligned, topk_weights
        self.dequant_ptx, self.act_fn = dequant_ptx, act_fn
        self.max_blocks = max_blocks
        device = call.device
        # Compiled for an NVIDIA GPU (where the dots are wgmmas with the weights in registers).
        self.nvidia = (device.type == "cuda" and not settings.current().interpret
                       and not settings.device_facts(device).is_hip)
        self.num_pairs = call.problem.num_pairs

    def step(self, a, a_row_div, blocks, scales, layout, bias, out, *, n, k, gated,
             router_weight, cfg, splits=1, k_per_split=None, a_rows=ROWS_PAIR,
             out_rows=ROWS_PAIR, scale_fold=False) -> Step:
        """``a`` [A_rows, K]: row of pair p is ``p // a_row_div`` (``a_rows=ROWS_PAIR``) or row i
        of the alignment (``ROWS_SORTED``: [max_blocks * block_m, K]); ``blocks`` [E, N, K/2]
        and ``scales`` [E, N, K/32] of a weight in MMA_LANES ``layout`` (or ``layout`` None:
        ``blocks`` dense [E, N, K] in the activation dtype, ``scales`` ignored: the same GEMM
        without the upcast); ``bias`` [E, N] or None; ``out`` [num_pairs, N // 2 if gated
        else N] (``out_rows=ROWS_PAIR``) or [max_blocks * block_m, ...] (``ROWS_SORTED``;
        padding rows are not written). ``router_weight``: 0 none, 1 before the bias, 2 after
        it. ``scale_fold``: every scale byte is <= 128 (`layouts.scales_fold`), so the PTX
        conversion folds 2**126 into the scale."""
        if splits != 1:
            raise ValueError("the prefill GEMM has no split-K")
        if self.aligned.block_m != cfg.block_m:
            raise ValueError(f"the alignment's block_m {self.aligned.block_m} is not the "
                             f"prefill config's {cfg.block_m}")
        dense = layout is None
        if dense:
            if tuple(blocks.shape[-2:]) != (n, k) or blocks.dtype != a.dtype:
                raise ValueError(f"dense weight {tuple(blocks.shape)} {blocks.dtype} does not "
                                 f"match N = {n}, K = {k}, {a.dtype}")
            scales = blocks
        else:
            _check_weight(layout, tuple(blocks.shape), n, k, gated)
            if blocks.stride()[-1] != 1:
                raise ValueError(f"the prefill GEMM reads each row's codes as contiguous words, "
                                 f"got strides {blocks.stride()}")
        if not dense:
            cfg = gemm_tile(cfg, gated, self.call.activation.interleaved)
        tma = cfg.tma and a_rows == ROWS_SORTED
        w_tma = (cfg.weights_tma and not dense
                 and (not gated or self.call.activation.interleaved))
        n_tiles = cdiv(n // 2 if gated else n, cfg.block_n // 2 if gated else cfg.block_n)
        programs = _num_programs(self.call.device, self.max_blocks * n_tiles, cfg)
        sa, so = a.stride(), out.stride()
        sb = bias.stride() if bias is not None else (0, 0)
        sw, ss = blocks.stride(), scales.stride()
        aligned = self.aligned
        return Step(_gemm, (programs,), dict(
            a_ptr=a, a_desc=DescriptorRef(a, (cfg.block_m, cfg.block_k)) if tma else a,
            # TMA boxes of the codes as int32 words (one per MMA lane).
            w_desc=(DescriptorRef(blocks.viewed_as(torch.int32),
                                  (1, cfg.block_n, cfg.block_k // 8)) if w_tma else blocks),
            s_desc=(DescriptorRef(_k_major_view(scales), (1, cfg.block_k // 32, cfg.block_n))
                    if w_tma else scales),
            w_ptr=blocks, w_scale_ptr=scales,
            bias_ptr=bias if bias is not None else out, out_ptr=out,
            topk_weights_ptr=self.topk_weights, sorted_ids_ptr=aligned.sorted_ids,
            expert_ids_ptr=aligned.expert_ids,
            num_post_padded_ptr=aligned.num_tokens_post_padded,
            N=n, K=k, num_pairs=self.num_pairs,
            stride_am=sa[0], stride_ak=sa[1],
            stride_we=sw[0], stride_wn=sw[1], stride_wk=sw[2],
            stride_se=ss[0], stride_sn=ss[1], stride_sk=ss[2],
            stride_bias_e=sb[0], stride_bias_n=sb[1], stride_om=so[0], stride_on=so[1],
            alpha=self.call.alpha, limit=self.call.limit, num_programs=programs,
            A_ROW_DIV=a_row_div, A_ROWS=a_rows, OUT_ROWS=out_rows, A_TMA=tma,
            GATED=gated, INTERLEAVED=self.call.activation.interleaved, ACT_FN=self.act_fn,
            ROUTER_WEIGHT=router_weight, HAS_BIAS=bias is not None, DENSE=dense,
            DEQUANT_PTX=self.dequant_ptx,
            SCALE_FOLD=bool(scale_fold and self.dequant_ptx and not dense),
            DOT_DTYPE=TRITON_DTYPES[a.dtype],
            DOT_PRECISION="ieee" if a.dtype == torch.float32 else None,
            EVEN_K=k % cfg.block_k == 0,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            NUM_STAGES=cfg.num_stages, FLATTEN=cfg.flatten, W_TMA=w_tma,
            RETIRE_DOTS=self.nvidia and retires_dots(dense, tma, self.dequant_ptx),
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        ))

    def gather_step(self, x, out, row_div: int) -> Step:
        """``out[i] = x[sorted_ids[i] // row_div]`` for the rows in use (0 for padding)."""
        interpret = settings.current().interpret
        rows, block_k = (16, 64) if interpret else (16, 512)
        return Step(_gather, (cdiv(out.shape[0], rows),), dict(
            src_ptr=x, dst_ptr=out, sorted_ids_ptr=self.aligned.sorted_ids,
            num_post_padded_ptr=self.aligned.num_tokens_post_padded, num_pairs=self.num_pairs,
            K=x.shape[1], stride_sm=x.stride(0), stride_sk=x.stride(1),
            stride_dm=out.stride(0), stride_dk=out.stride(1), ROW_DIV=row_div, ROWS=rows,
            BLOCK_K=block_k, num_warps=4,
        ))

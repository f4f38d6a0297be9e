"""Launcher of the fused MoE: align -> GEMM1 + activation -> GEMM2 + weight -> top-k sum.

No host synchronisation anywhere: sizes come from shapes only, so a forward can be captured in
a CUDA graph.

`FusedMoEPlan` is the launch sequence of one call signature (shapes, strides, dtypes, pointer
alignment, parameters), worked out once: configs, grids, scalars, the scratch buffers' places in
one workspace, the compiled kernels (`launch.LaunchPlan`). Running it on a call's tensors costs
one output allocation, the workspace (kept per CUDA stream when small) and the driver calls.
`fused_moe` builds a plan and runs it once; `mxmoe.plans` keeps plans across calls.
"""

from __future__ import annotations

import json

import torch

from .. import scratch, settings
from ..layouts import GROUP_HALVES, MMA_LANES, PLAIN, scales_fold
from ..problem import MoECall
from ..routing import max_aligned_blocks
from . import configs
from ._epilogues import epilogue_of
from ._moe_gemm import (LAYOUT_GROUP_HALVES, LAYOUT_MMA_LANES, LAYOUT_PLAIN, moe_gemm_kernel,
                       split_activation_kernel, topk_sum_kernel)
from .align import plan_align
from .decode import (DecodeConfig, DecodeGemm, TokenGemm, choose_decode_configs, plane_words,
                     word_layout)
from .grouped_gemm import GroupedGemm
from .prefill import ROWS_PAIR, ROWS_SORTED, PrefillConfig, PrefillGemm, choose_prefill_config
from .inner_product import InnerProduct
from .launch import TRITON_DTYPES, LaunchPlan, Launcher, Ref, Step, Workspace, cdiv

__all__ = ["fused_moe", "FusedMoEPlan", "choose_config", "use_dequant_ptx", "uses_decode_kernels",
           "uses_prefill_kernels"]


_gemm = Launcher(moe_gemm_kernel)
#: The general kernel's W_LAYOUT of each layout it decodes (`_moe_gemm`).
_GENERAL_LAYOUTS = {PLAIN: LAYOUT_PLAIN.value, GROUP_HALVES: LAYOUT_GROUP_HALVES.value,
                    MMA_LANES: LAYOUT_MMA_LANES.value}
_split_activation = Launcher(split_activation_kernel)
_topk_sum = Launcher(topk_sum_kernel)


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
    """``MXMOE_CONFIG`` if set, else `configs.select`: the user cache, this device's table, its
    family's, configs derived from the tuned data, the heuristics (in that order)."""
    switches = settings.current()
    if switches.forced_config:
        return configs.MoEConfig(**json.loads(switches.forced_config))
    p = call.problem
    facts = (settings.device_facts(call.device)
             if call.device.type == "cuda" and not switches.interpret else None)
    return configs.select(backend, facts, p.num_tokens, p.hidden, p.intermediate,
                          p.num_local_experts, p.top_k, interpret=switches.interpret)


def _k_slices(k: int, cfg) -> tuple[int, int]:
    """(slices, K per slice): at most ``cfg.split_k`` slices of whole K tiles, none empty."""
    k_tiles = cdiv(k, cfg.block_k)
    per_split = cdiv(k_tiles, max(1, min(cfg.split_k, k_tiles)))
    return cdiv(k_tiles, per_split), per_split * cfg.block_k


class _Gemm(GroupedGemm):
    """The general kernel's GEMMs of one plan, with one inner product."""

    def __init__(self, call: MoECall, inner: InnerProduct, aligned, max_blocks: int,
                 topk_weights: Ref, dequant_ptx: bool, act_fn):
        super().__init__(call, aligned, max_blocks, topk_weights, act_fn)
        self.inner = inner
        self.dot_dtype = _dot_dtype(call.hidden_states.dtype, inner)
        self.dequant_ptx = dequant_ptx

    def step(self, a, a_row_div, blocks, scales, layout, bias, out, *, n, k, gated,
             router_weight, cfg, splits=1, k_per_split=None) -> Step:
        """One grouped GEMM, the weight as ``blocks`` [E, N, K/2] uint8 + ``scales``
        [E, N, K/32] in ``layout`` (or, for the dense inner product, ``blocks`` [E, N, K] and
        ``scales`` unused); the rest as `GroupedGemm.contract_arguments`. All `Ref`s."""
        if layout == MMA_LANES and self.inner is not InnerProduct.DENSE:
            blocks = blocks.viewed_as(torch.int32)  # read as one int32 word per MMA lane
        grid, arguments = self.contract_arguments(
            a, a_row_div, blocks, scales, bias, out, n=n, k=k, gated=gated,
            router_weight=router_weight, cfg=cfg, splits=splits, k_per_split=k_per_split)
        w_layout = 0 if self.inner is InnerProduct.DENSE else _GENERAL_LAYOUTS[layout]
        return Step(_gemm, grid, dict(
            arguments, WEIGHT_MODE=int(self.inner), W_LAYOUT=w_layout,
            SPLIT_DOT=cfg.split_dot, DEQUANT_PTX=self.dequant_ptx, SWAP_AB=cfg.swap_ab,
            DOT_DTYPE=TRITON_DTYPES[self.dot_dtype],
            DOT_PRECISION="ieee" if self.dot_dtype == torch.float32 else None,
            DOT_FORMAT="fp16" if self.dot_dtype == torch.float16 else "bf16",
        ))


# ROUTER_WEIGHT of moe_gemm_kernel: where the routing weight multiplies the accumulator.
_WEIGHT_NONE, _WEIGHT_BEFORE_BIAS, _WEIGHT_AFTER_BIAS = 0, 1, 2


def uses_decode_kernels(call: MoECall, inner: InnerProduct) -> bool:
    """Whether a call without a given config runs the decode GEMMs (their own configs)."""
    return (inner is InnerProduct.DEQUANT and not settings.current().forced_config
            and _reads_words(call.w13.layout) and _reads_words(call.w2.layout)
            and choose_decode_configs(call.problem) is not None)


def _reads_words(layout) -> bool:
    """Whether the decode kernels read weights in this layout."""
    try:
        word_layout(layout)
    except ValueError:
        return False
    return True


def uses_prefill_kernels(call: MoECall, inner: InnerProduct) -> bool:
    """Whether a call without a given config runs the prefill GEMMs (their own configs)."""
    return (inner is InnerProduct.DEQUANT and not settings.current().forced_config
            and choose_prefill_config(call) is not None)


def _configs(call: MoECall, inner: InnerProduct, backend: str, config):
    """(GEMM class, config of GEMM1, config of GEMM2): the decode GEMMs when pairs per expert
    are few, the prefill GEMMs when they are many (weights in MMA_LANES), else the general
    kernel's tuned config."""
    if isinstance(config, PrefillConfig):
        return PrefillGemm, config, config
    if isinstance(config, DecodeConfig):
        config = (config, config)
    if config is None and uses_decode_kernels(call, inner):
        config = choose_decode_configs(call.problem)
    if config is None and uses_prefill_kernels(call, inner):
        config = choose_prefill_config(call)
        return PrefillGemm, config, config
    if isinstance(config, tuple):
        first, second = config
        if first.variant != second.variant:
            raise ValueError(f"both decode GEMMs run one variant, got {first.variant!r} and "
                             f"{second.variant!r}")
        return (TokenGemm if first.variant == "direct" else DecodeGemm), first, second
    cfg = config or choose_config(call, backend)
    return _Gemm, cfg, cfg.gemm2()


# Positions of the tensors of a call in the tuple a plan runs on (`Ref.source`).
(_X, _TOPK_WEIGHTS, _TOPK_IDS, _W13, _W13_SCALES, _W2, _W2_SCALES, _W13_BIAS, _W2_BIAS,
 _EXPERT_MAP, _OUT, _WORKSPACE) = range(12)

#: Plans keep their workspace (one per CUDA stream) up to this size; larger ones (prefill) are
#: allocated per call, so that a model run at many sizes does not hold a buffer for each.
KEPT_WORKSPACE_BYTES = 16 << 20


def _word_viewable(blocks: torch.Tensor) -> bool:
    """Whether the GEMV can read these bytes as int32 words in place."""
    return (blocks.stride(-1) == 1 and blocks.data_ptr() % 4 == 0
            and all(st % 4 == 0 for st in blocks.stride()[:-1]))


def _flat_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).contiguous()


def _flat_float32(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).to(torch.float32).contiguous()


def _own_copy(t: torch.Tensor) -> torch.Tensor:
    return t.clone(memory_format=torch.contiguous_format)


class FusedMoEPlan:
    """The launches of every call with the signature of ``call`` (see the module).

    Args:
        call: a validated call (M > 0, E_local > 0) of the signature; its tensors' metadata is
            what the plan is built on, their contents are not read.
        inner: the GEMMs' inner product.
        backend: the backend's name, which its tuned configs are keyed on.
        dense: ``(w13 [E, 2I, H], w2 [E, H, I])`` in the dot dtype, for `InnerProduct.DENSE`
            (passed again, as ``w13`` and ``w2``, to every `run`).
        config: instead of the lookup (tuning, tests): a `MoEConfig` for the general kernel,
            or a `DecodeConfig` (or one per GEMM, as a pair) for the decode GEMMs.
    """

    def __init__(self, call: MoECall, inner: InnerProduct, backend: str, *,
                 dense: tuple[torch.Tensor, torch.Tensor] | None = None, config=None):
        p = call.problem
        x = call.hidden_states
        self.out_shape = (p.num_tokens, p.hidden)
        self.dtype = x.dtype
        self.poison = settings.current().poison
        #: (position, function) applied to the call's tensors before the launches: the rare
        #: inputs the kernels cannot take as they are.
        self.conversions: list = []
        gemm_class, cfg, cfg2 = _configs(call, inner, backend, config)
        num_pairs = p.num_pairs
        direct = gemm_class is TokenGemm
        max_blocks = (num_pairs if direct else
                      max_aligned_blocks(num_pairs, p.num_local_experts, cfg.block_m))
        self.empty = max_blocks == 0
        self.launches = LaunchPlan([])
        workspace = Workspace(_WORKSPACE)
        self.workspace_bytes = 0
        self._workspaces: dict = {}
        if self.empty:
            return
        steps = self.launches.steps

        # The kernels index topk_ids, topk_weights and expert_map as flat unit-stride arrays.
        topk_ids = self._flat_input(_TOPK_IDS, call.topk_ids, call.topk_ids.dtype)
        topk_weights = self._flat_input(_TOPK_WEIGHTS, call.topk_weights, torch.float32)
        expert_map = (None if call.expert_map is None else
                      self._flat_input(_EXPERT_MAP, call.expert_map, call.expert_map.dtype))
        on_input = call.apply_router_weight_on_input
        if inner is InnerProduct.DENSE:
            w13 = Ref.of(_W13, dense[0])
            w2 = Ref.of(_W2, dense[1])
            w13_parts, w2_parts = (w13, w13, None), (w2, w2, None)
        else:
            w13_parts = self._weight(_W13, _W13_SCALES, call.w13, gemm_class)
            w2_parts = self._weight(_W2, _W2_SCALES, call.w2, gemm_class)
        w13_bias = None if call.w13_bias is None else Ref.of(_W13_BIAS, call.w13_bias)
        w2_bias = None if call.w2_bias is None else Ref.of(_W2_BIAS, call.w2_bias)
        x_ref = Ref.of(_X, x)
        act_fn = epilogue_of(call.activation)
        if direct:
            gemm = TokenGemm(call, topk_ids, topk_weights, expert_map, act_fn)
        else:
            aligned = plan_align(steps, workspace, topk_ids, expert_map, num_pairs, cfg.block_m,
                                 p.num_local_experts, p.num_global_experts)
            dequant_ptx = (inner is InnerProduct.DEQUANT
                           and use_dequant_ptx(call.device, _dot_dtype(self.dtype, inner)))
            if gemm_class is DecodeGemm:
                gemm = DecodeGemm(call, aligned, max_blocks, topk_weights, act_fn)
            elif gemm_class is PrefillGemm:
                gemm = PrefillGemm(call, aligned, max_blocks, topk_weights, dequant_ptx, act_fn)
            else:
                gemm = _Gemm(call, inner, aligned, max_blocks, topk_weights, dequant_ptx,
                             act_fn)
        interpret = settings.current().interpret

        weight1 = _WEIGHT_BEFORE_BIAS if on_input else _WEIGHT_NONE
        weight2 = _WEIGHT_NONE if on_input else _WEIGHT_AFTER_BIAS
        out = Ref(_OUT, self.dtype, self.out_shape, (p.hidden, 1), reinterpret=False)
        if gemm_class is PrefillGemm:
            # GEMM1 writes its activations in the alignment's (expert) order, so that GEMM2
            # reads whole token tiles; its own tokens too with gather_a.
            sorted_rows = max_blocks * cfg.block_m
            a1, a1_div, a1_rows = x_ref, p.top_k, ROWS_PAIR
            if cfg.gather_a:
                a1 = workspace.take((sorted_rows, p.hidden), self.dtype)
                a1_div, a1_rows = 1, ROWS_SORTED
                steps.append(gemm.gather_step(x_ref, a1, p.top_k))
            act = workspace.take((sorted_rows, p.intermediate), self.dtype)
            # (The scales' fold fact is part of the plan's key: `plans.signature`.)
            steps.append(gemm.step(a1, a1_div, *w13_parts, w13_bias, act, n=2 * p.intermediate,
                                   k=p.hidden, gated=True, router_weight=weight1, cfg=cfg,
                                   a_rows=a1_rows, out_rows=ROWS_SORTED,
                                   scale_fold=scales_fold(call.w13.scales)))
            inter = workspace.take((num_pairs, p.hidden), self.dtype)
            steps.append(gemm.step(act, 1, *w2_parts, w2_bias, inter, n=p.hidden,
                                   k=p.intermediate, gated=False, router_weight=weight2,
                                   cfg=cfg2, a_rows=ROWS_SORTED, out_rows=ROWS_PAIR,
                                   scale_fold=scales_fold(call.w2.scales)))
            self._append_topk_sum(steps, inter, 1, topk_ids, expert_map, out, p, interpret)
            self.workspace_bytes = workspace.nbytes
            return

        splits1, k_per_split1 = _k_slices(p.hidden, cfg)
        # With MXMOE_DECODE_PLANES=1 the direct GEMMs hand the activation over as float32
        # planes in GEMM2's code order (`decode.TokenGemm`): GEMM2 then reads one contiguous
        # pre-scaled vector a code instead of gathering, converting and scaling each activation
        # (the same values and sums). Off by default until it is timed on a GPU
        # (benchmarks/NOTES.md section 22).
        planes = direct and splits1 == 1 and settings.current().decode_planes
        act = (workspace.take((num_pairs, 8, plane_words(p.intermediate)), torch.float32)
               if planes else workspace.take((num_pairs, p.intermediate), self.dtype))
        if splits1 == 1:
            steps.append(gemm.step(x_ref, p.top_k, *w13_parts, w13_bias, act,
                                   n=2 * p.intermediate, k=p.hidden, gated=True,
                                   router_weight=weight1, cfg=cfg,
                                   **(dict(out_planes_layout=w2_parts[2]) if planes else {})))
        else:
            partial = workspace.take((splits1, num_pairs, 2 * p.intermediate), torch.float32)
            steps.append(gemm.step(x_ref, p.top_k, *w13_parts, w13_bias, partial,
                                   n=2 * p.intermediate, k=p.hidden, gated=False,
                                   router_weight=weight1, cfg=cfg, splits=splits1,
                                   k_per_split=k_per_split1))
            block_i = 64 if interpret else 1024
            steps.append(Step(_split_activation, (num_pairs, cdiv(p.intermediate, block_i)), dict(
                partial_ptr=partial, out_ptr=act, inter_size=p.intermediate,
                stride_ps=partial.stride(0), stride_pm=partial.stride(1),
                stride_pn=partial.stride(2), stride_om=act.stride(0), stride_on=act.stride(1),
                alpha=call.alpha, limit=call.limit, INTERLEAVED=call.activation.interleaved,
                ACT_FN=act_fn, NUM_SPLITS=splits1, BLOCK_I=block_i,
            )))

        if direct:
            # GEMM2 sums each token's pairs itself: no top-k sum.
            steps.append(gemm.step(act, 1, *w2_parts, w2_bias, out, n=p.hidden,
                                   k=p.intermediate, gated=False, router_weight=weight2,
                                   cfg=cfg2, sum_pairs=True))
            self.workspace_bytes = workspace.nbytes
            return
        splits2, k_per_split2 = _k_slices(p.intermediate, cfg2)
        # GEMM2's per-pair rows; with split-K one float32 plane per K slice, summed by topk_sum.
        inter = (workspace.take((num_pairs, p.hidden), self.dtype) if splits2 == 1 else
                 workspace.take((splits2, num_pairs, p.hidden), torch.float32))
        steps.append(gemm.step(act, 1, *w2_parts, w2_bias, inter, n=p.hidden,
                               k=p.intermediate, gated=False, router_weight=weight2,
                               cfg=cfg2, splits=splits2, k_per_split=k_per_split2))
        self._append_topk_sum(steps, inter, splits2, topk_ids, expert_map, out, p, interpret)
        self.workspace_bytes = workspace.nbytes

    @staticmethod
    def _append_topk_sum(steps, inter, splits, topk_ids, expert_map, out, p, interpret):
        """The deterministic top-k sum of GEMM2's per-pair rows (``inter`` [pairs, H], or
        [splits, pairs, H] float32 planes) into ``out``."""
        inter_rows = inter if splits == 1 else inter.plane(0)
        has_map = expert_map is not None
        block_h = 64 if interpret else 1024
        steps.append(Step(_topk_sum, (p.num_tokens, cdiv(p.hidden, block_h)), dict(
            inter_ptr=inter, topk_ids_ptr=topk_ids,
            expert_map_ptr=expert_map if has_map else topk_ids, out_ptr=out, H=p.hidden,
            num_global_experts=p.num_global_experts, num_local_experts=p.num_local_experts,
            stride_im=inter_rows.stride(0), stride_ih=inter_rows.stride(1),
            stride_om=out.stride(0), stride_oh=out.stride(1),
            stride_is=inter.stride(0) if splits > 1 else 0,
            TOP_K=p.top_k, HAS_MAP=has_map, BLOCK_H=block_h, NUM_SPLITS=splits,
        )))

    def _flat_input(self, position: int, t: torch.Tensor, dtype: torch.dtype) -> Ref:
        """A `Ref` to ``t`` as a flat unit-stride ``dtype`` array, converted per call if needed
        (``reshape(-1)`` alone can return a strided view: a [M, 1] column of a wider tensor)."""
        if t.dtype != dtype:
            self.conversions.append((position, _flat_float32))
        elif not t.is_contiguous():
            self.conversions.append((position, _flat_contiguous))
        return Ref(position, dtype, (t.numel(),), (1,), reinterpret=False)

    def _weight(self, blocks_at: int, scales_at: int, weight, gemm_class) -> tuple:
        """(blocks, scales, layout) of an MXFP4 weight as the GEMM reads it."""
        blocks, scales = weight.blocks, weight.scales
        if gemm_class in (DecodeGemm, TokenGemm) and not _word_viewable(blocks):
            # The GEMV reads the bytes as int32 words: an odd view is copied, per call.
            self.conversions.append((blocks_at, _own_copy))
            blocks = blocks.contiguous()
        return Ref.of(blocks_at, blocks), Ref.of(scales_at, scales), weight.layout

    def _workspace(self, device: torch.device) -> torch.Tensor | None:
        nbytes = self.workspace_bytes
        if nbytes == 0:
            return None
        if (nbytes > KEPT_WORKSPACE_BYTES or device.type != "cuda" or not scratch.kept()
                or torch.cuda.is_current_stream_capturing()):
            # While a CUDA graph is captured, or inside the operator (torch.compile's CUDA-graph
            # trees record from there: `mxmoe.scratch`), the buffer comes from the graph's pool,
            # which must own it.
            return torch.empty(nbytes, dtype=torch.uint8, device=device)
        # One per stream: kernels of one stream run in order, so consecutive calls (and every
        # layer sharing this plan) reuse it safely; two streams never share one.
        stream = torch._C._cuda_getCurrentRawStream(device.index)
        buffer = self._workspaces.get(stream)
        if buffer is None:
            buffer = self._workspaces[stream] = torch.empty(nbytes, dtype=torch.uint8,
                                                            device=device)
        return buffer

    def run(self, hidden_states, topk_weights, topk_ids, w13, w13_scales, w2, w2_scales,
            w13_bias, w2_bias, expert_map) -> torch.Tensor:
        """``[M, H]`` for a call of the plan's signature (weights as blocks and scales, or the
        dense copies and anything as scales for the dense inner product)."""
        device = hidden_states.device
        out = torch.empty(self.out_shape, dtype=self.dtype, device=device)
        if self.empty:
            return out.zero_()
        workspace = self._workspace(device)
        if self.poison:
            # NaN in every float buffer (and -1 in the int ones) until a kernel writes it.
            out.fill_(float("nan"))
            if workspace is not None:
                workspace.fill_(255)
        tensors = [hidden_states, topk_weights, topk_ids, w13, w13_scales, w2, w2_scales,
                   w13_bias, w2_bias, expert_map, out, workspace]
        for position, convert in self.conversions:
            tensors[position] = convert(tensors[position])
        self.launches.run(tensors)
        return out


def fused_moe(call: MoECall, inner: InnerProduct, backend: str, *,
              dense: tuple[torch.Tensor, torch.Tensor] | None = None,
              config=None) -> torch.Tensor:
    """``[M, H]`` in the activation dtype: a `FusedMoEPlan` of ``call`` built and run once.

    Arguments as `FusedMoEPlan`'s.
    """
    plan = FusedMoEPlan(call, inner, backend, dense=dense, config=config)
    if dense is not None:
        w13, w13_scales, w2, w2_scales = dense[0], dense[0], dense[1], dense[1]
    else:
        w13, w13_scales = call.w13.blocks, call.w13.scales
        w2, w2_scales = call.w2.blocks, call.w2.scales
    return plan.run(call.hidden_states, call.topk_weights, call.topk_ids, w13, w13_scales,
                    w2, w2_scales, call.w13_bias, call.w2_bias, call.expert_map)

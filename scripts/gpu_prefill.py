"""One GPU call for the prefill GEMM: correctness and CUDA-graph timings against the general kernel.

    PYTHONPATH=src python3 scripts/gpu_prefill.py          # on the H200; JSON under $OUT

At gpt-oss-20b (E = 32) M = 2048, 4096, 16384 and gpt-oss-120b (E = 128) M = 4096, 16384
(H = I = 2880, k = 4, bf16, random MXFP4 weights, softmax-top-k routing):
1. The general kernel (`moe_gemm_kernel` through `mxmoe.kernels.fused_moe`, its tuned config,
   plain-layout weights): GEMM1 and GEMM2 alone (alignment outside the graph) and the layer
   (`mxmoe.fused_experts(backend="triton_dequant")`).
2. Each prefill variant (`PrefillConfig`s below, MMA_LANES weights): GEMM1 and GEMM2 alone
   and the layer (`prefill_fused_experts`). Its GEMM outputs are checked against the general
   kernel's (GEMM1's activations row by row, GEMM2's per-pair rows from each kernel's own
   activations) and its layer against the general layer; at the first M of each model the
   layer is also checked against the fp32 reference.
3. The same prefill GEMMs (variant DENSE_VARIANT) on dense bf16 copies of the weights: the
   upcast's overhead is the MXFP4 GEMM time over this one.
4. When triton_kernels imports (its folder on PYTHONPATH, e.g. ``PYTHONPATH=src:.peers``), its
   whole layer (`mxmoe.bench.peers.TritonKernelsLayer`, routing included, as vLLM runs it) on
   the same weights and logits, checked against the general layer.
Printed: ms and TFLOP/s (FLOPs = 2 * pairs * (H * 2I + I * H)) beside the floor at 799 TFLOP/s
(bf16 8192^3 on the H200, FACTS.md). Variants that fail to compile or launch are reported and
skipped. Budget: under 3 minutes on one H200, compiles included (later points are skipped when
the budget runs out).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import mxmoe  # noqa: E402
from gpu_decode import graph_time, random_weights  # noqa: E402
from mxmoe.bench import peers  # noqa: E402
from mxmoe.kernels._epilogues import epilogue_of  # noqa: E402
from mxmoe.kernels.align import align  # noqa: E402
from mxmoe.kernels.fused_moe import _Gemm, _k_slices, choose_config, use_dequant_ptx  # noqa: E402
from mxmoe.kernels.inner_product import InnerProduct  # noqa: E402
from mxmoe.kernels.launch import LaunchPlan, Ref  # noqa: E402
from mxmoe.kernels.prefill import (  # noqa: E402
    ROWS_PAIR,
    ROWS_SORTED,
    PrefillConfig,
    PrefillGemm,
)
from mxmoe.reference import fused_experts_reference  # noqa: E402
from mxmoe.testing import prefill_fused_experts  # noqa: E402
from mxmoe.routing import max_aligned_blocks  # noqa: E402
from mxmoe.validation import check_fused_experts_args  # noqa: E402

MATMUL_RATE = 799e12  # FLOP/s, bf16 8192^3 on the H200 (FACTS.md)
HIDDEN = INTER = 2880
TOP_K = 4
#: In the order they run (one model's weights at a time; if the budget runs out, the last go).
PREFILL_POINTS = [("gpt-oss-20b", 32, 4096), ("gpt-oss-20b", 32, 16384),
                  ("gpt-oss-120b", 128, 4096), ("gpt-oss-120b", 128, 16384),
                  ("gpt-oss-20b", 32, 2048)]
#: SWEEP=mid: the memory-bound middle (past the direct decode GEMMs, below the prefill sizes),
#: where the question is whether small token tiles of this kernel beat the general kernel.
MID_POINTS = [("gpt-oss-20b", 32, 64), ("gpt-oss-20b", 32, 256), ("gpt-oss-20b", 32, 1024),
              ("gpt-oss-20b", 32, 16), ("gpt-oss-120b", 128, 256),
              ("gpt-oss-120b", 128, 1024), ("gpt-oss-120b", 128, 64)]
#: SWEEP=mid2: the upper middle, the tiles that won there.
MID2_POINTS = [("gpt-oss-120b", 128, 256), ("gpt-oss-120b", 128, 1024),
               ("gpt-oss-120b", 128, 2048), ("gpt-oss-120b", 128, 64),
               ("gpt-oss-20b", 32, 512), ("gpt-oss-20b", 32, 1024), ("gpt-oss-20b", 32, 128)]
SWEEP = os.environ.get("SWEEP", "prefill")
POINTS = {"mid": MID_POINTS, "mid2": MID2_POINTS}.get(SWEEP, PREFILL_POINTS)
#: Tiles are tokens (block_m) x weight rows (block_n). Per K element a tile reads
#: 2 * block_m + block_n / 2 bytes for 2 * block_m * block_n FLOPs: with 4-bit weights, wide
#: weight tiles ask the least of L2 (128 x 256: 170 FLOP/B; 256 x 128: 114) but upcast the most
#: per FLOP. In priority order (the budget cuts the last).
VARIANTS = {
    "m128 n256": PrefillConfig(block_m=128, block_n=256, block_k=64, num_warps=8,
                               num_stages=4, tma=True),
    "m256 n128": PrefillConfig(block_m=256, block_n=128, block_k=64, num_warps=8,
                               num_stages=4, tma=True),
    "m128 n256 gather": PrefillConfig(block_m=128, block_n=256, block_k=64, num_warps=8,
                                      num_stages=4, tma=True, gather_a=True),
    "m64 n256": PrefillConfig(block_m=64, block_n=256, block_k=64, num_warps=8, num_stages=6,
                              tma=True),
    "m128 n256 flat": PrefillConfig(block_m=128, block_n=256, block_k=64, num_warps=8,
                                    num_stages=4, tma=True, flatten=True),
    # Codes and scales by TMA too (not measured before 2026-12-02's end).
    "m256 n128 wtma": PrefillConfig(block_m=256, block_n=128, block_k=64, num_warps=8,
                                    num_stages=4, tma=True, weights_tma=True),
    "m128 n256 gather wtma": PrefillConfig(block_m=128, block_n=256, block_k=64, num_warps=8,
                                           num_stages=4, tma=True, gather_a=True,
                                           weights_tma=True),
}
MID_VARIANTS = {
    "m16 n128 k128": PrefillConfig(block_m=16, block_n=128, block_k=128, num_warps=4,
                                   num_stages=4, tma=True),
    "m32 n128 k128": PrefillConfig(block_m=32, block_n=128, block_k=128, num_warps=4,
                                   num_stages=4, tma=True),
    "m64 n128 k128": PrefillConfig(block_m=64, block_n=128, block_k=128, num_warps=4,
                                   num_stages=4, tma=True),
    "m16 n256 k128": PrefillConfig(block_m=16, block_n=256, block_k=128, num_warps=8,
                                   num_stages=4, tma=True),
    "m16 n128 k128 x2": PrefillConfig(block_m=16, block_n=128, block_k=128, num_warps=4,
                                      num_stages=4, tma=True, programs=264),
    "m32 n128 k128 x2": PrefillConfig(block_m=32, block_n=128, block_k=128, num_warps=4,
                                      num_stages=4, tma=True, programs=264),
    "m32 n128 k128 ptr": PrefillConfig(block_m=32, block_n=128, block_k=128, num_warps=4,
                                       num_stages=4, tma=False),
    "m64 n256": PrefillConfig(block_m=64, block_n=256, block_k=64, num_warps=8, num_stages=6,
                              tma=True),
    "m128 n128 k64": PrefillConfig(block_m=128, block_n=128, block_k=64, num_warps=8,
                                   num_stages=4, tma=True),
}
MID2_VARIANTS = {
    "m64 n256": MID_VARIANTS["m64 n256"],
    "m64 n256 x2": PrefillConfig(block_m=64, block_n=256, block_k=64, num_warps=8,
                                 num_stages=6, tma=True, programs=264),
    "m128 n128 k64": MID_VARIANTS["m128 n128 k64"],
    "m128 n256 gather": VARIANTS["m128 n256 gather"],
    "m256 n128": VARIANTS["m256 n128"],
    "m64 n128 k128 x2": PrefillConfig(block_m=64, block_n=128, block_k=128, num_warps=4,
                                      num_stages=4, tma=True, programs=264),
    "m32 n256 k64": PrefillConfig(block_m=32, block_n=256, block_k=64, num_warps=8,
                                  num_stages=6, tma=True),
}
if SWEEP == "mid":
    VARIANTS = MID_VARIANTS
elif SWEEP == "mid2":
    VARIANTS = MID2_VARIANTS
#: The same GEMMs on dense bf16 weights (no upcast): what the upcast costs.
DENSE_VARIANT = "m32 n128 k128" if SWEEP == "mid" else "m128 n256"
BUDGET_S = float(os.environ.get("BUDGET_S", "150"))
START = time.time()
ACT = epilogue_of(mxmoe.Activation.SWIGLUOAI)


def flops(m):
    return 2 * m * TOP_K * (HIDDEN * 2 * INTER + INTER * HIDDEN)


def errors(out, ref):
    out, ref = out.float(), ref.float()
    scale = ref.abs().max().clamp_min(1e-30)
    return (float((out - ref).abs().max() / scale),
            float((out - ref).norm() / ref.norm().clamp_min(1e-30)))


def ok(err):
    return err[0] < 2e-2 and err[1] < 8e-3


def general_gemms(call, e):
    """(run GEMM1, run GEMM2, act by pair, inter by pair, config) of the general kernel, each
    GEMM one launch plan (`mxmoe.kernels.launch.LaunchPlan`) as `fused_moe` builds them."""
    cfg = choose_config(call, "triton_dequant")
    if _k_slices(HIDDEN, cfg)[0] != 1 or _k_slices(INTER, cfg.gemm2())[0] != 1:
        cfg = replace(cfg, split_k=1, split_k2=1)  # one output plane, as the prefill writes
    cfg2 = cfg.gemm2()
    ids = call.topk_ids.reshape(-1).contiguous()
    num_pairs = ids.numel()
    aligned = align(ids, cfg.block_m, e, e, None)
    max_blocks = max_aligned_blocks(num_pairs, e, cfg.block_m)
    x = call.hidden_states
    act = torch.empty(num_pairs, INTER, dtype=x.dtype, device=x.device)
    inter = torch.empty(num_pairs, HIDDEN, dtype=x.dtype, device=x.device)
    w13, w2 = call.w13, call.w2
    tensors = [x, act, inter, w13.blocks, w13.scales, w2.blocks, w2.scales, call.w13_bias,
               call.w2_bias, call.topk_weights.reshape(-1).float().contiguous(),
               aligned.sorted_ids, aligned.expert_ids, aligned.num_tokens_post_padded]
    r = [Ref.of(i, t) for i, t in enumerate(tensors)]
    refs = SimpleNamespace(sorted_ids=r[10], expert_ids=r[11], num_tokens_post_padded=r[12],
                           block_m=cfg.block_m)
    gemm = _Gemm(call, InnerProduct.DEQUANT, refs, max_blocks, r[9],
                 use_dequant_ptx(call.device, torch.bfloat16), ACT)
    plan1 = LaunchPlan([gemm.step(r[0], TOP_K, r[3], r[4], w13.layout, r[7], r[1], n=2 * INTER,
                                  k=HIDDEN, gated=True, router_weight=0, cfg=cfg)])
    plan2 = LaunchPlan([gemm.step(r[1], 1, r[5], r[6], w2.layout, r[8], r[2], n=HIDDEN,
                                  k=INTER, gated=False, router_weight=2, cfg=cfg2)])
    return (lambda: plan1.run(tensors)), (lambda: plan2.run(tensors)), act, inter, cfg


def prefill_gemms(call, e, cfg, dense=None):
    """(run GEMM1, run GEMM2, act in sorted rows, inter by pair, alignment) of a variant, each
    GEMM one launch plan of `PrefillGemm` steps; ``dense``: (w13, w2) bf16 tensors instead of
    the call's MXFP4 weights."""
    ids = call.topk_ids.reshape(-1).contiguous()
    num_pairs = ids.numel()
    aligned = align(ids, cfg.block_m, e, e, None)
    max_blocks = max_aligned_blocks(num_pairs, e, cfg.block_m)
    x = call.hidden_states
    rows = max_blocks * cfg.block_m
    act = torch.empty(rows, INTER, dtype=x.dtype, device=x.device)
    inter = torch.empty(num_pairs, HIDDEN, dtype=x.dtype, device=x.device)
    gathered = (torch.empty(rows, HIDDEN, dtype=x.dtype, device=x.device) if cfg.gather_a
                else x)
    if dense:
        w13b, w13s, w2b, w2s, layout13, layout2 = dense[0], dense[0], dense[1], dense[1], None, None
    else:
        w13b, w13s, w2b, w2s = call.w13.blocks, call.w13.scales, call.w2.blocks, call.w2.scales
        layout13, layout2 = call.w13.layout, call.w2.layout
    tensors = [x, act, inter, w13b, w13s, w2b, w2s, call.w13_bias, call.w2_bias,
               call.topk_weights.reshape(-1).float().contiguous(), aligned.sorted_ids,
               aligned.expert_ids, aligned.num_tokens_post_padded, gathered]
    r = [Ref.of(i, t) for i, t in enumerate(tensors)]
    refs = SimpleNamespace(sorted_ids=r[10], expert_ids=r[11], num_tokens_post_padded=r[12],
                           block_m=cfg.block_m)
    gemm = PrefillGemm(call, refs, max_blocks, r[9], use_dequant_ptx(call.device, torch.bfloat16),
                       ACT)
    steps1 = []
    if cfg.gather_a:
        steps1.append(gemm.gather_step(r[0], r[13], TOP_K))
        steps1.append(gemm.step(r[13], 1, r[3], r[4], layout13, r[7], r[1], n=2 * INTER,
                                k=HIDDEN, gated=True, router_weight=0, cfg=cfg,
                                a_rows=ROWS_SORTED, out_rows=ROWS_SORTED))
    else:
        steps1.append(gemm.step(r[0], TOP_K, r[3], r[4], layout13, r[7], r[1], n=2 * INTER,
                                k=HIDDEN, gated=True, router_weight=0, cfg=cfg,
                                a_rows=ROWS_PAIR, out_rows=ROWS_SORTED))
    plan1 = LaunchPlan(steps1)
    plan2 = LaunchPlan([gemm.step(r[1], 1, r[5], r[6], layout2, r[8], r[2], n=HIDDEN, k=INTER,
                                  gated=False, router_weight=2, cfg=cfg, a_rows=ROWS_SORTED,
                                  out_rows=ROWS_PAIR)])
    return (lambda: plan1.run(tensors)), (lambda: plan2.run(tensors)), act, inter, aligned


def routing(m, e, device, seed):
    """(hidden states, router logits, weights, ids): softmax over the top-k logits."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, HIDDEN, device=device, generator=g).to(torch.bfloat16)
    logits = torch.randn(m, e, device=device, generator=g)
    weights, ids = mxmoe.route(logits, TOP_K)
    return x, logits, weights, ids


def peer_layer(w13, w2, b13, b2):
    """triton_kernels' layer on these weights, or the reason it cannot run here."""
    shape = SimpleNamespace(top_k=TOP_K, hidden=HIDDEN, inter=INTER)
    try:
        return peers.TritonKernelsLayer(SimpleNamespace(w13=w13, w2=w2, w13_bias=b13,
                                                        w2_bias=b2, model=shape),
                                        torch.bfloat16)
    except Exception as exc:  # PeerUnavailable, or an API mismatch
        return f"{type(exc).__name__}: {str(exc)[:200]}"


def tflops(flop, ms):
    return flop / (ms * 1e-3) / 1e12


DEVICE = "cuda"


def main():
    device = torch.device(DEVICE)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else DEVICE
    header = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__,
                  cuda=torch.version.cuda, python=platform.python_version(),
                  sha=os.environ.get("MXMOE_GIT_SHA", "?"), date=time.strftime("%Y-%m-%d"),
                  matmul_rate_tflops=MATMUL_RATE / 1e12)
    print(header, flush=True)
    results, table = [], []
    weights = {}
    for model, e, m in POINTS:
        if time.time() - START > BUDGET_S:
            print(f"time budget reached: skipping {model} M={m}")
            continue
        if e not in weights:
            weights.clear()  # one model's weights (and its peer copy) at a time
            w13, w2, b13, b2 = random_weights(e, INTER, device, seed=e)
            weights[e] = (w13, w2, b13, b2, w13.to_layout("mma_lanes"),
                          w2.to_layout("mma_lanes"), peer_layer(w13, w2, b13, b2))
            if isinstance(weights[e][-1], str):
                print(f"triton_kernels not timed: {weights[e][-1]}", flush=True)
        w13, w2, b13, b2, w13l, w2l, peer = weights[e]
        x, logits, w, ids = routing(m, e, device, seed=m + e)
        fl = flops(m)
        # GEMM1 does 2/3 of the FLOPs, GEMM2 1/3.
        row = dict(model=model, E=e, M=m, floor_ms=fl / MATMUL_RATE * 1e3)
        call = check_fused_experts_args(x, w13, w2, w, ids, w13_bias=b13, w2_bias=b2,
                                        activation="swigluoai", alpha=1.702, limit=7.0,
                                        expert_map=None)
        g1, g2, g_act, g_inter, gcfg = general_gemms(call, e)
        row["general_config"] = gcfg.to_json()
        row["general_gemm1_ms"] = graph_time(g1) / 1e3
        row["general_gemm2_ms"] = graph_time(g2) / 1e3
        g_layer = mxmoe.fused_experts(x, w13, w2, w, ids, w13_bias=b13, w2_bias=b2,
                                      backend="triton_dequant")
        row["general_layer_ms"] = graph_time(lambda: mxmoe.fused_experts(
            x, w13, w2, w, ids, w13_bias=b13, w2_bias=b2, backend="triton_dequant")) / 1e3
        if not isinstance(peer, str):
            try:
                inputs = SimpleNamespace(hidden_states=x, router_logits=logits)
                row["triton_kernels_vs_general"] = errors(peer(inputs), g_layer)
                row["triton_kernels_layer_ms"] = graph_time(lambda: peer(inputs)) / 1e3
            except Exception as exc:
                print(f"  triton_kernels failed: {type(exc).__name__}: {str(exc)[:300]}",
                      flush=True)
        reference = None
        if next(pm for pmodel, _, pm in POINTS if pmodel == model) == m:
            reference = fused_experts_reference(x, w13, w2, w, ids, w13_bias=b13, w2_bias=b2)
            row["general_vs_reference"] = errors(g_layer, reference)
        call_l = check_fused_experts_args(x, w13l, w2l, w, ids, w13_bias=b13, w2_bias=b2,
                                          activation="swigluoai", alpha=1.702, limit=7.0,
                                          expert_map=None)
        for name, cfg in VARIANTS.items():
            if time.time() - START > BUDGET_S:
                print(f"time budget reached: skipping {name} at {model} M={m}")
                break
            try:
                p1, p2, p_act, p_inter, aligned = prefill_gemms(call_l, e, cfg)
                p1()
                p2()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                # GEMM1: sorted row i holds pair sorted_ids[i]; compare the real rows.
                sorted_ids = aligned.sorted_ids[:p_act.shape[0]].long()
                real = sorted_ids < m * TOP_K
                act_err = errors(p_act[real], g_act[sorted_ids[real]])
                inter_err = errors(p_inter, g_inter)
                t1 = graph_time(p1) / 1e3
                t2 = graph_time(p2) / 1e3
                layer = prefill_fused_experts(x, w13l, w2l, w, ids, w13_bias=b13, w2_bias=b2,
                                              config=cfg)
                layer_err = errors(layer, g_layer)
                tl_ms = graph_time(lambda: prefill_fused_experts(
                    x, w13l, w2l, w, ids, w13_bias=b13, w2_bias=b2, config=cfg)) / 1e3
            except Exception as exc:  # a variant that fails to compile or launch
                print(f"  {model} M={m} {name}: {type(exc).__name__}: {str(exc)[:300]}",
                      flush=True)
                results.append(dict(kind="failed", model=model, M=m, variant=name,
                                    error=f"{type(exc).__name__}: {exc}"))
                continue
            entry = dict(kind="variant", model=model, E=e, M=m, variant=name,
                         config=cfg.__dict__, gemm1_ms=t1, gemm2_ms=t2, layer_ms=tl_ms,
                         gemm1_tflops=tflops(fl * 2 / 3, t1), gemm2_tflops=tflops(fl / 3, t2),
                         layer_tflops=tflops(fl, tl_ms), act_vs_general=act_err,
                         inter_vs_general=inter_err, layer_vs_general=layer_err,
                         ok=ok(act_err) and ok(inter_err) and ok(layer_err))
            if reference is not None:
                entry["layer_vs_reference"] = errors(layer, reference)
                entry["ok"] = entry["ok"] and ok(entry["layer_vs_reference"])
            results.append(entry)
            print(f"  {model} M={m} {name}: GEMM1 {t1:.3f} ms ({entry['gemm1_tflops']:.0f} "
                  f"TFLOP/s), GEMM2 {t2:.3f} ms ({entry['gemm2_tflops']:.0f}), layer "
                  f"{tl_ms:.3f} ms ({entry['layer_tflops']:.0f}); errors act {act_err[0]:.1e}"
                  f" inter {inter_err[0]:.1e} layer {layer_err[0]:.1e}"
                  f"{' ref %.1e' % entry['layer_vs_reference'][0] if reference is not None else ''}"
                  f" {'ok' if entry['ok'] else 'FAIL'}", flush=True)
            best = row.get("best")
            if entry["ok"] and (best is None or tl_ms < best["layer_ms"]):
                row["best"] = dict(variant=name, gemm1_ms=t1, gemm2_ms=t2, layer_ms=tl_ms)
        if time.time() - START < BUDGET_S and os.environ.get("DENSE", "1") == "1":
            try:
                dense = (w13.dequantize(x.dtype), w2.dequantize(x.dtype))
                d1, d2, d_act, d_inter, aligned = prefill_gemms(call_l, e, VARIANTS[DENSE_VARIANT],
                                                                dense=dense)
                row["dense_gemm1_ms"] = graph_time(d1) / 1e3
                row["dense_gemm2_ms"] = graph_time(d2) / 1e3
                mx = [r for r in results if r.get("kind") == "variant" and r["M"] == m
                      and r["model"] == model and r["variant"] == DENSE_VARIANT]
                if mx:
                    row["upcast_overhead_gemm1"] = mx[0]["gemm1_ms"] / row["dense_gemm1_ms"] - 1
                    row["upcast_overhead_gemm2"] = mx[0]["gemm2_ms"] / row["dense_gemm2_ms"] - 1
                d1_ms = row["dense_gemm1_ms"]
                print(f"  {model} M={m} dense bf16 {DENSE_VARIANT}: GEMM1 "
                      f"{d1_ms:.3f} ms ({tflops(fl * 2 / 3, d1_ms):.0f} TFLOP/s), GEMM2 {row['dense_gemm2_ms']:.3f} ms "
                      f"({tflops(fl / 3, row['dense_gemm2_ms']):.0f}); upcast overhead "
                      f"{row.get('upcast_overhead_gemm1', float('nan')):+.1%} / "
                      f"{row.get('upcast_overhead_gemm2', float('nan')):+.1%}", flush=True)
                del dense, d_act, d_inter
            except Exception as exc:
                print(f"  dense bf16 failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        table.append(row)
        results.append(dict(kind="point", **row))
        print(f"{model} M={m}: floor {row['floor_ms']:.3f} ms; general GEMM1 "
              f"{row['general_gemm1_ms']:.3f} GEMM2 {row['general_gemm2_ms']:.3f} layer "
              f"{row['general_layer_ms']:.3f} ms ({tflops(fl, row['general_layer_ms']):.0f} "
              f"TFLOP/s); triton_kernels layer "
              f"{row.get('triton_kernels_layer_ms', float('nan')):.3f} ms", flush=True)
        out_dir = Path(os.environ.get("OUT", "."))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"gpu_prefill-{SWEEP}.json").write_text(json.dumps(dict(header=header, rows=results),
                                                             indent=1))

    print(f"\n{header['gpu']}, torch {header['torch']}, triton {header['triton']}, "
          f"sha {header['sha']}  (ms, CUDA graphs; floor = FLOPs / 799 TFLOP/s)")
    print("model | M | floor | general GEMM1 | GEMM2 | layer | triton_kernels layer | best "
          "variant | GEMM1 | GEMM2 | layer | layer TFLOP/s | layer x floor | speedup over "
          "general | over triton_kernels | upcast overhead GEMM1 / GEMM2")
    for r in table:
        b = r.get("best") or {}
        lay = b.get("layer_ms", float("nan"))
        peer_ms = r.get("triton_kernels_layer_ms", float("nan"))
        print(f"{r['model']} | {r['M']} | {r['floor_ms']:.3f} | {r['general_gemm1_ms']:.3f} | "
              f"{r['general_gemm2_ms']:.3f} | {r['general_layer_ms']:.3f} | {peer_ms:.3f} | "
              f"{b.get('variant', '-')} | {b.get('gemm1_ms', float('nan')):.3f} | "
              f"{b.get('gemm2_ms', float('nan')):.3f} | {lay:.3f} | "
              f"{tflops(flops(r['M']), lay):.0f} | {lay / r['floor_ms']:.2f} | "
              f"{r['general_layer_ms'] / lay:.2f} | {peer_ms / lay:.2f} | "
              f"{r.get('upcast_overhead_gemm1', float('nan')):+.1%} / "
              f"{r.get('upcast_overhead_gemm2', float('nan')):+.1%}")
    failed = [r for r in results if r.get("kind") == "variant" and not r["ok"]]
    print(f"correctness: {len(failed)} failed of "
          f"{sum(r.get('kind') == 'variant' for r in results)}; "
          f"{sum(r.get('kind') == 'failed' for r in results)} variants did not run; "
          f"total {time.time() - START:.0f} s")


if __name__ == "__main__":
    main()

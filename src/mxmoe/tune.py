"""`mxmoe tune`: search kernel configs per (device, shape, M bucket) and write the table the
kernels read (``kernels/configs/<device>.json``).

The search is staged, because a full product of block sizes, warps, stages and strategies is
thousands of compiles: first the tile shape and the dot strategy (swap-AB or not) at fixed
pipelining, then K tile, warps and stages around the best shape, then GEMM2's own N/K tiles,
then (decode sizes only) split-K of each GEMM.
Every candidate is timed as the whole fused-experts call inside a CUDA graph (median of
replays); a candidate that fails to compile or run is skipped.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import torch

from .kernels.configs import MoEConfig, device_slug

GPT_OSS = {"20b": (2880, 2880, 32, 4), "120b": (2880, 2880, 128, 4)}
DEFAULT_TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384)


def _block_m_choices(num_tokens: int, top_k: int, num_experts: int) -> list[int]:
    per_expert = num_tokens * top_k / num_experts
    if per_expert <= 8:
        return [16]
    if per_expert <= 32:
        return [16, 32]
    if per_expert <= 128:
        return [32, 64]
    if per_expert <= 512:
        return [64, 128]
    return [128, 256]


def stage1(num_tokens, top_k, num_experts) -> list[MoEConfig]:
    out = []
    for bm, bn, swap in itertools.product(
        _block_m_choices(num_tokens, top_k, num_experts), (32, 64, 128), (False, True)
    ):
        out.append(MoEConfig(block_m=bm, block_n=bn, block_k=128, num_warps=4, num_stages=3,
                             swap_ab=swap))
    if num_tokens * top_k / num_experts > 512:
        # Prefill: large tiles need 8 warps to hold the accumulator; try them directly.
        out += [MoEConfig(block_m=bm, block_n=bn, block_k=64, num_warps=8, num_stages=3,
                          swap_ab=True) for bm, bn in ((128, 128), (256, 64), (256, 128))]
    return out


def stage2(best: MoEConfig) -> list[MoEConfig]:
    return [replace(best, block_k=bk, num_warps=w, num_stages=s)
            for bk, w, s in itertools.product((64, 128, 256), (4, 8), (2, 3, 4))]


def stage3(best: MoEConfig) -> list[MoEConfig]:
    return [replace(best, block_n2=bn, block_k2=bk)
            for bn, bk in itertools.product((32, 64, 128, 256), (64, 128, 256))]


def stage4(best: MoEConfig, num_tokens: int, top_k: int, num_experts: int) -> list[MoEConfig]:
    """Split-K for decode sizes, where few experts x N tiles leave SMs idle (none otherwise:
    the fp32 partial planes cost traffic that larger M does not repay)."""
    if num_tokens * top_k / num_experts > 16:
        return []
    return [replace(best, split_k=s1, split_k2=s2)
            for s1, s2 in itertools.product((1, 2, 3, 4), (1, 2, 4)) if (s1, s2) != (1, 1)]


def _graph_ms(fn, replays: int) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def _problem_args(num_tokens, hidden, inter, num_experts, top_k, dtype, seed=0):
    from .cli._common import random_moe
    from .validation import check_fused_experts_args

    p = random_moe(num_tokens, hidden, inter, num_experts, top_k, dtype, "cuda", seed=seed)
    kw = dict(w13_bias=p.w13_bias, w2_bias=p.w2_bias, activation="swigluoai", alpha=1.702,
              limit=7.0, expert_map=None)
    return check_fused_experts_args(p.hidden_states, p.w13, p.w2, p.topk_weights,
                                    p.topk_ids, **kw)


def time_config(args, mode: str, cfg: MoEConfig, replays: int) -> float:
    from .backends import get_backend
    from .kernels.fused_moe import fused_moe

    backend = {"dequant": "triton_dequant", "scaled": "triton_scaled"}[mode]
    inner = get_backend(backend).inner_product
    try:
        return _graph_ms(lambda: fused_moe(args, inner, backend, config=cfg), replays)
    except Exception as exc:  # a config that does not compile or fit is not a candidate
        print(f"    skip {cfg.to_json()}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
        return float("inf")


def tune_point(args, mode: str, log=print) -> tuple[MoEConfig, float]:
    """The fastest config for one problem: stage 1, then 2 around its best, then 3."""
    p = args.problem
    replays = 10 if p.num_tokens >= 4096 else 30
    best, best_ms = None, float("inf")
    shape = (p.num_tokens, p.top_k, p.num_local_experts)
    for make_stage in (lambda _: stage1(*shape), stage2, stage3,
                       lambda best: stage4(best, *shape)):
        for cfg in make_stage(best):
            ms = time_config(args, mode, cfg, replays)
            if ms < best_ms:
                best, best_ms = cfg, ms
        if best is None:
            raise RuntimeError(f"no config ran for M={p.num_tokens} ({mode})")
    log(f"  M={p.num_tokens:<6} {mode:<8} {best_ms:8.4f} ms  {best.to_json()}")
    return best, best_ms


def tune(models, tokens, modes, out_path: Path, dtype=torch.bfloat16, log=print) -> dict:
    """Tune and merge the results into the table at ``out_path``; returns the table."""
    table = json.loads(out_path.read_text()) if out_path.is_file() else {}
    table.setdefault("device", torch.cuda.get_device_name())
    configs = table.setdefault("configs", {})
    fastest = table.setdefault("fastest", {})
    for model in models:
        hidden, inter, experts, top_k = GPT_OSS[model] if model in GPT_OSS else model
        key = f"H{hidden}_I{inter}_E{experts}_k{top_k}"
        for m in tokens:
            args = _problem_args(m, hidden, inter, experts, top_k, dtype)
            timings = {}
            for mode in modes:
                cfg, ms = tune_point(args, mode, log)
                configs.setdefault(mode, {}).setdefault(key, {})[str(m)] = cfg.to_json()
                timings[{"dequant": "triton_dequant", "scaled": "triton_scaled"}[mode]] = ms
            if len(timings) > 1:  # a verdict needs a comparison
                fastest.setdefault(key, {})[str(m)] = min(timings, key=timings.get)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(table, indent=1, sort_keys=True))
    return table


def default_table_path() -> Path:
    return Path(__file__).with_name("kernels") / "configs" / (
        device_slug(torch.cuda.get_device_name()) + ".json")

"""One GPU call: the prefill GEMMs' shipped tiles against variants of them, whole layer in a CUDA
graph, gpt-oss-20b and 120b shapes (bf16, random MXFP4 weights with scales 119..123).

    PYTHONPATH=src python3 scripts/gpu_tiles.py [--models 20b 120b] [--tokens 8 64 ...]

Each variant maps the shipped `PREFILL_TILES` config of the call's pairs per expert to another
(`VARIANTS`); its output is checked against the shipped config's (relative error) and its graph
time printed beside it. A sweep tool for section 20 of benchmarks/NOTES.md.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_decode import graph_time, random_weights, routing  # noqa: E402
from mxmoe.kernels.prefill import default_prefill_config  # noqa: E402
from mxmoe.testing import prefill_fused_experts, relative_error  # noqa: E402

EXPERTS = {"20b": 32, "120b": 128}
INTER = 2880
TOP_K = 4


def _wide_k(cfg):
    """The small tiles with 256-wide K steps (fewer trips: the per-trip cost amortised)."""
    return replace(cfg, block_k=256, num_stages=3) if cfg.block_m <= 32 else cfg


def _small(change):
    """``change`` applied to the small tiles (at most 32 tokens) only."""
    return lambda cfg: change(cfg) if cfg.block_m <= 32 else cfg


VARIANTS = {
    "shipped": lambda cfg: cfg,
    "gather": lambda cfg: replace(cfg, tma=True, gather_a=True),
    "gather, small wTMA": lambda cfg: _small(lambda c: replace(c, weights_tma=True))(
        replace(cfg, tma=True, gather_a=True)),
    "gather, small wTMA K256": lambda cfg: _small(lambda c: replace(_wide_k(c), weights_tma=True))(
        replace(cfg, tma=True, gather_a=True)),
    "gather, 128x256": lambda cfg: (replace(cfg, block_m=128, block_n=256, tma=True, gather_a=True)
                                    if cfg.block_m == 256 else replace(cfg, tma=True, gather_a=True)),
    # The 32- and 64-token tiles (16 to 64 pairs per expert) with codes and scales by TMA boxes
    # twice or four times as wide in K.
    "mid TMA K128": lambda cfg: (replace(cfg, block_k=128, num_stages=3 if cfg.block_m == 64
                                         else 4, weights_tma=True)
                                 if cfg.block_m in (32, 64) else cfg),
    "mid TMA K128, 32x128x256": lambda cfg: (
        replace(cfg, block_k=128, num_stages=3, weights_tma=True) if cfg.block_m == 64 else
        replace(cfg, block_n=128, block_k=256, num_warps=4, num_stages=3, weights_tma=True,
                per_sm=2) if cfg.block_m == 32 else cfg),
    "weights TMA": lambda cfg: replace(cfg, weights_tma=True),
    "weights TMA, K 256 small": lambda cfg: replace(_wide_k(cfg), weights_tma=True),
    "K 256 small": _wide_k,
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["20b", "120b"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[8, 64, 256, 1024, 4096])
    parser.add_argument("--variants", nargs="+", default=["shipped", "mid TMA K128",
                                                           "mid TMA K128, 32x128x256"])
    args = parser.parse_args()
    for model in args.models:
        e = EXPERTS[model]
        w13, w2, b13, b2 = random_weights(e, INTER, "cuda", seed=0)
        w13, w2 = w13.to_layout("mma_lanes"), w2.to_layout("mma_lanes")
        for m in args.tokens:
            x, weights, ids = routing(m, e, "cuda", seed=m)
            shipped = default_prefill_config(m * TOP_K / e)
            base = None
            for name in args.variants:
                cfg = VARIANTS[name](shipped)

                def run(cfg=cfg):
                    return prefill_fused_experts(x, w13, w2, weights, ids, w13_bias=b13,
                                                 w2_bias=b2, config=cfg)
                try:
                    out = run()
                    us = graph_time(run)
                except Exception as exc:  # a variant that does not compile or launch
                    print(f"{model} M={m} {name}: {type(exc).__name__}: {str(exc)[:160]}")
                    continue
                base = out if base is None else base
                err = relative_error(out.float(), base.float())
                again = [torch.equal(run(), out) for _ in range(3)]
                print(f"{model} M={m:5d} {name:26s} {us:9.1f} us  rel err vs first {err:.1e} repeatable {all(again)}"
                      f"  ({cfg.block_m}x{cfg.block_n}x{cfg.block_k} s{cfg.num_stages}"
                      f"{' wTMA' if cfg.weights_tma else ''}{' gather' if cfg.gather_a else ''})",
                      flush=True)


if __name__ == "__main__":
    main()

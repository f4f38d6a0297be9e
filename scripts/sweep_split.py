"""Split-K sweep at decode sizes: the whole layer (CUDA graph, median) for GEMM1/GEMM2 K slices
around the tuned config of each M, each checked against the unsplit result.

    PYTHONPATH=src python3 scripts/sweep_split.py --models 20b 120b --tokens 1 4 16 64
"""

import argparse
import json
from dataclasses import replace

import torch

from mxmoe.kernels.fused_moe import choose_config, fused_moe
from mxmoe.tune import GPT_OSS, _graph_ms, _problem_args

ap = argparse.ArgumentParser()
ap.add_argument("--models", nargs="+", default=["20b", "120b"])
ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64])
ap.add_argument("--splits", type=int, nargs="+", default=[1, 2, 3, 4, 6])
ap.add_argument("--block-n", type=int, nargs="+", default=[32, 64])
ap.add_argument("--json", default=None)
args = ap.parse_args()

rows = []
for model in args.models:
    h, i, e, k = GPT_OSS[model]
    for m in args.tokens:
        a = _problem_args(m, h, i, e, k, torch.bfloat16)
        base = choose_config(a, "dequant")
        ref = fused_moe(a, mode="dequant", config=base).float()
        base_ms = _graph_ms(lambda: fused_moe(a, mode="dequant", config=base), 50)
        best = (base_ms, base)
        for bn in args.block_n:
            for s1 in args.splits:
                for s2 in args.splits:
                    cfg = replace(base, block_n=bn, block_n2=bn, split_k=s1, split_k2=s2)
                    try:
                        out = fused_moe(a, mode="dequant", config=cfg).float()
                        err = float((out - ref).abs().max() / ref.abs().max())
                        ms = _graph_ms(lambda: fused_moe(a, mode="dequant", config=cfg), 50)
                    except Exception as exc:  # noqa: BLE001
                        print(f"skip {cfg.to_json()}: {exc!s:.100}")
                        continue
                    rows.append(dict(model=model, M=m, block_n=bn, split_k=s1, split_k2=s2,
                                     ms=ms, err=err))
                    if err > 2e-2:
                        print(f"WRONG {model} M={m} {cfg.to_json()} err={err:.2e}")
                    elif ms < best[0]:
                        best = (ms, cfg)
        print(f"{model} M={m:<4} base {base_ms * 1e3:7.1f} us  best {best[0] * 1e3:7.1f} us "
              f"{best[1].to_json()}", flush=True)
if args.json:
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)

"""A/B of the dequant conversions in one run on one card: the whole layer (CUDA graph, median)
with the portable fp32 bit manipulation and with the PTX bf16x2 conversion, each at the config
`auto` picks and, for small M, with split-K; every variant checked against the fp32 reference.

    PYTHONPATH=src python3 scripts/ab_dequant.py --models 20b 120b --json ab.json
"""

import argparse
import json
import os
from dataclasses import replace

import torch

from mxmoe.kernels.fused_moe import choose_config, fused_moe
from mxmoe.reference import fused_experts_reference
from mxmoe.tune import GPT_OSS, _graph_ms, _problem_args

ap = argparse.ArgumentParser()
ap.add_argument("--models", nargs="+", default=["20b", "120b"])
ap.add_argument("--tokens", type=int, nargs="+",
                default=[1, 4, 16, 64, 256, 512, 1024, 2048, 4096, 16384])
ap.add_argument("--splits", type=int, nargs="+", default=[2, 3, 4])
ap.add_argument("--json", default=None)
args = ap.parse_args()


def reference(a):
    x = a.hidden_states.float()
    return fused_experts_reference(x, a.w13, a.w2, a.topk_weights, a.topk_ids,
                                   w13_bias=a.w13_bias.float(), w2_bias=a.w2_bias.float())


rows = []
for model in args.models:
    h, i, e, k = GPT_OSS[model]
    for m in args.tokens:
        a = _problem_args(m, h, i, e, k, torch.bfloat16)
        ref = reference(a) if m <= 4096 else None
        base = choose_config(a, "dequant")
        variants = [("portable", "0", base), ("ptx", "1", base)]
        if m * k / e <= 16:
            for s in args.splits:
                variants.append((f"ptx split {s}/{s}", "1", replace(base, split_k=s, split_k2=s)))
                variants.append((f"ptx split {s}/1", "1", replace(base, split_k=s, split_k2=1)))
        line = []
        for name, flag, cfg in variants:
            os.environ["MXMOE_DEQUANT_PTX"] = flag
            out = fused_moe(a, mode="dequant", config=cfg).float()
            err = (float((out - ref).abs().max() / ref.abs().max()) if ref is not None
                   else float("nan"))
            ms = _graph_ms(lambda: fused_moe(a, mode="dequant", config=cfg),
                           10 if m >= 4096 else 50)
            rows.append(dict(model=model, M=m, variant=name, ms=ms, err=err,
                             config=cfg.to_json()))
            line.append(f"{name} {ms * 1e3:8.1f}us e={err:.1e}")
        print(f"{model} M={m:<6} " + " | ".join(line), flush=True)
os.environ.pop("MXMOE_DEQUANT_PTX", None)
if args.json:
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)

"""Decode sweep of the dot strategy with the PTX conversion: the tuned config against two
half-dots (no nibble re-interleave), with and without swap-AB, a few N/K tiles; whole layer in
a CUDA graph (median), each checked against the tuned config's output.

    PYTHONPATH=src python3 scripts/sweep_split_dot.py --json sweep.json
"""

import argparse
import itertools
import json
from dataclasses import replace

import torch

from mxmoe.kernels.fused_moe import choose_config, fused_moe
from mxmoe.tune import GPT_OSS, _graph_ms, _problem_args

ap = argparse.ArgumentParser()
ap.add_argument("--points", nargs="+", default=["20b:1", "20b:4", "20b:16", "20b:64", "20b:256",
                                                 "120b:1", "120b:16", "120b:256"])
ap.add_argument("--json", default=None)
args = ap.parse_args()

rows = []
for point in args.points:
    model, m = point.split(":")
    m = int(m)
    h, i, e, k = GPT_OSS[model]
    a = _problem_args(m, h, i, e, k, torch.bfloat16)
    base = choose_config(a, "dequant")
    ref = fused_moe(a, mode="dequant", config=base).float()
    base_ms = _graph_ms(lambda: fused_moe(a, mode="dequant", config=base), 50)
    best = (base_ms, base)
    for swap, bn, bk in itertools.product((False, True), (32, 64, 128), (128, 256)):
        cfg = replace(base, split_dot=True, swap_ab=swap, block_n=bn, block_k=bk,
                      block_n2=None, block_k2=None)
        try:
            out = fused_moe(a, mode="dequant", config=cfg).float()
            err = float((out - ref).abs().max() / ref.abs().max())
            ms = _graph_ms(lambda: fused_moe(a, mode="dequant", config=cfg), 50)
        except Exception as exc:  # noqa: BLE001
            print(f"skip {cfg.to_json()}: {exc!s:.100}")
            continue
        rows.append(dict(model=model, M=m, ms=ms, err=err, config=cfg.to_json(),
                         base_ms=base_ms))
        if err > 2e-2:
            print(f"WRONG {point} {cfg.to_json()} err={err:.2e}")
        elif ms < best[0]:
            best = (ms, cfg)
    print(f"{point:<9} tuned {base_ms * 1e3:8.1f} us   best {best[0] * 1e3:8.1f} us  "
          f"{best[1].to_json()}", flush=True)
if args.json:
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)

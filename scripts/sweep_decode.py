"""Decode-size sweeps around the config `auto` picks: the whole layer (CUDA graph, median) for
each variant, checked against the picked config's output.

    PYTHONPATH=src python3 scripts/sweep_decode.py split-k --json split-k.json
    PYTHONPATH=src python3 scripts/sweep_decode.py split-dot --json split-dot.json

split-k: GEMM1/GEMM2 K slices x N tiles (benchmarks/NOTES.md section 7); split-dot: two
half-dots, both orientations, N and K tiles (section 12).
"""

import argparse
import itertools
import json
from dataclasses import replace

import torch

from mxmoe.kernels.fused_moe import choose_config, fused_moe
from mxmoe.tune import GPT_OSS, _graph_ms, _problem_args


def split_k_variants(base):
    for bn, s1, s2 in itertools.product((32, 64), (1, 2, 3, 4, 6), (1, 2, 3, 4, 6)):
        yield replace(base, block_n=bn, block_n2=bn, split_k=s1, split_k2=s2)


def split_dot_variants(base):
    for swap, bn, bk in itertools.product((False, True), (32, 64, 128), (128, 256)):
        yield replace(base, split_dot=True, swap_ab=swap, block_n=bn, block_k=bk,
                      block_n2=None, block_k2=None)


SWEEPS = {"split-k": split_k_variants, "split-dot": split_dot_variants}

ap = argparse.ArgumentParser()
ap.add_argument("sweep", choices=sorted(SWEEPS))
ap.add_argument("--points", nargs="+", metavar="MODEL:M",
                default=["20b:1", "20b:4", "20b:16", "20b:64", "120b:1", "120b:16", "120b:64"])
ap.add_argument("--json", default=None)
args = ap.parse_args()

rows = []
for point in args.points:
    model, m = point.split(":")
    m = int(m)
    a = _problem_args(m, *GPT_OSS[model], torch.bfloat16)
    base = choose_config(a, "dequant")
    ref = fused_moe(a, mode="dequant", config=base).float()
    base_ms = _graph_ms(lambda: fused_moe(a, mode="dequant", config=base), 50)
    best = (base_ms, base)
    for cfg in SWEEPS[args.sweep](base):
        try:
            out = fused_moe(a, mode="dequant", config=cfg).float()
            err = float((out - ref).abs().max() / ref.abs().max())
            ms = _graph_ms(lambda: fused_moe(a, mode="dequant", config=cfg), 50)
        except Exception as exc:  # noqa: BLE001  (a variant that does not compile is skipped)
            print(f"skip {cfg.to_json()}: {exc!s:.100}")
            continue
        rows.append(dict(model=model, M=m, ms=ms, err=err, config=cfg.to_json(),
                         base_ms=base_ms))
        if err > 2e-2:
            print(f"WRONG {point} {cfg.to_json()} err={err:.2e}")
        elif ms < best[0]:
            best = (ms, cfg)
    print(f"{point:<9} picked {base_ms * 1e3:8.1f} us   best {best[0] * 1e3:8.1f} us  "
          f"{best[1].to_json()}", flush=True)
if args.json:
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)

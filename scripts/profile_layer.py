"""Per-kernel time of one fused-experts call (torch.profiler), to see where a layer's time goes.

    PYTHONPATH=src python3 scripts/profile_layer.py --tokens 1 64 8192 --backend triton_dequant
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import mxmoe
from mxmoe.cli._common import random_moe

ap = argparse.ArgumentParser()
ap.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 8192])
ap.add_argument("--experts", type=int, default=32)
ap.add_argument("--backend", default="triton_dequant")
args = ap.parse_args()

for m in args.tokens:
    p = random_moe(m, 2880, 2880, args.experts, 4, torch.bfloat16, "cuda")

    def call():
        w, ids = mxmoe.route(torch.randn(m, args.experts, device="cuda"), 4)
        return mxmoe.fused_experts(p.hidden_states, p.w13, p.w2, w, ids, w13_bias=p.w13_bias,
                                   w2_bias=p.w2_bias, backend=args.backend)

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            call()
        torch.cuda.synchronize()
    print(f"--- M={m} E={args.experts} {args.backend} (per call, us)")
    rows = []
    for evt in prof.key_averages():
        if evt.device_type == torch.autograd.DeviceType.CUDA or getattr(evt, "device_time_total", 0):
            total = getattr(evt, "device_time_total", 0) or getattr(evt, "cuda_time_total", 0)
            if total:
                rows.append((total / 10, evt.count // 10, evt.key[:70]))
    for t, n, k in sorted(rows, reverse=True)[:14]:
        print(f"{t:9.1f} x{n:<3} {k}")
    print(f"{sum(r[0] for r in rows):9.1f} total")

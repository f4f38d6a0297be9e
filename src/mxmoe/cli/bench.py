"""Time a whole MoE layer (route -> experts -> weighted sum) on each usable backend."""

from __future__ import annotations

import time

import torch

from ._common import environment, header, random_moe


def add_arguments(parser) -> None:
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="M values")
    parser.add_argument("--repeat", type=int, default=3)


def run(args) -> int:
    from ..api import fused_experts
    from ..backends import backends

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(header(environment()))
    if device.type == "cpu":
        hidden, inter, experts, top_k = 288, 288, 8, 4
        print(f"no GPU: timing the reference at a scaled-down gpt-oss shape "
              f"(H = I = {hidden}, E = {experts}, k = {top_k}) on the CPU")
    else:
        hidden, inter, experts, top_k = 2880, 2880, 32, 4
    tokens = args.tokens or [1, 16, 128]
    print(f"\n{'backend':<16} {'M':>6} {'ms':>10}")
    for name, (usable, _) in backends(device).items():
        if not usable:
            continue
        for m in tokens:
            p = random_moe(m, hidden, inter, experts, top_k, torch.float32, device)
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                fused_experts(p.hidden_states, p.w13, p.w2, p.topk_weights, p.topk_ids,
                              backend=name)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            print(f"{name:<16} {m:>6} {sorted(times)[len(times) // 2] * 1e3:>10.3f}")
    return 0

"""Run every usable backend against the float32 reference on random inputs; print pass/fail."""

from __future__ import annotations

import torch

from ._common import environment, header, random_moe, relative_error

#: (label, M, H, I, E, k): small awkward shapes; the GPU adds a gpt-oss-20b-shaped case.
_CPU_CASES = [
    ("one token", 1, 64, 96, 5, 2),
    ("k = E", 7, 64, 32, 3, 3),
    ("prime E", 13, 96, 64, 7, 2),
]
_GPU_CASES = _CPU_CASES + [("gpt-oss-20b", 64, 2880, 2880, 32, 4)]


def add_arguments(parser) -> None:
    parser.add_argument("--tolerance", type=float, default=None,
                        help="max relative error allowed (default: 1e-4 fp32, 2e-2 bf16/fp16)")


def run(args) -> int:
    from ..api import fused_experts
    from ..backends import backends
    from ..reference import fused_experts_reference

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(header(environment()))
    print(f"checking on {device} with {dtype}\n")
    cases = _GPU_CASES if device.type == "cuda" else _CPU_CASES
    tolerance = args.tolerance or (2e-2 if dtype != torch.float32 else 1e-4)
    failures = 0
    print(f"{'backend':<16} {'case':<14} {'max rel err':>12}  result")
    for name, (usable, reason) in backends(device).items():
        if not usable:
            print(f"{name:<16} {'-':<14} {'-':>12}  skipped ({reason})")
            continue
        for label, m, h, i, e, k in cases:
            p = random_moe(m, h, i, e, k, dtype, device)
            kwargs = dict(w13_bias=p.w13_bias, w2_bias=p.w2_bias)
            ref = fused_experts_reference(p.hidden_states, p.w13, p.w2, p.topk_weights,
                                          p.topk_ids, **kwargs)
            try:
                out = fused_experts(p.hidden_states, p.w13, p.w2, p.topk_weights, p.topk_ids,
                                    backend=name, **kwargs)
                err = relative_error(out, ref)
                ok = err <= tolerance
            except Exception as exc:  # report, keep checking the others
                err, ok = float("nan"), False
                label = f"{label} ({type(exc).__name__}: {exc})"
            failures += not ok
            print(f"{name:<16} {label:<14} {err:>12.2e}  {'PASS' if ok else 'FAIL'}")
    print(f"\n{'all passed' if failures == 0 else f'{failures} failed'} (tolerance {tolerance:g})")
    return 1 if failures else 0

"""Run every usable backend against the float32 reference on random inputs; print pass/fail.

Tolerance policy (the error is max |out - ref| / max |ref|), the one `mxmoe bench` and the
backend probe use for 16-bit arithmetic: 2e-2 for a path that rounds to 16 bits (bf16/fp16
activations, or triton_scaled, whose tl.dot_scaled takes the activations as bf16 even when they
are fp32), 1e-4 for a path that computes in fp32 (the torch reference, triton_dequant and bf16
on fp32 activations). A wrong kernel is off by O(1); 16-bit rounding of the activations alone
gives ~4e-3. --tolerance replaces both numbers.
"""

from __future__ import annotations

# The policy, shared with `mxmoe bench` (`mxmoe.tolerances`).
from ..tolerances import FP32_TOLERANCE, HALF_PRECISION_TOLERANCE, tolerance_for  # noqa: E402

#: (label, M, H, I, E, k): small awkward shapes; the GPU adds a gpt-oss-20b-shaped case.
_CPU_CASES = [
    ("one token", 1, 64, 96, 5, 2),
    ("k = E", 7, 64, 32, 3, 3),
    ("prime E", 13, 96, 64, 7, 2),
]
_GPU_CASES = _CPU_CASES + [("gpt-oss-20b", 64, 2880, 2880, 32, 4)]

def add_arguments(parser) -> None:
    parser.add_argument("--tolerance", type=float, default=None,
                        help=f"max relative error allowed, for every path (default: "
                             f"{HALF_PRECISION_TOLERANCE:g} where the arithmetic rounds to 16 "
                             f"bits: bf16/fp16 activations, or triton_scaled's bf16 "
                             f"tl.dot_scaled; {FP32_TOLERANCE:g} where it is fp32)")

def run(args) -> int:
    import torch

    from ..api import fused_experts
    from ..backends import backends
    from ..reference import fused_experts_reference
    from ._common import environment, header, random_moe, relative_error

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(header(environment()))
    print(f"checking on {device} with {dtype}\n")
    cases = _GPU_CASES if device.type == "cuda" else _CPU_CASES
    failures = 0
    print(f"{'backend':<16} {'case':<14} {'max rel err':>12} {'tolerance':>10}  result")
    for name, (usable, reason) in backends(device).items():
        if not usable:
            print(f"{name:<16} {'-':<14} {'-':>12} {'-':>10}  skipped ({reason})")
            continue
        tolerance = args.tolerance if args.tolerance is not None else tolerance_for(name, dtype)
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
            print(f"{name:<16} {label:<14} {err:>12.2e} {tolerance:>10.0e}  "
                  f"{'PASS' if ok else 'FAIL'}")
    policy = (f"{args.tolerance:g} for every path" if args.tolerance is not None else
              f"{HALF_PRECISION_TOLERANCE:g} for 16-bit arithmetic, {FP32_TOLERANCE:g} for fp32; "
              f"see --help")
    print(f"\n{'all passed' if failures == 0 else f'{failures} failed'} (tolerance: {policy})")
    return 1 if failures else 0

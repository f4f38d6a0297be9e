"""GPU check of planned launches with TMA descriptors: repeated eager calls agree, and cost.

    PYTHONPATH=src python3 scripts/gpu_planned_descriptors.py

gpt-oss-20b shapes (H = I = 2880, E = 32, k = 4, bf16), MMA_LANES weights, M = 64, 512, 2048
(the prefill GEMMs, whose token tiles are TMA descriptors). Per M: the first call plans (through
Triton), later calls launch every step directly; each of five calls on new activations and
routing is compared with `backend="triton_dequant"` on plain weights (the general kernel, no
descriptors) and must agree to bf16 rounding. Then the host time of an eager call (median of 50,
after a sync, the GPU kept busy so the host is measured, not the queue).
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import mxmoe  # noqa: E402
from mxmoe.testing import random_moe, relative_error  # noqa: E402


def main():
    worst = 0.0
    for m in (64, 512, 2048):
        base = random_moe(m, 2880, 2880, 32, 4, torch.bfloat16, "cuda", seed=m)
        lanes13, lanes2 = base.w13.to_layout("mma_lanes"), base.w2.to_layout("mma_lanes")
        errors = []
        for trial in range(5):
            p = random_moe(m, 2880, 2880, 32, 4, torch.bfloat16, "cuda", seed=1000 * m + trial)
            kw = dict(topk_weights=p.topk_weights, topk_ids=p.topk_ids, w13_bias=base.w13_bias,
                      w2_bias=base.w2_bias, activation="swigluoai")
            ref = mxmoe.fused_experts(p.hidden_states, base.w13, base.w2,
                                      backend="triton_dequant", **kw)
            out = mxmoe.fused_experts(p.hidden_states, lanes13, lanes2, **kw)
            errors.append(relative_error(out.float(), ref.float()))
        worst = max(worst, *errors)
        host = []
        x = p.hidden_states
        for _ in range(50):
            torch.cuda.synchronize()
            big = torch.empty(8192, 8192, device="cuda", dtype=torch.bfloat16)
            big @ big  # keeps the GPU busy: the call's host time is not hidden by a wait
            start = time.perf_counter()
            mxmoe.fused_experts(x, lanes13, lanes2, **kw)
            host.append((time.perf_counter() - start) * 1e6)
        torch.cuda.synchronize()
        print(f"M = {m}: relative error per call {['%.2e' % e for e in errors]}; host "
              f"median {statistics.median(host):.0f} us, min {min(host):.0f} us")
    print("ok" if worst < 2e-2 else f"FAILED: worst relative error {worst:.3e}")
    return 0 if worst < 2e-2 else 1


if __name__ == "__main__":
    sys.exit(main())

"""The direct decode GEMMs with and without activation planes on the GPU (bf16, MMA_LANES and
plain weights): bit-identical layers, both against the fp32 reference, at gpt-oss-20b/120b
widths and a 736-wide TP shard, M = 1, 2, 4 (and 16 at 120b), with a remote expert map.

    PYTHONPATH=src python3 scripts/gpu_decode_planes_check.py

Run it before turning the planes on by default (MXMOE_DECODE_PLANES, benchmarks/NOTES.md
section 22); `MODE=gemms MXMOE_DECODE_PLANES=1 LAYOUT=mma_lanes scripts/gpu_direct.py` times them.
"""

import os

import torch

from mxmoe import settings
from mxmoe.reference import fused_experts_reference
from mxmoe.testing import decode_fused_experts, random_moe, relative_error

failures = 0
for h, i, e, k, ms in ((2880, 2880, 32, 4, (1, 2, 4)), (2880, 2880, 128, 4, (1, 16)),
                       (2880, 736, 32, 4, (1, 3))):
    for m in ms:
        for layout in ("mma_lanes", "plain"):
            p = random_moe(m, h, i, e, k, torch.bfloat16, "cuda", seed=m + e,
                           num_global_experts=e + 3, with_expert_map=True)
            kw = dict(p.kwargs(activation=True, expert_map=True),
                      w13=p.w13.to_layout(layout), w2=p.w2.to_layout(layout))
            outs = []
            for planes in ("1", "0"):
                os.environ["MXMOE_DECODE_PLANES"] = planes
                settings.refresh()
                outs.append(decode_fused_experts(**kw))
            torch.cuda.synchronize()
            ref = fused_experts_reference(**p.kwargs(activation=True, expert_map=True))
            same = torch.equal(outs[0], outs[1])
            err = relative_error(outs[0].float(), ref.float())
            ok = same and err < 1e-2 and bool(torch.isfinite(outs[0]).all())
            failures += not ok
            print(f"H={h} I={i} E={e} M={m} {layout:9s}: planes == rows {same}, "
                  f"rel err {err:.2e} {'ok' if ok else 'FAIL'}", flush=True)
print("FAILURES", failures)

"""Which variants of the 256 x 128 prefill tile give the same result on every run (20b M = 4096, four
runs each, against the fp32 reference): the check behind benchmarks/NOTES.md section 20.

    PYTHONPATH=src python3 scripts/gpu_repeatability.py
"""
import sys
from dataclasses import replace
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_decode import random_weights, routing
from mxmoe.kernels import fused_moe
from mxmoe.kernels.prefill import default_prefill_config
from mxmoe.testing import prefill_fused_experts, relative_error
from mxmoe.reference import fused_experts_reference

e, m = 32, 4096
w13, w2, b13, b2 = random_weights(e, 2880, "cuda", seed=0)
l13, l2 = w13.to_layout("mma_lanes"), w2.to_layout("mma_lanes")
x, weights, ids = routing(m, e, "cuda", seed=m)
ref = fused_experts_reference(x.float(), w13, w2, weights, ids, w13_bias=b13.float(), w2_bias=b2.float())
cfg = default_prefill_config(m * 4 / e)
real_fold = fused_moe.scales_fold
variants = {
    "shipped": (cfg, True),
    "shipped no fold": (cfg, False),
    "s3": (replace(cfg, num_stages=3), True),
    "s2": (replace(cfg, num_stages=2), True),
    "no A TMA": (replace(cfg, tma=False), True),
    "128x128": (replace(cfg, block_m=128), True),
    "256x128x128 s3": (replace(cfg, block_k=128, num_stages=3), True),
    "128x256 gather": (replace(cfg, block_m=128, block_n=256, gather_a=True), True),
    "w TMA": (replace(cfg, weights_tma=True), True),
    "256x256 wTMA": (replace(cfg, block_n=256, weights_tma=True, num_stages=3), True),
}
for name, (c, fold) in variants.items():
    fused_moe.scales_fold = (lambda s: real_fold(s)) if fold else (lambda s: False)
    try:
        outs = [prefill_fused_experts(x, l13, l2, weights, ids, w13_bias=b13, w2_bias=b2, config=c) for _ in range(4)]
        torch.cuda.synchronize()
    except Exception as exc:
        print(name, "ERROR", type(exc).__name__, str(exc)[:200], flush=True)
        continue
    same = [torch.equal(outs[0], o) for o in outs[1:]]
    errs = [f"{relative_error(o.float(), ref):.2e}" for o in outs]
    print(f"{name:18s} deterministic={same} rel err vs fp32 ref {errs}", flush=True)

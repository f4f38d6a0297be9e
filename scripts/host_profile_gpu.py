"""Where the host time of an eager call goes, on the GPU machine (gpt-oss-20b, M=1).

Times (median of wall times, the GPU idle before each call): `fused_experts` on plain and on
group_halves weights, `MXFP4MoE`, and their pieces (the signature, the plan's launches, one
allocation, a bare compiled launch); then a cProfile of the plain call.

    PYTHONPATH=src python3 scripts/host_profile_gpu.py
"""

import cProfile
import pstats
import statistics
import time

import torch

import mxmoe
from mxmoe import plans
from mxmoe.testing import random_moe


def median_us(fn, reps=300, sync=True):
    times = []
    for _ in range(reps):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def main():
    torch.manual_seed(0)
    p = random_moe(1, 2880, 2880, 32, 4, torch.bfloat16, "cuda", seed=0)
    kw = p.kwargs()
    kw.pop("backend", None)
    halves = dict(kw, w13=kw["w13"].to_layout("group_halves"),
                  w2=kw["w2"].to_layout("group_halves"))
    rows = {}
    with torch.inference_mode():
        for name, args in (("fused_experts plain", kw), ("fused_experts group_halves", halves)):
            for _ in range(5):
                mxmoe.fused_experts(**args)
            rows[name] = median_us(lambda: mxmoe.fused_experts(**args))
            rows[name + " (no sync between)"] = median_us(lambda: mxmoe.fused_experts(**args),
                                                          sync=False)
        key_args = (kw["hidden_states"], kw["w13"], kw["w2"], kw["topk_weights"],
                    kw["topk_ids"], kw["w13_bias"], kw["w2_bias"], "swigluoai", 1.702, 7.0,
                    None, False, "auto")
        rows["signature"] = median_us(lambda: plans.signature(*key_args), sync=False)
        key = plans.signature(*key_args)
        plan = plans._PLANS.get(key)
        runner_args = (kw["hidden_states"], kw["w13"], kw["w2"], kw["topk_weights"],
                       kw["topk_ids"], kw["w13_bias"], kw["w2_bias"], None)
        rows["CallPlan.__call__"] = median_us(lambda: plan(*runner_args))
        rows["torch.empty"] = median_us(
            lambda: torch.empty((1, 2880), dtype=torch.bfloat16, device="cuda"), sync=False)
        layer = mxmoe.MXFP4MoE(kw["w13"], kw["w2"],
                               torch.randn(32, 2880, device="cuda", dtype=torch.bfloat16),
                               torch.randn(32, device="cuda", dtype=torch.bfloat16),
                               kw["w13_bias"], kw["w2_bias"], top_k=4)
        x = kw["hidden_states"]
        for _ in range(5):
            layer(x)
        rows["MXFP4MoE plain"] = median_us(lambda: layer(x))
        fp32_layer = mxmoe.MXFP4MoE(kw["w13"], kw["w2"],
                                    torch.randn(32, 2880, device="cuda"),
                                    torch.randn(32, device="cuda"),
                                    kw["w13_bias"], kw["w2_bias"], top_k=4)
        for _ in range(5):
            fp32_layer(x)
        rows["MXFP4MoE plain, float32 router"] = median_us(lambda: fp32_layer(x))
        layer.to_layout("group_halves")
        for _ in range(5):
            layer(x)
        rows["MXFP4MoE group_halves"] = median_us(lambda: layer(x))
        logits = torch.randn(1, 32, device="cuda")
        rows["route"] = median_us(lambda: mxmoe.route(logits, 4))
        rows["router linear"] = median_us(lambda: layer.router(x))

        import triton
        import triton.language as tl

        @triton.jit
        def touch(ptr):
            tl.store(ptr + tl.program_id(0), 1.0)

        buf = torch.zeros(1, device="cuda")
        touch[(1,)](buf)
        rows["bare kernel[grid]"] = median_us(lambda: touch[(1,)](buf))
        compiled = touch.warmup(buf, grid=(1,))
        launcher = compiled[(1, 1, 1)]
        rows["bare compiled[grid]"] = median_us(lambda: launcher(buf))
        address = buf.data_ptr()
        rows["bare compiled[grid] int pointer"] = median_us(lambda: launcher(address))

    with torch.no_grad():
        rows["MXFP4MoE group_halves, no_grad"] = median_us(lambda: layer(x))
        rows["fused_experts plain, no_grad"] = median_us(lambda: mxmoe.fused_experts(**kw))
    rows["MXFP4MoE group_halves, grad enabled"] = median_us(lambda: layer(x))
    rows["fused_experts plain, grad enabled"] = median_us(lambda: mxmoe.fused_experts(**kw))
    for name, us in rows.items():
        print(f"{us:8.1f} us  {name}")
    with torch.inference_mode():
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(300):
            layer(x)
        torch.cuda.synchronize()
        profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()

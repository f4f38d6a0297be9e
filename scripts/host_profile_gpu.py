"""Where the host time of an eager call goes on a GPU machine: gpt-oss-20b M=1.

Times (median µs of issuing one call, the GPU idle before each, as `mxmoe bench --host`;
the layer with gradients on, under no_grad and under inference_mode, the rest in inference mode):
``fused_experts`` (auto), the `MXFP4MoE` forward with a float32 router (as the benchmark's)
and with a bfloat16 one (as transformers' gpt-oss), its pieces (the cast, the router Linear,
`mxmoe.route`), and the torch and Triton primitives they are made of; then a cProfile of each
call, sorted by own time. Read it beside `scripts/host_profile_cpu.py` (the same Python path
on the CPU machine, its launches stubbed).

    PYTHONPATH=src python scripts/host_profile_gpu.py [--calls 400] [--profile-rows 25]
"""

import argparse
import cProfile
import pstats
import statistics
import time

import torch

import mxmoe
from mxmoe.testing import random_moe


def host_us(call, reps: int) -> float:
    seconds = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(seconds) * 1e6


def cupti_experiment(calls: dict, reps: int) -> None:
    """Whether a finished torch.profiler leaves host overhead on later calls, and whether
    ``TEARDOWN_CUPTI=1`` (read by Kineto when a profile stops) removes it: the same calls
    timed clean, after a profile with teardown, and after a profile without."""
    import os

    from torch.profiler import ProfilerActivity, profile

    names = ("kernel[grid] trivial", "compiled trivial", "fused_experts auto",
             "MXFP4MoE bf16 router", "F.linear fp32 [1,2880]x[32,2880]")
    columns = {}
    with torch.inference_mode():
        for call in calls.values():
            for _ in range(20):
                call()
        torch.cuda.synchronize()
        for stage, teardown in (("clean", None), ("after, TEARDOWN_CUPTI=1", "1"),
                                ("after, TEARDOWN_CUPTI=0", "0")):
            if teardown is not None:
                os.environ["TEARDOWN_CUPTI"] = teardown
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]):
                    calls["fused_experts auto"]()
                    torch.cuda.synchronize()
                time.sleep(1.0)  # (Kineto's teardown may finish on its own thread)
            columns[stage] = [host_us(calls[name], reps) for name in names]
    print(f"{'us per call':40s} " + " ".join(f"{stage:>24s}" for stage in columns))
    for i, name in enumerate(names):
        print(f"{name:40s} " + " ".join(f"{columns[stage][i]:24.1f}" for stage in columns))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--cupti", action="store_true",
                        help="only: the calls' host cost before any torch.profiler, after one "
                             "with TEARDOWN_CUPTI=1, then after one with TEARDOWN_CUPTI=0")
    args = parser.parse_args()

    device = torch.device("cuda")
    p = random_moe(1, 2880, 2880, 32, 4, torch.bfloat16, device, seed=0)
    kw = p.kwargs()
    g = torch.Generator().manual_seed(1)
    router_w = torch.randn(32, 2880, generator=g).to(device) * 2880 ** -0.5
    router_b = torch.randn(32, generator=g).to(device) * 0.1
    x = kw["hidden_states"]
    layers = {
        dtype: mxmoe.MXFP4MoE(kw["w13"], kw["w2"], router_w.to(dtype), router_b.to(dtype),
                              kw["w13_bias"], kw["w2_bias"], top_k=4)
        for dtype in (torch.float32, torch.bfloat16)
    }
    logits = torch.nn.functional.linear(x.float(), router_w, router_b)
    buf = torch.zeros(1, device=device)

    import triton
    import triton.language as tl

    @triton.jit
    def _touch(out_ptr):
        tl.store(out_ptr + tl.program_id(0), 1.0)

    _touch[(1,)](buf)
    compiled = _touch.warmup(buf, grid=(1,))[(1, 1, 1)]

    calls = {
        "fused_experts auto": lambda: mxmoe.fused_experts(**kw),
        "MXFP4MoE fp32 router": lambda: layers[torch.float32](x),
        "MXFP4MoE bf16 router": lambda: layers[torch.bfloat16](x),
        "x.to(float32)": lambda: x.to(torch.float32),
        "F.linear fp32 [1,2880]x[32,2880]": lambda: torch.nn.functional.linear(
            x.float(), router_w, router_b),
        "router Linear module (bf16)": lambda: layers[torch.bfloat16].router(x),
        "mxmoe.route": lambda: mxmoe.route(logits, 4),
        "torch.empty cuda": lambda: torch.empty((1, 2880), dtype=torch.bfloat16, device=device),
        "kernel[grid] trivial": lambda: _touch[(1,)](buf),
        "compiled trivial": lambda: compiled(buf),
        "torch.cuda.current_stream": lambda: torch.cuda.current_stream(),
    }
    if args.cupti:
        cupti_experiment(calls, args.calls)
        return
    # The layer in the three autograd modes (the router's weight is a Parameter).
    for mode_name, mode in (("grad on", torch.enable_grad), ("no_grad", torch.no_grad),
                            ("inference_mode", torch.inference_mode)):
        with mode():
            for dtype in (torch.float32, torch.bfloat16):
                layer = layers[dtype]
                for _ in range(20):
                    layer(x)
                print(f"MXFP4MoE {str(dtype)[6:]} router, {mode_name:15s} "
                      f"{host_us(lambda: layer(x), args.calls):8.1f} us")
    with torch.inference_mode():
        for call in calls.values():
            for _ in range(20):
                call()
        torch.cuda.synchronize()
        for name, call in calls.items():
            print(f"{name:40s} {host_us(call, args.calls):8.1f} us")
        for name in ("fused_experts auto", "MXFP4MoE fp32 router", "MXFP4MoE bf16 router"):
            profile = cProfile.Profile()
            call = calls[name]
            profile.enable()
            for _ in range(args.calls):
                call()
            profile.disable()
            torch.cuda.synchronize()
            print(f"\n===== cProfile: {name} ({args.calls} calls)")
            pstats.Stats(profile).sort_stats("tottime").print_stats(args.profile_rows)


if __name__ == "__main__":
    main()

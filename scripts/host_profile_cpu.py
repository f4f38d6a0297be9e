"""Host cost of an eager `fused_experts` call on the CPU machine, the kernels not run.

A proxy for the GPU machine's host: the whole Python path of a gpt-oss-20b M=1 call (plan
lookup, allocations, argument assembly) runs as on a GPU, except that each launch goes to a
stand-in compiled kernel whose ``run`` does nothing. Prints µs per call and a profile.

    PYTHONPATH=src python scripts/host_profile_cpu.py [--layout group_halves] [--layer]
"""

import argparse
import cProfile
import dataclasses
import os
import pstats
import time
import types

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

import mxmoe  # noqa: E402
import importlib  # noqa: E402

from mxmoe import settings  # noqa: E402
from mxmoe.backends.triton import triton_dequant  # noqa: E402
from mxmoe.kernels import launch  # noqa: E402
from mxmoe.testing import random_moe  # noqa: E402


class _Compiled:
    function = None
    packed_metadata = None

    def run(self, *args):
        pass


class _Active:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0


_HOOKS = types.SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layout", default="plain")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--layer", action="store_true",
                        help="an MXFP4MoE forward (router included, fp32 router weight as the "
                             "benchmark's) instead of a fused_experts call")
    args = parser.parse_args()

    launch._RUNTIME = (_Active(), _HOOKS)
    launch.Launcher.launch_and_return_compiled = lambda self, grid, named: _Compiled()
    settings._current = dataclasses.replace(settings.current(), interpret=False)
    backend = triton_dequant()
    importlib.import_module("mxmoe.backends").resolve_backend = (
        lambda name, device, problem, *rest, **kw: backend)

    p = random_moe(1, 2880, 2880, 32, 4, torch.bfloat16, "cpu", seed=0)
    kw = p.kwargs()
    kw.pop("backend", None)
    if args.layout != "plain":
        kw["w13"] = kw["w13"].to_layout(args.layout)
        kw["w2"] = kw["w2"].to_layout(args.layout)

    def call_experts():
        return mxmoe.fused_experts(**kw, backend="triton_dequant")

    call = call_experts
    if args.layer:
        # The Triton router as on a GPU (its launch stubbed like the others).
        router = importlib.import_module("mxmoe.router")
        router._use_triton_router = lambda logits: True
        g = torch.Generator().manual_seed(1)
        layer = mxmoe.MXFP4MoE(kw["w13"], kw["w2"], torch.randn(32, 2880, generator=g),
                               torch.randn(32, generator=g), kw["w13_bias"], kw["w2_bias"],
                               top_k=4, backend="triton_dequant")
        x = kw["hidden_states"]

        def call_layer():
            return layer(x)

        call = call_layer

    with torch.inference_mode():
        for _ in range(20):
            call()
        t0 = time.perf_counter()
        for _ in range(args.calls):
            call()
        what = "MXFP4MoE forward" if args.layer else "fused_experts"
        print(f"{what} host us per call ({args.layout}): "
              f"{(time.perf_counter() - t0) / args.calls * 1e6:.1f}")
        t0 = time.perf_counter()
        for _ in range(args.calls):
            torch.empty((1, 2880), dtype=torch.bfloat16)
        print(f"torch.empty us: {(time.perf_counter() - t0) / args.calls * 1e6:.1f}")
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.calls):
            call()
        profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()

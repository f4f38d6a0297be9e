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
    args = parser.parse_args()

    launch._RUNTIME = (_Active(), _HOOKS)
    launch.Launcher.launch_and_return_compiled = lambda self, grid, named: _Compiled()
    settings._current = dataclasses.replace(settings.current(), interpret=False)
    backend = triton_dequant()
    importlib.import_module("mxmoe.backends").resolve_backend = (
        lambda name, device, problem: backend)

    p = random_moe(1, 2880, 2880, 32, 4, torch.bfloat16, "cpu", seed=0)
    kw = p.kwargs()
    kw.pop("backend", None)
    if args.layout != "plain":
        kw["w13"] = kw["w13"].to_layout(args.layout)
        kw["w2"] = kw["w2"].to_layout(args.layout)

    def call():
        return mxmoe.fused_experts(**kw, backend="triton_dequant")

    with torch.inference_mode():
        for _ in range(20):
            call()
        t0 = time.perf_counter()
        for _ in range(args.calls):
            call()
        print(f"fused_experts host us per call ({args.layout}): "
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

"""On the GPU machine: run the layer through each path at shapes that reach every shipped tile, then
read every kernel Triton compiled for it and report wgmma register-operand hazards
(`mxmoe.kernels.sass.register_operand_hazards`) with the installed Triton.

    PYTHONPATH=src python3 scripts/gpu_hazards.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import mxmoe  # noqa: E402
from gpu_decode import random_weights, routing  # noqa: E402
from mxmoe.kernels import _decode_gemm, _moe_gemm, _prefill_gemm  # noqa: E402
from mxmoe.kernels.sass import cuobjdump, register_operand_hazards  # noqa: E402


def compiled_kernels(jit_function):
    """(specialisation key, CompiledKernel) of every variant in a JITFunction's caches."""
    for cache in jit_function.device_caches.values():
        kernels = cache[0] if isinstance(cache, tuple) else cache
        for key, compiled in kernels.items():
            yield key, compiled


def scan() -> int:
    total = 0
    for module, name in ((_prefill_gemm, "prefill_gemm_kernel"), (_moe_gemm, "moe_gemm_kernel"),
                         (_decode_gemm, "decode_gemv_kernel"), (_decode_gemm, "decode_token_kernel")):
        kernel = getattr(module, name, None)
        if kernel is None:
            continue
        for key, compiled in compiled_kernels(kernel):
            hazards = register_operand_hazards(cuobjdump(compiled.asm["cubin"]))
            total += len(hazards)
            consts = {k: v for k, v in getattr(compiled.src, "constants", {}).items()
                      if isinstance(k, str) and k.isupper()} if hasattr(compiled, "src") else {}
            short = {k: consts[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GATED", "A_TMA",
                                             "W_TMA", "SCALE_FOLD", "NUM_STAGES") if k in consts}
            print(f"{name} {short or str(key)[:120]} warps={compiled.metadata.num_warps}: "
                  f"{len(hazards)} hazards", flush=True)
            for h in hazards[:3]:
                print("   ", h)
    return total


def exercise(models=(32,), tokens=(1, 8, 64, 256, 1024, 4096)):
    for e in models:
        w13, w2, b13, b2 = random_weights(e, 2880, "cuda", seed=0)
        lanes = w13.to_layout("mma_lanes"), w2.to_layout("mma_lanes")
        for m in tokens:
            x, weights, ids = routing(m, e, "cuda", seed=m)
            mxmoe.fused_experts(x, *lanes, weights, ids, w13_bias=b13, w2_bias=b2)
            mxmoe.fused_experts(x, w13, w2, weights, ids, w13_bias=b13, w2_bias=b2,
                                backend="triton_dequant")
        torch.cuda.synchronize()


if __name__ == "__main__":
    exercise()
    print("hazards in all:", scan())

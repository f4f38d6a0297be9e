"""Does Triton's automatic warp specialization take a K loop whose MMA operand is decoded in
registers? Compile-only, for sm_90, on a CPU machine (Triton 3.6 first on the path):

    PYTHONPATH=/tmp/t36 /work/main/.venv/bin/python scripts/inspect_warp_specialize.py

Each case is a 128 x 128 accumulator over a K loop marked ``tl.range(warp_specialize=True)``
with both operands loaded through tensor descriptors (TMA); the left operand is a bf16 tile
(as loaded, or through an inline-asm identity) or uint8 codes decoded to bf16 in registers
(nibbles split and joined: the prefill GEMM's pattern, `mxmoe.kernels._prefill_gemm`). Printed:
whether the TTGIR has a ``ttg.warp_specialize`` region, or the compiler's failure. (Measured
2026-12-02 with Triton 3.6: bf16 operands are specialized with 4 warps and not with 8; decoded
codes make the NVGPUWarpSpecialization pass fail with 4 warps and are not specialized with 8.)
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# LEFT: how the left operand is made
BF16, BF16_ASM, CODES = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _loop(w_desc, b_desc, c_ptr, K, LEFT: tl.constexpr):
    acc = tl.zeros((128, 128), tl.float32)
    for k0 in tl.range(0, K, 64, num_stages=3, warp_specialize=True):
        if LEFT == CODES:
            packed = w_desc.load([0, k0 // 2])  # (128, 32) uint8
            lo = (packed & 0xF).to(tl.bfloat16)
            hi = (packed >> 4).to(tl.bfloat16)
            w = tl.reshape(tl.join(lo, hi), (128, 64))
        else:
            w = w_desc.load([0, k0])  # (128, 64) bf16
            if LEFT == BF16_ASM:
                w = tl.inline_asm_elementwise("mov.b16 $0, $1;", "=h,h", [w],
                                              dtype=tl.bfloat16, is_pure=True, pack=1)
        acc = tl.dot(w, tl.trans(b_desc.load([0, k0])), acc)
    offs = tl.arange(0, 128)
    tl.store(c_ptr + offs[:, None] * 128 + offs[None, :], acc)


def main():
    print(f"triton {triton.__version__}, target sm_90")
    for left, name in ((BF16, "bf16 tile"), (BF16_ASM, "bf16 tile through inline asm"),
                       (CODES, "uint8 codes decoded in registers")):
        for warps in (4, 8):
            codes = left.value == CODES.value
            w_type = "tensordesc<u8[128, 32]>" if codes else "tensordesc<bf16[128, 64]>"
            signature = {"w_desc": w_type, "b_desc": "tensordesc<bf16[128, 64]>",
                         "c_ptr": "*fp32", "K": "i32", "LEFT": "constexpr"}
            try:
                compiled = triton.compile(ASTSource(_loop, signature, {"LEFT": left.value}),
                                          target=GPUTarget("cuda", 90, 32),
                                          options=dict(num_warps=warps))
                verdict = ("specialized" if "ttg.warp_specialize" in compiled.asm["ttgir"]
                           else "not specialized")
            except Exception as exc:  # the pass pipeline's failure
                verdict = f"compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
            print(f"{name}, {warps} warps: {verdict}", flush=True)


if __name__ == "__main__":
    main()

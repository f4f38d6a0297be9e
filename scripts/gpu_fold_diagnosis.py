"""GPU diagnosis of the scale fold (benchmarks/NOTES.md section 19): the folded and the two-product
PTX conversions of MMA_LANES words against exact values, for every code and scale byte, then
the prefill GEMMs with the fold forced on one weight at a time.

    PYTHONPATH=src python3 scripts/gpu_fold_diagnosis.py
"""

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mxmoe.kernels import _moe_gemm  # noqa: E402


@triton.jit
def _convert(words_ptr, scales_ptr, out_ptr, FOLD: tl.constexpr, N: tl.constexpr):
    offs = tl.arange(0, N)
    words = tl.load(words_ptr + offs)
    s = tl.load(scales_ptr + offs)
    if FOLD:
        pairs = _moe_gemm._folded_scale_pairs(s)
    else:
        pairs = _moe_gemm._e8m0_to_bf16_pairs(s)
    outs = _moe_gemm._mma_lanes_to_bf16_ptx(words, pairs, FOLD)
    for i in tl.static_range(8):
        tl.store(out_ptr + offs * 8 + i, outs[i])


def asm_check():
    from mxmoe.layouts import MMA_LANES
    from mxmoe.format import MXFP4Tensor
    n = 1024
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (n, 32), generator=g, dtype=torch.uint8)
    plain = (codes[:, 0::2] | (codes[:, 1::2] << 4))
    s = torch.randint(0, 129, (n, 1), generator=g, dtype=torch.uint8)
    w = MXFP4Tensor(plain, s).to_layout(MMA_LANES)
    exact = MXFP4Tensor(plain, s).dequantize(torch.float32)  # (n, 32)
    words = w.blocks.reshape(n, 4, 4).contiguous().view(torch.int32).reshape(n * 4).cuda()
    scales = s.repeat_interleave(4, 0).reshape(n * 4).cuda()
    for fold in (False, True):
        out = torch.empty(n * 4 * 8, dtype=torch.bfloat16, device="cuda")
        _convert[(1,)](words, scales, out, FOLD=fold, N=n * 4)
        out = out.reshape(n, 4, 4, 2).float().cpu()  # (row, t, i, j) -> element 8i + 2t + j
        got = out.permute(0, 2, 1, 3).reshape(n, 32)
        want = exact.to(torch.bfloat16).float()
        bad = (got != want) & ~(got.isnan() & want.isnan())
        print(f"asm fold={fold}: {int(bad.sum())} of {bad.numel()} differ")
        if bad.any():
            r, c = bad.nonzero()[0].tolist()
            print("  first: row", r, "elem", c, "scale", int(s[r, 0]), "code", int(codes[r, c]),
                  "got", float(got[r, c]), "want", float(want[r, c]))
            print("  scales of bad rows:", sorted(set(int(s[x, 0]) for x in bad.nonzero()[:, 0]))[:30])


def layer_check():
    import mxmoe
    from mxmoe.kernels import fused_moe
    from mxmoe.reference import fused_experts_reference
    from mxmoe.testing import relative_error
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import make_moe
    kw = make_moe(1024, 256, 192, 8, 2, dtype=torch.bfloat16, device="cuda", seed=1024)
    ref = fused_experts_reference(**{k: v.float() if torch.is_tensor(v) and v.is_floating_point()
                                     else v for k, v in kw.items()})
    lanes = dict(kw, w13=kw["w13"].to_layout("mma_lanes"), w2=kw["w2"].to_layout("mma_lanes"))
    real = fused_moe.scales_fold
    for which in ("none", "w13", "w2", "both"):
        def forced(scales, which=which):
            if which == "both":
                return True
            target = lanes["w13"].scales if which == "w13" else lanes["w2"].scales
            return which != "none" and scales is target
        fused_moe.scales_fold = forced
        mxmoe.plans.clear()
        out = mxmoe.fused_experts(**lanes)
        print(f"prefill fold on {which}: rel err {relative_error(out.float(), ref):.3e}")
    fused_moe.scales_fold = real


if __name__ == "__main__":
    asm_check()
    layer_check()

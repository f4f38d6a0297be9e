"""Compile the prefill GEMM for sm_90 on a CPU machine and read what the compiler made of it.

For each variant (gpt-oss shapes, bf16, the PTX upcast): whether the code uses wgmma (and takes
the weights from registers), cp.async, TMA; registers, spills, shared memory; the instruction
mix of the K loop (the innermost loop around the wgmmas) and its instructions per weight; the
layout conversions left in the K loop of the TTGIR. Needs Triton 3.6 (the GPU's version) on the
path before the venv's:

    PYTHONPATH=/tmp/t36:src /work/main/.venv/bin/python scripts/inspect_prefill.py [--dump DIR]

``--dump`` writes each variant's TTGIR, PTX and SASS there.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from inspect_decode import _cuobjdump, dump_compiled, resources  # noqa: E402
from mxmoe.kernels._epilogues import swiglu_oai  # noqa: E402
from mxmoe.kernels._prefill_gemm import prefill_gemm_kernel  # noqa: E402

POINTERS = {"a_ptr": "*bf16", "w_ptr": "*u8", "w_scale_ptr": "*u8", "bias_ptr": "*bf16",
            "out_ptr": "*bf16", "topk_weights_ptr": "*fp32", "sorted_ids_ptr": "*i32",
            "expert_ids_ptr": "*i32", "num_post_padded_ptr": "*i32"}
#: Scalars that are 1 at the real shapes (Triton specialises them the same way at launch):
#: MMA_LANES scales are K-major, so stride_sn is 1.
UNIT = {"stride_ak", "stride_wk", "stride_sn", "stride_bias_n", "stride_on"}
#: Scalars divisible by 16 at gpt-oss shapes (specialised at launch).
DIV16 = {"N", "K", "stride_am", "stride_we", "stride_wn", "stride_se", "stride_sk",
         "stride_bias_e", "stride_om"}


def _variant(gemm1, block_m, block_n, block_k=64, warps=8, stages=4, tma=False, flatten=False,
             dense=False, w_tma=False):
    name = (f"{'GEMM1' if gemm1 else 'GEMM2'} {block_m}x{block_n}x{block_k} w{warps} s{stages} "
            f"{'TMA' if tma else 'gathered' if gemm1 else 'rows'}{' flat' if flatten else ''}"
            f"{' dense bf16' if dense else ''}{' W-TMA' if w_tma else ''}")
    constexprs = dict(A_ROW_DIV=1 if tma or not gemm1 else 4, A_ROWS=1 if tma or not gemm1 else 0,
                      OUT_ROWS=1 if gemm1 else 0, A_TMA=tma, GATED=gemm1, INTERLEAVED=True,
                      ACT_FN=swiglu_oai, ROUTER_WEIGHT=0 if gemm1 else 2, HAS_BIAS=True,
                      DENSE=dense, DEQUANT_PTX=True, DOT_DTYPE=tl.bfloat16, DOT_PRECISION=None,
                      EVEN_K=2880 % block_k == 0, BLOCK_M=block_m, BLOCK_N=block_n,
                      BLOCK_K=block_k, GROUP_M=8, NUM_STAGES=stages, FLATTEN=flatten,
                      W_TMA=w_tma)
    return name, constexprs, dict(num_warps=warps, num_stages=stages)


VARIANTS = [
    # Every load of the K loop a descriptor (GEMM1 with gathered tokens): codes and scales TMA.
    _variant(False, 256, 128, tma=True, w_tma=True),
    _variant(True, 256, 128, tma=True, w_tma=True),
    _variant(True, 128, 256, tma=True, w_tma=True),
    # Small token tiles for the memory-bound middle (a few to tens of pairs per expert).
    _variant(True, 16, 128, 128, warps=4),
    _variant(False, 16, 128, 128, warps=4, tma=True),
    _variant(True, 32, 128, 128, warps=4),
    _variant(False, 32, 128, 128, warps=4, tma=True),
    _variant(True, 256, 128),
    _variant(True, 256, 128, tma=True),
    _variant(True, 128, 128),
    _variant(True, 128, 256),
    _variant(False, 256, 128, tma=True),
    _variant(False, 128, 128, tma=True),
    _variant(False, 256, 128),
    _variant(True, 256, 128, block_k=128, stages=3),
    _variant(True, 256, 128, flatten=True),
    _variant(True, 256, 128, tma=True, flatten=True),
    _variant(False, 256, 128, tma=True, flatten=True),
    _variant(True, 128, 256, tma=True),
    _variant(False, 128, 256, tma=True),
    _variant(True, 64, 256, stages=6),
    _variant(True, 128, 256, tma=True, dense=True),
]


def compile_variant(constexprs, options):
    kernel = prefill_gemm_kernel
    signature = {}
    for name in kernel.arg_names:
        if name in ("w_ptr", "w_scale_ptr") and constexprs["DENSE"]:
            signature[name] = "*bf16"
        elif name in POINTERS:
            signature[name] = POINTERS[name]
        elif name == "a_desc":
            signature[name] = (f"tensordesc<bf16[{constexprs['BLOCK_M']}, "
                               f"{constexprs['BLOCK_K']}]>" if constexprs["A_TMA"] else "*bf16")
        elif name == "w_desc":
            signature[name] = (f"tensordesc<i32[1, {constexprs['BLOCK_N']}, "
                               f"{constexprs['BLOCK_K'] // 8}]>" if constexprs["W_TMA"]
                               else "*u8")
        elif name == "s_desc":
            signature[name] = (f"tensordesc<u8[1, {constexprs['BLOCK_K'] // 32}, "
                               f"{constexprs['BLOCK_N']}]>" if constexprs["W_TMA"] else "*u8")
        elif name in constexprs or name in UNIT:
            signature[name] = "constexpr"
        elif name in ("alpha", "limit"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    consts = dict(constexprs, **{name: 1 for name in UNIT})
    names = kernel.arg_names
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in list(POINTERS) + sorted(DIV16)}
    src = ASTSource(kernel, signature, consts, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def k_loop(sass: str) -> list[tuple[str, str]]:
    """(opcode, operands) of the innermost backward-branch region that holds the wgmmas."""
    instrs = [(int(m.group(1), 16), m.group(3), m.group(4)) for m in _INSTR.finditer(sass)]
    best = None
    for addr, op, args in instrs:
        target = re.search(r"0x([0-9a-f]+)", args) if op == "BRA" else None
        if target is None or int(target.group(1), 16) >= addr:
            continue
        lo = int(target.group(1), 16)
        body = [(o, a) for x, o, a in instrs if lo <= x <= addr]
        if any(o.startswith("HGMMA") for o, _ in body) and (best is None or len(body) < len(best)):
            best = body
    return best or []


def summarize(name, compiled, constexprs, options):
    sass = _cuobjdump(compiled.asm["cubin"], "-sass")
    ptx = compiled.asm["ptx"]
    ttgir = compiled.asm["ttgir"]
    res = resources(compiled.asm["cubin"])
    loop = k_loop(sass)
    ops = Counter(op.split(".")[0] for op, _ in loop)
    hgmma = [args for op, args in loop if op.startswith("HGMMA")]
    # A register A operand reads "HGMMA... R24, R164, gdesc[...]": the second operand a register.
    a_in_registers = bool(hgmma) and all(re.search(r"R\d+, R\d+, gdesc", a) for a in hgmma)
    # The K loop of the TTGIR: the last scf.for up to its yield.
    start = ttgir.rfind("scf.for")
    inner = ttgir[start:ttgir.find("scf.yield", start)] if start >= 0 else ""
    threads = 32 * options["num_warps"]
    weights = constexprs["BLOCK_N"] * constexprs["BLOCK_K"] / threads
    return {
        "variant": name,
        "regs": res.get("REG"), "spill bytes": res.get("LOCAL"),
        "smem": compiled.metadata.shared,
        "wgmma": "wgmma.mma_async" in ptx, "A from regs": a_in_registers,
        "cp.async": "cp.async.cg" in ptx or "cp.async.ca" in ptx,
        "TMA": "cp.async.bulk.tensor" in ptx,
        "loop instr": len(loop),
        "instr/weight": round(len(loop) / weights, 2) if loop else None,
        "HGMMA": ops["HGMMA"], "LDGSTS": ops["LDGSTS"], "LDG": ops["LDG"],
        "LDS+LDSM": ops["LDS"] + ops["LDSM"], "STS": ops["STS"], "BAR": ops["BAR"],
        "HMUL2/HFMA2": ops["HMUL2"] + ops["HFMA2"], "LOP3+SHF+PRMT": ops["LOP3"] + ops["SHF"]
        + ops["PRMT"], "IMAD+ISETP+SEL": ops["IMAD"] + ops["ISETP"] + ops["SEL"],
        "K-loop cvt": inner.count("ttg.convert_layout"),
    }, sass


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dump", type=Path, default=None)
    parser.add_argument("--only", default=None, help="substring of the variant names")
    args = parser.parse_args()
    print(f"triton {triton.__version__} ({triton.__file__}), target sm_90; weights per loop "
          f"trip and thread = BLOCK_N * BLOCK_K / threads")
    rows = []
    for name, constexprs, options in VARIANTS:
        if args.only and args.only not in name:
            continue
        compiled = compile_variant(constexprs, options)
        row, sass = summarize(name, compiled, constexprs, options)
        rows.append(row)
        print(row, flush=True)
        if args.dump:
            dump_compiled(args.dump, name, compiled, sass)
    keys = list(rows[0]) if rows else []
    print()
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(str(row[k]) for k in keys))


if __name__ == "__main__":
    main()

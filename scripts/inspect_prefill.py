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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from inspect_decode import _cuobjdump, dump_compiled, resources  # noqa: E402
from mxmoe.kernels._epilogues import swiglu_oai  # noqa: E402
from mxmoe.kernels.sass import (  # noqa: E402
    compile_prefill_sm90,
    innermost_loop,
    parse,
    register_operand_hazards,
)

def _variant(gemm1, block_m, block_n, block_k=64, warps=8, stages=4, tma=False, flatten=False,
             dense=False, w_tma=False, fold=True):
    name = (f"{'GEMM1' if gemm1 else 'GEMM2'} {block_m}x{block_n}x{block_k} w{warps} s{stages} "
            f"{'TMA' if tma else 'gathered' if gemm1 else 'rows'}{' flat' if flatten else ''}"
            f"{' dense bf16' if dense else ''}{' W-TMA' if w_tma else ''}"
            f"{' no-fold' if not fold and not dense else ''}")
    constexprs = dict(A_ROW_DIV=1 if tma or not gemm1 else 4, A_ROWS=1 if tma or not gemm1 else 0,
                      OUT_ROWS=1 if gemm1 else 0, A_TMA=tma, GATED=gemm1, INTERLEAVED=True,
                      ACT_FN=swiglu_oai, ROUTER_WEIGHT=0 if gemm1 else 2, HAS_BIAS=True,
                      DENSE=dense, DEQUANT_PTX=True, SCALE_FOLD=fold, DOT_DTYPE=tl.bfloat16, DOT_PRECISION=None,
                      EVEN_K=2880 % block_k == 0, BLOCK_M=block_m, BLOCK_N=block_n,
                      BLOCK_K=block_k, GROUP_M=8, NUM_STAGES=stages, FLATTEN=flatten,
                      W_TMA=w_tma, RETIRE_DOTS=False)
    return name, constexprs, dict(num_warps=warps, num_stages=stages)


VARIANTS = [
    # Every load of the K loop a descriptor (GEMM1 with gathered tokens): codes and scales TMA.
    _variant(False, 256, 128, tma=True, w_tma=True),
    _variant(True, 256, 128, tma=True, w_tma=True),
    _variant(True, 128, 256, tma=True, w_tma=True),
    # Small token tiles for the memory-bound middle (a few to tens of pairs per expert).
    _variant(True, 16, 128, 128, warps=4),
    _variant(True, 16, 128, 128, warps=4, fold=False),
    _variant(True, 16, 128, 128, warps=4, w_tma=True),
    _variant(True, 16, 128, 128, warps=4, tma=True, w_tma=True),
    _variant(True, 16, 128, 256, warps=4, stages=3, w_tma=True),
    _variant(False, 16, 128, 128, warps=4, tma=True, w_tma=True),
    _variant(False, 16, 128, 128, warps=4, tma=True),
    _variant(True, 32, 128, 128, warps=4),
    _variant(False, 32, 128, 128, warps=4, tma=True),
    _variant(True, 256, 128),
    _variant(True, 256, 128, fold=False),
    _variant(False, 256, 128, tma=True, fold=False),
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
    _variant(True, 128, 256, tma=True, fold=False),
    _variant(False, 128, 256, tma=True),
    _variant(True, 64, 256, stages=6),
    _variant(True, 64, 256, stages=6, tma=True, w_tma=True),
    _variant(False, 64, 256, stages=6, tma=True, w_tma=True),
    _variant(True, 64, 256, 128, stages=3, tma=True, w_tma=True),
    _variant(False, 64, 256, 128, stages=3, tma=True, w_tma=True),
    _variant(True, 32, 256, stages=6, tma=True, w_tma=True),
    _variant(True, 32, 256, 128, stages=4, tma=True, w_tma=True),
    _variant(False, 32, 256, 128, stages=4, tma=True, w_tma=True),
    _variant(True, 32, 128, 256, warps=4, stages=3, tma=True, w_tma=True),
    _variant(True, 64, 128, 256, warps=4, stages=3, tma=True, w_tma=True),
    _variant(False, 64, 128, 256, warps=4, stages=3, tma=True, w_tma=True),
    _variant(False, 32, 128, 256, warps=4, stages=3, tma=True, w_tma=True),
    _variant(True, 256, 128, stages=2),
    _variant(True, 256, 128, stages=3),
    _variant(True, 64, 256, stages=6, tma=True),
    _variant(False, 64, 256, stages=6, tma=True),
    _variant(True, 32, 256, stages=6, tma=True),
    _variant(False, 32, 256, stages=6, tma=True),
    _variant(True, 16, 128, 128, warps=4, tma=True),
    _variant(True, 16, 128, 256, warps=4, stages=3, tma=True, w_tma=True),
    _variant(False, 16, 128, 256, warps=4, stages=3, tma=True, w_tma=True),
    _variant(True, 128, 256, tma=True, dense=True),
]


def compile_variant(constexprs, options):
    return compile_prefill_sm90(constexprs, options["num_warps"], options["num_stages"])


def k_loop(sass: str) -> list[tuple[str, str]]:
    """(opcode, operands) of the K loop: the innermost loop that holds the wgmmas."""
    return [(i.opcode, i.operands) for i in innermost_loop(parse(sass))]


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
        "wgmma A hazards": len(register_operand_hazards(sass)),
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

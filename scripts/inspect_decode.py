"""Compile the decode GEMMs for sm_90 on a CPU machine and read what the compiler made of them.

For each variant (gpt-oss shapes, bf16 activations): registers, spills, and in the K loop of
the SASS the instruction mix (global/shared loads and stores, barriers, FMAs, MMAs, integer
logic) and instructions per weight; from the TTGIR the layout the decoded weight tile has at
the dot. Needs Triton 3.6 (the GPU's version) on the path before the venv's, e.g.

    PYTHONPATH=/tmp/t36:src /work/main/.venv/bin/python scripts/inspect_decode.py [--dump DIR]

``--dump`` writes each variant's TTGIR, PTX and SASS there.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mxmoe.kernels._decode_gemm import decode_gemv_kernel, decode_token_kernel  # noqa: E402
from mxmoe.kernels._epilogues import swiglu_oai  # noqa: E402
from mxmoe.kernels.sass import cuobjdump  # noqa: E402

POINTERS = {"a_ptr": "*bf16", "b_ptr": "*u8", "b_scale_ptr": "*u8", "bias_ptr": "*bf16",
            "out_ptr": "*bf16", "topk_weights_ptr": "*fp32", "sorted_ids_ptr": "*i32",
            "expert_ids_ptr": "*i32", "num_post_padded_ptr": "*i32"}
SCALARS = ["N", "K", "num_pairs", "max_blocks", "stride_am", "stride_ak", "stride_be",
           "stride_bn", "stride_bk", "stride_se", "stride_sn", "stride_sk", "stride_bias_e",
           "stride_bias_n", "stride_om", "stride_on", "stride_os", "k_per_split"]
#: Scalars that are 1 at the real shapes (Triton specialises them the same way at launch).
UNIT = {"stride_ak", "stride_bk", "stride_sk", "stride_bias_n", "stride_on"}
#: Scalars divisible by 16 at gpt-oss shapes (specialised at launch).
DIV16 = {"N", "K", "stride_am", "stride_be", "stride_bn", "stride_bias_e", "stride_om",
         "stride_os", "stride_ap", "stride_op", "k_per_split"}

#: The token kernel's (`decode_token_kernel`) own pointers and scalars.
TOKEN_POINTERS = {"a_ptr": "*bf16", "b_ptr": "*i32", "b_scale_ptr": "*u8", "bias_ptr": "*bf16",
                  "out_ptr": "*bf16", "topk_weights_ptr": "*fp32", "topk_ids_ptr": "*i32",
                  "expert_map_ptr": "*i32"}
TOKEN_SCALARS = ["N", "K", "num_tokens", "num_global_experts", "num_local_experts",
                 "stride_am", "stride_ak", "stride_be", "stride_bn", "stride_bk", "stride_se",
                 "stride_sn", "stride_sk", "stride_bias_e", "stride_bias_n", "stride_om",
                 "stride_on", "stride_os", "stride_ap", "stride_op", "k_per_split"]


# (name, kernel, constexprs, options)
def _gemv(name, m, n, k, warps, gemm1=False, even=False, layout=1):
    return (f"gemv M{m} N{n} K{k} w{warps} {'GEMM1' if gemm1 else 'GEMM2'}"
            f"{' even K' if even else ''} L{layout}", decode_gemv_kernel,
            dict(A_ROW_DIV=4 if gemm1 else 1, GATED=gemm1, INTERLEAVED=True, ACT_FN=swiglu_oai,
                 ROUTER_WEIGHT=0 if gemm1 else 2, HAS_BIAS=True, BLOCK_M=m, BLOCK_N=n,
                 BLOCK_K=k, SPLIT_K=1, EVEN_K=even, W_LAYOUT=layout),
            dict(num_warps=warps, num_stages=3))


def _direct(j, n, k, warps, gemm1=False, even=True, layout=0, planes=False):
    """``planes``: GEMM1 writes activation planes, GEMM2 reads them (MXMOE_DECODE_PLANES=1)."""
    return (f"direct J{j} N{n} K{k} w{warps} {'GEMM1' if gemm1 else 'GEMM2'}"
            f"{' even K' if even else ''} L{layout}{' planes' if planes else ''}",
            decode_token_kernel,
            dict(TOP_K=4, A_ROW_DIV=4 if gemm1 else 1, SUM_PAIRS=not gemm1, GATED=gemm1,
                 INTERLEAVED=True, ACT_FN=swiglu_oai, ROUTER_WEIGHT=0 if gemm1 else 2,
                 HAS_BIAS=True, HAS_MAP=False, BLOCK_J=j, BLOCK_N=n, BLOCK_K=k, SPLIT_K=1,
                 EVEN_K=even, W_LAYOUT=layout, X_PLANES=planes and not gemm1,
                 OUT_PLANES=planes and gemm1, ROUND_DTYPE="bf16", OUT_LAYOUT=layout),
            dict(num_warps=warps, num_stages=3))


VARIANTS = [
    # the shipped M = 1 configs (kernels/decode.direct_configs) on the Hopper layout
    _direct(4, 4, 512, 4, gemm1=True, even=False, layout=2),
    _direct(1, 8, 1024, 4, even=False, layout=2),
    _direct(4, 8, 1024, 4, even=False, layout=2),
    _direct(4, 4, 512, 4, even=False, layout=2),
    _direct(4, 4, 512, 4, gemm1=True, even=False, layout=2, planes=True),
    _direct(1, 8, 1024, 4, even=False, layout=2, planes=True),
    _direct(1, 16, 512, 4, even=False, layout=2, planes=True),
    _direct(2, 16, 256, 4, even=False, layout=2, planes=True),
    _direct(4, 8, 256, 4, even=False, layout=2, planes=True),
    _direct(1, 8, 1024, 8, even=False, layout=2, planes=True),
    _direct(1, 8, 512, 4, even=False, layout=2, planes=True),
    _direct(1, 8, 512, 2, even=False, layout=2, planes=True),
    _direct(1, 4, 1024, 4, even=False, layout=2, planes=True),
    _direct(1, 32, 256, 4, even=False, layout=2),
    _direct(1, 16, 256, 4, even=False, layout=2),
    _direct(2, 16, 256, 4, even=False, layout=2),
    _direct(1, 8, 256, 4, even=False, layout=2),
    _direct(1, 16, 512, 4, even=False, layout=2),
    _direct(1, 16, 512, 8, even=False, layout=2),
    _direct(1, 8, 1024, 8, even=False, layout=2),
    _direct(4, 8, 256, 4, gemm1=True, even=False, layout=2),
    _direct(4, 4, 1024, 4, gemm1=True, even=False, layout=2),
    _direct(4, 4, 512, 8, gemm1=True, even=False, layout=2),
    _direct(4, 16, 256, 4, gemm1=True),
    _direct(4, 16, 256, 4, gemm1=True, layout=1),
    _direct(4, 16, 256, 4, gemm1=True, layout=2),
    _direct(4, 8, 512, 4, gemm1=True),
    _direct(1, 32, 256, 4),
    _direct(1, 32, 256, 4, layout=2),
    _direct(1, 64, 256, 4),
    _direct(1, 64, 128, 4),
    _direct(2, 16, 256, 4),
    _direct(2, 32, 256, 4),
    _direct(2, 64, 128, 4),
    _direct(2, 32, 512, 4),
    _gemv("", 1, 64, 128, 4, gemm1=True, layout=0),
    _gemv("", 1, 64, 128, 4, gemm1=True),
    _gemv("", 1, 64, 128, 4),
    _gemv("", 1, 64, 256, 8),
    _gemv("", 1, 128, 128, 4),
    _gemv("", 1, 128, 64, 4, even=True),
    _gemv("", 1, 256, 64, 4, even=True),
    _gemv("", 1, 256, 128, 8, even=True),
    _gemv("", 2, 128, 64, 4, even=True),
    _gemv("", 2, 64, 128, 4),
    _gemv("", 4, 64, 128, 4),
]


def compile_variant(kernel, constexprs, options):
    import triton.language as tl

    token = kernel is decode_token_kernel
    pointers = TOKEN_POINTERS if token else POINTERS
    signature = dict(pointers)
    if kernel is decode_gemv_kernel:
        signature["b_ptr"] = "*i32"  # the GEMV reads the bytes as int32 words
    for name in TOKEN_SCALARS if token else SCALARS:
        signature[name] = "constexpr" if name in UNIT else "i32"
    signature["alpha"] = "fp32"
    signature["limit"] = "fp32"
    consts = {name: 1 for name in UNIT}
    for name, value in constexprs.items():
        signature[name] = "constexpr"
        consts[name] = value
    for name in ("DOT_DTYPE", "ROUND_DTYPE"):
        if name in constexprs:
            consts[name] = {"bf16": tl.bfloat16, "fp16": tl.float16}[constexprs[name]]
    if constexprs.get("X_PLANES"):
        signature["a_ptr"] = "*fp32"
    if constexprs.get("OUT_PLANES"):
        signature["out_ptr"] = "*fp32"
    names = kernel.arg_names
    signature = {name: signature[name] for name in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]]
             for n in list(pointers) + sorted(DIV16)}
    src = ASTSource(kernel, signature, consts, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


_cuobjdump = cuobjdump  # the one in mxmoe.kernels.sass


def resources(cubin: bytes) -> dict:
    """REG, STACK, SHARED, LOCAL of the kernel (cuobjdump -res-usage)."""
    text = _cuobjdump(cubin, "-res-usage")
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text)}


_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")
_BRANCH = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?BRA\s+(?:\S+\s+)?`?\(?\.L_x_\d+\)?"
                     r"|/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?BRA\s+0x([0-9a-f]+)")


def sass_loop(sass: str) -> list[str]:
    """Opcodes of the largest backward-branch region (the K loop) of the SASS."""
    lines = [line for line in sass.splitlines() if _OP.search(line)]
    addr = [int(re.search(r"/\*([0-9a-f]{4,})\*/", line).group(1), 16) for line in lines]
    best = (0, 0)
    for idx, line in enumerate(lines):
        m = re.search(r"BRA\s+(?:\S+\s+)?0x([0-9a-f]+)", line)
        if m is None:
            m = re.search(r"BRA\s+`\(\.L_x_(\d+)\)", line)
            if m is None:
                continue
            label = f".L_x_{m.group(1)}"
            target = next((i for i, l in enumerate(sass.splitlines()) if l.strip().startswith(label)),
                          None)
            if target is None:
                continue
            # Map the label line to the next instruction address.
            following = sass.splitlines()[target + 1:]
            nxt = next((l for l in following if _OP.search(l)), None)
            if nxt is None:
                continue
            target_addr = int(re.search(r"/\*([0-9a-f]{4,})\*/", nxt).group(1), 16)
        else:
            target_addr = int(m.group(1), 16)
        if target_addr < addr[idx] and addr[idx] - target_addr > best[1] - best[0]:
            best = (target_addr, addr[idx])
    return [_OP.search(line).group(1) for line, a in zip(lines, addr) if best[0] <= a <= best[1]]


def dot_operand_layouts(ttgir: str) -> list[str]:
    """The operand encodings of the dots in the TTGIR (weights first under swap-AB)."""
    out = []
    for line in ttgir.splitlines():
        if "warp_group_dot" in line or "tt.dot " in line:
            types = re.findall(r"tensor<[^>]*>", line.split(":")[-1])
            out.append(" x ".join(types[:2]))
    return out


def summarize(name, compiled, weights_per_iter):
    sass = _cuobjdump(compiled.asm["cubin"], "-sass")
    res = resources(compiled.asm["cubin"])
    loop = sass_loop(sass)
    ops = Counter(op.split(".")[0] for op in loop)
    ttgir = compiled.asm["ttgir"]
    row = {
        "variant": name,
        "regs": res.get("REG"),
        "spills": res.get("LOCAL"),
        "smem": compiled.metadata.shared,
        "loop instr": len(loop),
        "LDG": ops["LDG"], "LDS": ops["LDS"] + ops["LDSM"], "STS": ops["STS"],
        "BAR": ops["BAR"], "LDGSTS": ops["LDGSTS"],
        "FFMA": ops["FFMA"], "FMUL": ops["FMUL"], "FADD": ops["FADD"],
        "HMMA/WGMMA": ops["HMMA"] + ops["HGMMA"],
        "LOP3+SHF": ops["LOP3"] + ops["SHF"] + ops["PRMT"] + ops["IMAD"],
        "instr/weight": round(len(loop) / weights_per_iter, 2) if loop else None,
        "dot operands": dot_operand_layouts(ttgir),
        "local_alloc": ttgir.count("ttg.local_alloc"),
        "cvt_layout": ttgir.count("ttg.convert_layout"),
    }
    return row, sass


def dump_compiled(directory: Path, name: str, compiled, sass: str) -> None:
    """The variant's TTGIR, PTX and SASS as files named after it in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"\W+", "_", name)
    (directory / f"{stem}.ttgir").write_text(compiled.asm["ttgir"])
    (directory / f"{stem}.ptx").write_text(compiled.asm["ptx"])
    (directory / f"{stem}.sass").write_text(sass)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dump", type=Path, default=None)
    parser.add_argument("--only", default=None, help="substring of the variant names")
    args = parser.parse_args()
    print(f"triton {triton.__version__} ({triton.__file__}), target sm_90")
    rows = []
    for name, kernel, constexprs, options in VARIANTS:
        if args.only and args.only not in name:
            continue
        compiled = compile_variant(kernel, constexprs, options)
        # Weights one loop trip reads per thread: BLOCK_N * BLOCK_K over the threads.
        threads = 32 * options["num_warps"]
        per_thread = (constexprs.get("BLOCK_J", 1) * constexprs["BLOCK_N"]
                      * constexprs["BLOCK_K"] / threads)
        row, sass = summarize(name, compiled, per_thread)
        rows.append(row)
        if args.dump:
            dump_compiled(args.dump, name, compiled, sass)
    keys = ["variant", "regs", "spills", "smem", "loop instr", "instr/weight", "LDG", "LDS", "STS",
            "BAR", "LDGSTS", "FFMA", "FMUL", "FADD", "HMMA/WGMMA", "LOP3+SHF", "local_alloc",
            "cvt_layout"]
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(str(row[k]) for k in keys))
    for row in rows:
        for layouts in row["dot operands"]:
            print(f"{row['variant']}: dot {layouts}")


if __name__ == "__main__":
    main()

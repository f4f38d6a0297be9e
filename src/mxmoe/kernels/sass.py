"""Reading compiled NVIDIA kernels (SASS): the instructions of a loop and the one hazard that the
tests check, a wgmma's register operand overwritten while the wgmma may still read it.

A development tool for `scripts/inspect_prefill.py` and the tests: nothing in the package's
call path imports it. It needs Triton's NVIDIA backend (its bundled ``cuobjdump``), not a GPU.

Why the hazard matters: a ``wgmma.mma_async`` whose A operand is in registers (the prefill GEMM's
dequantized weights) reads those registers asynchronously, until a ``wgmma.wait_group`` retires
it (PTX ISA, "asynchronous warpgroup level matrix instructions": writing them earlier is
undefined). Triton 3.6 pipelines such dots across K steps with ``wait_group 3`` and lets the next
step's upcast write the registers of the last three wgmmas, when the token tile comes by
``cp.async`` (not when it comes by TMA); on the H200 that made the 256 x 128 tile's results
change from run to run (benchmarks/NOTES.md section 20). `register_operand_hazards` finds every
such write in the SASS.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Instruction", "parse", "cuobjdump", "innermost_loop", "loops_with",
           "RegisterHazard", "register_operand_hazards"]

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_TARGET = re.compile(r"0x([0-9a-f]+)")
_REGISTER = re.compile(r"R(\d+)")


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with its modifiers: "HGMMA.64x256x16.F32.BF16"
    operands: str  # the text after the opcode, without the predicate

    @property
    def branch_target(self) -> int | None:
        if self.opcode != "BRA":
            return None
        target = _TARGET.search(self.operands)
        return int(target.group(1), 16) if target else None


def parse(sass: str) -> list[Instruction]:
    """The instructions of ``cuobjdump -sass`` output, in address order."""
    return [Instruction(int(m.group(1), 16), m.group(3), m.group(4).strip())
            for m in _LINE.finditer(sass)]


def cuobjdump(cubin: bytes, flag: str = "-sass") -> str:
    """``cuobjdump <flag>`` of a cubin, with the binary bundled in Triton's NVIDIA backend."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        return subprocess.run([str(tool), flag, path], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(path)


def loops_with(instructions: list[Instruction], opcode_prefix: str) -> list[list[Instruction]]:
    """The bodies of the loops (a backward branch and what lies between its target and it) that
    hold an instruction of ``opcode_prefix``. A region that holds a branch to before its own
    start is not a loop: an mbarrier wait's retry stub, placed after the loop and branching back
    into it, spans the loop's tail and whatever follows."""
    loops = []
    for end in instructions:
        start = end.branch_target
        if start is None or start >= end.address:
            continue
        body = [i for i in instructions if start <= i.address <= end.address]
        if any(i.branch_target is not None and i.branch_target < start and i is not end
               for i in body):
            continue
        if any(i.opcode.startswith(opcode_prefix) for i in body):
            loops.append(body)
    return loops


def innermost_loop(instructions: list[Instruction], opcode_prefix: str = "HGMMA"
                   ) -> list[Instruction]:
    """The smallest loop holding an ``opcode_prefix`` instruction (the K loop for "HGMMA")."""
    loops = loops_with(instructions, opcode_prefix)
    return min(loops, key=len) if loops else []


@dataclass(frozen=True)
class RegisterHazard:
    wgmma: Instruction  # the HGMMA whose A registers are written too early
    writer: Instruction  # the first instruction that writes one of them before its retirement
    registers: tuple[int, ...]

    def __str__(self) -> str:
        return (f"HGMMA at {self.wgmma.address:#x} reads R{self.registers[0]} (its A operand) "
                f"while {self.writer.opcode} {self.writer.operands[:40]} at "
                f"{self.writer.address:#x} writes it")


#: Opcodes with no register destination (their first operand is read, or an address).
_NO_DESTINATION = ("HGMMA", "WARPGROUP", "BAR", "BRA", "ST", "RED", "ATOM", "SYNCS", "LDGSTS",
                   "UTMA", "DEPBAR", "LDGDEPBAR", "FENCE", "MEMBAR", "NOP", "EXIT", "RET",
                   "CALL", "YIELD", "ARRIVES", "ERRBAR", "CCTL", "WARPSYNC", "VOTEU", "UBLKCP")


def _written_registers(instruction: Instruction) -> set[int]:
    if instruction.opcode.startswith(_NO_DESTINATION) or instruction.opcode.startswith("U"):
        return set()
    first = instruction.operands.split(",")[0].strip()
    match = re.fullmatch(r"R(\d+)(\.\w+)*", first)
    if match is None:
        return set()
    base = int(match.group(1))
    width = 1
    for bits, regs in ((".128", 4), (".64", 2), (".WIDE", 2)):  # IMAD.WIDE: a register pair
        if bits in instruction.opcode:
            width = regs
    if instruction.opcode.startswith("LDSM"):  # LDSM.16.M88.4: four matrices, four registers
        width = {"2": 2, "4": 4}.get(instruction.opcode[-1], 1)
    return set(range(base, base + width))


def register_operand_hazards(sass: str) -> list[RegisterHazard]:
    """Every HGMMA with a register A operand (four registers) in a loop whose registers an
    instruction writes, going forward from it through the loop's back edge, before a
    ``WARPGROUP.DEPBAR.LE gsb0, n`` with at least ``n`` newer HGMMAs has retired it. (Each HGMMA
    is taken as its own group, as Triton commits them.)"""
    hazards = []
    for body in loops_with(parse(sass), "HGMMA"):
        twice = body + body
        for i, wgmma in enumerate(body):
            if not wgmma.opcode.startswith("HGMMA"):
                continue
            operands = [o.strip() for o in wgmma.operands.split(",")]
            match = re.fullmatch(r"R(\d+)", operands[1]) if len(operands) > 1 else None
            if match is None:  # A from shared memory (a descriptor)
                continue
            a_registers = set(range(int(match.group(1)), int(match.group(1)) + 4))
            newer = 0
            for later in twice[i + 1:i + len(body)]:
                if later.opcode.startswith("HGMMA"):
                    newer += 1
                    continue
                if later.opcode.startswith("WARPGROUP.DEPBAR"):
                    pending = _TARGET.search(later.operands)
                    if pending is not None and newer >= int(pending.group(1), 16):
                        break
                    continue
                hit = a_registers & _written_registers(later)
                if hit:
                    hazards.append(RegisterHazard(wgmma, later, tuple(sorted(hit))))
                    break
    return hazards


# ------------------------------------------------------------------ the prefill GEMM for sm_90

#: Pointer arguments of `prefill_gemm_kernel` at bf16 (the descriptors are set per variant).
_PREFILL_POINTERS = {"a_ptr": "*bf16", "w_ptr": "*u8", "w_scale_ptr": "*u8", "bias_ptr": "*bf16",
                     "out_ptr": "*bf16", "topk_weights_ptr": "*fp32", "sorted_ids_ptr": "*i32",
                     "expert_ids_ptr": "*i32", "num_post_padded_ptr": "*i32"}
#: Scalars that are 1 at real shapes (Triton specialises them so at launch): MMA_LANES scales
#: are K-major, so stride_sn is 1.
_PREFILL_UNIT = {"stride_ak", "stride_wk", "stride_sn", "stride_bias_n", "stride_on"}
#: Scalars divisible by 16 at gpt-oss shapes (specialised at launch).
_PREFILL_DIV16 = {"N", "K", "stride_am", "stride_we", "stride_wn", "stride_se", "stride_sk",
                  "stride_bias_e", "stride_om"}


def prefill_constexprs(cfg, gemm1: bool, *, k: int = 2880, fold: bool = True,
                       dense: bool = False, interleaved: bool = True,
                       dequant_ptx: bool = True) -> dict:
    """The constexprs `PrefillGemm.step` gives `prefill_gemm_kernel` for ``cfg`` (a
    `PrefillConfig`) at a gpt-oss-like shape (bf16, biases, the PTX upcast or with
    ``dequant_ptx=False`` the portable one; ``interleaved``:
    gpt-oss's swiglu with interleaved gate/up rows, else silu with ``[gate | up]`` halves):
    GEMM1 (gated, router weight none) or GEMM2 (router weight after the bias)."""
    import triton.language as tl

    from ._epilogues import silu_and_mul, swiglu_oai
    from .prefill import ROWS_PAIR, ROWS_SORTED, retires_dots

    a_tma = cfg.tma and (cfg.gather_a or not gemm1)
    a_rows = ROWS_SORTED if (cfg.gather_a or not gemm1) else ROWS_PAIR
    return dict(A_ROW_DIV=1 if a_rows == ROWS_SORTED else 4, A_ROWS=a_rows,
                OUT_ROWS=ROWS_SORTED if gemm1 else ROWS_PAIR, A_TMA=a_tma, GATED=gemm1,
                INTERLEAVED=interleaved, ACT_FN=swiglu_oai if interleaved else silu_and_mul,
                ROUTER_WEIGHT=0 if gemm1 else 2,
                HAS_BIAS=True, DENSE=dense, DEQUANT_PTX=dequant_ptx,
                SCALE_FOLD=fold and dequant_ptx and not dense,
                DOT_DTYPE=tl.bfloat16, DOT_PRECISION=None, EVEN_K=k % cfg.block_k == 0,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                GROUP_M=cfg.group_m, NUM_STAGES=cfg.num_stages, FLATTEN=cfg.flatten,
                W_TMA=cfg.weights_tma and not dense and (interleaved or not gemm1),
                RETIRE_DOTS=retires_dots(dense, a_tma, dequant_ptx))


def compile_prefill_sm90(constexprs: dict, num_warps: int, num_stages: int):
    """`prefill_gemm_kernel` compiled for sm_90 with these constexprs (`prefill_constexprs`), on
    any machine with Triton's NVIDIA backend: the CompiledKernel (``.asm``: ttgir, ptx,
    cubin)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ._prefill_gemm import prefill_gemm_kernel as kernel

    c = constexprs
    signature = {}
    for name in kernel.arg_names:
        if name in ("w_ptr", "w_scale_ptr") and c["DENSE"]:
            signature[name] = "*bf16"
        elif name in _PREFILL_POINTERS:
            signature[name] = _PREFILL_POINTERS[name]
        elif name == "a_desc":
            signature[name] = (f"tensordesc<bf16[{c['BLOCK_M']}, {c['BLOCK_K']}]>"
                               if c["A_TMA"] else "*bf16")
        elif name == "w_desc":
            signature[name] = (f"tensordesc<i32[1, {c['BLOCK_N']}, {c['BLOCK_K'] // 8}]>"
                               if c["W_TMA"] else "*u8")
        elif name == "s_desc":
            signature[name] = (f"tensordesc<u8[1, {c['BLOCK_K'] // 32}, {c['BLOCK_N']}]>"
                               if c["W_TMA"] else "*u8")
        elif name in c or name in _PREFILL_UNIT:
            signature[name] = "constexpr"
        elif name in ("alpha", "limit"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    consts = dict(c, **{name: 1 for name in _PREFILL_UNIT})
    names = kernel.arg_names
    attrs = {(names.index(n),): [["tt.divisibility", 16]]
             for n in list(_PREFILL_POINTERS) + sorted(_PREFILL_DIV16)}
    return triton.compile(ASTSource(kernel, signature, consts, attrs),
                          target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def check_prefill_tiles(extra: dict | None = None) -> dict:
    """For every shipped tile (`PREFILL_TILES`; GEMM1 with both gate/up row layouts, GEMM2; the
    PTX upcast and the portable one) and
    the named ``extra`` configs (name -> (PrefillConfig, gemm1)): whether the K loop's wgmmas
    take A from registers, and the register-operand hazards of its SASS (as text). Compiled for
    sm_90 with the installed Triton; run outside ``TRITON_INTERPRET`` (`main`)."""
    from .prefill import PREFILL_TILES, gemm_tile

    cases = {}
    for least, cfg in PREFILL_TILES:
        for gemm1, interleaved, ptx in ((True, True, True), (True, False, True),
                                        (False, True, True), (True, True, False),
                                        (False, True, False)):
            name = (f"{least}+ pairs {cfg.block_m}x{cfg.block_n}x{cfg.block_k} "
                    f"{'GEMM1' if gemm1 else 'GEMM2'}{'' if interleaved else ' halves'}"
                    f"{'' if ptx else ' portable'}")
            cases[name] = (cfg, gemm1, interleaved, ptx)
    for name, (cfg, gemm1) in (extra or {}).items():
        cases[name] = (cfg, gemm1, True, True)
    results = {}
    for name, (cfg, gemm1, interleaved, ptx) in cases.items():
        cfg = gemm_tile(cfg, gemm1, interleaved)  # what the launcher runs for this GEMM
        constexprs = prefill_constexprs(cfg, gemm1, interleaved=interleaved, dequant_ptx=ptx)
        if name.startswith("control:"):
            constexprs["RETIRE_DOTS"] = False  # as before the fix: the hazard shows
        compiled = compile_prefill_sm90(constexprs, cfg.num_warps, cfg.num_stages)
        sass = cuobjdump(compiled.asm["cubin"])
        wgmmas = [i for i in innermost_loop(parse(sass)) if i.opcode.startswith("HGMMA")]
        results[name] = {
            "wgmmas": len(wgmmas),
            "a_in_registers": bool(wgmmas) and all(
                i.operands.split(",")[1].strip().startswith("R") for i in wgmmas),
            "hazards": [str(h) for h in register_operand_hazards(sass)],
        }
    return results


def main(argv=None) -> int:
    """``python -m mxmoe.kernels.sass``: `check_prefill_tiles` as JSON (``--cp-async-control``
    adds GEMM1 256 x 128 with its tokens by cp.async, the case Triton 3.6 gets wrong)."""
    import argparse
    import json

    import triton

    from .prefill import PrefillConfig

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--cp-async-control", action="store_true")
    args = parser.parse_args(argv)
    extra = {}
    if args.cp_async_control:
        extra["control: 256x128x64 GEMM1, tokens by cp.async"] = (PrefillConfig(
            block_m=256, block_n=128, block_k=64, num_warps=8, num_stages=4, tma=True), True)
    print(json.dumps({"triton": triton.__version__, "cases": check_prefill_tiles(extra)},
                     indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

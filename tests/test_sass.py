"""The wgmma register-operand hazard (`mxmoe.kernels.sass`): the checker on hand-written SASS, every
shipped prefill tile compiled for sm_90 with the installed Triton (CPU, no GPU needed), and on a
GPU the layer at every tile repeatable bit for bit with no hazard in what Triton compiled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mxmoe.kernels.sass import (
    innermost_loop,
    parse,
    register_operand_hazards,
)


def _sass(lines: list[str]) -> str:
    """SASS text in cuobjdump's format, one instruction every 0x10 from 0x100."""
    return "\n".join(f"        /*{0x100 + 16 * i:04x}*/                   {line} ;"
                     f"   /* 0x0000000000000000 */" for i, line in enumerate(lines))


def _loop(body: list[str]) -> str:
    """``body`` in a loop (a backward branch to its first instruction), then an exit."""
    return _sass(body + ["@P0 BRA 0x100", "EXIT"])


TRIP = [
    "LOP3.LUT R10, R4, 0x81c081c0, RZ, 0xc0, !PT",  # the upcast writes the A registers
    "WARPGROUP.ARRIVE",
    "HGMMA.64x128x16.F32.BF16 R24, R8, gdesc[UR4], R24, gsb0",
    "WARPGROUP.DEPBAR.LE gsb0, 0x1",
]


def test_a_write_before_the_wgmma_retires_is_found():
    hazards = register_operand_hazards(_loop(TRIP))
    assert len(hazards) == 1
    assert hazards[0].registers == (10,) and hazards[0].writer.opcode == "LOP3.LUT"
    assert "R10" in str(hazards[0])


@pytest.mark.parametrize("change", ["wait for all", "A from shared memory", "other registers"])
def test_no_hazard_once_retired_or_not_read(change):
    trip = list(TRIP)
    if change == "wait for all":
        trip[3] = "WARPGROUP.DEPBAR.LE gsb0, 0x0"
    elif change == "A from shared memory":
        trip[2] = "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0"
    else:
        trip[0] = "LOP3.LUT R12, R4, 0x81c081c0, RZ, 0xc0, !PT"
    assert register_operand_hazards(_loop(trip)) == []


def test_a_pair_written_by_a_wide_instruction_counts():
    trip = list(TRIP)
    trip[0] = "IMAD.WIDE.U32 R10, R4, 0x4, R2"  # writes R10 and R11
    assert [h.registers for h in register_operand_hazards(_loop(trip))] == [(10, 11)]
    trip[0] = "IMAD.WIDE.U32 R6, R4, 0x4, R2"  # R6, R7: below the operand
    assert register_operand_hazards(_loop(trip)) == []


def test_newer_wgmmas_retire_older_ones():
    # Two wgmmas a trip and "at most one pending": the first is retired by the second's wait,
    # the second is not when the next trip writes its registers.
    trip = ["LOP3.LUT R10, R4, 0x1, RZ, 0xc0, !PT", "LOP3.LUT R14, R4, 0x1, RZ, 0xc0, !PT",
            "HGMMA.64x128x16.F32.BF16 R24, R8, gdesc[UR4], R24, gsb0",
            "WARPGROUP.DEPBAR.LE gsb0, 0x1",
            "HGMMA.64x128x16.F32.BF16 R24, R12, gdesc[UR4], R24, gsb0",
            "WARPGROUP.DEPBAR.LE gsb0, 0x1"]
    hazards = register_operand_hazards(_loop(trip))
    assert [(h.wgmma.address, h.registers) for h in hazards] == [(0x140, (14,))]


def test_a_retry_stub_is_not_the_loop():
    # An mbarrier wait retried out of line (after the loop, branching back into it) spans the
    # loop's tail: the K loop is the real one.
    lines = ["SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR4], R2", "@!P1 BRA 0x150",
             "HGMMA.64x128x16.F32.BF16 R24, R8, gdesc[UR4], R24, gsb0",
             "WARPGROUP.DEPBAR.LE gsb0, 0x0", "@P0 BRA 0x100", "EXIT",
             "SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR4], R2", "@!P1 BRA 0x160", "BRA 0x120"]
    loop = innermost_loop(parse(_sass(lines)))
    assert [i.address for i in loop] == [0x100, 0x110, 0x120, 0x130, 0x140]


# ---------------------------------------------------------------------------------------------
# The shipped tiles, compiled for sm_90 with the installed Triton (no GPU needed)


def _nvidia_backend_or_skip():
    triton = pytest.importorskip("triton")
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        pytest.skip("Triton's NVIDIA backend (its cuobjdump) is not installed")
    return triton


@pytest.fixture(scope="module")
def compiled_tiles():
    """`python -m mxmoe.kernels.sass --cp-async-control` in a child without TRITON_INTERPRET
    (this process's kernels are the interpreter's): one compile of every shipped tile."""
    _nvidia_backend_or_skip()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src] + [p for p in [env.get("PYTHONPATH")] if p])
    done = subprocess.run([sys.executable, "-m", "mxmoe.kernels.sass", "--cp-async-control"],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def _tile_names():
    from mxmoe.kernels.prefill import PREFILL_TILES

    for least, cfg in PREFILL_TILES:
        for part in ("GEMM1", "GEMM1 halves", "GEMM2", "GEMM1 portable", "GEMM2 portable"):
            yield f"{least}+ pairs {cfg.block_m}x{cfg.block_n}x{cfg.block_k} {part}"


@pytest.mark.parametrize("name", list(_tile_names()))
def test_shipped_tiles_have_no_register_operand_hazard(compiled_tiles, name):
    case = compiled_tiles["cases"][name]
    # The check sees what it is about: wgmmas in a K loop taking the weights from registers.
    assert case["wgmmas"] > 0 and case["a_in_registers"]
    assert case["hazards"] == []


def test_triton_3_6_overwrites_registers_with_cp_async_token_tiles(compiled_tiles):
    """The fault the shipped tiles avoid, seen where it exists (Triton 3.6, the version of the
    GPU machine): GEMM1 256 x 128 with its tokens by cp.async has the hazard."""
    if not compiled_tiles["triton"].startswith("3.6."):
        pytest.skip(f"Triton {compiled_tiles['triton']}: the hazard was seen with 3.6 "
                    f"(3.9 compiles the same kernel without it)")
    case = compiled_tiles["cases"]["control: 256x128x64 GEMM1, tokens by cp.async"]
    assert case["a_in_registers"] and case["hazards"]


# ---------------------------------------------------------------------------------------------
# On a GPU: every tile, repeatable, and no hazard in what the installed Triton compiled


@pytest.mark.gpu
def test_every_tile_is_repeatable_and_compiled_without_the_hazard():
    import mxmoe
    from mxmoe.kernels import _prefill_gemm
    from mxmoe.kernels.prefill import PREFILL_TILES, default_prefill_config
    from mxmoe.kernels.sass import cuobjdump
    from mxmoe.testing import random_moe

    _nvidia_backend_or_skip()
    e, k = 16, 4
    for least, cfg in PREFILL_TILES:
        m = max(4, (least + 4) * e // k)  # just past the entry's bound
        assert default_prefill_config(m * k / e) == cfg
        p = random_moe(m, 512, 384, e, k, dtype=torch.bfloat16, device="cuda", seed=m)
        call = dict(p.kwargs(), w13=p.w13.to_layout("mma_lanes"), w2=p.w2.to_layout("mma_lanes"))
        outs = [mxmoe.fused_experts(**call) for _ in range(4)]
        assert all(torch.equal(outs[0], o) for o in outs[1:]), cfg
    compiled = [c for cache in _prefill_gemm.prefill_gemm_kernel.device_caches.values()
                for c in (cache[0] if isinstance(cache, tuple) else cache).values()]
    # Both GEMMs of every tile went through the prefill kernel.
    assert len(compiled) >= 2 * len(PREFILL_TILES)
    for kernel in compiled:
        assert register_operand_hazards(cuobjdump(kernel.asm["cubin"])) == []

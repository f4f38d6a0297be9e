"""Expert and tensor parallelism: the partitions, the slicing, and the layer over gloo.

The single-process tests check the math: the partial outputs of every (ep_rank, tp_rank) shard,
summed, equal the whole layer. The multi-process tests (one launch of `_distributed_worker.py`
per world size: 127.0.0.1, gloo, bounded by a timeout) check the communication: every rank's
output equals the whole layer's on the same inputs, and errors are raised on every rank.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mxmoe
from mxmoe.distributed import (
    ParallelLayout,
    expert_range,
    intermediate_range,
    make_expert_map,
    shard_experts,
    slice_w2,
    slice_w13,
    w13_row_ranges,
)

from _distributed_worker import make_layer
from helpers import rel_err

LAUNCH_TIMEOUT_S = 120  # a hang fails the test instead of stalling CI


def local_layer(layer: mxmoe.MXFP4MoE, layout: ParallelLayout) -> mxmoe.MXFP4MoE:
    """A shard built with no process group: its forward returns the partial output."""
    part = shard_experts(layer.w13, layer.w2, layer.w13_bias, layer.w2_bias,
                         activation=layer.activation, layout=layout)
    return mxmoe.MXFP4MoE(
        part.w13, part.w2, layer.router.weight.detach(), layer.router.bias.detach(),
        part.w13_bias, part.w2_bias, top_k=layer.top_k, activation=layer.activation,
        backend="torch", expert_map=part.expert_map,
    )


# --- partitions and slices, one process ---------------------------------------------------


def test_expert_map_marks_remote_experts():
    assert make_expert_map(5, range(3, 5)).tolist() == [-1, -1, -1, 0, 1]
    assert make_expert_map(2, range(2, 2)).tolist() == [-1, -1]


@pytest.mark.parametrize("activation", ["swigluoai", "silu"])
def test_w13_slices_reassemble_the_rows(activation):
    """Each rank's w13 rows hold its slice of I, gate/up laid out as the activation expects."""
    e, h, i = 3, 32, 96
    dense = torch.arange(e * 2 * i, dtype=torch.float32).reshape(e, 2 * i, 1).expand(e, 2 * i, h)
    w13 = mxmoe.quantize_mxfp4(dense.contiguous())
    full = w13.dequantize()[:, :, 0]
    for rank in range(2):
        inter = intermediate_range(i, 2, rank)
        part = slice_w13(w13, range(1, 3), w13_row_ranges(i, inter, activation))
        got = part.dequantize()[:, :, 0]
        if activation == "swigluoai":
            want = full[1:3, 2 * inter.start:2 * inter.stop]
        else:
            want = torch.cat([full[1:3, inter.start:inter.stop],
                              full[1:3, i + inter.start:i + inter.stop]], dim=1)
        assert torch.equal(got, want)


def test_w2_slice_is_whole_scale_blocks():
    w2 = mxmoe.quantize_mxfp4(torch.randn(2, 32, 96))
    inter = intermediate_range(96, 2, 1)  # 3 blocks over 2 ranks: [64, 96)
    assert inter == range(64, 96)
    part = slice_w2(w2, range(0, 2), inter)
    assert part.blocks.shape == (2, 32, 16) and part.scales.shape == (2, 32, 1)
    assert torch.equal(part.dequantize(), w2.dequantize()[:, :, 64:96])


def test_slices_are_contiguous_copies():
    """The whole layer's tensors can be freed once sharded: no slice shares their storage."""
    layer = make_layer(5, 32, 96, 2)
    part = shard_experts(layer.w13, layer.w2, layer.w13_bias, layer.w2_bias,
                         activation=layer.activation, layout=ParallelLayout(1, 2, 1, 2))
    whole = {t.untyped_storage().data_ptr() for t in layer.buffers()}
    for t in (part.w13.blocks, part.w13.scales, part.w2.blocks, part.w2.scales, part.w13_bias):
        assert t.is_contiguous()
        assert t.untyped_storage().data_ptr() not in whole
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    assert part.w2_bias is None  # tp rank 1: the bias is added by tp rank 0 only


def test_tp_larger_than_blocks_raises():
    with pytest.raises(ValueError, match="needs at least 4 blocks"):
        ParallelLayout(tp_rank=0, tp_world=4).intermediate(96)


@pytest.mark.parametrize(
    "e, i, ep_world, tp_world, activation",
    [
        pytest.param(5, 64, 2, 1, "swigluoai", id="EP E=5 over 2 (3+2)"),
        pytest.param(5, 64, 3, 1, "silu", id="EP E=5 over 3 (2+2+1)"),
        pytest.param(2, 64, 3, 1, "swigluoai", id="EP E=2 over 3: a rank with no expert"),
        pytest.param(4, 96, 1, 2, "swigluoai", id="TP I=96 = 3 blocks over 2"),
        pytest.param(4, 96, 1, 2, "silu", id="TP silu halves"),
        pytest.param(5, 96, 2, 3, "silu", id="EP 2 x TP 3"),
    ],
)
@torch.no_grad()
def test_partial_outputs_sum_to_the_whole_layer(e, i, ep_world, tp_world, activation):
    layer = make_layer(e, 32, i, 2, activation=activation)
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(1))
    want = layer(x)
    total = torch.zeros_like(want)
    for ep_rank in range(ep_world):
        for tp_rank in range(tp_world):
            total += local_layer(layer, ParallelLayout(ep_rank, ep_world, tp_rank, tp_world))(x)
    assert rel_err(total, want) < 1e-5


@torch.no_grad()
def test_no_local_expert_gives_zeros():
    layer = make_layer(2, 32, 64, 2)
    part = local_layer(layer, ParallelLayout(ep_rank=2, ep_world=3))
    assert part.w13.shape == (0, 128, 32)
    out = part(torch.randn(4, 32))
    assert out.shape == (4, 32) and torch.equal(out, torch.zeros_like(out))


def test_shard_without_groups_returns_self():
    layer = make_layer(2, 32, 64, 2)
    assert layer.shard() is layer


def test_expert_range_is_contiguous_and_covers():
    for e, w in [(5, 2), (5, 3), (2, 3), (128, 8)]:
        ranges = [expert_range(e, w, r) for r in range(w)]
        assert [x for rg in ranges for x in rg] == list(range(e))


# --- several processes over gloo ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, tmp_path: Path) -> list[dict]:
    """Run `_distributed_worker.run_rank` on ``world`` processes; each rank's case -> result.

    The ranks fork from a forkserver that has imported torch and mxmoe once (importing torch
    in each of 4 processes on CI's 2 cores takes longer than the tests themselves).
    """
    import _distributed_worker as worker

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "mxmoe", "_distributed_worker"])
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    outs = [tmp_path / f"rank{rank}.json" for rank in range(world)]
    procs = [ctx.Process(target=worker.run_rank, args=(rank, world, init_method, "gloo", str(out)))
             for rank, out in enumerate(outs)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
    for rank in hung:
        procs[rank].kill()
        procs[rank].join()
    assert not hung, f"ranks {hung} of {world} did not finish in {LAUNCH_TIMEOUT_S} s (a hang)"
    missing = [rank for rank, out in enumerate(outs) if not out.exists()]
    assert not missing, (f"ranks {missing} of {world} wrote no results (exit codes "
                         f"{[p.exitcode for p in procs]})")
    return [json.loads(out.read_text()) for out in outs]


def check_every_rank(results: list[dict]) -> None:
    failures = [f"rank {rank} {case}: {r['detail']}"
                for rank, per_rank in enumerate(results) for case, r in per_rank.items()
                if not r["ok"]]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_gloo_cases_pass_on_every_rank(world, tmp_path):
    """Every case of `_distributed_worker.CASES` that fits ``world``, on every rank."""
    results = launch(world, tmp_path)
    assert all(r.keys() == results[0].keys() for r in results)
    assert len(results[0]) >= 3
    check_every_rank(results)


@pytest.mark.gpu
def test_nccl_cases_pass_on_every_rank(tmp_path):
    """The same cases over NCCL, one process per visible GPU (world size 1 on one GPU)."""
    world = torch.cuda.device_count()
    src = str(Path(__file__).parents[1] / "src")
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""),
               NCCL_NVLS_ENABLE=os.environ.get("NCCL_NVLS_ENABLE", "0"),
               TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
               str(Path(__file__).with_name("_distributed_worker.py")),
               "--backend", "nccl", "--out", str(tmp_path)]
    try:
        run = subprocess.run(command, env=env, capture_output=True, text=True,
                             timeout=2 * LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the {world}-GPU launch did not finish in {2 * LAUNCH_TIMEOUT_S} s")
    outs = [tmp_path / f"rank{rank}.json" for rank in range(world)]
    assert all(out.exists() for out in outs), run.stdout[-4000:] + run.stderr[-4000:]
    check_every_rank([json.loads(out.read_text()) for out in outs])

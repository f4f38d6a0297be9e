"""One rank of the distributed tests: run every case that fits the world size, write results.

Launched by ``test_distributed.py`` (gloo on CPU: one process a rank, forked from a server that
has imported torch once, on 127.0.0.1), or by hand on GPUs with NCCL:

    torchrun --nproc-per-node 2 tests/_distributed_worker.py --backend nccl --out /tmp/nccl

Each case builds the same whole layer on every rank (fixed seed), shards it, and checks that
this rank's output equals the whole layer's on the same inputs; error cases check that every
rank raises the same ValueError before any collective. The results (case -> ok, detail) go to
``--out DIR/rank{R}.json``; the exit status is 1 if any case failed.
"""

from __future__ import annotations

import os

# NVLink multicast stays off (it can take a shared host's GPUs out of service).
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import mxmoe  # noqa: E402
from mxmoe.distributed import ep_tp_groups  # noqa: E402

HIDDEN = 32
TOP_K = 2
#: fp32 on both sides: only the order of the additions differs.
TOLERANCE = 1e-5
PROCESS_GROUP_TIMEOUT = datetime.timedelta(seconds=60)


def make_layer(e, h, i, k, *, activation="swigluoai", bias=True, seed=0, backend="torch"):
    """The whole layer, the same on every rank (a fixed seed on the CPU generator)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    return mxmoe.MXFP4MoE.from_dense(
        randn(e, h, scale=h**-0.5),
        randn(e, scale=0.1) if bias else None,
        randn(e, 2 * i, h, scale=h**-0.5),
        randn(e, h, i, scale=i**-0.5),
        randn(e, 2 * i, scale=0.1) if bias else None,
        randn(e, h, scale=0.1) if bias else None,
        top_k=k,
        activation=activation,
        backend=backend,
    )


@dataclass(frozen=True)
class Case:
    name: str
    #: "ep", "tp", "ep_tp" (2-D mesh, tp = 2, from ep_tp_groups or "device_mesh"), "single"
    #: (each rank its own group of one), or an error case's mode
    mode: str
    experts: int = 5
    #: intermediate size; None: 32 * (world + 1), block-uneven over the tp group
    intermediate: int | None = None
    activation: str = "swigluoai"
    bias: bool = True
    tokens: tuple = (2, 5)  # leading dims of the input
    min_world: int = 1
    #: an error case: the substring every rank's ValueError must contain
    error: str | None = None


CASES = [
    Case("EP, E=5 (uneven), swigluoai, biases", "ep"),
    Case("EP, E=5, silu, no biases", "ep", activation="silu", bias=False),
    Case("EP, E=2: ranks past 2 hold no expert", "ep", experts=2),
    Case("TP, I=32(w+1): uneven blocks, swigluoai, biases", "tp"),
    Case("TP, silu halves, biases", "tp", activation="silu"),
    Case("TP, no tokens", "tp", tokens=(0,)),
    Case("EP x TP mesh, swigluoai", "ep_tp", intermediate=96, min_world=4),
    Case("EP x TP mesh, silu", "ep_tp", intermediate=96, activation="silu", min_world=4),
    Case("EP x TP groups from torch's DeviceMesh", "device_mesh", intermediate=96, min_world=4),
    Case("groups of one rank", "single"),
    Case("one group set as both ep and tp is summed once", "summed_once", min_world=2),
    Case("error: TP over more ranks than blocks", "tp_too_wide", min_world=2,
         error="needs at least"),
    Case("error: one group passed as both ep and tp", "same_group", min_world=2,
         error="orthogonal"),
    Case("error: ep and tp groups overlap", "overlap", intermediate=96, min_world=4,
         error="orthogonal"),
    Case("error: sharding a shard", "reshard", min_world=2, error="already holds a part"),
    Case("error: local weights with an ep group but no expert_map", "no_expert_map",
         min_world=2, error="needs an expert_map"),
    Case("error: local weights with one group as both ep and tp", "same_group_local",
         min_world=2, error="orthogonal"),
    Case("error: w2 bias on a tp rank other than 0", "w2_bias_everywhere", min_world=2,
         error="only tp rank 0"),
]


def groups_for(case: Case, world: int):
    """(ep_group, tp_group) for a case; every rank makes the same new_group calls."""
    everyone = dist.group.WORLD
    if case.mode == "ep":
        return everyone, None
    if case.mode in ("tp", "tp_too_wide"):
        return None, everyone
    if case.mode == "ep_tp":
        return ep_tp_groups(2)
    if case.mode == "device_mesh":
        from torch.distributed.device_mesh import init_device_mesh

        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        mesh = init_device_mesh(device_type, (world // 2, 2), mesh_dim_names=("ep", "tp"))
        return mesh.get_group("ep"), mesh.get_group("tp")
    if case.mode == "single":
        mine = None
        for r in range(world):
            made = dist.new_group([r])
            if r == dist.get_rank():
                mine = made
        return mine, None
    if case.mode == "summed_once":
        return everyone, None
    if case.mode in ("same_group", "same_group_local"):
        return everyone, everyone
    if case.mode == "overlap":
        return everyone, ep_tp_groups(2)[1]
    if case.mode == "reshard":
        return everyone, everyone
    if case.mode == "no_expert_map":
        return everyone, None
    if case.mode == "w2_bias_everywhere":
        return None, everyone
    raise ValueError(f"unknown case mode {case.mode!r}")


def rebuild(layer, **kwargs):
    """The constructor given ``layer``'s tensors as if local, and ``kwargs`` (groups, map)."""
    return mxmoe.MXFP4MoE(layer.w13, layer.w2, layer.router.weight, layer.router.bias,
                          layer.w13_bias, layer.w2_bias, top_k=layer.top_k,
                          activation=layer.activation, backend=layer.backend, **kwargs)


def run_case(case: Case, world: int, device: torch.device, backend: str) -> str:
    """'' when the case passed, else what went wrong."""
    if case.mode == "tp_too_wide":
        intermediate = 32 * (world - 1)
    else:
        intermediate = case.intermediate or 32 * (world + 1)
    layer = make_layer(case.experts, HIDDEN, intermediate, TOP_K, activation=case.activation,
                       bias=case.bias, backend=backend).to(device)
    ep_group, tp_group = groups_for(case, world)
    if case.error is not None:
        try:
            if case.mode == "reshard":
                layer.shard(ep_group=ep_group).shard(tp_group=tp_group)
            elif case.mode == "no_expert_map":  # every rank passes the whole layer's weights
                rebuild(layer, ep_group=ep_group)
            elif case.mode == "same_group_local":
                part = layer.shard(ep_group=ep_group)
                rebuild(part, ep_group=ep_group, tp_group=tp_group,
                        expert_map=part.expert_map)
            elif case.mode == "w2_bias_everywhere":
                rebuild(layer, tp_group=tp_group)
                if dist.get_rank(tp_group) == 0:
                    return ""  # tp rank 0 holds the bias rightly; the others must raise
            else:
                layer.shard(ep_group=ep_group, tp_group=tp_group)
        except ValueError as exc:
            if case.error in str(exc):
                return ""
            return f"ValueError without {case.error!r}: {exc}"
        return "no ValueError"

    x = torch.randn(*case.tokens, HIDDEN, generator=torch.Generator().manual_seed(7)).to(device)
    with torch.no_grad():
        want = layer(x)
        part = layer.shard(ep_group=ep_group, tp_group=tp_group)
        if case.mode == "summed_once":
            part.tp_group = part.ep_group  # as a constructor given one group twice would hold
        got = part(x)
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    if want.numel() == 0:
        return ""
    err = float((got.double() - want.double()).abs().max() / want.double().abs().max())
    if not err <= TOLERANCE:
        return f"rel err {err:.3g} > {TOLERANCE}"
    return ""


def run_rank(rank: int, world: int, init_method: str, backend: str, out: str,
             moe_backend: str = "torch", local_rank: int | None = None) -> int:
    """Join the process group, run the cases that fit, write ``out``; 0 if all passed."""
    if backend == "nccl":
        device = torch.device("cuda", rank if local_rank is None else local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # several ranks share few cores
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=PROCESS_GROUP_TIMEOUT)
    results = {}
    for case in CASES:
        if world < case.min_world:
            continue
        try:
            detail = run_case(case, world, device, moe_backend)
        except Exception:  # a failure of one case must not stop the others
            detail = traceback.format_exc()
        results[case.name] = {"ok": detail == "", "detail": detail}

    # Every rank is still in step after the error cases: a rank that had gone into a
    # collective alone would make this sum wrong or time out.
    check = torch.ones(1, device=device)
    dist.all_reduce(check)
    in_step = int(check.item()) == world
    results["all ranks in step at the end"] = {
        "ok": in_step, "detail": "" if in_step else f"sum {check.item()} != {world}"}
    dist.destroy_process_group()

    Path(out).write_text(json.dumps(results, indent=1))
    failed = [name for name, r in results.items() if not r["ok"]]
    print(f"rank {rank}/{world}: {len(results) - len(failed)} passed, {len(failed)} failed"
          + "".join(f"\n  FAIL {name}: {results[name]['detail']}" for name in failed))
    return 1 if failed else 0


def main() -> int:
    """Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the environment)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="nccl", choices=["gloo", "nccl"])
    parser.add_argument("--moe-backend", default="torch", help="mxmoe backend of the layers")
    parser.add_argument("--out", required=True, help="directory for rank{R}.json")
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return run_rank(rank, world, "env://", args.backend, str(Path(args.out) / f"rank{rank}.json"),
                    args.moe_backend, int(os.environ.get("LOCAL_RANK", "0")))


if __name__ == "__main__":
    raise SystemExit(main())

"""Expert and tensor parallelism of a gpt-oss-120b-shaped MoE layer over NCCL (issue 8).

Builds one layer (E = 128, H = I = 2880, top-k 4, swigluoai, biases, bf16 activations;
synthetic MXFP4 weights from a fixed seed, made on rank 0 and broadcast), runs it whole on
rank 0 as the single-GPU reference, then sharded by experts (EP), by the intermediate dimension
(TP) and, on 4+ GPUs, both (EP x TP, tp = 2). Each sharded output is checked against the
single-GPU output on the same inputs, each M is timed (CUDA events, median after warm-up,
the slowest rank's median; with --cuda-graph also replayed from a CUDA graph) beside the
single-GPU time and the all-reduce alone, and the peak memory of every GPU is reported. Prints
a table and writes JSON to --out.

    torchrun --nproc-per-node 2 scripts/multi_gpu.py --out results/multi_gpu_2gpu.json
    python scripts/multi_gpu.py --out results/multi_gpu_1gpu.json   # world size 1, same code
    torchrun --nproc-per-node 2 scripts/multi_gpu.py --cpu --experts 8 --hidden 64 \
        --intermediate 96 --tokens 1 16 --out /tmp/smoke.json        # gloo smoke run, no GPU

NVLink multicast stays off: NCCL_NVLS_ENABLE=0 and the related variables are set below,
before torch is imported (a program using it can put a shared host's GPUs out of service).
"""

from __future__ import annotations

import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import mxmoe  # noqa: E402
from mxmoe.cli._common import environment, header  # noqa: E402
from mxmoe.distributed import ep_tp_groups  # noqa: E402
from mxmoe.format import MXFP4Tensor  # noqa: E402

GIB = 2**30
#: E8M0 bytes of the synthetic scales: uniform random E2M1 codes have RMS 2.93, so 2**(120-127)
#: gives weights of RMS ~0.023, about 1/sqrt(2880) as a trained layer's.
SCALE_BYTES = (119, 122)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--hidden", type=int, default=2880)
    p.add_argument("--intermediate", type=int, default=2880)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 1024, 8192])
    p.add_argument("--backend", default="auto", help="mxmoe backend of every layer")
    p.add_argument("--modes", nargs="+", default=["ep", "tp", "ep_tp"],
                   help="ep, tp, ep_tp (ep_tp runs only when world >= 4 and even)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--tolerance", type=float, default=2e-2,
                   help="max |sharded - single| / max |single| allowed (bf16 partial sums)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSON results path (written by rank 0)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="also time each forward replayed from a CUDA graph (all-reduce inside)")
    p.add_argument("--cpu", action="store_true",
                   help="gloo on the CPU, for a smoke run of this script at a small shape")
    return p.parse_args()


def init_distributed(cpu: bool) -> torch.device:
    """torchrun's environment, or world size 1 on 127.0.0.1 when run with plain python."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    timeout = datetime.timedelta(minutes=10)
    if cpu:
        dist.init_process_group("gloo", timeout=timeout)
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", timeout=timeout)
    return device


def build_layer(args, device) -> mxmoe.MXFP4MoE:
    """The whole layer on every rank: rank 0 draws the weights, the others receive them."""
    e, h, i = args.experts, args.hidden, args.intermediate
    shapes = {
        "w13_blocks": ((e, 2 * i, h // 2), torch.uint8),
        "w13_scales": ((e, 2 * i, h // 32), torch.uint8),
        "w2_blocks": ((e, h, i // 2), torch.uint8),
        "w2_scales": ((e, h, i // 32), torch.uint8),
        "w13_bias": ((e, 2 * i), torch.bfloat16),
        "w2_bias": ((e, h), torch.bfloat16),
        "router_weight": ((e, h), torch.bfloat16),
        "router_bias": ((e,), torch.bfloat16),
    }
    t = {name: torch.empty(shape, dtype=dtype, device=device)
         for name, (shape, dtype) in shapes.items()}
    if dist.get_rank() == 0:
        g = torch.Generator(device=device).manual_seed(args.seed)
        for name in ("w13_blocks", "w2_blocks"):
            t[name].random_(0, 256, generator=g)
        for name in ("w13_scales", "w2_scales"):
            t[name].random_(*SCALE_BYTES, generator=g)
        t["w13_bias"].normal_(0, 0.1, generator=g)
        t["w2_bias"].normal_(0, 0.1, generator=g)
        t["router_weight"].normal_(0, h**-0.5, generator=g)
        t["router_bias"].normal_(0, 0.1, generator=g)
    for tensor in t.values():
        dist.broadcast(tensor, src=0)
    return mxmoe.MXFP4MoE(
        MXFP4Tensor(t["w13_blocks"], t["w13_scales"]), MXFP4Tensor(t["w2_blocks"], t["w2_scales"]),
        t["router_weight"], t["router_bias"], t["w13_bias"], t["w2_bias"],
        top_k=args.top_k, activation="swigluoai", backend=args.backend,
    )


def make_inputs(args, device) -> dict[int, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(args.seed + 1)
    inputs = {}
    for m in args.tokens:
        x = torch.randn(m, args.hidden, generator=g, device=device).to(torch.bfloat16)
        dist.broadcast(x, src=0)
        inputs[m] = x
    return inputs


def median_ms(fn, warmup: int, iters: int, device) -> float:
    """Median of ``iters`` CUDA-event timings of ``fn()``, after ``warmup`` calls (wall clock
    on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cpu":
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize(device)
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_bytes(device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def graphed(fn, device):
    """``fn`` captured in a CUDA graph, after a warm-up on a side stream; returns the replay.
    Every rank captures the same sequence, so NCCL calls inside are captured alike."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def graph_median_ms(fn, args, device) -> tuple[float, str | None]:
    """`median_ms` of the CUDA-graph replay of ``fn``; NaN and the reason when the forward
    cannot be captured (reported, not fatal: every rank fails alike, so none is left waiting)."""
    try:
        return median_ms(graphed(fn, device), args.warmup, args.iters, device), None
    except Exception as exc:  # noqa: BLE001 - any capture failure is a result to report
        return float("nan"), f"{type(exc).__name__}: {exc}"


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def slowest_rank(value: float, device) -> float:
    """The largest value over all ranks (a sharded forward is as slow as its slowest rank)."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def gather(value, world: int) -> list:
    values = [None] * world
    dist.all_gather_object(values, value)
    return values


def layer_bytes(layer: mxmoe.MXFP4MoE) -> int:
    return sum(b.numel() * b.element_size() for b in layer.buffers() if b is not None) + sum(
        p.numel() * p.element_size() for p in layer.parameters())


def groups_for(mode: str, world: int):
    if mode == "ep":
        return dist.group.WORLD, None
    if mode == "tp":
        return None, dist.group.WORLD
    if mode == "ep_tp":
        return ep_tp_groups(2)
    raise ValueError(f"unknown mode {mode!r}; expected ep, tp or ep_tp")


def nccl_version() -> str:
    if not torch.cuda.is_available():
        return "none"
    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


@torch.inference_mode()
def main() -> int:
    args = parse_args()
    device = init_distributed(args.cpu)
    rank, world = dist.get_rank(), dist.get_world_size()
    info = environment()
    info.update(world_size=world, nccl=nccl_version(),
                NCCL_NVLS_ENABLE=os.environ["NCCL_NVLS_ENABLE"])
    modes = [m for m in args.modes if m != "ep_tp" or (world >= 4 and world % 2 == 0)]
    if rank == 0:
        print(header(info) + f" | world {world} | NCCL {info['nccl']}")
        print(f"layer: E={args.experts} H={args.hidden} I={args.intermediate} "
              f"k={args.top_k} swigluoai, bf16 activations, backend={args.backend!r}")

    whole = build_layer(args, device)
    inputs = make_inputs(args, device)
    reference, single_ms, single_graph_ms, single_peak = {}, {}, {}, 0
    use_graph = args.cuda_graph and device.type == "cuda"
    if rank == 0:  # the single-GPU layer: the whole layer on one GPU, no group
        reset_peak(device)
        for m, x in inputs.items():
            reference[m] = whole(x)
            single_ms[m] = median_ms(lambda: whole(x), args.warmup, args.iters, device)
            if use_graph:
                single_graph_ms[m], graph_error = graph_median_ms(lambda: whole(x), args, device)
                if graph_error:
                    print(f"single M={m}: no CUDA graph: {graph_error}")
        single_peak = peak_bytes(device)
    whole.to("cpu")  # in place: every shard is cut from this CPU copy, the GPU holds only shards
    dist.barrier()

    rows, memory = [], []
    for mode in modes:
        ep_group, tp_group = groups_for(mode, world)
        comm_groups = [tp_group] if tp_group is not None else []
        if ep_group is not None and ep_group is not tp_group:
            comm_groups.append(ep_group)
        local = whole.shard(ep_group=ep_group, tp_group=tp_group).to(device)
        reset_peak(device)
        for m, x in inputs.items():
            out = local(x)
            ms = median_ms(lambda: local(x), args.warmup, args.iters, device)
            graph_ms = None
            if use_graph:
                graph_ms, graph_error = graph_median_ms(lambda: local(x), args, device)
                graph_ms = slowest_rank(graph_ms, device)
                if graph_error and rank == 0:
                    print(f"{mode} M={m}: no CUDA graph: {graph_error}")
            buf = torch.zeros_like(x)
            comm_ms = median_ms(lambda: [dist.all_reduce(buf, group=g) for g in comm_groups],
                                args.warmup, args.iters, device)
            row = dict(mode=mode, world=world, M=m, ms=slowest_rank(ms, device),
                       allreduce_ms=slowest_rank(comm_ms, device), graph_ms=graph_ms)
            if rank == 0:
                ref = reference[m].double()
                diff = out.double() - ref
                row.update(single_ms=single_ms[m], single_graph_ms=single_graph_ms.get(m),
                           speedup=single_ms[m] / row["ms"],
                           rel_err=float(diff.abs().max() / ref.abs().max()),
                           rms_err=float(diff.norm() / ref.norm()))
                row["ok"] = row["rel_err"] <= args.tolerance
            rows.append(row)
        memory.append(dict(mode=mode, weights_gib=gather(layer_bytes(local) / GIB, world),
                           peak_gib=gather(peak_bytes(device) / GIB, world)))
        del local

    if rank == 0:
        memory.insert(0, dict(mode="single", weights_gib=[layer_bytes(whole) / GIB],
                              peak_gib=[single_peak / GIB]))
        print(f"\n{'mode':<6} {'M':>5} {'single ms':>10} {'sharded ms':>11} {'speedup':>8} "
              f"{'all-reduce ms':>14} {'rel err':>9} {'rms err':>9}")
        for r in rows:
            graph = (f"  graph: single {r['single_graph_ms']:.3f} sharded {r['graph_ms']:.3f}"
                     if r["graph_ms"] is not None else "")
            print(f"{r['mode']:<6} {r['M']:>5} {r['single_ms']:>10.3f} {r['ms']:>11.3f} "
                  f"{r['speedup']:>7.2f}x {r['allreduce_ms']:>14.3f} {r['rel_err']:>9.2e} "
                  f"{r['rms_err']:>9.2e}" + ("" if r["ok"] else "  FAIL") + graph)
        print(f"\n{'mode':<6} {'weights GiB per GPU':<28} peak allocated GiB per GPU")
        for mem in memory:
            print(f"{mem['mode']:<6} {' '.join(f'{v:.3f}' for v in mem['weights_gib']):<28} "
                  f"{' '.join(f'{v:.3f}' for v in mem['peak_gib'])}")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(dict(environment=info, args=vars(args), rows=rows,
                                       memory=memory), indent=1))
        print(f"\nwrote {out}")
    failed = rank == 0 and not all(r["ok"] for r in rows)
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

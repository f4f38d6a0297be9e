"""One GPU call for the "direct" decode GEMMs (no alignment, one program per token and N tile).

    PYTHONPATH=src:.peers python3 scripts/gpu_direct.py     # on the H200; JSON under $OUT

1. Correctness (bf16, poisoned buffers): every direct config of the sweep, whole layer, against
   the fp32 reference on the same weights at M = 1, 4 and 32 (gpt-oss-20b and -120b, and the
   736-wide TP shard of 120b), both weight layouts.
2. Timings (median of CUDA-graph replays, each graph cycling through ROTATE routings, routing
   included in every row): the general kernel on plain weights (what `auto` ran before), the
   aligned GEMV on both layouts, the direct GEMMs on both layouts over a small sweep (GEMM1's
   config first with GEMM2's fixed, then GEMM2's), and triton_kernels in the same run, beside
   the floor (touched packed bytes / 4.25 TB/s), M = 1..32.
Must finish within 9 minutes on one H200 (compiles included).

``MODE=gemms``: instead, each GEMM of the direct path alone (routing and buffers prepared
outside the graph) over a wider config sweep at M = ``MS`` (default 1, 2) for gpt-oss-20b, and
the route kernel alone: where a decode step's time goes.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_decode import graph_time as rotated_graph_time  # noqa: E402
import mxmoe  # noqa: E402
from mxmoe import settings  # noqa: E402
from mxmoe.bench.peers import TritonKernelsLayer  # noqa: E402
from mxmoe.bench.problems import MODELS, ModelShape, make_rotations, make_weights  # noqa: E402
from mxmoe.kernels.decode import DecodeConfig  # noqa: E402
from mxmoe.kernels.fused_moe import FusedMoEPlan, choose_config, fused_moe  # noqa: E402
from mxmoe.kernels.inner_product import InnerProduct  # noqa: E402
from mxmoe.kernels.launch import LaunchPlan  # noqa: E402
from mxmoe.reference import fused_experts_reference  # noqa: E402
from mxmoe.validation import check_fused_experts_args  # noqa: E402

COPY_RATE = 4.25e12  # bytes/s, FACTS.md
ROTATE = 8
MS = [int(m) for m in os.environ.get("MS", "1,2,4,8,16,32").split(",")]
START = time.time()
BUDGET_S = float(os.environ.get("BUDGET_S", 480))


def direct(j, n, k, warps=4, split=1, stages=3):
    return DecodeConfig("direct", block_m=j, block_n=n, block_k=k, num_warps=warps,
                        num_stages=stages, split_k=split)


def gemv(m, n, k, warps=4, split=1):
    return DecodeConfig("gemv", block_m=m, block_n=n, block_k=k, num_warps=warps, num_stages=3,
                        split_k=split)


GEMM1 = [direct(4, 16, 256), direct(4, 8, 512), direct(4, 32, 256), direct(2, 16, 256),
         direct(4, 16, 256, warps=8), direct(4, 32, 128, split=2), direct(4, 8, 256)]
GEMM2 = [direct(1, 32, 256), direct(2, 16, 256), direct(1, 64, 256), direct(2, 32, 256),
         direct(1, 16, 512), direct(1, 16, 256), direct(2, 64, 128)]
#: The aligned GEMV's default configs (decode.default_decode_config / decode_config2).
GEMV = (gemv(1, 64, 128, split=4), gemv(1, 64, 64, split=3))


def graph_time(fn, reps=30):
    """Median µs of one layer (fn runs ROTATE of them, captured once in one graph)."""
    return rotated_graph_time(fn, reps) / ROTATE


def layer(weights, rotations, w13, w2, config):
    """The layer (route + experts) of each rotation with ``config`` (None: the general kernel's
    lookup), through a `FusedMoEPlan` built once, as `mxmoe.fused_experts` runs it."""
    k = weights.model.top_k
    first = rotations.inputs[0]
    tw, ti = mxmoe.route(first.router_logits, k)
    call = check_fused_experts_args(first.hidden_states, w13, w2, tw, ti,
                                    w13_bias=weights.w13_bias, w2_bias=weights.w2_bias,
                                    activation="swigluoai", alpha=1.702, limit=7.0,
                                    expert_map=None)
    plan = FusedMoEPlan(call, InnerProduct.DEQUANT, "triton_dequant",
                        config=config or choose_config(call, "triton_dequant"))

    def run():
        for inputs in rotations.inputs:
            tw, ti = mxmoe.route(inputs.router_logits, k)
            plan.run(inputs.hidden_states, tw, ti, w13.blocks, w13.scales, w2.blocks, w2.scales,
                     weights.w13_bias, weights.w2_bias, None)
    return run


def gemm_parts(weights, rotations, w13, w2, config):
    """fn(steps) -> a function launching those steps of the direct plan for every rotation
    (routing done outside; one output and workspace per rotation)."""
    k = weights.model.top_k
    first = rotations.inputs[0]
    call = check_fused_experts_args(first.hidden_states, w13, w2, first.topk_weights,
                                    first.topk_ids, w13_bias=weights.w13_bias,
                                    w2_bias=weights.w2_bias, activation="swigluoai", alpha=1.702,
                                    limit=7.0, expert_map=None)
    plan = FusedMoEPlan(call, InnerProduct.DEQUANT, "triton_dequant", config=config)
    sets = []
    for inputs in rotations.inputs:
        tw, ti = mxmoe.route(inputs.router_logits, k)
        out = torch.empty(plan.out_shape, dtype=plan.dtype, device=tw.device)
        workspace = torch.empty(max(plan.workspace_bytes, 1), dtype=torch.uint8,
                                device=tw.device)
        sets.append([inputs.hidden_states, tw.reshape(-1).float().contiguous(),
                     ti.reshape(-1).contiguous(), w13.blocks, w13.scales, w2.blocks, w2.scales,
                     weights.w13_bias, weights.w2_bias, None, out, workspace])
    plan.launches.run(sets[0])  # compile; the direct launches from the next run on
    plan.launches.run(sets[0])

    def of(steps):
        launches = LaunchPlan([plan.launches.steps[i] for i in steps])

        def run():
            for tensors in sets:
                launches.run(tensors)
        return run
    return of, len(plan.launches.steps)


def gemms_mode(device, header):
    model = MODELS["20b"]
    weights = make_weights(model, torch.bfloat16, device, seed=0)
    # LAYOUT (a name of mxmoe.layouts.LAYOUTS): the weights converted once, as the layer's
    # Hopper default (mma_lanes) is.
    layout = os.environ.get("LAYOUT", "plain")
    plain = (weights.w13.to_layout(layout), weights.w2.to_layout(layout))
    header["layout"] = layout
    # The shipped M = 1 configs first (kernels/decode.direct_configs).
    first = [direct(4, 4, 512), direct(4, 8, 512), direct(4, 8, 256), direct(4, 4, 256),
             direct(4, 8, 512, warps=2), direct(4, 4, 1024), direct(4, 16, 256),
             direct(4, 4, 512, warps=8), direct(2, 8, 512), direct(4, 16, 256, split=2),
             direct(4, 8, 512, split=2), direct(4, 8, 256, warps=2)]
    second = [direct(1, 8, 1024), direct(1, 8, 1024, warps=8), direct(1, 16, 512),
              direct(2, 16, 256), direct(1, 16, 256), direct(1, 8, 256), direct(1, 16, 512,
              warps=8), direct(1, 8, 512), direct(1, 4, 1024), direct(2, 8, 512),
              direct(1, 32, 256), direct(1, 8, 512, warps=2)]
    results = []
    for m in (MS if "MS" in os.environ else [1, 2]):
        rot = make_rotations(model, m, ROTATE, torch.bfloat16, device, seed=11)
        per_expert = (3 * model.hidden * model.inter) * (1 / 2 + 1 / 32)
        floor = rot.mean_touched_experts * per_expert / COPY_RATE * 1e6

        def route_run():
            for inputs in rot.inputs:
                mxmoe.route(inputs.router_logits, model.top_k)
        route_us = graph_time(route_run)
        print(f"M={m}: floor {floor:.1f} us (GEMM1 2/3 of it), route alone {route_us:.1f} us")
        results.append(dict(kind="route", M=m, us=route_us, floor_us=floor))
        for c1 in first:
            of, count = gemm_parts(weights, rot, *plain, (c1, second[0]))
            g1 = graph_time(of(range(count - 1)))
            results.append(dict(kind="gemm1", M=m, config=c1.__dict__, us=g1))
            print(f"  GEMM1 {short(c1)}: {g1:.1f} us", flush=True)
        for c2 in second:
            of, count = gemm_parts(weights, rot, *plain, (first[0], c2))
            g2 = graph_time(of([count - 1]))
            both = graph_time(of(range(count)))
            results.append(dict(kind="gemm2", M=m, config=c2.__dict__, us=g2, both_us=both))
            print(f"  GEMM2 {short(c2)}: {g2:.1f} us (both GEMMs {both:.1f})", flush=True)
    out_dir = Path(os.environ.get("OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_direct_gemms.json").write_text(json.dumps(dict(header=header, rows=results),
                                                              indent=1))


def check(results, model, device):
    weights = make_weights(model, torch.bfloat16, device, seed=3)
    os.environ["MXMOE_POISON"] = "1"
    settings.refresh()
    for layout in ("plain", "group_halves"):
        w13, w2 = weights.w13.to_layout(layout), weights.w2.to_layout(layout)
        for m in (1, 4, 32):
            rot = make_rotations(model, m, 1, torch.bfloat16, device, seed=7)
            x = rot.inputs[0].hidden_states
            tw, ti = rot.inputs[0].topk_weights, rot.inputs[0].topk_ids
            ref = fused_experts_reference(x, weights.w13, weights.w2, tw, ti,
                                          w13_bias=weights.w13_bias, w2_bias=weights.w2_bias)
            pairs = [(c1, GEMM2[0]) for c1 in GEMM1] + [(GEMM1[0], c2) for c2 in GEMM2[1:]]
            if layout == "group_halves":
                pairs = pairs[:2]
            for c1, c2 in pairs:
                call = check_fused_experts_args(x, w13, w2, tw, ti, w13_bias=weights.w13_bias,
                                                w2_bias=weights.w2_bias, activation="swigluoai",
                                                alpha=1.702, limit=7.0, expert_map=None)
                out = fused_moe(call, InnerProduct.DEQUANT, "triton_dequant", config=(c1, c2))
                err = float((out.float() - ref).abs().max() / ref.abs().max())
                rms = float((out.float() - ref).norm() / ref.norm())
                ok = bool(torch.isfinite(out).all()) and err < 2e-2 and rms < 8e-3
                results.append(dict(kind="check", model=model.name, layout=layout, M=m,
                                    config1=c1.__dict__, config2=c2.__dict__, max_err=err,
                                    rms_err=rms, ok=ok))
                if not ok:
                    print(f"check FAIL {model.name} {layout} M={m} {c1} {c2}: max {err:.2e} "
                          f"rms {rms:.2e}")
    os.environ["MXMOE_POISON"] = "0"
    settings.refresh()
    print(f"checked {model.name}: {sum(r['ok'] for r in results if r.get('model') == model.name)}"
          f" ok of {sum(r.get('model') == model.name for r in results)}")


def short(c):
    return (f"{c.variant[0]}{c.block_m}/{c.block_n}x{c.block_k}w{c.num_warps}"
            + (f"s{c.split_k}" if c.split_k > 1 else ""))


def main():
    device = torch.device("cuda")
    header = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=triton.__version__, cuda=torch.version.cuda,
                  python=platform.python_version(), sha=os.environ.get("MXMOE_GIT_SHA", "?"),
                  date=time.strftime("%Y-%m-%d"))
    print(header)
    if os.environ.get("MODE") == "gemms":
        return gemms_mode(device, header)
    results = []
    models = [MODELS["20b"], MODELS["120b"]]
    checks = []
    for model in models + [ModelShape("gpt-oss-120b TP4", 2880, 736, 128, 4)]:
        check(checks, model, device)
    results += checks

    table = []
    for model in models:
        weights = make_weights(model, torch.bfloat16, device, seed=0)
        halves = (weights.w13.to_layout("group_halves"), weights.w2.to_layout("group_halves"))
        plain = (weights.w13, weights.w2)
        try:
            peer = TritonKernelsLayer(weights, torch.bfloat16)
        except Exception as exc:
            print(f"triton_kernels unavailable: {exc}")
            peer = None
        per_expert = (3 * model.hidden * model.inter) * (1 / 2 + 1 / 32)
        for m in MS:
            if time.time() - START > BUDGET_S:
                print(f"time budget reached: stopping before {model.name} M={m}")
                break
            rot = make_rotations(model, m, ROTATE, torch.bfloat16, device, seed=11)
            floor = rot.mean_touched_experts * per_expert / COPY_RATE * 1e6
            row = dict(model=model.name, M=m, floor_us=floor)
            row["general"] = graph_time(layer(weights, rot, *plain, None))
            row["gemv_halves"] = graph_time(layer(weights, rot, *halves, GEMV))
            row["gemv_plain"] = graph_time(layer(weights, rot, *plain, GEMV))
            if peer is not None:
                def peer_run():
                    for inputs in rot.inputs:
                        peer(inputs)
                row["triton_kernels"] = graph_time(peer_run)
            best1, t1 = None, None
            for c1 in GEMM1:
                t = graph_time(layer(weights, rot, *plain, (c1, GEMM2[0])))
                results.append(dict(kind="time", model=model.name, M=m, config1=c1.__dict__,
                                    config2=GEMM2[0].__dict__, layer_us=t))
                if t1 is None or t < t1:
                    best1, t1 = c1, t
            best2, t2 = GEMM2[0], t1
            for c2 in GEMM2[1:]:
                t = graph_time(layer(weights, rot, *plain, (best1, c2)))
                results.append(dict(kind="time", model=model.name, M=m,
                                    config1=best1.__dict__, config2=c2.__dict__, layer_us=t))
                if t < t2:
                    best2, t2 = c2, t
            row["direct_plain"] = t2
            row["direct_halves"] = graph_time(layer(weights, rot, *halves, (best1, best2)))
            row["direct_config"] = f"{short(best1)} {short(best2)}"
            table.append(row)
            results.append(dict(kind="best", **row))
            print({k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()},
                  flush=True)

    out_dir = Path(os.environ.get("OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_direct.json").write_text(json.dumps(dict(header=header, rows=results),
                                                        indent=1))
    print(f"\n{header['gpu']}, torch {header['torch']}, triton {header['triton']}, "
          f"sha {header['sha']}  (µs a layer, route included, CUDA graphs, {ROTATE} rotations)")
    cols = ["floor_us", "general", "gemv_halves", "gemv_plain", "direct_plain", "direct_halves",
            "triton_kernels"]
    print("model | M | " + " | ".join(cols) + " | direct / peer | direct config")
    for r in table:
        best = min(r["direct_plain"], r["direct_halves"])
        ratio = best / r["triton_kernels"] if "triton_kernels" in r else float("nan")
        print(f"{r['model']} | {r['M']} | "
              + " | ".join(f"{r.get(c, float('nan')):.1f}" for c in cols)
              + f" | {ratio:.2f} | {r['direct_config']}")
    failed = [r for r in checks if not r["ok"]]
    print(f"correctness: {len(failed)} failed of {len(checks)}; total "
          f"{time.time() - START:.0f} s")


if __name__ == "__main__":
    main()

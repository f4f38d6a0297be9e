"""The Triton backends at awkward shapes on the GPU, for `compute-sanitizer --tool memcheck`.

    scripts/sanitize.sh                            # under memcheck; log in $OUT/sanitize.log
    PYTHONPATH=src python3 scripts/sanitize.py     # the same cases without the sanitizer
    PYTHONPATH=src python3 scripts/sanitize.py --list
    PYTHONPATH=src python3 scripts/sanitize.py --large    # M*k*2I > 2**31, without memcheck
    PYTHONPATH=src python3 scripts/sanitize.py --device cpu --cases M=1   # dry run, interpreter

Every case runs in bf16 with NaN-poisoned buffers (MXMOE_POISON=1) and with the data checks
off (MXMOE_VALIDATE unset): out-of-range ids and expert-map values reach the kernels, which must
drop them. Each result is compared with the fp32 reference in which those pairs are dropped
(routed to an extra remote expert instead); NaN must appear exactly where the reference has it.
Shapes are small (memcheck slows kernels ~100x) except one gpt-oss-like case, H = I = 2880.
Exit status 1 when any case fails or raises; memcheck's own verdict is its ERROR SUMMARY line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field

os.environ.setdefault("MXMOE_POISON", "1")
os.environ.pop("MXMOE_VALIDATE", None)

import torch  # noqa: E402

import mxmoe  # noqa: E402
from mxmoe.reference import fused_experts_reference  # noqa: E402

#: Config overrides (MXMOE_CONFIG) per backend; "heuristic" is what the library picks.
VARIANTS = {
    "triton_dequant": {
        "heuristic": None,
        "no_swap": dict(block_m=32, block_n=128, block_k=64, num_warps=4, num_stages=3),
        "split_dot": dict(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=3,
                          split_dot=True),
        "split_k": dict(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=3,
                        swap_ab=True, split_k=3, split_k2=2),
        "portable": None,  # the heuristic config with MXMOE_DEQUANT_PTX=0
    },
    "triton_scaled": {
        "heuristic": None,
        "no_swap": dict(block_m=32, block_n=128, block_k=64, num_warps=4, num_stages=3),
    },
    "bf16": {
        "heuristic": None,
        "no_swap": dict(block_m=32, block_n=128, block_k=64, num_warps=4, num_stages=3),
    },
}


@dataclass
class Case:
    m: int
    hidden: int
    inter: int
    experts: int  # E_local
    top_k: int
    global_experts: int | None = None  # with an expert map when set
    activation: str = "swigluoai"
    bias: bool = True
    on_input: bool = False
    bad_ids: list = field(default_factory=list)  # values written into topk_ids (unchecked)
    bad_map: list = field(default_factory=list)  # values written into the expert map
    id_dtype: torch.dtype = torch.int32
    nan_scale: bool = False  # one w13 and one w2 scale byte 255
    heuristic_only: bool = False
    large: bool = False  # only with --large, and not under memcheck (minutes there)


CASES = {
    "M=1": Case(1, 96, 64, 4, 2),
    "M=7, N and K tails, prime E": Case(7, 160, 96, 5, 2),
    "k = E": Case(7, 96, 32, 3, 3),
    "prime E=7, k=1, silu": Case(13, 224, 160, 7, 1, activation="silu"),
    "expert map, remote experts": Case(9, 96, 64, 3, 4, global_experts=8),
    "weight on input, no bias": Case(6, 96, 64, 4, 2, bias=False, on_input=True),
    "out-of-range ids": Case(7, 96, 64, 4, 2, bad_ids=[4, -1, 2**31 - 1, -(2**31)]),
    "out-of-range ids and map values, int64": Case(
        7, 96, 64, 3, 2, global_experts=6, bad_ids=[6, -1, 2**32 + 1, 2**40],
        bad_map=[3, -7], id_dtype=torch.int64),
    "NaN scale bytes": Case(5, 96, 64, 4, 2, nan_scale=True),
    "M*k > 1024 (multi-program alignment)": Case(600, 64, 32, 4, 2),
    "gpt-oss-like H=I=2880, E=4": Case(3, 2880, 2880, 4, 2, heuristic_only=True),
    # M*k*2I = 2.3e9 elements of GEMM1 output: offsets past 2**31 need int64.
    "large M: M*k*2I > 2**31": Case(100_000, 2880, 2880, 4, 4, heuristic_only=True, large=True),
}


def build(case: Case, dev: str, dtype: torch.dtype, seed: int = 0):
    """fused_experts kwargs, and the kwargs of the reference with the bad pairs dropped."""
    g = torch.Generator(device=dev).manual_seed(seed)
    e, h, i, k = case.experts, case.hidden, case.inter, case.top_k
    e_global = case.global_experts or e
    w13 = mxmoe.quantize_mxfp4(torch.randn(e, 2 * i, h, device=dev, generator=g) * h**-0.5)
    w2 = mxmoe.quantize_mxfp4(torch.randn(e, h, i, device=dev, generator=g) * i**-0.5)
    if case.nan_scale:
        w13.scales[0, 3, 1] = 255
        w2.scales[1, 5, 0] = 255
    weights, ids = mxmoe.route(torch.randn(case.m, e_global, device=dev, generator=g), k)
    ids = ids.to(case.id_dtype)
    expert_map = None
    if case.global_experts:
        expert_map = torch.full((e_global,), -1, dtype=case.id_dtype, device=dev)
        chosen = torch.randperm(e_global, device=dev, generator=g)[:e]
        expert_map[chosen] = torch.arange(e, dtype=case.id_dtype, device=dev)
    kw = dict(
        hidden_states=torch.randn(case.m, h, device=dev, generator=g).to(dtype),
        w13=w13, w2=w2, topk_weights=weights, topk_ids=ids,
        w13_bias=(torch.randn(e, 2 * i, device=dev, generator=g) * 0.1).to(dtype)
        if case.bias else None,
        w2_bias=(torch.randn(e, h, device=dev, generator=g) * 0.1).to(dtype)
        if case.bias else None,
        activation=case.activation, expert_map=expert_map,
        apply_router_weight_on_input=case.on_input,
    )
    bad = torch.zeros_like(ids, dtype=torch.bool)
    for n, value in enumerate(case.bad_ids):
        m, j = divmod(n, k)
        ids[m % case.m, j] = value
        bad[m % case.m, j] = True
    if case.bad_map:
        # Point the map entries of the first local experts out of range.
        local_globals = (expert_map >= 0).nonzero().flatten().tolist()
        for target, value in zip(local_globals, case.bad_map):
            expert_map[target] = value
        local_ok = (expert_map >= 0) & (expert_map < e)
        in_range = (ids >= 0) & (ids < e_global)
        bad |= in_range & ~local_ok[ids.clamp(0, e_global - 1)]
    base_map = expert_map if expert_map is not None else torch.arange(e, device=dev)
    base_map = torch.where((base_map >= 0) & (base_map < e), base_map, -1)
    dropped = dict(kw, topk_ids=torch.where(bad, e_global, ids).to(torch.int64),
                   expert_map=torch.cat([base_map.to(torch.int64),
                                         torch.tensor([-1], device=dev)]))
    return kw, dropped


def unchecked(kw, backend):
    """fused_experts without the data checks (validation of shapes still runs)."""
    import dataclasses

    from mxmoe.backends import get_backend
    from mxmoe.validation import check_fused_experts_args

    # Shapes from stand-ins holding valid values (on the CPU the data is always checked).
    expert_map = kw["expert_map"]
    call = check_fused_experts_args(
        kw["hidden_states"], kw["w13"], kw["w2"], kw["topk_weights"],
        torch.zeros_like(kw["topk_ids"]), w13_bias=kw["w13_bias"], w2_bias=kw["w2_bias"],
        activation=kw["activation"], alpha=1.702, limit=7.0,
        expert_map=None if expert_map is None else torch.full_like(expert_map, -1),
        apply_router_weight_on_input=kw["apply_router_weight_on_input"],
    )
    call = dataclasses.replace(call, topk_ids=kw["topk_ids"], expert_map=kw["expert_map"])
    return get_backend(backend).run(call)


def compare(out: torch.Tensor, ref: torch.Tensor) -> tuple[bool, float, str]:
    out = out.float()
    if not torch.equal(torch.isnan(out), torch.isnan(ref)):
        return False, float("inf"), (f"NaN at {int(torch.isnan(out).sum())} places, reference "
                                     f"{int(torch.isnan(ref).sum())}")
    finite = torch.isfinite(ref)
    scale = ref[finite].abs().max().clamp_min(1e-30)
    err = float((out[finite] - ref[finite]).abs().max() / scale) if finite.any() else 0.0
    return err <= 2e-2, err, ""


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), metavar="CASE")
    ap.add_argument("--backends", nargs="+", default=list(VARIANTS))
    ap.add_argument("--list", action="store_true", help="print the case names and exit")
    ap.add_argument("--json", default=None, help="write the result rows to this file")
    ap.add_argument("--large", action="store_true",
                    help="run only the large-M case (about 10 GB of GPU memory; no memcheck)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: a dry run of this script under the Triton interpreter, in fp16")
    args = ap.parse_args()
    if args.list:
        print("\n".join(CASES))
        return 0
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is first imported
        dtype, device_name = torch.float16, "CPU (Triton interpreter)"
    elif not torch.cuda.is_available():
        print("sanitize.py needs a CUDA GPU (or --device cpu for a dry run)", file=sys.stderr)
        return 2
    else:
        dtype, device_name = torch.bfloat16, torch.cuda.get_device_name()
    import triton

    print(f"# {device_name} | {dtype} | torch {torch.__version__} | CUDA "
          f"{torch.version.cuda} | Triton {triton.__version__} | PYTORCH_NO_CUDA_MEMORY_CACHING="
          f"{os.environ.get('PYTORCH_NO_CUDA_MEMORY_CACHING', '')}", flush=True)
    rows, failures = [], 0
    for name in args.cases:
        case = CASES[name]
        if case.large != args.large:
            continue
        kw, dropped = build(case, args.device, dtype)
        ref = fused_experts_reference(**dict(dropped, activation=mxmoe.Activation(
            case.activation)))
        sync(args.device)
        for backend in args.backends:
            for variant, config in VARIANTS[backend].items():
                if case.heuristic_only and config is not None:
                    continue
                if variant == "portable":
                    os.environ["MXMOE_DEQUANT_PTX"] = "0"
                else:
                    os.environ.pop("MXMOE_DEQUANT_PTX", None)
                if config is None:
                    os.environ.pop("MXMOE_CONFIG", None)
                else:
                    os.environ["MXMOE_CONFIG"] = json.dumps(config)
                start = time.time()
                try:
                    out = unchecked(kw, backend)
                    sync(args.device)
                    ok, err, note = compare(out, ref)
                except Exception as exc:  # keep going: report every case
                    ok, err, note = False, float("inf"), f"{type(exc).__name__}: {exc}"[:300]
                failures += not ok
                row = dict(case=name, backend=backend, variant=variant, ok=ok, max_rel_err=err,
                           note=note, seconds=round(time.time() - start, 2))
                rows.append(row)
                print(f"{'ok  ' if ok else 'FAIL'} {name:<42} {backend:<15} {variant:<10} "
                      f"err={err:.2e} {row['seconds']:>6.1f}s {note}", flush=True)
        os.environ.pop("MXMOE_CONFIG", None)
    print(f"# {len(rows) - failures}/{len(rows)} cases ok", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU correctness and strategy timing for the Triton backends (run on the device machine).

    PYTHONPATH=src python3 scripts/gpu_check.py --out $OUT/gpu_check.json

Checks every Triton backend (and both dequant strategies) against the fp32 torch reference at
gpt-oss shapes, with NaN-poisoned buffers; checks CUDA-graph capture and replay; times the
two dequant strategies, dot_scaled and the dense path inside CUDA graphs. Prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("MXMOE_POISON", "1")

import torch  # noqa: E402

import mxmoe  # noqa: E402
from mxmoe.cli._common import environment, header  # noqa: E402
from mxmoe.reference import fused_experts_reference  # noqa: E402

MODELS = {"20b": 32, "120b": 128}
H = I = 2880
TOP_K = 4


def make_problem(m, e, dtype, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    w13 = mxmoe.quantize_mxfp4(torch.randn(e, 2 * I, H, device=device, generator=g) * H**-0.5)
    w2 = mxmoe.quantize_mxfp4(torch.randn(e, H, I, device=device, generator=g) * I**-0.5)
    x = torch.randn(m, H, device=device, generator=g).to(dtype)
    logits = torch.randn(m, e, device=device, generator=g)
    w, ids = mxmoe.route(logits, TOP_K)
    b13 = (torch.randn(e, 2 * I, device=device, generator=g) * 0.1).to(dtype)
    b2 = (torch.randn(e, H, device=device, generator=g) * 0.1).to(dtype)
    return dict(hidden_states=x, w13=w13, w2=w2, topk_weights=w, topk_ids=ids,
                w13_bias=b13, w2_bias=b2)


def rel_err(out, ref):
    if torch.isnan(out).any():
        return float("inf")
    return float((out.float() - ref).abs().max() / ref.abs().max())


VARIANTS = {
    "dequant": ("triton_dequant", {"split_dot": False}),
    "dequant_split": ("triton_dequant", {"split_dot": True}),
    "scaled": ("triton_scaled", {}),
    "bf16": ("bf16", {}),
}


def run_variant(variant, kw):
    backend, extra = VARIANTS[variant]
    from mxmoe.kernels import fused_moe as fm

    if extra:
        base = fm.choose_config
        def patched(args, mode, _base=base):
            cfg = _base(args, mode)
            return type(cfg)(**{**cfg.to_json(), **extra})
        fm.choose_config = patched
        try:
            return mxmoe.fused_experts(**kw, backend=backend)
        finally:
            fm.choose_config = base
    return mxmoe.fused_experts(**kw, backend=backend)


def graph_time_ms(fn, iters=50):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2], g, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 7, 64, 1000, 8192])
    ap.add_argument("--time-tokens", type=int, nargs="+", default=[1, 16, 64, 256, 1024, 4096, 8192])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--skip-correctness", action="store_true")
    args = ap.parse_args()
    info = environment()
    rows, failures = [], 0
    if not args.skip_correctness:
        for model, e in MODELS.items():
            for m in args.tokens:
                for dtype in (torch.bfloat16, torch.float16):
                    if dtype == torch.float16 and m not in (7, 1000):
                        continue
                    kw = make_problem(m, e, dtype, seed=m)
                    ref = fused_experts_reference(**kw)
                    for variant in args.variants:
                        t0 = time.time()
                        try:
                            out = run_variant(variant, kw)
                            torch.cuda.synchronize()
                            err = rel_err(out, ref)
                            note = ""
                        except Exception as exc:  # keep going, report
                            err, note = float("inf"), f"{type(exc).__name__}: {str(exc)[:200]}"
                        ok = err < 1e-2
                        failures += not ok
                        rows.append(dict(kind="check", model=model, M=m, dtype=str(dtype),
                                         variant=variant, max_rel_err=err, ok=ok, note=note,
                                         seconds=round(time.time() - t0, 2)))
                        print(f"check {model:>5} M={m:<5} {str(dtype):<15} {variant:<14} "
                              f"err={err:.2e} {'ok' if ok else 'FAIL'} {note}", flush=True)
        # CUDA graph capture/replay equals eager.
        kw = make_problem(64, 32, torch.bfloat16, seed=5)
        for variant in args.variants:
            try:
                eager = run_variant(variant, kw)
                _, g, out = graph_time_ms(lambda: run_variant(variant, kw), iters=2)
                g.replay(); torch.cuda.synchronize()
                same = bool(torch.equal(out, eager))
            except Exception as exc:
                same, out = False, None
                print("graph", variant, type(exc).__name__, exc)
            failures += not same
            rows.append(dict(kind="graph", variant=variant, equal_to_eager=same))
            print(f"graph replay == eager ({variant}): {same}", flush=True)

    # Timing of the variants (whole fused_experts incl. align and top-k sum, in a CUDA graph).
    timing = []
    for model, e in MODELS.items():
        for m in args.time_tokens:
            kw = make_problem(m, e, torch.bfloat16, seed=1)
            line = {"model": model, "M": m}
            for variant in args.variants:
                try:
                    ms, _, _ = graph_time_ms(lambda: run_variant(variant, kw))
                except Exception as exc:
                    ms = float("nan")
                    print("time", variant, type(exc).__name__, str(exc)[:300])
                line[variant] = ms
            timing.append(line)
            print("time", json.dumps(line), flush=True)
    print()
    print(header(info))
    print(f"{'model':>5} {'M':>6} " + " ".join(f"{v:>14}" for v in args.variants) + "   (ms, CUDA graph)")
    for line in timing:
        print(f"{line['model']:>5} {line['M']:>6} " + " ".join(f"{line[v]:>14.4f}" for v in args.variants))
    print(f"\ncorrectness failures: {failures}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": info, "rows": rows, "timing": timing}, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

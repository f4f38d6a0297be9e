"""Time one whole MoE layer (route -> experts -> weighted sum) on every path, beside its floor.

On a GPU: gpt-oss-20b and gpt-oss-120b shapes (H = I = 2880, k = 4, bf16 activations, biases,
swigluoai) for M from 1 to 16384; every usable mxmoe backend, ``auto`` and a plain-torch
baseline with dequantized weights (``torch._grouped_mm``), each checked against the fp32
reference, then timed as the median of CUDA-graph replays with rotating inputs. The floor of
each point comes from the copy bandwidth and bf16 matmul rate measured at the start of the run.
Writes ``<gpu>-<date>.json`` (and a PNG when matplotlib is installed) into mxmoe's user results
directory (printed; ``--out DIR`` chooses another, ``--committed`` the checkout's
``benchmarks/results/``) and prints a table.

Without a GPU: the reference, the baseline and (under TRITON_INTERPRET=1, which this command
sets when it is unset) the Triton interpreter on a small shape: a check that every path runs and
agrees with the reference, not performance numbers.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

#: --dtype choices -> torch dtype names (torch is imported by `run`, not for --help).
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


#: `mxmoe check`'s policy (`mxmoe.tolerances`) unless --tolerance is given.
TOLERANCE_HELP = ("max relative error against the fp32 reference (default: 2e-2 where the "
                  "arithmetic rounds to 16 bits, bf16/fp16 activations or tl.dot_scaled; 1e-4 "
                  "where it is fp32, as mxmoe check)")


def add_arguments(parser) -> None:
    parser.add_argument("--models", nargs="+", choices=["20b", "120b"], default=None,
                        help="gpt-oss layer shapes (default on a GPU: 20b 120b)")
    parser.add_argument("--custom", nargs=4, type=int, action="append", default=None,
                        metavar=("H", "I", "E", "K"), help="a custom shape (repeatable)")
    parser.add_argument("--tokens", nargs="+", type=int, default=None,
                        help="M values (default on a GPU: 1 2 4 ... 16384)")
    parser.add_argument("--backends", nargs="+", default=None,
                        help="paths: mxmoe backend names, 'auto', 'baseline' (plain torch, "
                             "dense weights), 'layer' (MXFP4MoE, router included), "
                             "'triton_kernels' (OpenAI's, when it imports) (default: all of "
                             "them that run here)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="activation dtype (default: bf16 on a GPU, fp32 on the CPU)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=None,
                       help="directory for the JSON and the PNG (default: mxmoe's user results "
                            "directory, ~/.cache/mxmoe/results on Linux, $MXMOE_RESULTS_DIR to "
                            "move it; the path is printed)")
    where.add_argument("--committed", action="store_true",
                       help="write into the checkout's benchmarks/results/ (the committed "
                            "results, as scripts/gpu_bench.sh does)")
    parser.add_argument("--tag", default="",
                        help="added to the file name: <gpu>-<date>-<tag>.json")
    parser.add_argument("--quick", action="store_true", help="fewer M values and repetitions")
    parser.add_argument("--rotations", type=int, default=None,
                        help="input sets (one CUDA graph each) cycled through (default 4; 2 on "
                             "the CPU)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timed repetitions per point (default 0.5 on a GPU)")
    parser.add_argument("--tolerance", type=float, default=None, help=TOLERANCE_HELP)
    parser.add_argument("--ceilings", nargs=2, type=float, default=None,
                        metavar=("COPY_GBPS", "MATMUL_TFLOPS"),
                        help="use these ceilings instead of measuring them")
    parser.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                        help="start no new point after this long; print and write what was "
                             "measured (for machines that kill long commands)")
    parser.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    parser.add_argument("--no-host", action="store_true",
                        help="do not measure the host cost of eager calls (measured by default "
                             "on a GPU: host µs per call, its launches, the bare cost of as "
                             "many Triton launches)")
    e2e = parser.add_argument_group(
        "whole model (--model-e2e)", "a gpt-oss model generating in transformers, bf16 experts "
        "against use_mxmoe (mxmoe.bench.e2e); also reads --out/--committed, --tag, --dtype and "
        "--time-limit (default 360 s on a GPU: compiled points that would not end by then are "
        "skipped, with the reason)")
    e2e.add_argument("--model-e2e", action="store_true",
                     help="measure a whole model instead of one layer")
    e2e.add_argument("--e2e-config", choices=["20b", "120b", "tiny"], default=None,
                     help="gpt-oss-20b (default on a GPU), gpt-oss-120b (mxmoe only: its bf16 "
                          "experts do not fit one card) or a 2-layer tiny model (the CPU's)")
    e2e.add_argument("--e2e-quick", action="store_true",
                     help="batches 1 and 64, 64 new tokens, prefill 2048 only")
    e2e.add_argument("--e2e-batches", nargs="+", type=int, default=None,
                     help="decode batch sizes (default 1 8 64)")
    e2e.add_argument("--e2e-prompt-tokens", type=int, default=None, help="default 128")
    e2e.add_argument("--e2e-new-tokens", type=int, default=None, help="default 128")
    e2e.add_argument("--e2e-prefill-tokens", nargs="+", type=int, default=None,
                     help="prefill prompt lengths (default 2048 8192)")
    e2e.add_argument("--e2e-no-compile", action="store_true",
                     help="skip the static-cache (compiled) decode")
    e2e.add_argument("--e2e-no-diagnosis", action="store_true",
                     help="skip the per-layer comparison of the two configurations")
    e2e.add_argument("--e2e-mxmoe-only", action="store_true",
                     help="build and measure the use_mxmoe model only, its bf16 experts made "
                          "one layer at a time (implied by --e2e-config 120b)")


def _set_up_interpreter(notes: list[str]) -> None:
    """Without a GPU, run Triton in its interpreter unless the caller decided otherwise.

    TRITON_INTERPRET is read when a kernel is defined, so it must be set before the kernel
    modules are imported; nothing before this point imports Triton.
    """
    if "TRITON_INTERPRET" in os.environ:
        notes.append(f"TRITON_INTERPRET={os.environ['TRITON_INTERPRET']} was set by the caller")
        return
    if any(name == "triton" or name.startswith("triton.") for name in sys.modules):
        notes.append("Triton was imported before `mxmoe bench` set TRITON_INTERPRET=1: kernels "
                     "defined before that may not run in the interpreter")
    os.environ["TRITON_INTERPRET"] = "1"
    notes.append("TRITON_INTERPRET=1 set by `mxmoe bench` (no GPU): Triton kernels run in the "
                 "interpreter")


def _paths(requested, device, known, log) -> list[str]:
    """The paths to run: ``requested`` (checked against ``known``), or by default every usable
    backend, auto, the baseline, the `MXFP4MoE` layer and the triton_kernels peer when it can
    run here. A requested peer that cannot run stays: its rows say why."""
    from ..backends import backends
    from ..bench.peers import TRITON_KERNELS, unavailable_reason
    from ..bench.runner import BASELINE, LAYER

    table = backends(device)
    if requested is None:
        for name, (usable, reason) in table.items():
            if not usable:
                log(f"skipping backend {name}: {reason}")
        paths = [n for n, (usable, _) in table.items() if usable] + ["auto", BASELINE, LAYER]
        peer_reason = unavailable_reason(device)
        if peer_reason is None:
            paths.append(TRITON_KERNELS)
        else:
            log(f"skipping {TRITON_KERNELS}: {peer_reason}")
        return paths
    paths = []
    for name in requested:
        if name not in known:
            raise SystemExit(f"mxmoe bench: unknown path {name!r}; known: {sorted(known)}")
        if name in table and not table[name][0]:
            log(f"skipping backend {name}: {table[name][1]}")
            continue
        if name not in paths:
            paths.append(name)
    return paths


def run(args) -> int:
    import torch

    if args.model_e2e:
        from ..bench import e2e
        from ._common import environment

        dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
        return e2e.run_from_args(args, environment(), dtype, _out_dir(args))
    if torch.cuda.is_available():
        return _run(args)
    # On the CPU the shapes are tiny, and intra-op threads only wait on each other (on a
    # loaded 2-core machine the reference ran 300x slower with 2 threads than with 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _out_dir(args) -> Path:
    from ..bench import report

    try:
        return (report.committed_results_dir() if args.committed
                else args.out or report.default_results_dir())
    except ValueError as exc:
        raise SystemExit(f"mxmoe bench: {exc}") from None


def _run(args) -> int:
    import torch

    cuda = torch.cuda.is_available()
    notes: list[str] = []
    if not cuda:
        _set_up_interpreter(notes)

    from ..backends import BACKEND_NAMES
    from ..bench import problems, report
    from ..bench.ceilings import (H100_COPY_BYTES_PER_S, H100_MATMUL_FLOPS_PER_S,
                                  given_ceilings, measure_ceilings)
    from ..bench.plot import plot_results
    from ..bench.runner import EXTRA_PATHS, Runner, Settings
    from ..bench.timing import RepPolicy
    from ._common import environment

    def log(text: str) -> None:
        print(text, flush=True)

    device = torch.device("cuda" if cuda else "cpu")
    out_dir = _out_dir(args)
    env = environment()
    log(report.header_line({"device": env["device"], "versions": env, "git_sha": env["git_sha"],
                            "date": env["date"]}))

    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else \
        (torch.bfloat16 if cuda else torch.float32)
    try:
        models = [problems.MODELS[name] for name in (args.models or [])]
        models += [problems.custom_model(*shape) for shape in (args.custom or [])]
    except ValueError as exc:
        raise SystemExit(f"mxmoe bench: {exc}") from None
    if cuda:
        models = models or list(problems.MODELS.values())
        tokens = args.tokens or list(
            problems.GPU_TOKENS_QUICK if args.quick else problems.GPU_TOKENS)
        policy = (RepPolicy(budget_s=0.15, min_reps_small=100, min_reps_large=10, cap_s=3.0)
                  if args.quick else RepPolicy())
        rotations = args.rotations or 4
    else:
        notes.insert(0, "no GPU: not performance numbers. The reference, the baseline and the "
                        "Triton interpreter on the CPU, timed by the wall clock, only to show "
                        "that every path runs and agrees with the fp32 reference (torch "
                        "single-threaded)")
        notes.append("host cost of eager calls: skipped without a GPU (the work itself runs "
                     "on the host: a call's wall time is its ms)")
        if not models:
            models = [problems.CPU_MODEL]
        elif any(m.hidden * m.inter * m.experts > 2**24 for m in models):
            notes.append("large shapes on the CPU: this will be slow")
        tokens = args.tokens or list(
            problems.CPU_TOKENS_QUICK if args.quick else problems.CPU_TOKENS)
        # Not performance numbers: one timed call after the checked one is enough for a slow
        # (interpreted) path; the interpreter must stay well under a minute on 2 cores.
        policy = RepPolicy(budget_s=0.05 if args.quick else 0.1, min_reps_small=1,
                           min_reps_large=1, max_reps=20, cap_s=0.5 if args.quick else 1.0)
        rotations = args.rotations or 2
        if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
            notes.append("bf16 under the Triton interpreter computes wrongly (triton#11584): "
                         "expect its Triton rows to FAIL; use --dtype fp32 or fp16")
    if args.budget is not None:
        policy = dataclasses.replace(policy, budget_s=args.budget)
    if any(m < 1 for m in tokens):
        raise SystemExit(f"mxmoe bench: --tokens must be >= 1, got {tokens}")
    if rotations < 1:
        raise SystemExit(f"mxmoe bench: --rotations must be >= 1, got {rotations}")

    known = {*BACKEND_NAMES, *EXTRA_PATHS}
    paths = _paths(args.backends, device, known, log)
    for note in notes:
        log(f"note: {note}")

    if args.ceilings:
        ceilings = given_ceilings(*args.ceilings, device=env["device"])
    else:
        log("measuring the ceilings (copy bandwidth, matmul rate) ...")
        try:
            ceilings = measure_ceilings(device)
        except Exception as exc:  # floors from FACTS.md beat no floors; say so loudly
            ceilings = given_ceilings(H100_COPY_BYTES_PER_S / 1e9, H100_MATMUL_FLOPS_PER_S / 1e12,
                                      device="FACTS.md H100")
            notes.append(f"measuring the ceilings failed ({type(exc).__name__}: {exc}); the "
                         f"floors use FACTS.md's H100 values")
            log(f"note: {notes[-1]}")
    log(report.ceilings_line({"ceilings": ceilings.as_dict()}))

    json_path = report.results_path(out_dir, env["device"], env["date"], args.tag)
    log(f"results will be written to {json_path}")
    settings = Settings(device=device, dtype=dtype, models=models, tokens=tokens, paths=paths,
                        rotations=rotations, policy=policy, tolerance=args.tolerance,
                        json_path=json_path, time_limit_s=args.time_limit, notes=notes,
                        host=not args.no_host)
    settings_note = (f"paths: {' '.join(paths)} | M: {' '.join(map(str, tokens))} | "
                     f"{len(models)} model(s) | {rotations} rotations | budget "
                     f"{policy.budget_s:g} s/point")
    log(settings_note)
    results = Runner(settings, ceilings, env, log=log).run()
    results["settings"]["quick"] = bool(args.quick)
    if cuda and ceilings.source == "measured" and results.get("complete"):
        # Measured again at the end: a drift from the start (clocks, heat) shows here.
        try:
            end = measure_ceilings(device)
            results["ceilings_end"] = end.as_dict()
            log("at the end, " + report.ceilings_line({"ceilings": end.as_dict()}))
        except Exception as exc:
            log(f"measuring the ceilings again failed: {type(exc).__name__}: {exc}")

    plot_message = "no plot (--no-plot)"
    if not args.no_plot:
        try:
            plot_message = plot_results(results, json_path.with_suffix(".png"))
        except Exception as exc:  # a broken plot must not lose the numbers
            plot_message = f"no plot: {type(exc).__name__}: {exc}"
    report.write_json(results, json_path)
    log("")
    log(report.render_text(results))
    log(f"results: {json_path}")
    log(plot_message)
    return 0 if results.get("complete") else 1

"""Search kernel configs on this GPU and store the fastest (user cache by default).

Each (shape, M, backend) times about 60-80 candidate configs, each compiled once: the time is
estimated and printed before the run starts, and a progress bar shows it while it runs. The
results go to the user cache (~/.cache/mxmoe/tuned.json, or $MXMOE_CACHE_DIR), which every
later call reads before the shipped tables; --write-shipped-table writes the package's table
for this GPU instead (for maintainers, to commit).

examples:
  mxmoe tune --models gpt-oss-20b --tp 1 2 4 8
  mxmoe tune --shapes 2048,768,128,8,silu --tokens 1 64 1024 8192
  mxmoe tune --models gpt-oss-20b gpt-oss-120b --tp 1 2 4 8 --write-shipped-table
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..tune_shapes import DEFAULT_TOKENS, MODEL_ALIASES, MODELS, TUNABLE_BACKENDS


def _shape(text: str):
    from ..tune_shapes import parse_shape

    try:
        return parse_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    models = ", ".join(f"{name} (H{s.hidden} I{s.intermediate} E{s.num_experts} k{s.top_k})"
                       for name, s in MODELS.items())
    parser.add_argument("--models", nargs="+", default=None,
                        choices=sorted(MODELS) + sorted(MODEL_ALIASES), metavar="MODEL",
                        help=f"models to tune: {models}. Default: gpt-oss-20b and gpt-oss-120b "
                             "unless --shapes is given")
    parser.add_argument("--tp", type=int, nargs="+", default=[1], metavar="N",
                        help="tensor-parallel sizes of --models to tune (each rank's share of I "
                             "along whole 32-blocks: gpt-oss tp2 I=1440, tp4 736/704, tp8 "
                             "384/352). Default: 1")
    parser.add_argument("--shapes", type=_shape, nargs="+", default=[], metavar="H,I,E,k",
                        help="further problems: hidden, intermediate (per rank), experts, top-k, "
                             "optionally ',silu' (halves, no bias) or ',swigluoai' (default)")
    parser.add_argument("--tokens", type=int, nargs="+", default=None, metavar="M",
                        help="token counts M to tune. Default: "
                             + " ".join(map(str, DEFAULT_TOKENS)))
    parser.add_argument("--backends", nargs="+", default=["triton_dequant"],
                        choices=TUNABLE_BACKENDS,
                        help="backends to tune; with several, the fastest per (shape, M) is "
                             "recorded for backend='auto'. Default: triton_dequant")
    parser.add_argument("--modes", nargs="+", choices=["dequant", "scaled"], default=None,
                        help="the first spelling of --backends, still accepted: dequant is "
                             "triton_dequant (weights dequantized in the GEMM loop), scaled is "
                             "triton_scaled (tl.dot_scaled); replaces --backends when given")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--write-shipped-table", action="store_true",
                       help="write the package's table for this GPU "
                            "(src/mxmoe/kernels/configs/<gpu>.json) instead of the user cache")
    where.add_argument("--out", type=Path, default=None,
                       help="write a table file of the shipped format to this path instead")
    parser.add_argument("--copy-tb-s", type=float, default=None,
                        help="the measured device-to-device copy rate to note in a written "
                             "table (what a family fallback on another card reports)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan and its time estimate, then stop (no GPU needed)")


def jobs_of(args):
    from ..tune import model_shapes, plan

    names = args.models if args.models is not None else (
        [] if args.shapes else ["gpt-oss-20b", "gpt-oss-120b"])
    shapes = model_shapes(names, args.tp)
    shapes += [s for s in args.shapes if s not in shapes]
    backends = ([{"dequant": "triton_dequant", "scaled": "triton_scaled"}[m] for m in args.modes]
                if args.modes else args.backends)
    return plan(shapes, args.tokens or list(DEFAULT_TOKENS), backends)


def run(args) -> int:
    from ..tune import estimate_seconds, format_seconds

    try:
        jobs = jobs_of(args)
    except ValueError as exc:
        print(f"mxmoe tune: {exc}")
        return 2
    candidates, seconds = estimate_seconds(jobs)
    shapes = sorted({(j.shape.label or j.shape.key, j.shape.key) for j in jobs})
    print(f"{len(jobs)} points ({len(shapes)} shapes x M x backends), {candidates} candidates: "
          f"about {format_seconds(seconds)}")
    for label, key in shapes:
        print(f"  {label}: {key}")
    if args.dry_run:
        return 0
    import torch

    if not torch.cuda.is_available():
        print("mxmoe tune needs a CUDA GPU: it times kernels on the device it tunes for.")
        return 2
    from .. import settings
    from ..devices import family
    from ..tune import GraphTimer, Progress, TableWriter, UserCacheWriter, shipped_table_path, tune

    facts = settings.device_facts("cuda")
    if args.write_shipped_table or args.out:
        writer = TableWriter(args.out or shipped_table_path(facts), facts, args.copy_tb_s)
    else:
        writer = UserCacheWriter(facts)
    print(f"tuning on {facts.name} ({family(facts.capability)}, {facts.sm_count} SMs) -> "
          f"{writer.where}")
    progress = Progress(candidates)
    try:
        tune(jobs, GraphTimer(), writer, progress=progress)
    finally:
        progress.close()
    return 0

#!/usr/bin/env python3
"""Write BENCHMARKS.md from a `mxmoe bench` results JSON.

    python scripts/render_benchmarks.py [RESULTS.json] [--output BENCHMARKS.md] [--no-plot]

Without RESULTS.json: the newest file in benchmarks/results/. The plot is the PNG beside the
JSON (same name); when it is missing and matplotlib is installed it is drawn first.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import mxmoe  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT / "src"))

from mxmoe.bench import report  # noqa: E402
from mxmoe.bench.plot import plot_results  # noqa: E402


def newest_results(directory: Path) -> Path:
    files = sorted(directory.glob("*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise SystemExit(f"render_benchmarks: no results JSON in {directory}")
    return files[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", type=Path, default=None,
                        help="results JSON (default: the newest in benchmarks/results/)")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--no-plot", action="store_true", help="no plot link (and no drawing)")
    args = parser.parse_args(argv)

    source = args.results or newest_results(ROOT / "benchmarks" / "results")
    try:
        results = report.load_json(source)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"render_benchmarks: cannot read {source}: {exc}") from None

    link = None
    if not args.no_plot:
        png = source.with_suffix(".png")
        if not png.exists():
            print(plot_results(results, png))
        if png.exists():
            link = Path(os.path.relpath(png, args.output.resolve().parent)).as_posix()
    shown_source = Path(os.path.relpath(source.resolve(), args.output.resolve().parent)).as_posix()
    args.output.write_text(report.render_markdown(results, plot=link, source=shown_source))
    print(f"wrote {args.output} from {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

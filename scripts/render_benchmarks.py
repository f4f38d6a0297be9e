#!/usr/bin/env python3
"""Write BENCHMARKS.md from `mxmoe bench` results JSON.

    python scripts/render_benchmarks.py [RESULTS.json ...] [--output BENCHMARKS.md]
                                        [--merged-json MERGED.json] [--no-plot]

Without RESULTS.json: the newest file in benchmarks/results/. Several files (runs on the same
card, e.g. one per model) are merged; `--merged-json` keeps the merge as one results file. The
plot is the PNG beside the (merged) JSON, same name; when it is missing and matplotlib is
installed it is drawn first.
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
    parser.add_argument("results", nargs="*", type=Path, default=None,
                        help="results JSON (default: the newest in benchmarks/results/)")
    parser.add_argument("--merged-json", type=Path, default=None,
                        help="write the merge of several results files here")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--no-plot", action="store_true", help="no plot link (and no drawing)")
    args = parser.parse_args(argv)

    sources = args.results or [newest_results(ROOT / "benchmarks" / "results")]
    loaded = []
    for source in sources:
        try:
            loaded.append(report.load_json(source))
        except (OSError, ValueError) as exc:
            raise SystemExit(f"render_benchmarks: cannot read {source}: {exc}") from None
    out_dir = args.output.resolve().parent

    def rel(path: Path) -> str:
        return Path(os.path.relpath(path.resolve(), out_dir)).as_posix()

    if len(loaded) == 1:
        results, json_path = loaded[0], sources[0]
    else:
        try:
            results = report.merge(loaded, [s.name for s in sources])
        except ValueError as exc:
            raise SystemExit(f"render_benchmarks: {exc}") from None
        json_path = args.merged_json or sources[0].with_name(sources[0].stem + "-merged.json")
        if args.merged_json:
            report.write_json(results, json_path)
            print(f"wrote {json_path}")

    link = None
    if not args.no_plot:
        png = json_path.with_suffix(".png")
        if len(loaded) > 1 or not png.exists():  # a merge is always drawn afresh
            print(plot_results(results, png))
        if png.exists():
            link = rel(png)
    shown = ", ".join(f"`{rel(s)}`" for s in ([json_path] if args.merged_json else sources))
    args.output.write_text(report.render_markdown(results, plot=link, source=shown))
    print(f"wrote {args.output} from {', '.join(map(str, sources))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

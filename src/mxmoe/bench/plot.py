"""The PNG: time and floor against M, log-log, one line per path, one panel per model.

Needs matplotlib (the ``bench`` extra); without it `plot_results` says so and draws nothing.
"""

from __future__ import annotations

from pathlib import Path


def plot_results(results: dict, path: Path) -> str:
    """Draw ``results`` to ``path``; returns one line saying what happened."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "no plot: matplotlib is not installed (pip install 'mxmoe[bench]')"

    models: list[str] = []
    for row in results["rows"]:
        if row["model"] not in models:
            models.append(row["model"])
    if not models:
        return "no plot: no rows"
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 5), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [r for r in results["rows"] if r["model"] == model]
        floor = sorted({(r["M"], r["floor_ms"]) for r in rows if r["floor_ms"]})
        if floor:
            ax.plot([m for m, _ in floor], [f for _, f in floor], "k--", lw=2, label="floor")
        paths: list[str] = []
        for r in rows:
            if r["backend"] not in paths:
                paths.append(r["backend"])
        for name in paths:
            points = sorted((r["M"], r["ms"], r["status"]) for r in rows
                            if r["backend"] == name and r["ms"] is not None)
            if not points:
                continue
            line, = ax.plot([m for m, _, _ in points], [t for _, t, _ in points], "o-",
                            ms=3, label=name)
            failed = [(m, t) for m, t, status in points if status != "ok"]
            if failed:  # over the tolerance: still drawn, crossed out
                ax.plot(*zip(*failed), "x", color=line.get_color(), ms=9)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        tokens = sorted({r["M"] for r in rows})
        ax.set_xticks(tokens, [str(m) for m in tokens], rotation=45, fontsize=7)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("ms per layer")
        ax.set_title(model)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{results.get('device')} | {results.get('date')} | git {results.get('git_sha')}"
                 " (x: over the error tolerance)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path}"

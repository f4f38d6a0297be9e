"""Results: the JSON file, the printed tables, and the markdown of BENCHMARKS.md.

The JSON (``schema: mxmoe-bench/1``) has top-level ``device``, ``versions``, ``git_sha``,
``date``, ``ceilings``, ``settings``, ``models``, ``notes``, ``complete`` and ``rows``; each row
has at least ``model``, ``M``, ``backend``, ``ms``, ``floor_ms``, ``ratio``, ``max_rel_err``,
``graph`` and ``status`` (``ok``, ``FAIL``: error over the tolerance, ``error``: it raised,
``skipped``: the path cannot run here, ``error`` says why), and the host cost of an eager call
(``host_us``, ``launches``, ``host_bare_us``, ``host_ratio``, ... see `host.HostCost`).
Missing numbers are ``null``; the file is strict JSON (no NaN).
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

SCHEMA = "mxmoe-bench/1"
REQUIRED_TOP = ("device", "versions", "git_sha", "ceilings", "rows")
REQUIRED_ROW = ("model", "M", "backend", "ms", "floor_ms", "ratio", "max_rel_err", "graph",
                "status")
STATUSES = ("ok", "FAIL", "error", "skipped")


def new_results(environment: dict, ceilings: dict, settings: dict, models: dict,
                notes: list[str]) -> dict:
    return {
        "schema": SCHEMA,
        "device": environment.get("device"),
        "versions": {key: environment.get(key)
                     for key in ("driver", "cuda", "torch", "triton", "python")},
        "git_sha": environment.get("git_sha"),
        "date": environment.get("date"),
        "environment": environment,
        "ceilings": ceilings,
        "settings": settings,
        "models": models,
        "notes": list(notes),
        "complete": False,
        "rows": [],
    }


def validate(results: dict) -> None:
    """ValueError naming the first missing key or bad row (what render_benchmarks needs)."""
    for key in REQUIRED_TOP:
        if key not in results:
            raise ValueError(f"results: missing top-level key {key!r}")
    if not isinstance(results["rows"], list):
        raise ValueError("results: 'rows' must be a list")
    for i, row in enumerate(results["rows"]):
        for key in REQUIRED_ROW:
            if key not in row:
                raise ValueError(f"results: row {i} has no {key!r}: {row}")
        if row["status"] not in STATUSES:
            raise ValueError(f"results: row {i} status must be one of {STATUSES}, got "
                             f"{row['status']!r}")


def _strict(value):
    """Non-finite floats -> None, recursively (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def write_json(results: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_strict(results), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def load_json(path: Path) -> dict:
    results = json.loads(Path(path).read_text())
    validate(results)
    return results


def merge(results_list: list[dict], names: list[str]) -> dict:
    """Several runs on one card (say ``--models 20b`` and ``--models 120b``, each within a time
    limit) as one result: their rows, each run's date, git sha and ceilings under ``runs``.
    A later run's row replaces an earlier one for the same (model, M, path) in the tables."""
    if not results_list:
        raise ValueError("merge: no results")
    devices = sorted({str(r.get("device")) for r in results_list})
    if len(devices) > 1:
        raise ValueError(f"merge: results come from different devices {devices}; timings from "
                         f"different cards are not a comparison")
    merged = dict(results_list[0])
    merged["rows"] = [row for r in results_list for row in r["rows"]]
    merged["models"] = {}
    merged["notes"] = []
    for r in results_list:
        merged["models"].update(r.get("models") or {})
        merged["notes"] += [n for n in r.get("notes", []) if n not in merged["notes"]]
    merged["complete"] = all(r.get("complete", False) for r in results_list)
    merged["runs"] = [{"file": name, "date": r.get("date"), "git_sha": r.get("git_sha"),
                       "ceilings": r.get("ceilings"), "complete": r.get("complete")}
                      for name, r in zip(names, results_list)]
    validate(merged)
    return merged


def slug(text: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``; a CPU run is ``"cpu"``."""
    if not text or text.lower().startswith("cpu"):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


#: Overrides where `mxmoe bench` writes by default.
RESULTS_DIR_ENV = "MXMOE_RESULTS_DIR"


def default_results_dir() -> Path:
    """Where `mxmoe bench` writes without ``--out``: ``$MXMOE_RESULTS_DIR``, else ``results/``
    in mxmoe's cache directory (``$MXMOE_CACHE_DIR``, else ``$XDG_CACHE_HOME/mxmoe`` or
    ``~/.cache/mxmoe``; ``~/Library/Caches/mxmoe`` on macOS, ``%LOCALAPPDATA%\\mxmoe`` on
    Windows), never the directory the command is run from."""
    if os.environ.get(RESULTS_DIR_ENV):
        return Path(os.environ[RESULTS_DIR_ENV]).expanduser()
    if os.environ.get("MXMOE_CACHE_DIR"):
        return Path(os.environ["MXMOE_CACHE_DIR"]).expanduser() / "results"
    home = Path.home()
    if sys.platform == "darwin":
        base = home / "Library" / "Caches"
    elif os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local")
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or home / ".cache")
    return base / "mxmoe" / "results"


def committed_results_dir() -> Path:
    """``benchmarks/results/`` of the mxmoe checkout this module runs from (the results that
    are committed; `scripts/gpu_bench.sh` writes there). ValueError outside a checkout."""
    root = Path(__file__).resolve().parents[3]
    results = root / "benchmarks" / "results"
    if not (root / "pyproject.toml").is_file() or not results.parent.is_dir():
        raise ValueError(f"--committed: mxmoe does not run from a checkout ({root} has no "
                         f"benchmarks/ and pyproject.toml); give --out DIR instead")
    return results


def results_path(out_dir: Path, device: str, date: str | None = None, tag: str = "") -> Path:
    """``<out_dir>/<device slug>-<YYYY-MM-DD>[-<tag>].json``; a time is added if that file
    exists."""
    date = (date or time.strftime("%Y-%m-%d", time.gmtime()))[:10]
    stem = f"{slug(device)}-{date}" + (f"-{slug(tag)}" if tag else "")
    path = Path(out_dir) / f"{stem}.json"
    if path.exists():
        path = Path(out_dir) / f"{stem}-{time.strftime('%H%M%S', time.gmtime())}.json"
    return path


# -- text ----------------------------------------------------------------------------------------

def _ratio(value) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}x" if value < 10 else f"{value:.1f}x" if value < 100 else f"{value:.0f}x"


def _ms(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def format_row(row: dict, t0: float | None = None) -> str:
    """One progress line per measured row."""
    prefix = f"[{time.perf_counter() - t0:7.1f}s] " if t0 is not None else ""
    err = "-" if row.get("max_rel_err") is None else f"{row['max_rel_err']:.1e}"
    ratio = _ratio(row.get("ratio"))
    line = (f"{prefix}{row['model']:<14} M={row['M']:<6} {row['backend']:<20} "
            f"{_ms(row['ms']):>9} ms  floor {_ms(row['floor_ms']):>9} ms  {ratio:>8}  "
            f"err {err:>7}  {'graph' if row['graph'] else 'eager':<5}  {row['status']}")
    if row.get("host_us") is not None:
        line += (f"  host {row['host_us']:.0f} us"
                 + (f" ({row['launches']} launches, bare {row['host_bare_us']:.0f} us)"
                    if row.get("host_bare_us") is not None else ""))
    extra = row.get("error") or ""
    if row.get("detail"):
        extra = f"{extra} ({row['detail']})" if extra else row["detail"]
    return f"{line}  {extra}".rstrip()


def _paths(rows: list[dict]) -> list[str]:
    seen: list[str] = []
    for row in rows:
        if row["backend"] not in seen:
            seen.append(row["backend"])
    return seen


def _cell(row: dict | None) -> str:
    if row is None:
        return ""
    if row["status"] == "skipped":
        return "skipped"
    if row["status"] == "error" or row["ms"] is None:
        return "error"
    text = f"{_ms(row['ms'])} {_ratio(row['ratio'])}" if row.get("ratio") else _ms(row["ms"])
    if not row["graph"]:
        text += " e"
    if row["status"] == "FAIL":
        text += " FAIL"
    return text


def summarize(rows: list[dict]) -> list[dict]:
    """Per (model, M): the floor, each path's row, the fastest correct path, auto / fastest."""
    points: dict[tuple[str, int], dict] = {}
    for row in rows:
        point = points.setdefault((row["model"], row["M"]), {
            "model": row["model"], "M": row["M"], "floor_ms": row["floor_ms"],
            "bound": row.get("bound", ""), "rows": {}})
        point["rows"][row["backend"]] = row
    for point in points.values():
        good = [r for r in point["rows"].values() if r["status"] == "ok" and r["ms"] is not None]
        best = min(good, key=lambda r: r["ms"]) if good else None
        point["fastest"] = best["backend"] if best else None
        auto = point["rows"].get("auto")
        point["auto_vs_best"] = (auto["ms"] / best["ms"] if best and auto and auto["status"] == "ok"
                                 and auto["ms"] is not None else None)
    return list(points.values())


def _grid(results: dict, model: str) -> tuple[list[str], list[list[str]]]:
    rows = [r for r in results["rows"] if r["model"] == model]
    paths = _paths(rows)
    head = ["M", "floor ms", "bound", *paths, "fastest", "auto/best"]
    body = []
    for point in summarize(rows):
        body.append([
            str(point["M"]), _ms(point["floor_ms"]), point["bound"],
            *[_cell(point["rows"].get(p)) for p in paths],
            point["fastest"] or "-",
            _ratio(point["auto_vs_best"]),
        ])
    return head, body


def _host_cell(row: dict | None) -> str:
    if row is None or row.get("host_us") is None:
        return "-" if row is not None else ""
    text = f"{row['host_us']:.0f}"
    if row.get("launches") is not None:
        text += f" /{row['launches']}"
    if row.get("host_ratio") is not None:
        text += f" {row['host_ratio']:.1f}x"
    return text


def has_host(results: dict, model: str) -> bool:
    return any(r.get("host_us") is not None for r in results["rows"] if r["model"] == model)


def _host_grid(results: dict, model: str) -> tuple[list[str], list[list[str]]]:
    """Host µs of one eager call per path, its launches, and its ratio to the bare launches."""
    rows = [r for r in results["rows"] if r["model"] == model]
    paths = _paths(rows)
    head = ["M", *paths, "bare µs/launch"]
    body = []
    for point in summarize(rows):
        bare = [r["host_bare_us"] / r["launches"] for r in point["rows"].values()
                if r.get("host_bare_us") is not None and r.get("launches")]
        body.append([str(point["M"]), *[_host_cell(point["rows"].get(p)) for p in paths],
                     f"{statistics.median(bare):.1f}" if bare else "-"])
    return head, body


HOST_LEGEND = ("host cell: median µs of wall time to issue one eager call (GPU idle before it) "
               "/ GPU launches it makes, and its ratio to as many launches of a trivial compiled "
               "Triton kernel through kernel[grid] (bare µs/launch), measured in the same run.")


def _models(results: dict) -> list[str]:
    seen: list[str] = []
    for row in results["rows"]:
        if row["model"] not in seen:
            seen.append(row["model"])
    return seen


def _shape_text(results: dict, model: str) -> str:
    shape = (results.get("models") or {}).get(model)
    if not shape:
        return ""
    return (f"(H = {shape['hidden']}, I = {shape['inter']}, E = {shape['experts']}, "
            f"k = {shape['top_k']}, {(results.get('settings') or {}).get('dtype', '?')})")


def header_line(results: dict) -> str:
    v = results.get("versions", {})
    return (f"device: {results.get('device')} | driver: {v.get('driver')} | CUDA: {v.get('cuda')} "
            f"| torch: {v.get('torch')} | Triton: {v.get('triton')} | git: "
            f"{results.get('git_sha')} | {results.get('date')}")


def ceilings_lines(results: dict) -> list[str]:
    """The ceilings of the run, or one line per run of a merged result."""
    runs = results.get("runs") or []
    if len(runs) <= 1:
        return [ceilings_line(results)]
    return [f"run {run['file']} ({run['date']}, git {run['git_sha']}): "
            f"{ceilings_line({'ceilings': run['ceilings']})}" for run in runs]


def ceilings_line(results: dict) -> str:
    c = results.get("ceilings") or {}
    if not c:
        return "ceilings: none"
    return (f"ceilings ({c.get('source')}{', ' + c['device'] if c.get('device') else ''}): copy "
            f"{c.get('copy_gb_per_s', 0):.4g} GB/s (read + write), matmul "
            f"{c.get('matmul_tflop_per_s', 0):.4g} TFLOP/s"
            + (f" ({c['matmul_dtype']} {c['matmul_size']}^3)" if c.get("matmul_size") else ""))


LEGEND = ("cell: median ms and ratio to the floor; e = eager (no CUDA graph); FAIL = max rel err "
          "over the tolerance; error = the path raised (see the errors below). fastest: among "
          "correct paths. auto/best: auto's time over the fastest.")


def errors(results: dict) -> list[str]:
    """One line per (path, error): which M it hit."""
    seen: dict[tuple[str, str, str], list[int]] = {}
    for row in results["rows"]:
        if row.get("error"):
            seen.setdefault((row["model"], row["backend"], row["error"]), []).append(row["M"])
    skipped = {(r["model"], r["backend"], r["error"]) for r in results["rows"]
               if r.get("status") == "skipped"}
    return [f"{model} {backend} at M={','.join(map(str, ms))}: "
            f"{'skipped: ' if (model, backend, error) in skipped else ''}{error}"
            for (model, backend, error), ms in seen.items()]


def render_text(results: dict) -> str:
    """The short table printed last: header, ceilings, one grid per model, errors."""
    lines = [header_line(results), *ceilings_lines(results)]
    lines += [f"note: {n}" for n in results.get("notes", [])]
    for model in _models(results):
        head, body = _grid(results, model)
        widths = [max(len(x) for x in col) for col in zip(head, *body)]
        lines += ["", f"{model} {_shape_text(results, model)}".rstrip()]
        lines.append("  ".join(h.rjust(w) for h, w in zip(head, widths)))
        lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in body]
        if has_host(results, model):
            head, body = _host_grid(results, model)
            widths = [max(len(x) for x in col) for col in zip(head, *body)]
            lines += ["", f"{model}: host cost of an eager call (µs / launches, x bare)"]
            lines.append("  ".join(h.rjust(w) for h, w in zip(head, widths)))
            lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in body]
    lines += ["", LEGEND]
    if any(has_host(results, model) for model in _models(results)):
        lines.append(HOST_LEGEND)
    problems = errors(results)
    if problems:
        lines += ["errors:"] + [f"  {p}" for p in problems]
    if results.get("aborted"):
        lines.append(f"ABORTED: {results['aborted']}")
    return "\n".join(lines)


def render_markdown(results: dict, plot: str | None = None, source: str | None = None) -> str:
    """BENCHMARKS.md: the latest results, one table per model, and the plot."""
    lines = ["# Benchmarks", "",
             "One whole MoE layer (route -> align -> GEMM1 + swiglu -> GEMM2 + weighted sum), "
             "timed by `mxmoe bench` as the median of CUDA-graph replays with rotating inputs "
             "and routings, beside its floor: max(bytes of the packed weights, scales and "
             "biases of the experts touched / copy bandwidth, useful FLOPs / bf16 matmul rate), "
             "both ceilings measured at the start of the same run.", "",
             f"- {header_line(results)}", *[f"- {c}" for c in ceilings_lines(results)]]
    settings = results.get("settings") or {}
    if settings:
        lines.append(f"- activations {settings.get('dtype')}, {settings.get('rotations')} "
                     f"rotating input sets, tolerance "
                     f"{settings.get('tolerance') or 'per path (mxmoe check policy)'}")
    if source:
        lines.append(f"- results: {source}")
    lines += [f"- note: {n}" for n in results.get("notes", [])]
    if not results.get("complete", True):
        lines.append("- **incomplete run**" + (f": {results['aborted']}" if results.get("aborted")
                                               else ""))
    if plot:
        lines += ["", f"![time and floor against M]({plot})"]
    for model in _models(results):
        head, body = _grid(results, model)
        lines += ["", f"## {model}", "", _shape_text(results, model)]
        lines += ["", "| " + " | ".join(head) + " |",
                  "|" + "|".join("---:" if i != 2 else "---" for i in range(len(head))) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in body]
        if has_host(results, model):
            head, body = _host_grid(results, model)
            lines += ["", f"Host cost of an eager call, {model}:", "",
                      "| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
            lines += ["| " + " | ".join(row) + " |" for row in body]
    lines += ["", LEGEND]
    if any(has_host(results, model) for model in _models(results)):
        lines.append(HOST_LEGEND)
    problems = errors(results)
    if problems:
        lines += ["", "## Errors", ""] + [f"- {p}" for p in problems]
    return "\n".join(lines) + "\n"

"""Results of `mxmoe bench --model-e2e` (`mxmoe.bench.e2e`): the JSON's layout and the table.

The JSON (``schema: mxmoe-e2e/2``) has top-level ``device``, ``versions`` (with
``transformers``), ``git_sha``, ``date``, ``command``, ``settings`` (the plan, how each figure
is measured, the schedule of the compiled points), ``backends`` (mxmoe's table on this device),
``model``, ``planned`` (every point meant to run, in order), ``configs``, ``triton_kernels``,
``check``, ``diagnosis``, ``memory``, ``phases`` (seconds per phase), ``in_progress`` (the
point under way when the file was written; None between points), ``notes``, ``complete``,
``errors`` and, after SIGTERM, ``interrupted``. ``configs`` maps `BF16` and `MXMOE` to
``description``, ``expert_bytes``, ``peak_bytes`` and one list of rows per kind (`KINDS`).
Every planned point has a row. Every row has ``status`` (`STATUSES`; ``error`` holds the text
of a failure or the reason of a skip), the peak memory of the point (``peak_bytes``,
``peak_raw_bytes``, ``parked_bytes``; None on the CPU), ``point_s`` (its wall time) and its own
figures:

- ``greedy``: ``tokens``, ``logit_margins`` (top-1 minus top-2 at each step);
- ``decode``: ``batch``, ``mode`` (`EAGER`, `STATIC`), ``tokens_per_s``, ``ms_per_step``,
  ``t_one_s``, ``t_all_s``, ``warmup_s`` (compiles included), ``compiled``; static rows also
  ``estimate_s`` (what the schedule expected);
- ``prefill``: ``prompt_tokens``, ``tokens_per_s``, ``s`` (the fastest), ``times_s``;
- ``moe_share``: ``batch``, ``moe_share``, ``moe_s``, ``total_s``, ``basis``; the host wall
  time's share beside it (``host_moe_share``, ``host_moe_s``, ``host_total_s``).

``check`` is `e2e.compare_greedy`'s answer with ``reference_margin_at_divergence``.
``diagnosis`` (`e2e.Session.diagnose`): ``status``; ``layers``, one row per decoder layer with
the mxmoe block's error against the bf16 block on the same input (``rel_err_max``,
``rel_err_mean``: per-token relative errors; ``max_abs_err_over_max_abs``), each one's mean
error against a float32 evaluation (``reference_vs_fp32_rel_err_mean``,
``candidate_vs_fp32_rel_err_mean``), ``decode_token_rel_err`` (the last token alone, through
the decode kernels), ``routing_agreement`` and ``hidden_rel_diff_mean`` (the two whole models'
decoder-layer outputs); ``logits`` (`e2e.logits_comparison` on the teacher-forced positions);
``verdict`` (``kind``: rounding, semantic, unclear; ``text``).
"""

from __future__ import annotations

SCHEMA = "mxmoe-e2e/2"
BF16 = "transformers_bf16"
MXMOE = "mxmoe"
TRITON_KERNELS = "triton_kernels"
CONFIG_NAMES = (BF16, MXMOE)
EAGER = "eager"
STATIC = "static"
STATUSES = ("ok", "error", "skipped")
KINDS = ("greedy", "decode", "prefill", "moe_share")



def new_results(*, environment: dict, transformers_version: str, command: str, settings: dict,
                backends: dict) -> dict:
    """The results before anything is measured."""
    versions = {key: environment.get(key) for key in ("driver", "cuda", "torch", "triton",
                                                      "python")}
    versions["transformers"] = transformers_version
    return {
        "schema": SCHEMA,
        "device": environment.get("device"),
        "versions": versions,
        "git_sha": environment.get("git_sha"),
        "date": environment.get("date"),
        "command": command,
        "environment": environment,
        "settings": settings,
        "backends": backends,
        "model": None,
        "configs": {name: {"description": None, "expert_bytes": None, "peak_bytes": None,
                           **{kind: [] for kind in KINDS}}
                    for name in CONFIG_NAMES},
        TRITON_KERNELS: {
            "status": "skipped",
            "error": "not run",
        },
        "planned": [],
        "check": None,
        "diagnosis": None,
        "memory": None,
        "phases": {},
        "in_progress": None,
        "notes": [],
        "complete": False,
        "errors": 0,
    }


def all_rows(results: dict) -> list[tuple[str, str, dict]]:
    """(configuration, kind, row) of every row."""
    return [(name, kind, row) for name in CONFIG_NAMES for kind in KINDS
            for row in results["configs"][name][kind]]


def row_text(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row.get('error', '')[:300]}"
    parts = []
    if row.get("tokens_per_s") is not None:
        parts.append(f"{row['tokens_per_s']:.1f} tok/s")
    if row.get("ms_per_step") is not None:
        parts.append(f"{row['ms_per_step']:.2f} ms/step")
    if row.get("moe_share") is not None:
        parts.append(f"MoE share {row['moe_share']:.1%}")
    if row.get("peak_bytes") is not None:
        parts.append(f"peak {row['peak_bytes'] / 2**30:.2f} GiB")
    return ", ".join(parts) or "ok"


def check_text(check: dict | None) -> str:
    if not check or check.get("status") != "ok":
        return f"not made ({(check or {}).get('error', 'no greedy runs')})"
    if check["equal"]:
        return f"equal for the first {check['n']} tokens"
    margin = check.get("reference_margin_at_divergence")
    margin_text = "" if margin is None else f" (reference top-1 margin there {margin:.3g})"
    return f"diverge at token {check['first_divergence']} of {check['n']}{margin_text}"


def diagnosis_text(diagnosis: dict | None) -> str:
    """One line: the verdict, the worst layer, the logits' agreement."""
    if not diagnosis or diagnosis.get("status") != "ok":
        return f"not made ({(diagnosis or {}).get('error', 'not run')})"
    layers = diagnosis.get("layers") or []
    parts = [diagnosis.get("verdict", {}).get("text", "")]
    if layers:
        routing = min(r["routing_agreement"] for r in layers)
        parts.append(f"routing agreement >= {routing:.1%}")
    logits = diagnosis.get("logits")
    if logits:
        first = logits["first"]
        parts.append(f"teacher-forced top-1 agreement {logits['top1_agreement']:.1%} over "
                     f"{logits['positions']} positions, max |logit diff| "
                     f"{logits['max_abs_diff']:.3g} (logit std {logits['reference_logit_std']:.3g}),"
                     f" first token: reference margin {first['reference_margin']:.3g}")
    return "; ".join(p for p in parts if p)


def diagnosis_lines(diagnosis: dict | None) -> list[str]:
    """The per-layer table of the diagnosis."""
    if not diagnosis or diagnosis.get("status") != "ok" or not diagnosis.get("layers"):
        return []
    lines = [f"{'layer':>5} {'rel err mean':>12} {'rel err max':>11} {'ref vs fp32':>12} "
             f"{'mxmoe vs fp32':>13} {'decode tok':>10} {'routing':>8} {'hidden diff':>11}"]
    for r in diagnosis["layers"]:
        lines.append(f"{r['layer']:>5} {r['rel_err_mean']:>12.3g} {r['rel_err_max']:>11.3g} "
                     f"{r['reference_vs_fp32_rel_err_mean']:>12.3g} "
                     f"{r['candidate_vs_fp32_rel_err_mean']:>13.3g} "
                     f"{r['decode_token_rel_err']:>10.3g} {r['routing_agreement']:>8.1%} "
                     f"{r['hidden_rel_diff_mean']:>11.3g}")
    return lines


def _find(rows: list[dict], **match) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def _cell(row: dict | None, key: str, fmt: str) -> tuple[str, float | None]:
    if row is None:
        return "-", None
    if row["status"] != "ok":
        return row["status"], None
    value = row.get(key)
    return ("-", None) if value is None else (fmt.format(value), value)


def render_table(results: dict) -> str:
    """The side-by-side table printed at the end of a run (and usable for BENCHMARKS.md)."""
    configs, settings = results["configs"], results["settings"]
    bf16, mx = configs[BF16], configs[MXMOE]
    dense = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(settings["dtype"],
                                                                         settings["dtype"])
    lines = [
        f"{(results.get('model') or {}).get('name', '?')} end to end | {results.get('device')} "
        f"| torch {results['versions'].get('torch')} | transformers "
        f"{results['versions'].get('transformers')} | git {results.get('git_sha')} | "
        f"{results.get('date')}",
        f"{'measure':<46} {'transformers ' + dense:>18} {'mxmoe':>10} {'mxmoe gain':>11}",
    ]

    def add(label: str, a: dict | None, b: dict | None, key: str, fmt: str,
            better: str | None = "higher") -> None:
        """One row; the gain is mxmoe's factor over bf16 (> 1: faster or smaller)."""
        (ta, va), (tb, vb) = _cell(a, key, fmt), _cell(b, key, fmt)
        ratio = "-"
        if va and vb and better:
            ratio = f"{(vb / va) if better == 'higher' else (va / vb):.2f}x"
        lines.append(f"{label:<46} {ta:>18} {tb:>10} {ratio:>11}")

    compiled = any(r.get("compiled") for c in (bf16, mx) for r in c["decode"])
    static_label = "static cache + compile" if compiled else "static cache, not compiled"
    for mode, mode_label in ((EAGER, "eager"), (STATIC, static_label)):
        for batch in settings["decode_batches"]:
            add(f"decode tok/s B={batch} ({mode_label})",
                _find(bf16["decode"], batch=batch, mode=mode),
                _find(mx["decode"], batch=batch, mode=mode), "tokens_per_s", "{:.1f}")
    for length in settings["prefill_tokens"]:
        add(f"prefill tok/s {length} tokens", _find(bf16["prefill"], prompt_tokens=length),
            _find(mx["prefill"], prompt_tokens=length), "tokens_per_s", "{:.0f}")
    for batch in settings["profile_batches"]:
        add(f"MoE share of decode B={batch}", _find(bf16["moe_share"], batch=batch),
            _find(mx["moe_share"], batch=batch), "moe_share", "{:.1%}", better=None)
    if results["device"] and not str(results["device"]).startswith("cpu"):
        for batch in settings["profile_batches"]:
            add(f"MoE share of decode host time B={batch}", _find(bf16["moe_share"], batch=batch),
                _find(mx["moe_share"], batch=batch), "host_moe_share", "{:.1%}", better=None)
    unit, scale = ("GiB", 2**30) if (bf16["expert_bytes"] or 0) >= 2**30 else ("MiB", 2**20)
    for label, key in ((f"expert weights {unit}", "expert_bytes"),
                       (f"peak allocated {unit} (any point)", "peak_bytes")):
        a, b = bf16.get(key), mx.get(key)
        if a is not None or b is not None:
            add(label, {"status": "ok", "v": None if a is None else a / scale},
                {"status": "ok", "v": None if b is None else b / scale}, "v", "{:.2f}",
                better="lower")
    memory = results.get("memory") or {}
    if memory.get("run_peak_raw_bytes") is not None:
        lines.append(f"peak allocated over the whole run (both configurations' blocks held): "
                     f"{memory['run_peak_raw_bytes'] / 2**30:.2f} GiB")
    lines.append(f"greedy tokens, mxmoe against transformers: {check_text(results.get('check'))}")
    if "diagnosis" in results:
        lines.append(f"divergence diagnosis: {diagnosis_text(results.get('diagnosis'))}")
        lines += ["  " + line for line in diagnosis_lines(results.get("diagnosis"))]
    if results.get("interrupted"):
        lines.append(f"interrupted: {results['interrupted']}")
    lines.append(f"{TRITON_KERNELS}: {results[TRITON_KERNELS]['error']}")
    for name, kind, r in all_rows(results):
        if r["status"] == "ok":
            continue
        where = ", ".join(f"{k}={r[k]}" for k in ("batch", "mode", "prompt_tokens") if k in r)
        lines.append(f"  {r['status']}: {name} {kind} {where}: {str(r.get('error'))[:400]}")
    return "\n".join(lines)

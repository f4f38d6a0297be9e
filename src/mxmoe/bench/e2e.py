"""End to end: a whole gpt-oss model generating in transformers, bf16 experts against `use_mxmoe`.

`mxmoe bench --model-e2e` builds a gpt-oss from its config with random weights (no download),
on the device (a 21B-parameter model is never initialised on the host), and makes the experts
MXFP4-exact: each random bf16 expert weight is quantized with `quantize_mxfp4` and replaced by
its dequantized values, so `use_mxmoe` takes the same weights losslessly. It then measures, in
one process, for transformers with bf16 experts (its own fallback without FP4 kernels:
``experts_implementation`` as transformers chose it, ``grouped_mm`` where torch has it) and for
the same model patched with `use_mxmoe`:

- decode tokens/s at several batch sizes: greedy ``generate`` of ``new_tokens`` after a
  ``prompt_tokens`` prompt, timed as ``batch * (new - 1) / (t(new) - t(1))`` so that the prefill
  and the first token are left out; eagerly (dynamic cache) and with ``cache_implementation=
  "static"``, with which transformers compiles the decode step (``torch.compile``, its default
  ``CompileConfig``: inductor, ``reduce-overhead``, i.e. CUDA graphs) on a GPU; not on the CPU;
- prefill tokens/s: ``generate(max_new_tokens=1)`` of one long prompt (time to first token);
- the MoE blocks' share of decode time (`torch.profiler`): kernel time inside the blocks over
  all kernel time of the decode steps (host wall time on the CPU, where there are no kernels);
- memory: the bytes of the expert weights, the peak allocated during each measurement and over
  the whole run;
- greedy agreement: the patched model's tokens against the unpatched model's (`compare_greedy`),
  and the divergence diagnosis (`Session.diagnose`): every MoE block of both configurations fed
  the same hidden states (those the unpatched model's blocks received), their outputs compared
  per layer with each other and with a float32 evaluation of the same weights, the routing
  compared, and both models' logits on the same token sequence. It says whether a greedy
  divergence is bf16 rounding (errors ~1e-2 or below, alike in every layer, as far from float32
  as transformers' own bf16 path) or a semantic mismatch (a layer with an error near 1).

Both configurations share one model: `use_mxmoe` replaces the blocks, and the replaced bf16
blocks are kept aside (still on the device, "parked") so that the compiled bf16 run can come
last. Peak memory is reported without the parked blocks (``peak_bytes``; the raw figure and the
parked bytes are recorded beside it).

Order and time. The points run most important first: the eager timings of both configurations
(greedy, decode, prefill; the same order for each, the divergence diagnosis after mxmoe's), then
the compiled decode points, and last the MoE share of both (profiled): once torch.profiler has
run with CUDA activities, later eager launches in the process may carry its overhead (mxmoe's
batch-1 eager decode step measured 43-64 ms after the profiler and the diagnosis in this
harness, 27 ms in a fresh process, `scripts/e2e_host_profile_gpu.py`, H200 2026-12-04), so
nothing timed follows it; their time is kept back from the compiled points. A compile costs about a
minute and a half, so those are budgeted: each has an estimate (`static_estimate_s`: the
configuration's observed compile time, or `COMPILE_PRIOR_S` before any, plus its eager decode
time) and is skipped, with the reason, when it would not end before ``time_limit_s`` with room
left for the compiled points ranked above it (`static_priority`: batch 1 of both, then the
largest batch, then the others). A configuration runs its compiled points in that order, so
that the third batch size reuses the graph the second compiled with a dynamic batch. A point not
started before the limit is recorded as skipped; SIGTERM (the ``timeout`` of
``scripts/gpu_e2e.sh``) ends the run cleanly: the point under way and every point not run are
recorded as skipped with the reason. The JSON is rewritten after every point and names the point
under way (``in_progress``), so a run killed outright keeps what it measured.

gpt-oss-120b (``--e2e-config 120b``) runs mxmoe only: its experts in bf16 are ~230 GB, more
than one H200 holds, so the model is built with its experts on the meta device and each layer's
random experts are made, quantized through `use_mxmoe` and dropped one layer at a time.

OpenAI's triton_kernels through the same model is not run (`TRITON_KERNELS_REASON`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shlex
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from .e2e_report import (BF16, CONFIG_NAMES, EAGER, KINDS, MXMOE, STATIC, all_rows, check_text,
                         diagnosis_text, new_results, render_table, row_text)

#: Names of the profiler ranges this module opens (forward of the model, one MoE block).
RANGE_PREFIX = "mxmoe_e2e."
FORWARD_PREFILL = RANGE_PREFIX + "forward.prefill"
FORWARD_DECODE = RANGE_PREFIX + "forward.decode"
MOE_PREFILL = RANGE_PREFIX + "moe.prefill"
MOE_DECODE = RANGE_PREFIX + "moe.decode"

#: gpt-oss-20b and -120b as published (their config.json); the attention's rope, sinks and
#: sliding window are GptOssConfig's defaults, which are gpt-oss's. ``tiny``: the same
#: structure, small enough for the CPU test (2 layers, one sliding and one full attention).
_GPT_OSS_COMMON = dict(
    vocab_size=201088, hidden_size=2880, intermediate_size=2880, head_dim=64,
    num_attention_heads=64, num_key_value_heads=8, sliding_window=128,
    max_position_embeddings=131072, swiglu_limit=7.0, num_experts_per_tok=4,
)
MODEL_CONFIGS = {
    "20b": dict(num_hidden_layers=24, num_local_experts=32, **_GPT_OSS_COMMON),
    "120b": dict(num_hidden_layers=36, num_local_experts=128, **_GPT_OSS_COMMON),
    "tiny": dict(
        num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=256,
        hidden_size=64, intermediate_size=64, head_dim=16, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=8, max_position_embeddings=131072,
        swiglu_limit=7.0,
    ),
}
#: Configurations whose bf16 experts do not fit one 141 GB card: mxmoe only.
MXMOE_ONLY_CONFIGS = {
    "120b": "gpt-oss-120b's experts in bf16 are ~230 GB (36 layers x 128 experts x 24.9M "
            "weights x 2 bytes), more than one H200's 141 GB: only the mxmoe model is built",
}

TRITON_KERNELS_REASON = (
    "not run: transformers runs gpt-oss's MXFP4 experts through triton_kernels only in "
    "Mxfp4GptOssMLP, whose kernels it takes from the Hub (kernels.get_kernel('kernels-community/"
    "gpt-oss-triton-kernels'), impossible offline). Plugging a local triton_kernels tree in "
    "would mean assigning transformers' private module global (transformers.integrations.mxfp4."
    "triton_kernels_hub) and swizzling the weights with its private helpers, against a "
    "triton_kernels version transformers does not pin: not robust enough for an unattended "
    "one-call run. `mxmoe bench` compares triton_kernels per layer (mxmoe.bench.peers)")

#: Seconds a first compile of the decode step is assumed to take before one is observed
#: (the H200 run of 2026-12-02: 90 s for gpt-oss-20b with bf16 experts).
COMPILE_PRIOR_S = 100.0
#: A configuration's third batch size, after two compiled ones: dynamo has made the batch
#: dimension dynamic at the second, so the third records CUDA graphs rather than compiling anew
#: (an assumption until measured: the rows keep warmup_s to check it).
REUSED_GRAPH_FACTOR = 0.3
#: Seconds assumed for a compiled point's generate calls when no eager row tells.
RUN_PRIOR_S = 15.0
#: Decode steps of the compiled warm-up: the first compiles, the next ones record and replay
#: the CUDA graph; generate is then stopped (its static cache already has the timed size).
STATIC_WARMUP_STEPS = 3
#: A decode point repeats its timed pair of generate calls while the pairs so far took less
#: than this (on the H200: mxmoe's batch 1 three, bf16's batch 1 and 8 two, its batch 64 one).
DECODE_REPEAT_BUDGET_S = 8.0
#: Seconds kept for each profiled MoE-share point (2.9-5.7 s each on the H200 for 20b).
PROFILE_POINT_S = 7.0


@dataclass(frozen=True)
class Plan:
    """What one run measures. Every decode point runs one warm-up ``generate`` and timed
    ``generate`` calls of 1 and ``new_tokens`` tokens: up to ``decode_repeats`` pairs while
    they fit `DECODE_REPEAT_BUDGET_S` (a 128-step generate averages its steps, but the host of
    an eager step is shared and moved by up to a third between runs on the H200: the fastest
    of each is kept); a prefill point one warm-up and ``prefill_repeats`` timed runs (the
    fastest is kept)."""

    decode_batches: tuple[int, ...] = (1, 8, 64)
    prompt_tokens: int = 128
    new_tokens: int = 128
    prefill_tokens: tuple[int, ...] = (2048, 8192)
    prefill_repeats: int = 2
    decode_repeats: int = 3
    check_tokens: int = 32
    profile_batches: tuple[int, ...] = (1, 8, 64)
    profile_steps: int = 4
    static: bool = True
    diagnose: bool = True

    def validate(self) -> None:
        for name in ("decode_batches", "prefill_tokens", "profile_batches"):
            values = getattr(self, name)
            if any(v < 1 for v in values):
                raise ValueError(f"{name} must be >= 1, got {list(values)}")
        for name in ("prompt_tokens", "prefill_repeats", "decode_repeats", "check_tokens",
                     "profile_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.new_tokens < 2:
            raise ValueError(f"new_tokens must be >= 2 (decode time is t(new) - t(1)), got "
                             f"{self.new_tokens}")


#: The defaults (the issue's sizes), a quick run, and the CPU test's sizes.
PLANS = {
    "full": Plan(),
    "quick": Plan(decode_batches=(1, 64), new_tokens=64, prefill_tokens=(2048,),
                  prefill_repeats=1, profile_batches=(1,), profile_steps=4),
    "tiny": Plan(decode_batches=(1, 3), prompt_tokens=8, new_tokens=6, prefill_tokens=(16, 40),
                 prefill_repeats=1, profile_batches=(2,), profile_steps=3),
}


@dataclass
class Options:
    config: str = "tiny"
    plan: Plan = PLANS["tiny"]
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    backend: str = "auto"
    seed: int = 0
    time_limit_s: float | None = None
    json_path: Path | None = None
    #: Build and measure the mxmoe model only (no bf16 experts ever made whole).
    mxmoe_only: bool = False


class Interrupted(BaseException):
    """SIGTERM arrived (the outer ``timeout``): stop measuring, record the rest as skipped.
    A BaseException so that the per-point ``except Exception`` does not swallow it."""


# -- the schedule of the compiled points (pure functions, tested on their own) -----------------

def static_priority(batches: Iterable[int]) -> list[int]:
    """Batch sizes of the compiled decode points, most wanted first: the smallest (the latency
    point, where the host cost that CUDA graphs remove weighs most), the largest (throughput),
    then the others from large to small."""
    ordered = sorted(set(batches))
    if len(ordered) <= 2:
        return ordered
    return [ordered[0], ordered[-1], *reversed(ordered[1:-1])]


def static_estimate_s(done_static_rows: Sequence[dict], eager_row: dict | None) -> float:
    """Seconds one compiled decode point of a configuration is expected to take, from that
    configuration's compiled points so far (``done_static_rows``: their ``warmup_s``, compile
    included) and its eager decode row at the same batch (``t_one_s + t_all_s``: the timed
    generate calls, which the compiled ones should not exceed)."""
    warmups = [r["warmup_s"] for r in done_static_rows
               if r.get("status") == "ok" and r.get("warmup_s") is not None]
    compile_s = max(warmups) if warmups else COMPILE_PRIOR_S
    if len(warmups) >= 2:
        compile_s *= REUSED_GRAPH_FACTOR
    if eager_row and eager_row.get("status") == "ok" and eager_row.get("t_all_s") is not None:
        run_s = eager_row["t_one_s"] + eager_row["t_all_s"]
    else:
        run_s = RUN_PRIOR_S
    return compile_s + run_s


def budget_skip_reason(now: float, deadline: float | None, estimate_s: float,
                       reserved: Sequence[tuple[str, float]]) -> str | None:
    """Why a point estimated at ``estimate_s`` must not start at ``now`` (None: it may), given
    the ``(name, estimate)`` of the points ranked above it still to run."""
    if deadline is None:
        return None
    left = deadline - now
    reserved_s = sum(s for _, s in reserved)
    if estimate_s + reserved_s <= left:
        return None
    above = (f", with {reserved_s:.0f} s kept for the points ranked above it "
             f"({', '.join(name for name, _ in reserved)})" if reserved else "")
    return (f"time budget: estimated {estimate_s:.0f} s, {max(left, 0.0):.0f} s left before "
            f"the time limit{above}")


# -- checks and accounting (pure functions, tested on their own) ---------------------------------

def compare_greedy(reference: Sequence[int], candidate: Sequence[int], n: int) -> dict:
    """Whether ``candidate`` repeats the first ``n`` tokens of ``reference``.

    Returns ``n``, ``compared`` (how many positions both have, at most n), ``equal`` (True only
    when both have n tokens and they agree) and ``first_divergence`` (the first position < n
    where they differ, or where the shorter one ends; None when equal).
    """
    if n < 1:
        raise ValueError(f"compare_greedy: n must be >= 1, got {n}")
    reference, candidate = [int(t) for t in reference[:n]], [int(t) for t in candidate[:n]]
    compared = min(len(reference), len(candidate))
    first = next((i for i in range(compared) if reference[i] != candidate[i]), None)
    if first is None and compared < n:
        first = compared
    return {"n": n, "compared": compared, "equal": first is None, "first_divergence": first}


def logit_margins(step_logits: Iterable[torch.Tensor]) -> list[float]:
    """Top-1 minus top-2 logit of row 0 at each step: how close greedy was to another token
    (a divergence where the margin is ~bf16 rounding is a near tie, not a wrong kernel)."""
    margins = []
    for logits in step_logits:
        top = torch.topk(logits[0].float(), 2).values
        margins.append(float(top[0] - top[1]))
    return margins


def _is_host_event(event) -> bool:
    from torch.autograd import DeviceType

    return event.device_type == DeviceType.CPU and not getattr(event, "is_async", False)


def _kernel_us(event) -> float:
    """Device time of the kernels launched by ``event`` itself (not its children); a device-side
    copy of one of our own ranges (a GPU user annotation) is not a kernel."""
    return sum(k.duration for k in event.kernels if not str(k.name).startswith(RANGE_PREFIX))


def _device_us_inside(event) -> float:
    return _kernel_us(event) + sum(_device_us_inside(c) for c in event.cpu_children)


def moe_share_from_events(events, *, device_kernels: bool) -> dict:
    """The MoE blocks' share of decode time from `torch.profiler` events of a profiled
    ``generate`` that ran under `_profile_ranges`.

    ``device_kernels=True``: MoE kernel time inside the decode steps' MoE ranges over all kernel
    time of the profile less the prefill forward's (kernels between the forwards, such as
    generate's argmax, count as decode). ``False`` (no device): host wall time of the decode
    steps' MoE ranges over that of the decode forwards.
    """
    host = [e for e in events if _is_host_event(e)]

    def total_of(name: str) -> float:
        spans = [e for e in host if e.name == name]
        if device_kernels:
            return sum(_device_us_inside(e) for e in spans)
        return sum(e.cpu_time_total for e in spans)

    moe_us = total_of(MOE_DECODE)
    host_moe_us = sum(e.cpu_time_total for e in host if e.name == MOE_DECODE)
    host_total_us = sum(e.cpu_time_total for e in host if e.name == FORWARD_DECODE)
    if device_kernels:
        all_us = sum(_kernel_us(e) for e in host)
        total_us = all_us - total_of(FORWARD_PREFILL)
        basis = ("device kernel time: the MoE blocks' kernels in the decode steps over all "
                 "kernels of the decode steps (the prefill forward's left out)")
    else:
        total_us = total_of(FORWARD_DECODE)
        basis = "host wall time: the MoE blocks over the whole decode forwards (no device)"
    return {
        "moe_s": moe_us / 1e6,
        "total_s": total_us / 1e6,
        "moe_share": moe_us / total_us if total_us > 0 else None,
        "decode_forwards": sum(1 for e in host if e.name == FORWARD_DECODE),
        "basis": basis,
        # Host wall time as well: an eager decode step that the host paces (its kernels
        # shorter than their launches) is slowed by the MoE's host cost, not its kernels.
        "host_moe_s": host_moe_us / 1e6,
        "host_total_s": host_total_us / 1e6,
        "host_moe_share": host_moe_us / host_total_us if host_total_us > 0 else None,
    }


def decode_rate(batch: int, new_tokens: int, t_one: float, t_all: float) -> dict:
    """Decode figures from the times of ``generate`` with 1 and ``new_tokens`` new tokens: the
    difference is ``new_tokens - 1`` decode steps of ``batch`` tokens each."""
    steps = new_tokens - 1
    decode_s = t_all - t_one
    ok = decode_s > 0
    return {
        "decode_s": decode_s,
        "ms_per_step": decode_s / steps * 1e3 if ok else None,
        "tokens_per_s": batch * steps / decode_s if ok else None,
        "generate_tokens_per_s": batch * new_tokens / t_all if t_all > 0 else None,
    }


# -- the divergence diagnosis's arithmetic (pure functions, tested on their own) --------------

#: A layer whose mean per-token relative error passes this disagrees in meaning (a wrong
#: activation constant, bias, routing rule or weight layout gives ~1), not in rounding.
SEMANTIC_REL_ERR = 0.3
#: bf16 keeps 8 significant bits: one rounding is ~4e-3; a block's chain of them stays ~1e-2.
ROUNDING_REL_ERR = 0.05


def token_rel_errors(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    """Per-token relative error ``|c - r| / |r|`` (norms over the hidden size) of two
    ``[..., H]`` tensors: its max and mean, and the whole tensors' max-abs error over max-abs
    value."""
    r = reference.reshape(-1, reference.shape[-1]).float()
    c = candidate.reshape(-1, candidate.shape[-1]).float()
    per_token = (c - r).norm(dim=-1) / r.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    return {
        "rel_err_max": float(per_token.max()),
        "rel_err_mean": float(per_token.mean()),
        "max_abs_err_over_max_abs": float((c - r).abs().max() / r.abs().max().clamp_min(
            torch.finfo(torch.float32).tiny)),
    }


def routing_agreement(reference_ids: torch.Tensor, candidate_ids: torch.Tensor) -> float:
    """Fraction of tokens (rows of ``[M, k]`` expert ids) routed to the same set of experts."""
    a = torch.sort(reference_ids.reshape(-1, reference_ids.shape[-1]).long(), dim=-1).values
    b = torch.sort(candidate_ids.reshape(-1, candidate_ids.shape[-1]).long(), dim=-1).values
    return float((a == b).all(dim=-1).float().mean())


def logits_comparison(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    """Two models' logits ``[S, V]`` at the same positions: how far apart, whether their top-1
    agree, and the reference's top-1 margin where they do not."""
    r, c = reference.float(), candidate.float()
    top_r = torch.topk(r, 2, dim=-1)
    top_c = torch.topk(c, 2, dim=-1)
    margin_r = top_r.values[:, 0] - top_r.values[:, 1]
    agree = top_r.indices[:, 0] == top_c.indices[:, 0]
    differ = (~agree).nonzero().flatten().tolist()
    first_ref = int(top_r.indices[0, 0])
    return {
        "positions": r.shape[0],
        "max_abs_diff": float((c - r).abs().max()),
        "mean_abs_diff": float((c - r).abs().mean()),
        "reference_logit_std": float(r.std()),
        "top1_agreement": float(agree.float().mean()),
        "differing_positions": differ,
        "reference_margin_at_differing": [round(float(margin_r[i]), 5) for i in differ],
        "reference_margin_median": float(margin_r.median()),
        "first": {
            "reference_top1": first_ref,
            "candidate_top1": int(top_c.indices[0, 0]),
            "reference_margin": float(margin_r[0]),
            "candidate_margin": float(top_c.values[0, 0] - top_c.values[0, 1]),
            # How far below its own top-1 the candidate puts the reference's choice.
            "candidate_gap_to_reference_top1": float(top_c.values[0, 0] - c[0, first_ref]),
        },
    }


def diagnosis_verdict(layers: Sequence[dict]) -> dict:
    """Rounding or meaning, from the per-layer rows of `Session.diagnose`."""
    if not layers:
        return {"kind": "unknown", "text": "no layers compared"}
    worst = max(layers, key=lambda r: r["rel_err_mean"])
    semantic = [r["layer"] for r in layers if r["rel_err_mean"] > SEMANTIC_REL_ERR]
    if semantic:
        return {"kind": "semantic", "layers": semantic,
                "text": f"layers {semantic} disagree in meaning (mean per-token relative "
                        f"error > {SEMANTIC_REL_ERR}; worst {worst['rel_err_mean']:.3g} at "
                        f"layer {worst['layer']}): not rounding"}
    if worst["rel_err_mean"] <= ROUNDING_REL_ERR:
        closer = [r for r in layers if r.get("candidate_vs_fp32_rel_err_mean") is not None]
        as_close = (all(r["candidate_vs_fp32_rel_err_mean"]
                        <= 2 * r["reference_vs_fp32_rel_err_mean"] + 1e-6 for r in closer)
                    if closer else None)
        tail = ("" if as_close is None else
                "; mxmoe is as close to float32 as transformers' bf16 path in every layer"
                if as_close else
                "; but mxmoe is further from float32 than transformers' bf16 path somewhere")
        return {"kind": "rounding", "as_close_to_fp32": as_close,
                "text": f"every layer within rounding (worst mean per-token relative error "
                        f"{worst['rel_err_mean']:.3g} at layer {worst['layer']}){tail}"}
    return {"kind": "unclear",
            "text": f"worst mean per-token relative error {worst['rel_err_mean']:.3g} at "
                    f"layer {worst['layer']}: above bf16 rounding, below a semantic mismatch"}


def _gpt_oss_gate(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's clamped swiglu on interleaved gate/up columns, for a transformers whose
    experts have no ``_apply_gate`` of their own (it computes this inside ``forward``)."""
    gate = gate_up[..., ::2].clamp(max=limit)
    up = gate_up[..., 1::2].clamp(min=-limit, max=limit)
    return (up + 1) * gate * torch.sigmoid(gate * alpha)


@torch.no_grad()
def moe_fp32_reference(block, hidden: torch.Tensor) -> torch.Tensor:
    """A transformers gpt-oss MoE block (`GptOssMLP`) evaluated in float32 from its own
    weights: its router (Linear with bias, top-k, softmax over the k logits) and its experts'
    own gate function (``_apply_gate``: interleaved gate/up, clamps, alpha, the ``up + 1``)."""
    router, experts = block.router, block.experts
    x = hidden.reshape(-1, hidden.shape[-1]).float()
    logits = torch.nn.functional.linear(x, router.weight.float(), router.bias.float())
    top_values, top_ids = torch.topk(logits, router.top_k, dim=-1)
    weights = torch.softmax(top_values, dim=-1)
    gate = getattr(experts, "_apply_gate", None) or (
        lambda gate_up: _gpt_oss_gate(gate_up, experts.alpha, experts.limit))
    out = torch.zeros_like(x)
    for e in top_ids.unique().tolist():
        rows, slot = torch.where(top_ids == e)
        gate_up = x[rows] @ experts.gate_up_proj[e].float() + experts.gate_up_proj_bias[e].float()
        y = (gate(gate_up) @ experts.down_proj[e].float()
             + experts.down_proj_bias[e].float())
        out.index_add_(0, rows, y * weights[rows, slot, None])
    return out.reshape(hidden.shape)


# -- the model ----------------------------------------------------------------------------------

def _transformers():
    try:
        import transformers
        from transformers import GptOssConfig, GptOssForCausalLM
    except ImportError as exc:
        raise SystemExit(f"mxmoe bench --model-e2e needs transformers with gpt-oss: "
                         f"{exc}") from None
    return transformers, GptOssConfig, GptOssForCausalLM


def _finish_model(model) -> None:
    model.eval().requires_grad_(False)
    # Random weights never say end-of-sequence by design: generate exactly the tokens asked for.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0


def build_model(config: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A gpt-oss ``config`` (a key of `MODEL_CONFIGS`) with random weights made on ``device``,
    in ``dtype``, its experts MXFP4-exact, in eval mode without gradients."""
    transformers, GptOssConfig, GptOssForCausalLM = _transformers()
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    with torch.device(device):
        model = GptOssForCausalLM._from_config(GptOssConfig(**MODEL_CONFIGS[config]), dtype=dtype)
    _finish_model(model)
    make_experts_mxfp4_exact(model)
    return model


@contextlib.contextmanager
def _experts_on_meta():
    """While open, transformers' `GptOssExperts` are constructed on the meta device (no
    memory), whatever device the rest of the model is made on."""
    from transformers.models.gpt_oss import modeling_gpt_oss

    experts_class = modeling_gpt_oss.GptOssExperts
    original_init = experts_class.__init__

    def init_on_meta(self, *args, **kwargs):
        with torch.device("meta"):  # the innermost device context decides
            original_init(self, *args, **kwargs)

    experts_class.__init__ = init_on_meta
    try:
        yield
    finally:
        experts_class.__init__ = original_init


@torch.no_grad()
def _materialize_random_experts(experts, device: torch.device, dtype: torch.dtype,
                                std: float) -> None:
    """Give meta-device `GptOssExperts` real random weights as transformers initialises them
    (normal(0, initializer_range) weights, zero biases). Not made MXFP4-exact: no bf16 model
    is compared with, and `use_mxmoe` quantizes them next."""
    for name in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"):
        shape = getattr(experts, name).shape
        value = torch.empty(shape, device=device, dtype=dtype)
        if name.endswith("_bias"):
            value.zero_()
        else:
            value.normal_(0.0, std)
        setattr(experts, name, torch.nn.Parameter(value, requires_grad=False))


def build_model_mxmoe_only(config: str, device: torch.device, dtype: torch.dtype, seed: int,
                           backend: str):
    """A gpt-oss ``config`` whose MoE blocks are `use_mxmoe`'s, without ever holding all of
    its bf16 experts: those are made on the meta device, then one layer at a time given random
    weights, shown alone to `use_mxmoe` (which skips the layers it patched
    already) and dropped with the block it replaced."""
    from ..integrations.transformers import use_mxmoe

    transformers, GptOssConfig, GptOssForCausalLM = _transformers()
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    gpt_oss_config = GptOssConfig(**MODEL_CONFIGS[config])
    with _experts_on_meta(), torch.device(device):
        model = GptOssForCausalLM._from_config(gpt_oss_config, dtype=dtype)
    _finish_model(model)
    layers = model.model.layers
    try:
        for i, layer in enumerate(layers):
            _materialize_random_experts(layer.mlp.experts, device, dtype,
                                        gpt_oss_config.initializer_range)
            model.model.layers = torch.nn.ModuleList(list(layers)[:i + 1])
            use_mxmoe(model, backend=backend)
    finally:
        model.model.layers = layers
    return model


@torch.no_grad()
def make_experts_mxfp4_exact(model) -> None:
    """Replace every bf16 expert weight by the dequantized MXFP4 of itself (quantized along the
    same axis as `use_mxmoe` does: the input dimension, in its ``[E, N, K]`` orientation), so
    that `use_mxmoe` requantizes it losslessly."""
    for layer in _decoder_layers(model):
        _make_mxfp4_exact(layer.mlp.experts)


@torch.no_grad()
def _make_mxfp4_exact(experts) -> None:
    from ..format import quantize_mxfp4

    for weight in (experts.gate_up_proj, experts.down_proj):  # [E, K, N] in transformers
        for e in range(weight.shape[0]):  # one expert at a time bounds the fp32 temporaries
            exact = quantize_mxfp4(weight[e].transpose(0, 1)).dequantize(weight.dtype)
            weight[e].copy_(exact.transpose(0, 1))


def _decoder_layers(model) -> list:
    return list(model.model.layers)


def moe_blocks(model) -> list:
    return [layer.mlp for layer in _decoder_layers(model)]


def _set_moe_blocks(model, blocks: Sequence) -> None:
    for layer, block in zip(_decoder_layers(model), blocks):
        layer.mlp = block


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def module_bytes(modules: Iterable[torch.nn.Module]) -> int:
    return tensor_bytes(t for m in modules for t in (*m.parameters(), *m.buffers()))


def expert_bytes(blocks: Iterable[torch.nn.Module]) -> int:
    """Bytes of the expert weights and biases of MoE ``blocks`` (their routers left out)."""
    return sum(module_bytes([b]) - module_bytes([b.router]) for b in blocks)


# -- measuring ---------------------------------------------------------------------------------

class _Clock:
    """Wall time with the device drained before each reading."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable) -> tuple[float, object]:
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - start, out


@contextlib.contextmanager
def _peak_memory(device: torch.device, parked_bytes: int, row: dict):
    """Record into ``row`` the peak allocated bytes of the block, raw and without the parked
    blocks (None on the CPU)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield
    finally:
        if cuda:
            torch.cuda.synchronize(device)
            raw = torch.cuda.max_memory_allocated(device)
            row.update(peak_bytes=raw - parked_bytes, peak_raw_bytes=raw,
                       parked_bytes=parked_bytes)
        else:
            row.update(peak_bytes=None, peak_raw_bytes=None, parked_bytes=parked_bytes)


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 4000 else text[:2000] + " ... " + text[-2000:]


def _stopping_after(tokens: int):
    """Generate's stopping criteria for the compiled warm-up: stop once ``tokens`` new tokens
    are made. ``max_new_tokens`` stays the timed one, so the static cache (sized by it) and
    the compiled step have the timed shapes, while only a few steps run."""
    from transformers.generation import StoppingCriteria, StoppingCriteriaList

    class StopAfterTokens(StoppingCriteria):
        def __init__(self):
            self.calls = 0

        def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
            self.calls += 1  # once per new token
            return torch.full((input_ids.shape[0],), self.calls >= tokens, dtype=torch.bool,
                              device=input_ids.device)

    return StoppingCriteriaList([StopAfterTokens()])


def _row_key(kind: str, row: dict) -> tuple:
    return (kind, row.get("batch"), row.get("mode"),
            row.get("prompt_tokens") if kind == "prefill" else None)


class Session:
    """One run: the model, its sets of MoE blocks, the results and the deadlines."""

    def __init__(self, options: Options, environment: dict, log: Callable[[str], None]):
        self.options = options
        self.plan = options.plan
        self.device = options.device
        self.log = log
        self.clock = _Clock(options.device)
        self.start = time.perf_counter()
        self.deadline = (None if options.time_limit_s is None
                         else self.start + options.time_limit_s)
        self.results = _new_results(options, environment)
        self.model = None
        self.blocks: dict[str, list] = {}
        self.active: str | None = None
        self.configs = (MXMOE,) if options.mxmoe_only else CONFIG_NAMES
        self.prompt_ids = self._prompts(max((*self.plan.decode_batches,
                                             *self.plan.profile_batches)),
                                        self.plan.prompt_tokens, seed=1)
        self.results["planned"] = self.planned_points()

    # -- bookkeeping --

    def _prompts(self, batch: int, length: int, seed: int) -> torch.Tensor:
        vocab = MODEL_CONFIGS[self.options.config]["vocab_size"]
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab, (batch, length), generator=gen).to(self.device)

    def planned_points(self) -> list[dict]:
        """Every point this run means to measure, in the order they run."""
        plan = self.plan
        points = []
        for name in self.configs:
            points.append({"config": name, "kind": "greedy", "batch": 1, "mode": EAGER})
            points += [{"config": name, "kind": "decode", "batch": b, "mode": EAGER}
                       for b in plan.decode_batches]
            points += [{"config": name, "kind": "prefill", "batch": 1, "prompt_tokens": n}
                       for n in plan.prefill_tokens]
        if plan.static:
            points += [{"config": name, "kind": "decode", "batch": b, "mode": STATIC}
                       for name in (MXMOE, BF16) if name in self.configs
                       for b in static_priority(plan.decode_batches)]
        points += [{"config": name, "kind": "moe_share", "batch": b, "mode": EAGER}
                   for name in self.configs for b in plan.profile_batches]
        return points

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def save(self) -> None:
        self.results["elapsed_s"] = round(self.elapsed(), 2)
        if self.options.json_path is not None:
            from .report import write_json

            write_json(self.results, self.options.json_path)

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        self.log(f"[{self.elapsed():6.1f} s] {name} ...")
        try:
            yield
        finally:
            self.results["phases"][name] = round(time.perf_counter() - start, 2)
            self.save()

    def parked_bytes(self) -> int:
        """Bytes of the blocks on the device that the active configuration does not use."""
        if self.device.type != "cuda":
            return 0
        return sum(module_bytes(b) for name, b in self.blocks.items() if name != self.active)

    def activate(self, name: str) -> None:
        if self.active != name:
            _set_moe_blocks(self.model, self.blocks[name])
            self.active = name
            _forget_compiled(self.model)

    def point(self, kind: str, row: dict, measure: Callable[[dict], None],
              deadline: float | None = None, skip_reason: str | None = None) -> dict:
        """Run ``measure(row)`` for the active configuration, recording a skip (past the
        deadline, or for ``skip_reason``) and the error of a failure; append the row and
        save."""
        config = self.results["configs"][self.active]
        row = {"status": "ok", **row}
        deadline = self.deadline if deadline is None else deadline
        if skip_reason is not None:
            row.update(status="skipped", error=skip_reason)
        elif deadline is not None and time.perf_counter() > deadline:
            row.update(status="skipped", error="time limit reached before this point")
        else:
            self.results["in_progress"] = {"config": self.active, "kind": kind, **row,
                                           "started_at_s": round(self.elapsed(), 2)}
            self.save()
            started = time.perf_counter()
            try:
                with _peak_memory(self.device, self.parked_bytes(), row):
                    measure(row)
            except Interrupted as exc:
                row.update(status="skipped", error=f"interrupted during this point ({exc})")
                config[kind].append(row)
                raise
            except Exception as exc:  # recorded, and the run goes on with the next point
                row.update(status="error", error=_error_text(exc))
                _recover(self.model, self.device)
            finally:
                row["point_s"] = round(time.perf_counter() - started, 2)
                self.results["in_progress"] = None
        config[kind].append(row)
        self.log(f"  {self.active} {kind}: " + row_text(row))
        self.save()
        return row

    # -- generate --

    def generate(self, input_ids: torch.Tensor, new_tokens: int, cache: str | None = None,
                 **kwargs):
        extra = {"cache_implementation": cache} if cache else {}
        return self.model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens, do_sample=False, **extra, **kwargs,
        )

    # -- measurements of the active configuration --

    def greedy(self) -> None:
        n = self.plan.check_tokens
        ids = self.prompt_ids[:1]

        def measure(row: dict) -> None:
            with torch.no_grad():
                out = self.generate(ids, n, output_logits=True, return_dict_in_generate=True)
            row["tokens"] = out.sequences[0, ids.shape[1]:].tolist()
            row["logit_margins"] = [round(m, 5) for m in logit_margins(out.logits)]

        self.point("greedy", {"batch": 1, "new_tokens": n, "mode": EAGER}, measure)

    def decode(self, batch: int, mode: str, deadline: float | None = None,
               skip_reason: str | None = None, extra: dict | None = None) -> dict:
        ids = self.prompt_ids[:batch]
        n = self.plan.new_tokens
        cache = STATIC if mode == STATIC else None

        def measure(row: dict) -> None:
            with torch.no_grad():
                if mode == STATIC:
                    # Sized for n new tokens (the timed shapes, compiled now), stopped early.
                    row["warmup_s"], _ = self.clock.time(lambda: self.generate(
                        ids, n, cache, stopping_criteria=_stopping_after(STATIC_WARMUP_STEPS)))
                    row["warmup_steps"] = STATIC_WARMUP_STEPS
                else:
                    row["warmup_s"], _ = self.clock.time(lambda: self.generate(ids, 2, cache))
                ones, alls = [], []
                while len(alls) < self.plan.decode_repeats and (
                        not alls or sum(ones) + sum(alls) < DECODE_REPEAT_BUDGET_S):
                    ones.append(self.clock.time(lambda: self.generate(ids, 1, cache))[0])
                    t, out = self.clock.time(lambda: self.generate(ids, n, cache))
                    alls.append(t)
                    if out.shape[1] != ids.shape[1] + n:
                        raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} "
                                           f"new tokens, expected {n}")
            t_one, t_all = min(ones), min(alls)
            row.update(t_one_s=t_one, t_all_s=t_all, t_one_runs_s=ones, t_all_runs_s=alls,
                       **decode_rate(batch, n, t_one, t_all),
                       compiled=hasattr(self.model, "_compiled_call"))

        return self.point("decode", {"batch": batch, "mode": mode, "prompt_tokens":
                                     ids.shape[1], "new_tokens": n, **(extra or {})},
                          measure, deadline, skip_reason)

    def prefill(self, length: int) -> dict:
        ids = self._prompts(1, length, seed=2)

        def measure(row: dict) -> None:
            with torch.no_grad():
                self.generate(ids, 1)
                times = [self.clock.time(lambda: self.generate(ids, 1))[0]
                         for _ in range(self.plan.prefill_repeats)]
            best = min(times)
            row.update(times_s=times, s=best, tokens_per_s=length / best,
                       median_s=statistics.median(times))

        return self.point("prefill", {"batch": 1, "prompt_tokens": length}, measure)

    def moe_share(self, batch: int) -> dict:
        ids = self.prompt_ids[:batch]
        steps = self.plan.profile_steps
        cuda = self.device.type == "cuda"

        def measure(row: dict) -> None:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with torch.no_grad():
                self.generate(ids, 2)  # warm
                with _profile_ranges(self.model, self.blocks[self.active]):
                    with profile(activities=activities) as prof:
                        self.generate(ids, steps + 1)
                        self.clock.sync()
            row.update(moe_share_from_events(prof.events(), device_kernels=cuda))
            if row["decode_forwards"] != steps:
                raise RuntimeError(f"the profile holds {row['decode_forwards']} decode "
                                   f"forwards, expected {steps}")

        return self.point("moe_share", {"batch": batch, "decode_steps": steps, "mode": EAGER},
                          measure)

    def eager_measurements(self) -> None:
        """The eager timings of the active configuration (no profiler has run before them:
        `profile_measurements` comes last)."""
        for batch in self.plan.decode_batches:
            self.decode(batch, EAGER)
        for length in self.plan.prefill_tokens:
            self.prefill(length)

    def profile_measurements(self) -> None:
        """The MoE share of decode (torch.profiler) of every configuration, after every timing
        of the run: a profiler with CUDA activities may leave per-launch host overhead behind
        in the process, so nothing timed follows it. Time for these points is kept back from
        the compiled points (`profile_reserve_s`)."""
        with self.phase("MoE share of decode (profiler, after every timing)"):
            for name in self.configs:
                self.activate(name)
                for batch in self.plan.profile_batches:
                    self.moe_share(batch)

    def profile_reserve_s(self) -> float:
        """Seconds kept at the end of the run for `profile_measurements`."""
        return PROFILE_POINT_S * len(self.plan.profile_batches) * len(self.configs)

    def static_measurements(self) -> None:
        """The compiled decode points, each configuration in `static_priority` order, each point
        started only if its estimate fits with the higher-ranked points still to come."""
        batches = static_priority(self.plan.decode_batches)
        names = [n for n in (MXMOE, BF16) if n in self.configs]
        ranking = [(name, b) for b in batches for name in names]
        pending = set(ranking)
        failed: dict[str, int] = {}
        for name in names:
            for batch in batches:
                pending.discard((name, batch))
                if name in failed:
                    # A failed compile costs minutes and fails again at the next batch size.
                    self._append_skipped(name, "decode", {"batch": batch, "mode": STATIC},
                                         f"not tried: the static-cache decode failed at batch "
                                         f"{failed[name]}")
                    continue
                estimate = self._static_estimate(name, batch)
                above = ranking[:ranking.index((name, batch))]
                reserved = [(f"{n} B={b}", self._static_estimate(n, b))
                            for n, b in above if (n, b) in pending]
                deadline = (None if self.deadline is None
                            else self.deadline - self.profile_reserve_s())
                reason = budget_skip_reason(time.perf_counter(), deadline, estimate, reserved)
                if reason is None:
                    with self.phase(f"{name} static cache B={batch}"):
                        self.activate(name)
                        row = self.decode(batch, STATIC, extra={"estimate_s": round(estimate, 1)})
                else:
                    row = self._append_skipped(name, "decode", {
                        "batch": batch, "mode": STATIC, "estimate_s": round(estimate, 1)}, reason)
                if row["status"] == "error":
                    failed[name] = batch

    def _static_estimate(self, name: str, batch: int) -> float:
        rows = self.results["configs"][name]["decode"]
        done = [r for r in rows if r.get("mode") == STATIC]
        eager = next((r for r in rows if r.get("mode") == EAGER and r.get("batch") == batch),
                     None)
        return static_estimate_s(done, eager)

    def _append_skipped(self, name: str, kind: str, row: dict, reason: str) -> dict:
        row = {"status": "skipped", **row, "error": reason}
        self.results["configs"][name][kind].append(row)
        self.log(f"  {name} {kind}: " + row_text(row))
        self.save()
        return row

    # -- the divergence diagnosis --

    def _capture(self, name: str, ids: torch.Tensor) -> dict:
        """One eager forward of ``ids`` with configuration ``name``: every MoE block's input
        and output, every decoder layer's output, the logits."""
        self.activate(name)
        moe_in, moe_out, layer_out = {}, {}, {}

        def first(value):
            return value[0] if isinstance(value, (tuple, list)) else value

        def keep_block(i):
            def hook(_module, args, out):
                moe_in[i], moe_out[i] = args[0].detach(), first(out).detach()
            return hook

        def keep_layer(i):
            def hook(_module, _args, out):
                layer_out[i] = first(out).detach()
            return hook

        handles = []
        for i, layer in enumerate(_decoder_layers(self.model)):
            handles += [layer.mlp.register_forward_hook(keep_block(i)),
                        layer.register_forward_hook(keep_layer(i))]
        try:
            with torch.no_grad():
                logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        finally:
            for handle in handles:
                handle.remove()
        return {"moe_in": moe_in, "moe_out": moe_out, "layer_out": layer_out,
                "logits": logits[0].detach()}

    def diagnose(self) -> None:
        """Where the patched and unpatched models part: each MoE block of both fed the same
        hidden states, and both models' logits on one token sequence (the prompt and the
        unpatched model's greedy tokens, teacher-forced)."""
        from ..router import route

        diagnosis = {"status": "ok"}
        self.results["diagnosis"] = diagnosis
        if self.deadline is not None and time.perf_counter() > self.deadline:
            diagnosis.update(status="skipped", error="time limit reached before this point")
            return
        greedy = self.results["configs"][BF16]["greedy"]
        tokens = greedy[-1]["tokens"] if greedy and greedy[-1]["status"] == "ok" else []
        prompt = self.prompt_ids[:1]
        ids = torch.cat([prompt, torch.tensor([tokens], dtype=prompt.dtype,
                                              device=prompt.device)], dim=1) if tokens else prompt
        positions = slice(prompt.shape[1] - 1, ids.shape[1] - 1 if tokens else None)
        diagnosis.update(sequence_tokens=ids.shape[1], prompt_tokens=prompt.shape[1],
                         teacher_forced_tokens=len(tokens), inputs=(
                             "each layer's MoE input captured in the unpatched model's forward "
                             "of the sequence; every block fed that same input"))
        active = self.active
        try:
            with torch.no_grad():
                reference = self._capture(BF16, ids)
                candidate = self._capture(MXMOE, ids)
                layers = []
                for i, (ref_block, mx_block) in enumerate(zip(self.blocks[BF16],
                                                              self.blocks[MXMOE])):
                    x, y_ref = reference["moe_in"][i], reference["moe_out"][i]
                    y_mx = mx_block(x)[0]
                    y_fp32 = moe_fp32_reference(ref_block, x)
                    flat = x.reshape(-1, x.shape[-1])
                    # The unpatched router's choice, as GptOssTopKRouter makes it.
                    ref_ids = torch.topk(torch.nn.functional.linear(
                        flat, ref_block.router.weight, ref_block.router.bias),
                        ref_block.router.top_k, dim=-1).indices
                    mx_ids = route(mx_block.router(flat.to(mx_block.router.weight.dtype)),
                                   mx_block.top_k, renormalize=mx_block.renormalize)[1]
                    one = mx_block(x[:, -1:])[0]  # one token: the decode kernels
                    row = {"layer": i, **token_rel_errors(y_ref, y_mx),
                           "reference_vs_fp32_rel_err_mean":
                               token_rel_errors(y_fp32, y_ref)["rel_err_mean"],
                           "candidate_vs_fp32_rel_err_mean":
                               token_rel_errors(y_fp32, y_mx)["rel_err_mean"],
                           "decode_token_rel_err": token_rel_errors(y_ref[:, -1:], one)[
                               "rel_err_mean"],
                           "routing_agreement": routing_agreement(ref_ids, mx_ids),
                           "hidden_rel_diff_mean": token_rel_errors(
                               reference["layer_out"][i], candidate["layer_out"][i])[
                               "rel_err_mean"]}
                    layers.append({k: (float(f"{v:.4g}") if isinstance(v, float) else v)
                                   for k, v in row.items()})
                diagnosis["layers"] = layers
                diagnosis["logits"] = logits_comparison(reference["logits"][positions],
                                                        candidate["logits"][positions])
                diagnosis["verdict"] = diagnosis_verdict(layers)
        except Interrupted:
            diagnosis.update(status="skipped", error="interrupted during this point")
            raise
        except Exception as exc:
            diagnosis.update(status="error", error=_error_text(exc))
        finally:
            if active is not None:
                self.activate(active)
        self.log("  diagnosis: " + diagnosis_text(diagnosis))
        self.save()

    # -- the run --

    def run(self) -> dict:
        opts, plan = self.options, self.plan
        self.log(f"gpt-oss-{opts.config} e2e on {self.device} ({_dtype_name(opts.dtype)}); "
                 f"decode B={list(plan.decode_batches)} prompt {plan.prompt_tokens} + "
                 f"{plan.new_tokens} new; prefill {list(plan.prefill_tokens)}; time limit "
                 f"{opts.time_limit_s} s; configurations {list(self.configs)}")
        try:
            if opts.mxmoe_only:
                self._run_mxmoe_only()
            else:
                self._run_both()
            if plan.static:
                self.static_measurements()
            self.profile_measurements()
        except Interrupted as exc:
            self.results["interrupted"] = f"{exc} after {self.elapsed():.1f} s"
            self.log(f"interrupted: {exc}")
            self._finish(unrun=f"not run: the run was interrupted ({exc})")
            return self.results
        self._finish(unrun="not run: an earlier step failed")
        return self.results

    def _run_both(self) -> None:
        opts, plan = self.options, self.plan
        with self.phase("build"):
            self.model = build_model(opts.config, self.device, opts.dtype, opts.seed)
            self.blocks[BF16] = moe_blocks(self.model)
            self.active = BF16
            self.results["model"] = _model_facts(self.model, opts.config)
        self._describe(BF16, "transformers' gpt-oss with bf16 experts, experts_implementation "
                             f"{self.results['model']['experts_implementation']!r}")
        with self.phase(f"{BF16} eager"):
            self.greedy()
            self.eager_measurements()

        with self.phase("use_mxmoe"):
            from ..integrations.transformers import use_mxmoe

            t, _ = self.clock.time(lambda: use_mxmoe(self.model, backend=opts.backend))
            self.blocks[MXMOE] = moe_blocks(self.model)
            self.active = MXMOE
            self.results["use_mxmoe_s"] = round(t, 3)
        self._describe(MXMOE, f"the same model after use_mxmoe(model, backend={opts.backend!r})")
        # The same order of points as the bf16 configuration's (greedy, then the timings), the
        # diagnosis after them: nothing but the greedy run precedes either's timings.
        with self.phase(f"{MXMOE} eager"):
            self.greedy()
            self._check()
            self.eager_measurements()
            self._record_auto_choices()
        if plan.diagnose:
            with self.phase(f"{MXMOE} diagnosis"):
                self.diagnose()

    def _run_mxmoe_only(self) -> None:
        opts = self.options
        reason = MXMOE_ONLY_CONFIGS.get(opts.config, "mxmoe only, as asked (--e2e-mxmoe-only)")
        self.results["configs"][BF16]["description"] = f"not run: {reason}"
        self.results["notes"].append(f"mxmoe only: {reason}")
        with self.phase("build with use_mxmoe, layer by layer"):
            t, self.model = self.clock.time(lambda: build_model_mxmoe_only(
                opts.config, self.device, opts.dtype, opts.seed, opts.backend))
            self.blocks[MXMOE] = moe_blocks(self.model)
            self.active = MXMOE
            self.results["model"] = _model_facts(self.model, opts.config, mxmoe_only=True)
            self.results["use_mxmoe_s"] = round(t, 3)
        self._describe(MXMOE, f"gpt-oss-{opts.config} built layer by layer through "
                              f"use_mxmoe(model, backend={opts.backend!r})")
        self.results["check"] = {"status": "skipped", "error": "no bf16 reference (mxmoe only)"}
        self.results["diagnosis"] = {"status": "skipped",
                                     "error": "no bf16 reference (mxmoe only)"}
        with self.phase(f"{MXMOE} eager"):
            self.greedy()
            self.eager_measurements()
            self._record_auto_choices()

    def _record_auto_choices(self) -> None:
        """Which backends ``auto`` ran, from its per-size memo (information only)."""
        from ..backends import _AUTO_MEMO as memo

        self.results["configs"][MXMOE]["auto_backends"] = sorted(set(memo.values()))

    def _describe(self, name: str, description: str) -> None:
        config = self.results["configs"][name]
        config["description"] = description
        config["expert_bytes"] = expert_bytes(self.blocks[name])
        config["block_class"] = type(self.blocks[name][0]).__name__

    def _check(self) -> None:
        rows = {name: self.results["configs"][name]["greedy"] for name in CONFIG_NAMES}
        if not all(r and r[-1]["status"] == "ok" for r in rows.values()):
            self.results["check"] = {"status": "error", "error": "a greedy run failed"}
            return
        reference, candidate = (rows[name][-1] for name in CONFIG_NAMES)
        check = compare_greedy(reference["tokens"], candidate["tokens"], self.plan.check_tokens)
        first = check["first_divergence"]
        margins = reference["logit_margins"]
        check.update(status="ok", reference=BF16, candidate=MXMOE,
                     reference_margin_at_divergence=(margins[first] if first is not None
                                                     and first < len(margins) else None),
                     reference_min_margin=min(margins) if margins else None)
        self.results["check"] = check
        self.log("  greedy check: " + check_text(check))

    def _record_unrun(self, reason: str) -> None:
        """A skipped row, with ``reason``, for every planned point that has no row."""
        for point in self.results["planned"]:
            name, kind = point["config"], point["kind"]
            rows = self.results["configs"][name][kind]
            if not any(_row_key(kind, r) == _row_key(kind, point) for r in rows):
                params = {k: v for k, v in point.items() if k not in ("config", "kind")}
                rows.append({"status": "skipped", **params, "error": reason})

    def _finish(self, unrun: str) -> None:
        self._record_unrun(unrun)
        peaks_raw = []
        for name in CONFIG_NAMES:
            config = self.results["configs"][name]
            peaks = [r["peak_bytes"] for kind in KINDS
                     for r in config[kind] if r.get("peak_bytes") is not None]
            peaks_raw += [r["peak_raw_bytes"] for kind in KINDS
                          for r in config[kind] if r.get("peak_raw_bytes") is not None]
            config["peak_bytes"] = max(peaks) if peaks else None
        self.results["memory"] = {
            "run_peak_raw_bytes": max(peaks_raw) if peaks_raw else None,
            "basis": "the largest torch.cuda.max_memory_allocated of any point, parked blocks "
                     "of the other configuration included (None on the CPU)",
        }
        if self.device.type == "cuda":
            self.results["memory"]["reserved_peak_bytes"] = torch.cuda.max_memory_reserved(
                self.device)
        rows = [row for _, _, row in all_rows(self.results)]
        diagnosis = self.results.get("diagnosis") or {}
        diagnosed = (diagnosis.get("status") == "ok" or self.options.mxmoe_only
                     or not self.plan.diagnose)
        self.results["complete"] = (all(r["status"] == "ok" for r in rows) and diagnosed
                                    and "interrupted" not in self.results)
        self.results["errors"] = (sum(r["status"] == "error" for r in rows)
                                  + (diagnosis.get("status") == "error"))
        self.save()


def _forget_compiled(model) -> None:
    """Drop transformers' compiled forward (it was traced with the other blocks)."""
    for name in ("_compiled_call", "_last_compile_config"):
        if name in model.__dict__:
            delattr(model, name)
    torch._dynamo.reset()


def _recover(model, device: torch.device) -> None:
    """After a failed point: no half-built compiled forward, no cached blocks of memory."""
    with contextlib.suppress(Exception):
        _forget_compiled(model)
    if device.type == "cuda":
        with contextlib.suppress(Exception):
            torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _profile_ranges(model, blocks: Sequence[torch.nn.Module]):
    """Open a profiler range around each forward of ``model`` (`FORWARD_PREFILL` when it
    takes more than one token per sequence, else `FORWARD_DECODE`) and around each of the MoE
    ``blocks`` inside it (`MOE_PREFILL` / `MOE_DECODE`)."""
    from torch.profiler import record_function

    phase = ["prefill"]
    open_ranges: list = []

    def enter(name: str) -> None:
        r = record_function(name)
        r.__enter__()
        open_ranges.append(r)

    def leave(*_args) -> None:
        if open_ranges:
            open_ranges.pop().__exit__(None, None, None)

    def before_model(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        phase[0] = "decode" if ids is not None and ids.shape[-1] == 1 else "prefill"
        enter(FORWARD_DECODE if phase[0] == "decode" else FORWARD_PREFILL)

    def before_block(_module, _args):
        enter(MOE_DECODE if phase[0] == "decode" else MOE_PREFILL)

    handles = [model.register_forward_pre_hook(before_model, with_kwargs=True),
               model.register_forward_hook(leave)]
    for block in blocks:
        handles += [block.register_forward_pre_hook(before_block),
                    block.register_forward_hook(leave)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        while open_ranges:
            leave()


# -- results ------------------------------------------------------------------------------------

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _model_facts(model, config: str, mxmoe_only: bool = False) -> dict:
    c = model.config
    return {
        "name": f"gpt-oss-{config}",
        "config": MODEL_CONFIGS[config],
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": _dtype_name(model.dtype),
        "attn_implementation": getattr(c, "_attn_implementation", None),
        "experts_implementation": getattr(c, "_experts_implementation", None),
        "weights": ("random (seeded), experts made one layer at a time and quantized by "
                    "use_mxmoe (the parameter count leaves its MXFP4 buffers out)" if mxmoe_only
                    else "random (seeded), experts MXFP4-exact (quantize_mxfp4, dequantized)"),
    }


def _new_results(options: Options, environment: dict) -> dict:
    transformers, _, _ = _transformers()
    try:
        from transformers import CompileConfig

        compile_config = {k: str(v) for k, v in CompileConfig().to_dict().items()}
    except Exception as exc:  # only a description of transformers' default
        compile_config = {"unknown": _error_text(exc)}
    settings = {
        "config": options.config, "dtype": _dtype_name(options.dtype),
        "backend": options.backend, "seed": options.seed,
        "time_limit_s": options.time_limit_s, "mxmoe_only": options.mxmoe_only,
        **dataclasses.asdict(options.plan),
        "static_compile": (f"generate(cache_implementation='static'); transformers compiles "
                           f"the decode step on a GPU with {compile_config}"),
        "decode_timing": "batch * (new_tokens - 1) / (t(generate new_tokens) - t(generate "
                         "1)); one warm-up (eager: 2 new tokens; static: sized for new_tokens, "
                         f"stopped after {STATIC_WARMUP_STEPS}), one timed run of each",
        "prefill_timing": "generate(max_new_tokens=1) of one prompt, batch 1; one warm-up, "
                          "the fastest of prefill_repeats",
        "peak_memory": "torch.cuda.max_memory_allocated during each point, less the parked "
                       "blocks of the other configuration (peak_raw_bytes, parked_bytes)",
        "static_schedule": {
            "priority": static_priority(options.plan.decode_batches),
            "compile_prior_s": COMPILE_PRIOR_S, "reused_graph_factor": REUSED_GRAPH_FACTOR,
            "run_prior_s": RUN_PRIOR_S,
            "rule": "configurations in turn (mxmoe first), each in the priority order; a point "
                    "starts only if its estimate and those of the points ranked above it still "
                    "to run fit before the time limit",
        },
    }
    results = new_results(environment=environment, transformers_version=transformers.__version__,
                          command="mxmoe " + shlex.join(sys.argv[1:]), settings=settings,
                          backends=_backend_table(options.device))
    results["triton_kernels"]["error"] = TRITON_KERNELS_REASON
    return results


def _backend_table(device: torch.device) -> dict:
    try:
        from ..backends import backends

        return {name: {"usable": usable, "reason": reason}
                for name, (usable, reason) in backends(device).items()}
    except Exception as exc:  # the table is information; the run goes on without it
        return {"error": _error_text(exc)}


# -- the command --------------------------------------------------------------------------------

#: ``--time-limit`` on a GPU when none is given: the measuring of scripts/gpu_e2e.sh's one call.
DEFAULT_GPU_TIME_LIMIT_S = 360.0


def options_from_args(args, dtype: torch.dtype | None, out_dir: Path, device: str,
                      date: str | None) -> Options:
    """Options from `mxmoe bench` arguments (``--e2e-*``, ``--dtype``, ``--time-limit``,
    ``--tag``); raises SystemExit naming a bad one."""
    from .report import results_path

    cuda = torch.cuda.is_available()
    config = args.e2e_config or ("20b" if cuda else "tiny")
    if config != "tiny" and not cuda:
        raise SystemExit(f"mxmoe bench --model-e2e: --e2e-config {config} needs a GPU (its "
                         f"weights are made on the device); use --e2e-config tiny here")
    plan = PLANS["tiny" if config == "tiny" else "quick" if args.e2e_quick else "full"]
    overrides = {
        "decode_batches": tuple(args.e2e_batches) if args.e2e_batches else None,
        "profile_batches": tuple(args.e2e_batches) if args.e2e_batches else None,
        "prompt_tokens": args.e2e_prompt_tokens,
        "new_tokens": args.e2e_new_tokens,
        "prefill_tokens": tuple(args.e2e_prefill_tokens) if args.e2e_prefill_tokens else None,
        "static": False if args.e2e_no_compile else None,
        "diagnose": False if getattr(args, "e2e_no_diagnosis", False) else None,
    }
    plan = dataclasses.replace(plan, **{k: v for k, v in overrides.items() if v is not None})
    try:
        plan.validate()
    except ValueError as exc:
        raise SystemExit(f"mxmoe bench --model-e2e: {exc}") from None
    time_limit = (args.time_limit if args.time_limit is not None
                  else (DEFAULT_GPU_TIME_LIMIT_S if cuda else None))
    tag = "-".join(t for t in (f"e2e-{config}", args.tag) if t)
    return Options(
        config=config, plan=plan, device=torch.device("cuda" if cuda else "cpu"),
        dtype=dtype or (torch.bfloat16 if cuda else torch.float32),
        time_limit_s=time_limit, json_path=results_path(out_dir, device, date, tag),
        mxmoe_only=config in MXMOE_ONLY_CONFIGS or bool(getattr(args, "e2e_mxmoe_only", False)),
    )


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM raises `Interrupted` in the main thread while open (and only there: a handler
    can be set from the main thread only)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_from_args(args, environment: dict, dtype: torch.dtype | None, out_dir: Path) -> int:
    """`mxmoe bench --model-e2e`: run, write the JSON, print the table. 0 when no point
    failed (skips by the time limit or an interruption included), 1 otherwise."""

    def log(text: str) -> None:
        print(text, flush=True)

    options = options_from_args(args, dtype, out_dir, environment["device"],
                                environment.get("date"))
    log(f"results will be written to {options.json_path}")
    session = Session(options, environment, log)
    if options.device.type == "cpu":
        session.results["notes"].append(
            "no GPU: not performance numbers; the static cache runs uncompiled (transformers "
            "compiles only on accelerators); the MoE share is host wall time")
    threads = torch.get_num_threads()
    if options.device.type == "cpu":
        # Tiny shapes: intra-op threads only wait on each other (30x slower on 2 busy cores).
        torch.set_num_threads(1)
    try:
        with _sigterm_interrupts():
            results = session.run()
    finally:
        torch.set_num_threads(threads)
    log("")
    log(render_table(results))
    log(f"results: {options.json_path}")
    return 1 if results["errors"] else 0

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
- memory: the bytes of the expert weights, and the peak allocated during each measurement;
- greedy agreement: the patched model's tokens against the unpatched model's (`compare_greedy`).

Both configurations share one model: `use_mxmoe` replaces the blocks, and the replaced bf16
blocks are kept aside (still on the device, "parked") so that the compiled bf16 run can come
last. Peak memory is reported without the parked blocks (``peak_bytes``; the raw figure and the
parked bytes are recorded beside it). Eager measurements come first; the compiled ones share
what is left of ``time_limit_s`` equally between the two configurations (a point not started
before its deadline is recorded as skipped). The JSON is rewritten after every point, so a run
killed from outside keeps what it measured.

OpenAI's triton_kernels through the same model is not run: transformers plugs it in only
through its Hub ``kernels`` download, which an offline machine cannot make (the layer
benchmark compares it per layer, `mxmoe.bench.peers`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from .e2e_report import (BF16, CONFIG_NAMES, EAGER, MXMOE, STATIC, all_rows, check_text,
                         new_results, render_table, row_text)

#: Names of the profiler ranges this module opens (forward of the model, one MoE block).
RANGE_PREFIX = "mxmoe_e2e."
FORWARD_PREFILL = RANGE_PREFIX + "forward.prefill"
FORWARD_DECODE = RANGE_PREFIX + "forward.decode"
MOE_PREFILL = RANGE_PREFIX + "moe.prefill"
MOE_DECODE = RANGE_PREFIX + "moe.decode"

#: gpt-oss-20b as published (its config.json); the attention's rope, sinks and sliding window
#: are GptOssConfig's defaults, which are gpt-oss's. ``tiny``: the same structure, small enough
#: for the CPU test (2 layers, one sliding and one full attention).
MODEL_CONFIGS = {
    "20b": dict(
        num_hidden_layers=24, num_local_experts=32, num_experts_per_tok=4, vocab_size=201088,
        hidden_size=2880, intermediate_size=2880, head_dim=64, num_attention_heads=64,
        num_key_value_heads=8, sliding_window=128, max_position_embeddings=131072,
        swiglu_limit=7.0,
    ),
    "tiny": dict(
        num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=256,
        hidden_size=64, intermediate_size=64, head_dim=16, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=8, max_position_embeddings=131072,
        swiglu_limit=7.0,
    ),
}


@dataclass(frozen=True)
class Plan:
    """What one run measures. Every decode point runs one warm-up ``generate`` and one timed
    ``generate`` each of 1 and ``new_tokens`` tokens (one repetition: a 128-step generate
    averages its steps already); a prefill point one warm-up and ``prefill_repeats`` timed
    runs (the fastest is kept)."""

    decode_batches: tuple[int, ...] = (1, 8, 64)
    prompt_tokens: int = 128
    new_tokens: int = 128
    prefill_tokens: tuple[int, ...] = (2048, 8192)
    prefill_repeats: int = 2
    check_tokens: int = 32
    profile_batches: tuple[int, ...] = (1, 8, 64)
    profile_steps: int = 8
    static: bool = True

    def validate(self) -> None:
        for name in ("decode_batches", "prefill_tokens", "profile_batches"):
            values = getattr(self, name)
            if any(v < 1 for v in values):
                raise ValueError(f"{name} must be >= 1, got {list(values)}")
        for name in ("prompt_tokens", "prefill_repeats", "check_tokens", "profile_steps"):
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


# -- the model ----------------------------------------------------------------------------------

def _transformers():
    try:
        import transformers
        from transformers import GptOssConfig, GptOssForCausalLM
    except ImportError as exc:
        raise SystemExit(f"mxmoe bench --model-e2e needs transformers with gpt-oss: "
                         f"{exc}") from None
    return transformers, GptOssConfig, GptOssForCausalLM


def build_model(config: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A gpt-oss ``config`` (a key of `MODEL_CONFIGS`) with random weights made on ``device``,
    in ``dtype``, its experts MXFP4-exact, in eval mode without gradients."""
    transformers, GptOssConfig, GptOssForCausalLM = _transformers()
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    with torch.device(device):
        model = GptOssForCausalLM._from_config(GptOssConfig(**MODEL_CONFIGS[config]), dtype=dtype)
    model.eval().requires_grad_(False)
    make_experts_mxfp4_exact(model)
    # Random weights never say end-of-sequence by design: generate exactly the tokens asked for.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@torch.no_grad()
def make_experts_mxfp4_exact(model) -> None:
    """Replace every bf16 expert weight by the dequantized MXFP4 of itself (quantized along the
    same axis as `use_mxmoe` does: the input dimension, in its ``[E, N, K]`` orientation), so
    that `use_mxmoe` requantizes it losslessly."""
    from ..format import quantize_mxfp4

    for layer in _decoder_layers(model):
        experts = layer.mlp.experts
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


# -- measuring ----------------------------------------------------------------------------------

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


class Session:
    """One run: the model, its two sets of MoE blocks, the results and the deadlines."""

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
        self.prompt_ids = self._prompts(max((*self.plan.decode_batches,
                                             *self.plan.profile_batches)),
                                        self.plan.prompt_tokens, seed=1)

    # -- bookkeeping --

    def _prompts(self, batch: int, length: int, seed: int) -> torch.Tensor:
        vocab = MODEL_CONFIGS[self.options.config]["vocab_size"]
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab, (batch, length), generator=gen).to(self.device)

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
              deadline: float | None = None) -> dict:
        """Run ``measure(row)`` for the active configuration, recording a skip past the
        deadline and the error of a failure; append the row and save."""
        config = self.results["configs"][self.active]
        row = {"status": "ok", **row}
        deadline = self.deadline if deadline is None else deadline
        if deadline is not None and time.perf_counter() > deadline:
            row.update(status="skipped", error="time limit reached before this point")
        else:
            try:
                with _peak_memory(self.device, self.parked_bytes(), row):
                    measure(row)
            except Exception as exc:  # recorded, and the run goes on with the next point
                row.update(status="error", error=_error_text(exc))
                _recover(self.model, self.device)
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

    def decode(self, batch: int, mode: str, deadline: float | None = None) -> dict:
        ids = self.prompt_ids[:batch]
        n = self.plan.new_tokens
        cache = STATIC if mode == STATIC else None

        def measure(row: dict) -> None:
            with torch.no_grad():
                # Warm-up at the full length: compiles (static) at the shapes that are timed.
                row["warmup_s"], _ = self.clock.time(
                    lambda: self.generate(ids, n if mode == STATIC else 2, cache))
                t_one, _ = self.clock.time(lambda: self.generate(ids, 1, cache))
                t_all, out = self.clock.time(lambda: self.generate(ids, n, cache))
            if out.shape[1] != ids.shape[1] + n:
                raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} new "
                                   f"tokens, expected {n}")
            row.update(t_one_s=t_one, t_all_s=t_all, **decode_rate(batch, n, t_one, t_all),
                       compiled=hasattr(self.model, "_compiled_call"))

        return self.point("decode", {"batch": batch, "mode": mode, "prompt_tokens":
                                     ids.shape[1], "new_tokens": n}, measure, deadline)

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
        for batch in self.plan.decode_batches:
            self.decode(batch, EAGER)
        for length in self.plan.prefill_tokens:
            self.prefill(length)
        for batch in self.plan.profile_batches:
            self.moe_share(batch)

    def static_measurements(self, deadline: float | None) -> None:
        failed = None
        for batch in self.plan.decode_batches:
            if failed is not None:
                # A failed compile costs minutes and fails again at the next batch size.
                self.results["configs"][self.active]["decode"].append({
                    "status": "skipped", "batch": batch, "mode": STATIC,
                    "error": f"not tried: the static-cache decode failed at batch {failed}"})
                continue
            if self.decode(batch, STATIC, deadline)["status"] == "error":
                failed = batch

    # -- the run --

    def run(self) -> dict:
        opts, plan = self.options, self.plan
        self.log(f"gpt-oss-{opts.config} e2e on {self.device} ({_dtype_name(opts.dtype)}); "
                 f"decode B={list(plan.decode_batches)} prompt {plan.prompt_tokens} + "
                 f"{plan.new_tokens} new; prefill {list(plan.prefill_tokens)}; time limit "
                 f"{opts.time_limit_s} s")
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
        with self.phase(f"{MXMOE} eager"):
            self.greedy()
            self._check()
            self.eager_measurements()
            self._record_auto_choices()

        if plan.static:
            # What is left is shared equally, so that both get their compiled points.
            now = time.perf_counter()
            half = None if self.deadline is None else max(0.0, self.deadline - now) / 2
            for i, name in enumerate((MXMOE, BF16)):
                self.activate(name)
                deadline = None if half is None else now + half * (i + 1)
                with self.phase(f"{name} static cache"):
                    self.static_measurements(deadline)
        self._finish()
        return self.results

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

    def _finish(self) -> None:
        for name in CONFIG_NAMES:
            config = self.results["configs"][name]
            peaks = [r["peak_bytes"] for kind in ("decode", "prefill", "greedy")
                     for r in config[kind] if r.get("peak_bytes") is not None]
            config["peak_bytes"] = max(peaks) if peaks else None
        rows = [row for _, _, row in all_rows(self.results)]
        self.results["complete"] = all(r["status"] == "ok" for r in rows)
        self.results["errors"] = sum(r["status"] == "error" for r in rows)
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


def _model_facts(model, config: str) -> dict:
    c = model.config
    return {
        "name": f"gpt-oss-{config}",
        "config": MODEL_CONFIGS[config],
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": _dtype_name(model.dtype),
        "attn_implementation": getattr(c, "_attn_implementation", None),
        "experts_implementation": getattr(c, "_experts_implementation", None),
        "weights": "random (seeded), experts MXFP4-exact (quantize_mxfp4, dequantized)",
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
        "time_limit_s": options.time_limit_s, **dataclasses.asdict(options.plan),
        "static_compile": (f"generate(cache_implementation='static'); transformers compiles "
                           f"the decode step on a GPU with {compile_config}"),
        "decode_timing": "batch * (new_tokens - 1) / (t(generate new_tokens) - t(generate "
                         "1)); one warm-up, one timed run of each",
        "prefill_timing": "generate(max_new_tokens=1) of one prompt, batch 1; one warm-up, "
                          "the fastest of prefill_repeats",
        "peak_memory": "torch.cuda.max_memory_allocated during each point, less the parked "
                       "blocks of the other configuration (peak_raw_bytes, parked_bytes)",
    }
    return new_results(environment=environment, transformers_version=transformers.__version__,
                       command="mxmoe " + shlex.join(sys.argv[1:]), settings=settings,
                       backends=_backend_table(options.device))


def _backend_table(device: torch.device) -> dict:
    try:
        from ..backends import backends

        return {name: {"usable": usable, "reason": reason}
                for name, (usable, reason) in backends(device).items()}
    except Exception as exc:  # the table is information; the run goes on without it
        return {"error": _error_text(exc)}


# -- the command --------------------------------------------------------------------------------

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
    }
    plan = dataclasses.replace(plan, **{k: v for k, v in overrides.items() if v is not None})
    try:
        plan.validate()
    except ValueError as exc:
        raise SystemExit(f"mxmoe bench --model-e2e: {exc}") from None
    time_limit = args.time_limit if args.time_limit is not None else (300.0 if cuda else None)
    tag = "-".join(t for t in (f"e2e-{config}", args.tag) if t)
    return Options(
        config=config, plan=plan, device=torch.device("cuda" if cuda else "cpu"),
        dtype=dtype or (torch.bfloat16 if cuda else torch.float32),
        time_limit_s=time_limit, json_path=results_path(out_dir, device, date, tag),
    )


def run_from_args(args, environment: dict, dtype: torch.dtype | None, out_dir: Path) -> int:
    """`mxmoe bench --model-e2e`: run, write the JSON, print the table. 0 when no point
    failed (skips by the time limit included), 1 otherwise."""

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
        results = session.run()
    finally:
        torch.set_num_threads(threads)
    log("")
    log(render_table(results))
    log(f"results: {options.json_path}")
    return 1 if results["errors"] else 0

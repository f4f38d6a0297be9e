"""`mxmoe tune`: search kernel configs per (backend, device, shape, M) and store the winners.

By default the results go to the user cache (`mxmoe.tuning_cache`), which
`mxmoe.kernels.configs.select` reads before the shipped tables; a maintainer can write the
package's table for this GPU instead (`TableWriter`).

The search is staged, because a full product of block sizes, warps, stages and strategies is
thousands of compiles: first the tile shape and the dot strategy (swap-AB or not) at fixed
pipelining, then K tile, warps and stages around the best shape, then GEMM2's own N/K tiles,
then (decode sizes only) split-K of each GEMM. Every candidate is timed by a ``timer`` (on the
GPU: the whole fused-experts call inside a CUDA graph, median of replays); a candidate that
fails to compile or run is skipped. Only backend names are spoken here: a backend runs with a
forced config through `run_with_config`.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

from . import autotune
from .kernels.configs import TABLE_FORMAT, MoEConfig
from .tune_shapes import (DEFAULT_TOKENS, MODEL_ALIASES, MODELS, TUNABLE_BACKENDS,  # noqa: F401
                          Shape, parse_shape)


def tp_shards(shape: Shape, tp_sizes: Iterable[int]) -> list[Shape]:
    """The distinct per-rank shapes of ``shape`` under each tensor-parallel size: I split along
    whole 32-blocks as `mxmoe.distributed.intermediate_range` does (gpt-oss I = 2880 over 4
    ranks: 736 and 704), E, H and k whole."""
    from .distributed import intermediate_range

    out = []
    for tp in tp_sizes:
        sizes = sorted({len(intermediate_range(shape.intermediate, tp, r)) for r in range(tp)},
                       reverse=True)
        for inter in sizes:
            label = shape.label if tp == 1 else f"{shape.label} tp{tp}"
            shard = replace(shape, intermediate=inter, label=label)
            if shard not in out:
                out.append(shard)
    return out


def model_shapes(names: Iterable[str], tp_sizes: Iterable[int] = (1,)) -> list[Shape]:
    tp_sizes = list(tp_sizes)
    shapes = []
    for name in names:
        base = MODELS[MODEL_ALIASES.get(name, name)]
        shapes += [s for s in tp_shards(base, tp_sizes) if s not in shapes]
    return shapes


# --------------------------------------------------------------------------- the staged search


def _block_m_choices(num_tokens: int, top_k: int, num_experts: int) -> list[int]:
    per_expert = num_tokens * top_k / num_experts
    if per_expert <= 8:
        return [16]
    if per_expert <= 32:
        return [16, 32]
    if per_expert <= 128:
        return [32, 64]
    if per_expert <= 512:
        return [64, 128]
    return [128, 256]


def stage1(num_tokens, top_k, num_experts) -> list[MoEConfig]:
    out = []
    for bm, bn, swap in itertools.product(
        _block_m_choices(num_tokens, top_k, num_experts), (32, 64, 128), (False, True)
    ):
        out.append(MoEConfig(block_m=bm, block_n=bn, block_k=128, num_warps=4, num_stages=3,
                             swap_ab=swap))
    if num_tokens * top_k / num_experts > 512:
        # Prefill: large tiles need 8 warps to hold the accumulator; try them directly.
        out += [MoEConfig(block_m=bm, block_n=bn, block_k=64, num_warps=8, num_stages=3,
                          swap_ab=True) for bm, bn in ((128, 128), (256, 64), (256, 128))]
    return out


def stage2(best: MoEConfig) -> list[MoEConfig]:
    return [replace(best, block_k=bk, num_warps=w, num_stages=s)
            for bk, w, s in itertools.product((64, 128, 256), (4, 8), (2, 3, 4))]


def stage3(best: MoEConfig) -> list[MoEConfig]:
    return [replace(best, block_n2=bn, block_k2=bk)
            for bn, bk in itertools.product((32, 64, 128, 256), (64, 128, 256))]


def stage4(best: MoEConfig, num_tokens: int, top_k: int, num_experts: int) -> list[MoEConfig]:
    """Split-K for decode sizes, where few experts x N tiles leave SMs idle (none otherwise:
    the fp32 partial planes cost traffic that larger M does not repay)."""
    if num_tokens * top_k / num_experts > 16:
        return []
    return [replace(best, split_k=s1, split_k2=s2)
            for s1, s2 in itertools.product((1, 2, 3, 4), (1, 2, 4)) if (s1, s2) != (1, 1)]


def candidate_count(num_tokens: int, top_k: int, num_experts: int) -> int:
    """How many configs `tune_point` times for one (shape, M, backend)."""
    first = len(stage1(num_tokens, top_k, num_experts))
    later = len(stage2(MoEConfig())) + len(stage3(MoEConfig()))
    return first + later + len(stage4(MoEConfig(), num_tokens, top_k, num_experts))


#: What we expect one candidate to cost on the GPU: compiling its two GEMM specialisations
#: (seconds, the bulk) plus timing its replays. Only for the estimate printed before a run.
SECONDS_PER_CANDIDATE = 2.5


@dataclass(frozen=True)
class Job:
    shape: Shape
    num_tokens: int
    backend: str


def plan(shapes: list[Shape], tokens: Iterable[int], backends: Iterable[str]) -> list[Job]:
    return [Job(s, m, b) for s in shapes for m in tokens for b in backends]


def estimate_seconds(jobs: list[Job]) -> tuple[int, float]:
    """(candidates, seconds) a run of ``jobs`` is expected to take."""
    count = sum(candidate_count(j.num_tokens, j.shape.top_k, j.shape.num_experts) for j in jobs)
    return count, count * SECONDS_PER_CANDIDATE


class Progress:
    """A one-line progress bar on a terminal stream: done/total, elapsed and what is left."""

    def __init__(self, total: int, stream=None, width: int = 30):
        self.total, self.done, self.width = max(total, 1), 0, width
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.monotonic()
        self.label = ""

    def step(self, label: str = "") -> None:
        self.done = min(self.done + 1, self.total)
        self.label = label or self.label
        self.draw()

    def draw(self) -> None:
        elapsed = time.monotonic() - self.start
        fraction = self.done / self.total
        left = elapsed / fraction - elapsed if self.done else float("nan")
        filled = int(round(self.width * fraction))
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r[{bar}] {self.done}/{self.total} {format_seconds(elapsed)} "
                          f"elapsed, ~{format_seconds(left)} left  {self.label[:40]:<40}")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


#: ``timer(backend, shape, num_tokens, config) -> seconds`` (inf: the candidate did not run).
Timer = Callable[[str, Shape, int, MoEConfig], float]


def tune_point(timer: Timer, job: Job, progress: Progress | None = None) -> tuple[MoEConfig, float]:
    """The fastest config for one job: stage 1, then 2 around its best, then 3, then 4."""
    shape, m = job.shape, job.num_tokens
    best, best_s = None, math.inf
    dims = (m, shape.top_k, shape.num_experts)
    for make_stage in (lambda _: stage1(*dims), stage2, stage3, lambda b: stage4(b, *dims)):
        for cfg in make_stage(best):
            seconds = timer(job.backend, shape, m, cfg)
            if seconds < best_s:
                best, best_s = cfg, seconds
            if progress is not None:
                progress.step(f"{shape.label or shape.key} M={m} {job.backend}")
        if best is None:
            raise RuntimeError(f"no config ran for {shape.key} M={m} ({job.backend})")
    return best, best_s


def tune(jobs: list[Job], timer: Timer, writer, *, progress: Progress | None = None,
         log=print) -> dict:
    """Time every job, hand each winner to ``writer.record`` and, where several backends were
    timed for one (shape, M), the fastest to ``writer.fastest``; returns
    ``{(shape key, M): {backend: (config, seconds)}}``."""
    results: dict[tuple[str, int], dict[str, tuple[MoEConfig, float]]] = {}
    for job in jobs:
        cfg, seconds = tune_point(timer, job, progress)
        results.setdefault((job.shape.key, job.num_tokens), {})[job.backend] = (cfg, seconds)
        writer.record(job.backend, job.shape.key, job.num_tokens, cfg)
        if progress is not None:
            progress.stream.write("\n")
        log(f"  {job.shape.label or job.shape.key:<24} M={job.num_tokens:<6} {job.backend:<15} "
            f"{seconds * 1e3:8.4f} ms  {cfg.to_json()}")
    for (key, m), timed in results.items():
        if len(timed) > 1:  # a verdict needs a comparison
            writer.fastest(key, m, min(timed, key=lambda b: timed[b][1]))
    return results


# --------------------------------------------------------------------------- where results go


class UserCacheWriter:
    """Results into the user cache, for this device and software stack."""

    def __init__(self, facts):
        self.facts = facts

    def record(self, backend: str, problem: str, num_tokens: int, cfg: MoEConfig) -> None:
        from . import tuning_cache

        tuning_cache.record(self.facts, backend, problem, num_tokens, cfg.to_json())

    def fastest(self, problem: str, num_tokens: int, backend: str) -> None:
        from . import tuning_cache

        table = tuning_cache.table(self.facts)
        cfg = table["configs"][backend][problem][str(num_tokens)]
        tuning_cache.record(self.facts, backend, problem, num_tokens, cfg, fastest=backend)

    @property
    def where(self) -> str:
        from . import tuning_cache

        return f"the user cache {tuning_cache.path()}"


class TableWriter:
    """Results into a table file of the shipped format (for maintainers: the package's own
    ``kernels/configs/<device>.json``); merged into what the file holds, written atomically."""

    def __init__(self, path: Path, facts, copy_tb_s: float | None = None):
        from .kernels.configs import current_kernel_sources

        self.path = path
        self.table = _read_table(path)
        # (Entries tuned earlier and kept by the merge share the newest digest: retune whole.)
        self.table.update({"format": TABLE_FORMAT, "device": facts.name,
                           "capability": list(facts.capability),
                           "sm_count": facts.sm_count,
                           "kernel_sources": current_kernel_sources()})
        if copy_tb_s is not None:
            self.table["copy_tb_s"] = copy_tb_s
        self.table.setdefault("configs", {})
        self.table.setdefault("fastest", {})

    def record(self, backend: str, problem: str, num_tokens: int, cfg: MoEConfig) -> None:
        self.table["configs"].setdefault(backend, {}).setdefault(problem, {})[str(num_tokens)] = \
            cfg.to_json()
        self._write()

    def fastest(self, problem: str, num_tokens: int, backend: str) -> None:
        self.table["fastest"].setdefault(problem, {})[str(num_tokens)] = backend
        self._write()

    @property
    def where(self) -> str:
        return f"the table {self.path}"

    def _write(self) -> None:
        from .cache import atomic_write_text
        from .kernels import configs

        atomic_write_text(self.path, json.dumps(self.table, indent=1, sort_keys=True) + "\n")
        configs.clear_memo()


def _read_table(path: Path) -> dict:
    from .kernels.configs import backend_name

    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    data["configs"] = {backend_name(k): v for k, v in data.get("configs", {}).items()}
    return data


def shipped_table_path(facts) -> Path:
    from .kernels import configs

    from .devices import device_slug

    return configs._TABLE_DIR / f"{device_slug(facts.name)}.json"


# --------------------------------------------------------------------------- timing on the GPU


def run_with_config(backend: str, call, cfg: MoEConfig):
    """Run the Triton backend named ``backend`` on ``call`` with ``cfg`` forced (its inner
    product and, for ``bf16``, its cached dense weights come from the backend itself)."""
    from .backends import get_backend
    from .backends.triton import dense_weights
    from .kernels.fused_moe import fused_moe
    from .kernels.inner_product import InnerProduct

    impl = get_backend(backend)
    inner = getattr(impl, "inner_product", None)
    if inner is None:
        raise ValueError(f"backend {backend!r} takes no kernel config; tunable backends: "
                         f"{', '.join(TUNABLE_BACKENDS)}")
    dense = None
    if inner is InnerProduct.DENSE:
        dtype = call.hidden_states.dtype
        dense = (dense_weights(call.w13, dtype), dense_weights(call.w2, dtype))
    return fused_moe(call, inner, backend, dense=dense, config=cfg)


def problem_args(shape: Shape, num_tokens: int, dtype, device="cuda", seed: int = 0):
    """Random quantized weights and routing of ``shape``, validated: one backend's `MoECall`."""
    from .testing import random_moe
    from .validation import check_fused_experts_args

    p = random_moe(num_tokens, shape.hidden, shape.intermediate, shape.num_experts,
                   shape.top_k, dtype, device, seed=seed, bias=shape.bias,
                   activation=shape.activation)
    return check_fused_experts_args(p.hidden_states, p.w13, p.w2, p.topk_weights, p.topk_ids,
                                    w13_bias=p.w13_bias, w2_bias=p.w2_bias,
                                    activation=shape.activation, alpha=1.702, limit=7.0,
                                    expert_map=None)


class GraphTimer:
    """`Timer` on the GPU: the whole call in a CUDA graph, median of replays; the problem of
    the last (shape, M) is kept, so its weights are made once for all its candidates."""

    def __init__(self, dtype=None, log=print):
        import torch

        self.dtype = dtype or torch.bfloat16
        self.log = log
        self._last = None

    def __call__(self, backend: str, shape: Shape, num_tokens: int, cfg: MoEConfig) -> float:
        if self._last is None or self._last[0] != (shape, num_tokens):
            self._last = ((shape, num_tokens), problem_args(shape, num_tokens, self.dtype))
        args = self._last[1]
        replays = 10 if num_tokens >= 4096 else 30
        try:
            return autotune.graph_seconds(lambda: run_with_config(backend, args, cfg),
                                          replays)
        except Exception as exc:  # a config that does not compile or fit is not a candidate
            self.log(f"    skip {cfg.to_json()}: {type(exc).__name__}: {str(exc)[:120]}")
            return math.inf

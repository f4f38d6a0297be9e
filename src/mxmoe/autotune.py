"""Tuning on first use (``MXMOE_AUTOTUNE=1``): the first call of a new (backend, device,
problem, size class) times a handful of candidates and keeps the fastest in the user cache.

The caller supplies the timing (`maybe_tune`'s ``time_candidate``), so this module knows
nothing of launches. It never tunes while a CUDA graph is being captured or torch.compile is
tracing (timing synchronises the host, which neither allows): there `maybe_tune` returns None
and the caller uses `mxmoe.kernels.configs.select`. After a size class is tuned its winner is
in the user cache, which `select` reads first: later calls time nothing and never synchronise.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Iterable

from . import tuning_cache
from .settings import DeviceFacts
from .kernels import configs
from .kernels.configs import MoEConfig

ENV = "MXMOE_AUTOTUNE"
#: How many candidates a first call times at most (each is compiled, then timed).
MAX_CANDIDATES = 8

_ENABLED: list[bool] = []
#: Keys tuned (or found tuned) by this process: their answer is in the user cache.
_DONE: set["TuneKey"] = set()


@dataclass(frozen=True)
class TuneKey:
    """What one tuning result stands for."""

    backend: str
    device: DeviceFacts
    hidden: int
    intermediate: int
    num_experts: int
    top_k: int
    #: `mxmoe.kernels.configs.size_class` of M.
    num_tokens: int

    @classmethod
    def of(cls, backend: str, device: DeviceFacts, num_tokens: int, hidden: int,
           intermediate: int, num_experts: int, top_k: int) -> "TuneKey":
        return cls(configs.backend_name(backend), device, hidden, intermediate, num_experts,
                   top_k, configs.size_class(num_tokens))

    @property
    def problem(self) -> str:
        return f"H{self.hidden}_I{self.intermediate}_E{self.num_experts}_k{self.top_k}"


def enabled() -> bool:
    """``MXMOE_AUTOTUNE=1``, read once a process (`refresh` re-reads it)."""
    if not _ENABLED:
        _ENABLED.append(os.environ.get(ENV, "0") == "1")
    return _ENABLED[0]


def refresh() -> None:
    """Re-read the environment switch and forget which keys this process tuned."""
    _ENABLED.clear()
    _DONE.clear()


def can_time_now() -> bool:
    """False while a CUDA graph is captured or torch.compile traces: no timing there."""
    import torch

    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling():
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    return True


def is_tuned(key: TuneKey) -> bool:
    """Whether the user cache holds a config for exactly this key's size class."""
    if key in _DONE:
        return True
    table = tuning_cache.table(key.device)
    entries = table["configs"].get(key.backend, {}).get(key.problem, {})
    return str(key.num_tokens) in entries


def maybe_tune(key: TuneKey, candidates: Iterable[MoEConfig],
               time_candidate: Callable[[MoEConfig], float]) -> MoEConfig | None:
    """The fastest of ``candidates`` for ``key``, timed now and stored, or None.

    None when tuning is off, when the key is already tuned (`select` has its answer), while
    capturing or compiling, or when no candidate ran. ``time_candidate(config)`` returns
    seconds (``inf`` or an exception: the candidate is skipped); the candidates are timed in
    order and the first of equal times wins.
    """
    if not enabled() or not can_time_now() or is_tuned(key):
        return None
    best, best_s = None, math.inf
    for cfg in list(candidates)[:MAX_CANDIDATES]:
        try:
            seconds = float(time_candidate(cfg))
        except Exception as exc:  # a config that does not compile or fit is not a candidate
            warnings.warn(f"mxmoe autotune: skipped {cfg.to_json()} ({type(exc).__name__}: "
                          f"{str(exc)[:120]})", RuntimeWarning, stacklevel=2)
            continue
        if seconds < best_s:
            best, best_s = cfg, seconds
    if best is None:
        return None
    tuning_cache.record(key.device, key.backend, key.problem, key.num_tokens, best.to_json())
    _DONE.add(key)
    return best


def candidates(key: TuneKey) -> list[MoEConfig]:
    """A handful of configs worth timing for ``key``, the default first: what `select` picks,
    the tuned configs of the nearest points, and those with GEMM1 split along K at decode."""
    shape = (key.num_tokens, key.hidden, key.intermediate, key.num_experts, key.top_k)
    sms = key.device.sm_count
    found = [configs.explain(key.backend, key.device, *shape).config]
    tables = [configs._load_table(s) for s in configs._shipped_slugs()]
    points = configs._tuned_points(key.backend, tables)
    pairs = key.num_tokens * key.top_k / max(key.num_experts, 1)
    n1, k1 = 2 * key.intermediate, key.hidden

    def distance(p):
        return (configs._log_ratio(p.pairs_per_expert, pairs)
                + configs._SHAPE_WEIGHT * (abs(math.log2(p.n / n1)) + abs(math.log2(p.k / k1))))

    if pairs <= 16:  # decode: few experts x N tiles may leave SMs idle
        found += [replace(found[0], split_k=s, split_k2=1) for s in (2, 4)]
    for point in sorted(points, key=distance):
        found.append(configs.fit_config(point.config, *shape, sm_count=sms))
    unique = []
    for cfg in found:
        if cfg not in unique:
            unique.append(cfg)
    return unique[:MAX_CANDIDATES]


def graph_seconds(fn, replays: int) -> float:
    """Median seconds of one replay of ``fn`` captured in a CUDA graph (what `mxmoe tune` and
    first-use tuning time a candidate by; synchronises)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]

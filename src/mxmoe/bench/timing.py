"""Timing a layer: CUDA-graph replays with CUDA events on a GPU, the wall clock on the CPU.

Rotation (so that nothing is timed from cache): one CUDA graph is captured per input set of
`problems.Rotations` (its own activations, router logits and therefore routing), and the
timed replays cycle through the graphs, so consecutive replays read different activations and,
at decode sizes, different experts. Copying fresh inputs into one graph's static buffers was
the alternative; it was not chosen because the copy would sit between the timed replays (or
inside them) and its writes would leave the new inputs in L2. Each graph's output is kept and
checked against the reference after a replay into a NaN-filled buffer.

A graph replay is bracketed by a pair of events; the median over replays is the time. Before
each batch of replays the GPU is held busy for a few milliseconds (`torch.cuda._sleep`) so
that the host can queue the whole batch and no replay waits for the host to launch it.
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .problems import Inputs

LayerFn = Callable[[Inputs], torch.Tensor]

# Replays queued per batch behind one sleep kernel; the sleep (~2.5 ms) outlasts their launch.
_BATCH = 50
_SLEEP_CYCLES = 5_000_000
# Warm-up before timing: at least this long, so that clocks have ramped up.
_WARMUP_S = 0.05


@dataclass(frozen=True)
class RepPolicy:
    """How many timed repetitions one point gets.

    ``budget_s / estimate`` clamped to [min_reps, max_reps], where min_reps is
    ``min_reps_small`` for calls under ``small_s`` (decode sizes: noisy, cheap) and
    ``min_reps_large`` otherwise; a point never takes more than ``cap_s`` unless
    min(3, that minimum) repetitions already do.
    """

    budget_s: float = 0.5
    min_reps_small: int = 200
    min_reps_large: int = 20
    small_s: float = 5e-4
    max_reps: int = 2000
    cap_s: float = 10.0

    def reps(self, seconds_per_rep: float) -> int:
        t = max(seconds_per_rep, 1e-7)
        lo = self.min_reps_small if t < self.small_s else self.min_reps_large
        n = max(lo, min(self.max_reps, int(self.budget_s / t)))
        if n * t > self.cap_s:
            n = max(min(3, lo), int(self.cap_s / t))
        return n


@dataclass
class Timing:
    ms: float  # median
    ms_min: float
    ms_p90: float
    reps: int
    graph: bool
    #: Back-to-back replays: (last end - first start) / count per batch, averaged. Includes the
    #: gaps between replays but not the events' own cost; a check on the per-replay median.
    ms_batch_mean: float | None = None

    @classmethod
    def from_seconds(cls, seconds: Sequence[float], graph: bool,
                     batch_mean_s: float | None = None) -> "Timing":
        ordered = sorted(seconds)
        p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
        return cls(statistics.median(ordered) * 1e3, ordered[0] * 1e3, p90 * 1e3,
                   len(ordered), graph,
                   None if batch_mean_s is None else batch_mean_s * 1e3)


def host_sync_reason(fn: LayerFn, inputs: Inputs) -> str | None:
    """Run ``fn`` once with PyTorch's sync debug mode set to error: the first line of the error
    if it synchronises with the host (then it cannot be captured), else None.

    Call it after a first (warm-up) run: compiling and autotuning may synchronise legitimately.
    """
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn(inputs)
    except RuntimeError as exc:
        message = str(exc)
        if "synchroniz" not in message.lower():
            raise
        return (message.strip().splitlines() or ["host synchronisation"])[0][:160]
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    return None


def capture_graphs(fn: LayerFn, input_sets: Sequence[Inputs]
                   ) -> tuple[list[torch.cuda.CUDAGraph], list[torch.Tensor]]:
    """One CUDA graph per input set, after a warm-up on a side stream (as PyTorch's CUDA-graph
    docs prescribe); returns the graphs and their static outputs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for inputs in input_sets:
            fn(inputs)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graphs, outputs = [], []
    for inputs in input_sets:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(inputs)
        graphs.append(graph)
        outputs.append(out)
    torch.cuda.synchronize()
    return graphs, outputs


def _sleep_ahead() -> None:
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is not None:
        sleep(_SLEEP_CYCLES)


def _timed_cuda(step: Callable[[int], None], n: int, sleep: bool
                ) -> tuple[list[float], float]:
    """Seconds of ``step(i)`` for i in range(n), each between two CUDA events; and the mean
    over batches of (last end - first start) / steps in the batch."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for first in range(0, n, _BATCH):
        if sleep:
            _sleep_ahead()
        for i in range(first, min(n, first + _BATCH)):
            starts[i].record()
            step(i)
            ends[i].record()
    torch.cuda.synchronize()
    batches = [(first, min(n, first + _BATCH)) for first in range(0, n, _BATCH)]
    batch_mean = statistics.fmean(starts[a].elapsed_time(ends[b - 1]) / 1e3 / (b - a)
                                  for a, b in batches)
    return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)], batch_mean


def _estimate_cuda(step: Callable[[int], None], count: int) -> float:
    """Seconds per step, from ``count`` steps between one pair of events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(count):
        step(i)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / count


def _time_cuda(step: Callable[[int], None], cycle: int, policy: RepPolicy, graph: bool) -> Timing:
    # One running count across warm-up and timing, so the rotation never repeats a set twice
    # in a row where one phase ends and the next begins.
    calls = itertools.count()

    def next_step(_: int) -> None:
        step(next(calls))

    for i in range(cycle):  # first replays upload the graphs; not part of the estimate
        next_step(i)
    torch.cuda.synchronize()
    estimate = _estimate_cuda(next_step, max(2, cycle))
    warmup = min(500, int(_WARMUP_S / max(estimate, 1e-7)))
    if warmup:
        _estimate_cuda(next_step, warmup)
    seconds, batch_mean = _timed_cuda(next_step, policy.reps(estimate), sleep=graph)
    return Timing.from_seconds(seconds, graph, batch_mean)


def time_graphs(graphs: Sequence[torch.cuda.CUDAGraph], policy: RepPolicy) -> Timing:
    """Median replay time, replays cycling through ``graphs``."""
    return _time_cuda(lambda i: graphs[i % len(graphs)].replay(), len(graphs), policy, graph=True)


def time_eager_cuda(fn: LayerFn, input_sets: Sequence[Inputs], policy: RepPolicy) -> Timing:
    """Median time of eager calls (host launch gaps included), cycling through the inputs."""
    return _time_cuda(lambda i: fn(input_sets[i % len(input_sets)]), len(input_sets), policy,
                      graph=False)


def time_cpu(fn: LayerFn, input_sets: Sequence[Inputs], policy: RepPolicy,
             estimate: float | None = None) -> Timing:
    """Median wall-clock time of calls on the CPU, cycling through the inputs. ``estimate``
    (seconds of an earlier call) saves the call that would measure it."""
    if estimate is None:
        t0 = time.perf_counter()
        fn(input_sets[0])
        estimate = time.perf_counter() - t0
    seconds = []
    for i in range(policy.reps(estimate)):
        t0 = time.perf_counter()
        fn(input_sets[i % len(input_sets)])
        seconds.append(time.perf_counter() - t0)
    return Timing.from_seconds(seconds, graph=False)

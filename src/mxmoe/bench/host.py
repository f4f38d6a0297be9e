"""Host cost of an eager call, beside the bare cost of as many kernel launches, in the same run.

- The host time of one call: the GPU made idle first (`torch.cuda.synchronize`), then the wall
  time of the call itself, with no synchronisation inside it: what a caller that does not
  capture CUDA graphs (eager decode) pays on the CPU per call. Median over repetitions,
  cycling through the input sets.
- Its launches: the GPU activities one call causes (kernels, memsets, copies), counted with
  `torch.profiler`'s CUDA activities.
- CUPTI released after each count: Kineto keeps CUPTI attached once a profile with CUDA
  activities ends unless ``TEARDOWN_CUPTI=1`` (pytorch/pytorch#144455), and every later CUDA
  call of the process then pays its callbacks: the rows timed after the first count, and the
  bare launches, would carry that overhead. `release_cupti_after_profiles` asks for the
  teardown where torch deems it safe beside CUDA graphs (CUDA >= 12.6); each row records
  whether it was on (``host_cupti_teardown``).
- The bare cost of that many launches: a trivial Triton kernel, compiled once, launched that
  many times in a loop (timed the same way), through ``kernel[grid](...)`` (what a plain Triton
  launcher pays: binding and specialisation key on every call) and through the compiled
  kernel's own launcher (``compiled[grid](...)``, the floor of a Triton launch).

Nothing here imports Triton at module import (the kernel is defined on first use).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

#: Repetitions of the host timing: this many seconds over the time of one call, clamped to
#: [_MIN_REPS, _MAX_REPS]; calls over _SLOW_S (the reference at large M) get _MIN_REPS_SLOW.
_HOST_BUDGET_S = 0.2
_MIN_REPS, _MAX_REPS = 20, 200
_SLOW_S, _MIN_REPS_SLOW = 1e-2, 5
_WARMUP_CALLS = 3


@dataclass
class HostCost:
    """The host-cost fields of one row (µs); None where not measured, `note` says why."""

    us: float | None = None
    us_min: float | None = None
    reps: int = 0
    launches: int | None = None
    kernels: int | None = None
    bare_us: float | None = None
    bare_direct_us: float | None = None
    cupti_teardown: bool | None = None  # whether CUPTI was released after the launch count
    notes: list[str] = field(default_factory=list)

    def as_row(self) -> dict:
        ratio = (self.us / self.bare_us if self.us is not None and self.bare_us else None)
        return {
            "host_us": self.us,
            "host_us_min": self.us_min,
            "host_reps": self.reps,
            "launches": self.launches,
            "launch_kernels": self.kernels,
            "host_bare_us": self.bare_us,
            "host_bare_direct_us": self.bare_direct_us,
            "host_ratio": ratio,
            "host_cupti_teardown": self.cupti_teardown,
            "host_note": "; ".join(self.notes),
        }


def skipped(reason: str) -> HostCost:
    return HostCost(notes=[reason])


def host_reps(seconds_per_call: float) -> int:
    lo = _MIN_REPS if seconds_per_call < _SLOW_S else _MIN_REPS_SLOW
    return max(lo, min(_MAX_REPS, int(_HOST_BUDGET_S / max(seconds_per_call, 1e-6))))


def time_host(call: Callable[[int], object], reps: int, sync: Callable[[], None]
              ) -> list[float]:
    """Seconds to issue ``call(i)`` for i in range(reps): ``sync()`` before each (the GPU
    idle), then the call alone on the wall clock, nothing synchronised inside it."""
    seconds = []
    for i in range(reps):
        sync()
        t0 = time.perf_counter()
        call(i)
        seconds.append(time.perf_counter() - t0)
    sync()
    return seconds


def _is_copy_or_set(event) -> bool:
    kind = str(getattr(event, "activity_type", "") or "").lower()
    name = str(getattr(event, "name", "")).lower()
    return ("memcpy" in kind or "memset" in kind or name.startswith("memcpy")
            or name.startswith("memset"))


def device_activity_counts(events) -> tuple[int, int]:
    """``(activities, kernels)`` among profiler events: those on a CUDA device, and of them the
    ones that are not memsets or memory copies."""
    from torch.autograd import DeviceType

    device = [e for e in events if getattr(e, "device_type", None) == DeviceType.CUDA]
    return len(device), sum(not _is_copy_or_set(e) for e in device)


#: The CUDA version from which torch lets Kineto tear CUPTI down beside CUDA graphs (older ones
#: crashed on the re-initialisation; torch.compile's CUDA-graph mode turns it off below it).
CUPTI_TEARDOWN_MIN_CUDA = (12, 6)


def release_cupti_after_profiles(cuda_version: str | None = None) -> bool:
    """Set ``TEARDOWN_CUPTI=1`` (unless the environment already sets it) when torch's CUDA is
    at least `CUPTI_TEARDOWN_MIN_CUDA`, so that a profile leaves no CUPTI callbacks on later
    calls. Returns whether teardown is on."""
    version = torch.version.cuda if cuda_version is None else cuda_version
    if "TEARDOWN_CUPTI" not in os.environ and version:
        try:
            major_minor = tuple(int(part) for part in version.split(".")[:2])
        except ValueError:
            major_minor = ()
        if major_minor >= CUPTI_TEARDOWN_MIN_CUDA:
            os.environ["TEARDOWN_CUPTI"] = "1"
    return os.environ.get("TEARDOWN_CUPTI") == "1"


def count_launches(call: Callable[[], object]) -> tuple[int, int]:
    """``(activities, kernels)`` of one ``call()`` on the current CUDA device (CUPTI released
    afterwards where that is safe: `release_cupti_after_profiles`)."""
    from torch.profiler import ProfilerActivity, profile

    release_cupti_after_profiles()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    return device_activity_counts(prof.events())


class BareLaunch:
    """A trivial Triton kernel (one store), compiled once on ``device``; `time` launches it."""

    def __init__(self, device: torch.device):
        import triton
        import triton.language as tl

        @triton.jit
        def _touch(out_ptr):
            tl.store(out_ptr + tl.program_id(0), 1.0)

        self.device = device
        self.buffer = torch.zeros(1, dtype=torch.float32, device=device)
        self.kernel = _touch
        self.kernel[(1,)](self.buffer)  # compiles
        self.compiled = None
        self.direct_note = ""
        try:
            compiled = self.kernel.warmup(self.buffer, grid=(1,))
            compiled[(1, 1, 1)](self.buffer)
            self.compiled = compiled
        except Exception as exc:  # the launcher's API moves between Triton versions
            self.direct_note = (f"direct launch not available: {type(exc).__name__}: "
                                f"{(str(exc).splitlines() or [''])[0][:120]}")
        torch.cuda.synchronize(device)

    def _loop(self, launch: Callable[[], object], count: int, reps: int) -> float:
        def call(_: int) -> None:
            for _ in range(count):
                launch()

        return statistics.median(time_host(call, reps, torch.cuda.synchronize)) * 1e6

    def time(self, count: int, reps: int) -> tuple[float, float | None]:
        """µs of ``count`` launches through ``kernel[grid]`` and through the compiled
        kernel's launcher (None when that is not available)."""
        buf, grid = self.buffer, (1,)
        jit_us = self._loop(lambda: self.kernel[grid](buf), count, reps)
        direct_us = None
        if self.compiled is not None:
            compiled = self.compiled[(1, 1, 1)]
            direct_us = self._loop(lambda: compiled(buf), count, reps)
        return jit_us, direct_us


class HostMeter:
    """Measures `HostCost` for the paths of one run on a CUDA device (one `BareLaunch`)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._bare: BareLaunch | None = None
        self._bare_error: str | None = None

    def _bare_launch(self) -> BareLaunch | None:
        if self._bare is None and self._bare_error is None:
            try:
                self._bare = BareLaunch(self.device)
            except Exception as exc:
                self._bare_error = f"no bare launch: {type(exc).__name__}: {exc}"[:200]
        return self._bare

    def measure(self, fn: Callable, input_sets: Sequence, seconds_per_call: float) -> HostCost:
        cost = HostCost()
        n = len(input_sets)
        for i in range(_WARMUP_CALLS):
            fn(input_sets[i % n])
        reps = host_reps(seconds_per_call)
        seconds = time_host(lambda i: fn(input_sets[i % n]), reps, torch.cuda.synchronize)
        cost.us, cost.us_min, cost.reps = statistics.median(seconds) * 1e6, min(seconds) * 1e6, reps
        try:
            cost.launches, cost.kernels = count_launches(lambda: fn(input_sets[0]))
            cost.cupti_teardown = release_cupti_after_profiles()  # (as count_launches asked)
            if not cost.cupti_teardown:
                cost.notes.append("CUPTI stays attached after the launch count (TEARDOWN_CUPTI "
                                  "not 1): later rows and the bare launches carry its overhead")
        except Exception as exc:
            cost.notes.append(f"launches not counted: {type(exc).__name__}: {exc}"[:200])
            return cost
        bare = self._bare_launch()
        if bare is None:
            cost.notes.append(self._bare_error or "no bare launch")
        elif cost.launches:
            cost.bare_us, cost.bare_direct_us = bare.time(cost.launches, reps)
            if bare.direct_note:
                cost.notes.append(bare.direct_note)
        return cost

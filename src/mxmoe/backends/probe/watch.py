"""Running one probe child and watching it: its output, its deadline, its process group.

The child runs in its own session, so a timeout kills what it started too (ptxas, ...). A child
that printed its result gets `EXIT_GRACE_S` to exit, then is killed and judged on that result.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .result import RESULT_MARKER, ProbeResult, judge

#: Seconds a child may take. The first Triton compiles of a process are slow (tens of seconds).
DEFAULT_TIMEOUT_S = 180.0
TIMEOUT_ENV = "MXMOE_PROBE_TIMEOUT"
#: Seconds a child that printed its result may take to exit before it is killed (and judged on
#: that result). Tearing down a CUDA context takes well under this.
EXIT_GRACE_S = 15.0
#: Seconds to keep reading after killing a child (a grandchild that escaped may hold a pipe).
_DRAIN_S = 2.0


def probe_timeout() -> float:
    """``MXMOE_PROBE_TIMEOUT`` seconds if set, else `DEFAULT_TIMEOUT_S`."""
    value = os.environ.get(TIMEOUT_ENV, "")
    if not value:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {value!r}") from None
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be positive, got {value!r}")
    return seconds


def child_command(backend: str, device: str) -> list[str]:
    """The child's command line. Tests replace this function to run tiny scripts instead."""
    return [sys.executable, "-m", "mxmoe.backends.probe", "--backend", backend, "--device", device]


def run_child(
    backend: str,
    device: torch.device | str,
    *,
    timeout: float | None = None,
    command: list[str] | None = None,
) -> ProbeResult:
    """Run one probe child (no cache, no memo) and judge what it printed and how it ended."""
    timeout = probe_timeout() if timeout is None else timeout
    argv = command if command is not None else child_command(backend, str(device))
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(),
            start_new_session=True,
        )
    except OSError as exc:
        return ProbeResult(backend, False, f"could not start the probe child {argv!r}: {exc}")
    run = _watch(proc, timeout)
    return judge(
        backend,
        stdout=run.stdout.decode("utf-8", "replace"),
        stderr=run.stderr.decode("utf-8", "replace"),
        exit_code=run.exit_code,
        killed=run.killed,
        seconds=time.monotonic() - start,
    )


def child_env() -> dict[str, str]:
    """The caller's environment, with this mxmoe importable even if it came from sys.path."""
    env = dict(os.environ)
    package_parent = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    return env


@dataclass
class _ChildRun:
    stdout: bytes
    stderr: bytes
    #: The child's status; None when we killed it.
    exit_code: int | None
    #: Why we killed it, or None when it ended by itself.
    killed: str | None


_RESULT_LINE = re.compile(rb"(?:^|\n)" + RESULT_MARKER.encode() + rb" [^\n]*\n")


def _watch(proc: subprocess.Popen, timeout: float) -> _ChildRun:
    """Read the child's output until it ends, or kill its process group at the deadline.

    The deadline is ``timeout`` seconds away, brought forward to `EXIT_GRACE_S` after a result
    line appears: a child that printed its result and then hangs tearing down the driver need
    not cost the whole timeout.
    """
    out, err = bytearray(), bytearray()
    buffers = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    timeout_at = deadline = time.monotonic() + timeout
    result_seen = False
    killed = None
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            selector.register(proc.stderr, selectors.EVENT_READ)
            while selector.get_map() and time.monotonic() < deadline:
                _read_some(selector, buffers, deadline)
                if not result_seen and _RESULT_LINE.search(out):
                    result_seen = True
                    deadline = min(timeout_at, time.monotonic() + EXIT_GRACE_S)
            if not selector.get_map():  # both pipes closed: the child is exiting
                try:
                    proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
                except subprocess.TimeoutExpired:
                    pass
            if proc.returncode is None:
                killed = (f"hung at exit (killed {EXIT_GRACE_S:g} s after printing its result)"
                          if result_seen and deadline < timeout_at else
                          f"timed out after {timeout:g} s ({TIMEOUT_ENV} raises the limit)")
                _kill_group(proc)
                _wait_quietly(proc, _DRAIN_S)
                drain_until = time.monotonic() + _DRAIN_S  # keep what was written before the kill
                while selector.get_map() and time.monotonic() < drain_until:
                    _read_some(selector, buffers, drain_until)
    except BaseException:  # KeyboardInterrupt: the child has its own session, Ctrl-C missed it
        _kill_group(proc)
        raise
    finally:
        proc.stdout.close()
        proc.stderr.close()
    return _ChildRun(bytes(out), bytes(err), None if killed else proc.returncode, killed)


def _read_some(selector: selectors.BaseSelector, buffers: dict, deadline: float) -> None:
    """Append what the pipes have ready (waiting until ``deadline`` at most); drop them at EOF."""
    for key, _ in selector.select(max(deadline - time.monotonic(), 0.0)):
        chunk = os.read(key.fd, 1 << 16)
        if chunk:
            buffers[key.fd] += chunk
        else:
            selector.unregister(key.fileobj)


def _wait_quietly(proc: subprocess.Popen, seconds: float) -> None:
    """Reap a killed child, but not forever: one stuck inside the GPU driver ignores SIGKILL."""
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pass


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, AttributeError):
        proc.kill()

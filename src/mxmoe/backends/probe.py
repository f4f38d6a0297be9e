"""The capability probe: does a backend give the reference's answer on this device?

Each backend with ``needs_probe`` is run once on a tiny problem in a **child process**, because
a compiler or driver crash (segfault, abort, hang) must not take the caller down. The parent
reads the child's printed result first and its exit code second: some drivers crash while the
process tears down after the work finished correctly, and a printed, correct result is what
counts (a child that printed its result gets `EXIT_GRACE_S` to exit, then is killed). No result,
a timeout, unparsable output or a wrong answer marks the backend unusable, with the reason kept.

Verdicts are cached in one JSON file (`cache_path`), keyed by the device, the driver, the torch,
Triton and mxmoe versions and a digest of the sources the kernels depend on (`PROBED_SOURCES`:
editing a kernel re-probes), and memoized for the life of the process.

Run as a program, this module is the child; it prints one line ``MXMOE_PROBE_RESULT {json}``::

    python -m mxmoe.backends.probe --backend triton_dequant --device cuda:0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

#: The child's one result line starts with this, then a space, then a JSON object.
RESULT_MARKER = "MXMOE_PROBE_RESULT"
#: Seconds a child may take. The first Triton compiles of a process are slow (tens of seconds).
DEFAULT_TIMEOUT_S = 180.0
TIMEOUT_ENV = "MXMOE_PROBE_TIMEOUT"
CACHE_DIR_ENV = "MXMOE_CACHE_DIR"
CACHE_FILE_NAME = "probe.json"
#: Bump when the layout of the cache file changes; other formats are ignored and rewritten.
CACHE_FORMAT = 1
#: Keys of older kernel sources pile up while developing; keep the most recent few.
MAX_CACHE_ENTRIES = 16
#: Max relative error (max|out - ref| / max|ref|) a bf16/fp16 result may have. Rounding alone
#: stays well under 1e-2 at the probe's size; a broken kernel (wrong nibble, missing mask) is O(1).
TOLERANCE = 2e-2
#: The probe problem: M, H, I, E, k. I = 96 is 3 scale blocks, not a multiple of 64, so the
#: masked K tail of the second GEMM runs; M = 5 leaves most of an M tile empty.
PROBE_SHAPE = (5, 64, 96, 3, 2)
#: Seconds a child that printed its result may take to exit before it is killed (and judged on
#: that result). Tearing down a CUDA context takes well under this.
EXIT_GRACE_S = 15.0
#: A cached timeout is believed this long, then probed again: a machine busy compiling (eight
#: ranks starting at once) can time a healthy backend out, and `auto` would then avoid it.
TIMEOUT_RETRY_S = 24 * 3600.0
#: Seconds to keep reading after killing a child (a grandchild that escaped may hold a pipe).
_DRAIN_S = 2.0
_STDERR_TAIL_CHARS = 600


@dataclass
class ProbeResult:
    """One backend's verdict on one device (fingerprint)."""

    backend: str
    usable: bool
    #: Why it is not usable; '' when it is.
    reason: str
    #: The child's max relative error against the reference; None without a result.
    max_rel_err: float | None = None
    #: The child's exit status (negative: killed by that signal); None when the parent killed it
    #: (timeout, or hung at exit).
    exit_code: int | None = None
    seconds: float = 0.0
    #: What happened besides the verdict, e.g. a crash at exit after a correct result.
    note: str = ""
    #: Killed at the timeout before printing a result (maybe only a busy machine: see
    #: `TIMEOUT_RETRY_S`).
    timed_out: bool = False
    #: When the child ran (seconds since the epoch).
    probed_at: float = field(default_factory=time.time)
    #: "fresh" (probed by this process) or "cache" (read from the cache file). Not stored.
    source: str = "fresh"

    def to_dict(self) -> dict:
        data = asdict(self)
        del data["source"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ProbeResult":
        """The result stored as ``data``; ValueError when it is not one."""
        if not isinstance(data, dict):
            raise ValueError(f"a probe result must be a JSON object, got {type(data).__name__}")
        try:
            result = cls(**data, source="cache")
        except TypeError as exc:
            raise ValueError(f"not a probe result ({exc})") from None
        if not (isinstance(result.backend, str) and isinstance(result.usable, bool)
                and isinstance(result.reason, str) and isinstance(result.timed_out, bool)
                and isinstance(result.probed_at, (int, float))):
            raise ValueError(f"not a probe result: {data!r}")
        return result


# --------------------------------------------------------------------------- the parent side

_LOCK = threading.Lock()
#: (key id, backend) -> verdict: never probe twice in one process.
_MEMO: dict[tuple[str, str], ProbeResult] = {}
_warned_unwritable = False


def probe(backend: str, device: torch.device | str, *, timeout: float | None = None) -> ProbeResult:
    """The verdict on ``backend`` for the CUDA ``device``: from memory, the cache file, or a child.

    Never raises for a failing backend: the failure is the verdict.
    """
    device = _with_index(torch.device(device))
    key_id, key = probe_key(device)
    with _LOCK:  # two threads asking at once must not both start a child
        result = _MEMO.get((key_id, backend))
        if result is not None:
            return result
        path = cache_path()
        result = _read_cached(path, key_id, key, backend)
        if result is None:
            result = run_child(backend, device, timeout=timeout)
            _write_cached(path, key_id, key, result)
        _MEMO[(key_id, backend)] = result
        return result


def forget(*, cache_file: bool = True) -> None:
    """Drop this process's verdicts and (by default) the cache file: the next use re-probes."""
    with _LOCK:
        _MEMO.clear()
        if cache_file:
            try:
                cache_path().unlink()
            except FileNotFoundError:
                pass


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
            env=_child_env(),
            # Its own process group, so a timeout also kills what it started (ptxas, ...).
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


def _child_env() -> dict[str, str]:
    """The caller's environment, with this mxmoe importable even if it came from sys.path."""
    env = dict(os.environ)
    package_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    return env


def judge(
    backend: str,
    *,
    stdout: str,
    stderr: str,
    exit_code: int | None,
    killed: str | None = None,
    seconds: float = 0.0,
) -> ProbeResult:
    """The verdict on one child run: its printed result first, how it ended second.

    Args:
        exit_code: the child's status (negative: the signal that killed it); None if we killed it.
        killed: why we killed it ("timed out after ..."), or None when it ended by itself.
    """
    ended = killed or _how_it_ended(exit_code)

    line = _result_line(stdout)

    def unusable(reason: str, max_rel_err: float | None = None) -> ProbeResult:
        return ProbeResult(backend, False, reason, max_rel_err, exit_code, seconds,
                           timed_out=line is None and killed is not None)

    if line is None:
        tail = _tail(stderr)
        return unusable(
            f"the probe child {ended} before printing a result; "
            + (f"stderr ends: {tail}" if tail else "stderr was empty")
        )
    try:
        payload = _parse_payload(line, backend)
    except ValueError as exc:
        return unusable(f"the probe child printed an unusable result ({exc}) and {ended}")
    err = payload["max_rel_err"]
    if not payload["ok"]:
        return unusable(payload["reason"] or "the probe child reported a failure", err)
    if err is None or not math.isfinite(err) or err > TOLERANCE:
        return unusable(f"wrong answer: max relative error {err} against the reference, "
                        f"tolerance {TOLERANCE:g}", err)
    clean = exit_code == 0
    note = "" if clean else f"the probe child {ended}; the correct result it printed first counts"
    return ProbeResult(backend, True, "", err, exit_code, seconds, note)


def _how_it_ended(exit_code: int | None) -> str:
    if exit_code is not None and exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        return f"was killed by {name}"
    return f"exited with code {exit_code}"


def _result_line(stdout: str) -> str | None:
    """The JSON after the last result marker, or None (compilers may print other lines)."""
    found = None
    for line in stdout.splitlines():
        if line.startswith(RESULT_MARKER + " "):
            found = line[len(RESULT_MARKER) + 1:]
    return found


def _parse_payload(line: str, backend: str) -> dict:
    """The child's result as {"ok", "max_rel_err", "reason"}; ValueError naming what is wrong."""
    shown = line if len(line) <= 200 else line[:200] + "..."
    try:
        payload = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}; got {shown!r}") from None
    if not isinstance(payload, dict):
        raise ValueError(f"expected a JSON object, got {shown!r}")
    if payload.get("backend") != backend:
        raise ValueError(f"expected backend {backend!r}, got {payload.get('backend')!r}")
    ok, err, reason = payload.get("ok"), payload.get("max_rel_err"), payload.get("reason", "")
    if not isinstance(ok, bool):
        raise ValueError(f"expected 'ok' true or false, got {ok!r}")
    if err is not None and (isinstance(err, bool) or not isinstance(err, (int, float))):
        raise ValueError(f"expected 'max_rel_err' a number or null, got {err!r}")
    if not isinstance(reason, str):
        raise ValueError(f"expected 'reason' a string, got {reason!r}")
    return {"ok": ok, "max_rel_err": None if err is None else float(err), "reason": reason}


def _tail(text: str) -> str:
    text = " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    return text if len(text) <= _STDERR_TAIL_CHARS else "..." + text[-_STDERR_TAIL_CHARS:]


# --------------------------------------------------------------------------- the cache key


def probe_key(device: torch.device) -> tuple[str, dict]:
    """(short id, what it hashes) of everything a verdict on the CUDA ``device`` depends on:
    the device, the versions, the kernel sources, and the switch between the two nibble
    conversions of triton_dequant (``MXMOE_DEQUANT_PTX``: different code is compiled)."""
    return _key_of(str(_with_index(device)), os.environ.get("MXMOE_DEQUANT_PTX", "1"))


_KEYS: dict[tuple[str, str], tuple[str, dict]] = {}


def _key_of(device: str, dequant_ptx: str) -> tuple[str, dict]:
    if (device, dequant_ptx) not in _KEYS:  # sources and driver are read once a process
        import mxmoe

        key = {
            **device_fingerprint(torch.device(device)),
            "torch": torch.__version__,
            "triton": _triton_version(),
            "mxmoe": mxmoe.__version__,
            "sources": source_digest(),
            "dequant_ptx": dequant_ptx,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        _KEYS[(device, dequant_ptx)] = (digest, key)
    return _KEYS[(device, dequant_ptx)]


def device_fingerprint(device: torch.device) -> dict:
    """The CUDA device's name, compute capability, driver and CUDA (or HIP) runtime versions."""
    index = _with_index(device).index
    major, minor = torch.cuda.get_device_capability(index)
    return {
        "device": torch.cuda.get_device_name(index),
        "capability": f"{major}.{minor}",
        "driver": driver_version(index),
        "runtime": torch.version.cuda or getattr(torch.version, "hip", None) or "unknown",
    }


def driver_version(index: int = 0) -> str:
    """The kernel driver's version (e.g. 580.95.05), without initialising anything new."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        match = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", text)
        if match:
            return match.group(1)
    except OSError:
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--id={index}", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


#: What a kernel's answer depends on, relative to the package: editing any of these re-probes.
PROBED_SOURCES = ("kernels", "backends", "routing.py", "format.py", "activations.py",
                  "constants.py")
_SOURCE_DIGEST: list[str] = []


def source_digest() -> str:
    """sha256 of the `PROBED_SOURCES` (.py and .json files), read once a process."""
    if not _SOURCE_DIGEST:
        package = Path(__file__).resolve().parents[1]
        h = hashlib.sha256()
        for path in _probed_files(package):
            h.update(path.relative_to(package).as_posix().encode() + b"\0")
            h.update(path.read_bytes() + b"\0")
        _SOURCE_DIGEST.append(h.hexdigest()[:16])
    return _SOURCE_DIGEST[0]


def _probed_files(package: Path) -> list[Path]:
    files = []
    for name in PROBED_SOURCES:
        path = package / name
        found = sorted(path.rglob("*")) if path.is_dir() else [path]
        files += [p for p in found if p.suffix in (".py", ".json") and p.is_file()]
    return files


def _with_index(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


# --------------------------------------------------------------------------- the cache file


def cache_dir() -> Path:
    """``$MXMOE_CACHE_DIR``, else ``$XDG_CACHE_HOME/mxmoe``, else ``~/.cache/mxmoe``."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "mxmoe"
    try:
        return Path.home() / ".cache" / "mxmoe"
    except RuntimeError:  # no home directory (some containers)
        return Path(tempfile.gettempdir()) / "mxmoe-cache"


def cache_path() -> Path:
    return cache_dir() / CACHE_FILE_NAME


def _load_entries(path: Path) -> dict:
    """The cache file's entries; {} when it is missing, unreadable or not ours (never raises)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError covers bad JSON and bad UTF-8
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def _read_cached(path: Path, key_id: str, key: dict, backend: str) -> ProbeResult | None:
    entry = _load_entries(path).get(key_id)
    if not isinstance(entry, dict) or entry.get("key") != key:
        return None
    results = entry.get("results")
    if not isinstance(results, dict) or backend not in results:
        return None
    try:
        result = ProbeResult.from_dict(results[backend])
    except ValueError:
        return None
    if result.timed_out and time.time() - result.probed_at > TIMEOUT_RETRY_S:
        return None
    return result


def _write_cached(path: Path, key_id: str, key: dict, result: ProbeResult) -> None:
    """Add ``result`` to the cache file, atomically; warn once (never raise) when it can't."""
    entries = _load_entries(path)  # re-read: another process may have added entries
    entry = entries.get(key_id)
    if not isinstance(entry, dict) or entry.get("key") != key or not isinstance(
        entry.get("results"), dict
    ):
        entry = {"key": key, "results": {}}
    entry["results"][result.backend] = result.to_dict()
    entry["written"] = time.time()
    entries[key_id] = entry
    newest = sorted(entries, key=lambda k: _written(entries[k]), reverse=True)
    data = {"format": CACHE_FORMAT, "entries": {k: entries[k] for k in newest[:MAX_CACHE_ENTRIES]}}
    try:
        _atomic_write(path, json.dumps(data, indent=1, sort_keys=True))
    except OSError as exc:
        _warn_unwritable(path, exc)


def _written(entry) -> float:
    value = entry.get("written") if isinstance(entry, dict) else None
    return value if isinstance(value, (int, float)) else 0.0


def _atomic_write(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _warn_unwritable(path: Path, exc: OSError) -> None:
    global _warned_unwritable
    if _warned_unwritable:
        return
    _warned_unwritable = True
    warnings.warn(
        f"mxmoe: cannot write the backend probe cache {path} ({exc}); every new process will "
        f"probe again. Set {CACHE_DIR_ENV} to a writable directory.",
        RuntimeWarning,
        stacklevel=3,
    )


# --------------------------------------------------------------------------- the child side


def _probe_args(activation, device: torch.device, dtype: torch.dtype):
    """The tiny problem's `MoECall`, the same every run (seeded), with biases."""
    from ..format import quantize_mxfp4
    from ..routing import route
    from ..validation import check_fused_experts_args

    m, h, i, e, k = PROBE_SHAPE
    g = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    w13 = quantize_mxfp4(randn(e, 2 * i, h, scale=h**-0.5)).to(device)
    w2 = quantize_mxfp4(randn(e, h, i, scale=i**-0.5)).to(device)
    weights, ids = route(randn(m, e), k)
    kwargs = dict(
        hidden_states=randn(m, h).to(dtype).to(device),
        w13=w13,
        w2=w2,
        topk_weights=weights.to(device),
        topk_ids=ids.to(device),
        w13_bias=randn(e, 2 * i, scale=0.1).to(dtype).to(device),
        w2_bias=randn(e, h, scale=0.1).to(dtype).to(device),
    )
    return check_fused_experts_args(
        **kwargs, activation=activation, alpha=1.702, limit=7.0, expert_map=None
    )


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max|out - ref| / max|ref|; inf when out holds NaN or Inf."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return math.inf
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def check_backend(name: str, device: torch.device, dtype: torch.dtype) -> dict:
    """Run backend ``name`` on the probe problem (both activations) here; the child's payload."""
    from ..activations import Activation
    from ..reference import fused_experts_reference
    from . import get_backend

    backend = get_backend(name)
    reason = backend.unavailable_reason(device)
    if reason is not None:
        return {"ok": False, "max_rel_err": None, "reason": reason}
    worst = 0.0
    for activation in Activation:
        args = _probe_args(activation, device, dtype)
        out = backend.run(args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # surface asynchronous kernel errors here
        expected_shape = tuple(args.hidden_states.shape)
        if tuple(out.shape) != expected_shape or out.dtype != dtype:
            return {"ok": False, "max_rel_err": None, "reason": (
                f"{activation.value}: output is {tuple(out.shape)} {out.dtype}, expected "
                f"{expected_shape} {dtype}")}
        ref = fused_experts_reference(
            args.hidden_states, args.w13, args.w2, args.topk_weights, args.topk_ids,
            w13_bias=args.w13_bias, w2_bias=args.w2_bias, activation=activation,
        )
        err = _relative_error(out, ref)
        if not math.isfinite(err):
            return {"ok": False, "max_rel_err": None,
                    "reason": f"{activation.value}: output holds NaN or Inf"}
        if err > TOLERANCE:
            return {"ok": False, "max_rel_err": err, "reason": (
                f"{activation.value}: max relative error {err:.3g} against the reference, "
                f"tolerance {TOLERANCE:g}")}
        worst = max(worst, err)
    return {"ok": True, "max_rel_err": worst, "reason": ""}


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def main(argv: list[str] | None = None) -> int:
    """The child: probe one backend, print one result line, flush. Exit 0 when usable."""
    parser = argparse.ArgumentParser(prog="python -m mxmoe.backends.probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--device", required=True, help="cuda:N, or cpu")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                        help="default: bfloat16 on CUDA, float16 on the CPU (the Triton "
                             "interpreter computes bfloat16 wrongly)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = _DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float16")]
    payload = {"backend": args.backend, "ok": False, "max_rel_err": None, "reason": ""}
    try:
        payload.update(check_backend(args.backend, device, dtype))
    except Exception as exc:  # the verdict, not a crash: report it through the result line
        traceback.print_exc()
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        payload["reason"] = f"{type(exc).__name__}: {first_line}"
    print(f"{RESULT_MARKER} {json.dumps(payload)}", flush=True)
    return 0 if payload["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

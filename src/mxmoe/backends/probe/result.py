"""The probe's verdict (`ProbeResult`) and how one child run is judged (`judge`).

A child prints one line ``MXMOE_PROBE_RESULT {json}``; the parent judges that line first and
the way the child ended second: a printed, correct result counts even when the driver crashes
while the process tears down.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import asdict, dataclass, field

#: The child's one result line starts with this, then a space, then a JSON object.
RESULT_MARKER = "MXMOE_PROBE_RESULT"
#: Max relative error (max|out - ref| / max|ref|) a bf16/fp16 result may have. Rounding alone
#: stays well under 1e-2 at the probe's size; a broken kernel (wrong nibble, missing mask) is O(1).
TOLERANCE = 2e-2
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
    #: `mxmoe.backends.probe.TIMEOUT_RETRY_S`).
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


def result_line_text(payload: dict) -> str:
    """The line a child prints for ``payload``."""
    return f"{RESULT_MARKER} {json.dumps(payload)}"


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

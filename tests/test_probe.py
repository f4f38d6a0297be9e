"""The capability probe: its verdict on every way a child can end, and its cache.

Children are simulated by tiny scripts written to tmp_path; one test runs the real child for
the `torch` backend on the CPU. No test here needs a GPU except those marked ``gpu``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from mxmoe import cache
from mxmoe.backends import probe
from mxmoe.backends.probe import key as probe_key_module
from mxmoe.backends.probe import watch

BACKEND = "triton_dequant"
FAKE_KEY = ("key-one", {"device": "Fake GPU", "driver": "1.0", "sources": "aaaa"})


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own cache directory and an empty in-process memo."""
    monkeypatch.setenv(probe.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(probe.TIMEOUT_ENV, raising=False)
    monkeypatch.setattr(cache, "_warned", set())
    probe.forget(cache_file=False)
    yield tmp_path / "cache"
    probe.forget(cache_file=False)


def result_line(ok=True, max_rel_err=1e-3, reason="", backend=BACKEND) -> str:
    payload = {"backend": backend, "ok": ok, "max_rel_err": max_rel_err, "reason": reason}
    return f"{probe.RESULT_MARKER} {json.dumps(payload)}"


def child_script(tmp_path, body: str, name: str = "child.py") -> list[str]:
    """A command running ``body`` (Python) as the probe child."""
    path = tmp_path / name
    path.write_text("import json, os, signal, sys, time\n" + textwrap.dedent(body))
    return [sys.executable, str(path)]


def run_script(tmp_path, body: str, timeout: float = 30.0) -> probe.ProbeResult:
    return probe.run_child(BACKEND, "cuda:0", timeout=timeout, command=child_script(tmp_path, body))


# --------------------------------------------------------------------------- simulated children


def test_correct_result_and_clean_exit_is_usable(tmp_path):
    result = run_script(tmp_path, f"print({result_line()!r}, flush=True)")
    assert result.usable and result.reason == "" and result.note == ""
    assert result.max_rel_err == pytest.approx(1e-3) and result.exit_code == 0


@pytest.mark.parametrize("crash, ended", [
    ("os.abort()", "SIGABRT"),
    ("os.kill(os.getpid(), signal.SIGSEGV)", "SIGSEGV"),
    ("os._exit(-11)", "code 245"),  # exit statuses are taken mod 256
    ("sys.exit(3)", "code 3"),
])
def test_correct_result_then_crash_at_exit_is_usable(tmp_path, crash, ended):
    # The driver-teardown crash: the work was done and printed; the exit code must not matter.
    result = run_script(tmp_path, f"print({result_line()!r}, flush=True)\n{crash}\n")
    assert result.usable, result.reason
    assert ended in result.note and "the correct result it printed first counts" in result.note
    assert result.exit_code != 0


def test_noise_around_the_result_line_is_ignored(tmp_path):
    body = f"""
        print("compiling kernel... MXMOE_PROBE_RESULT is mentioned mid-line")
        print({result_line()!r})
        print("done", flush=True)
        sys.stderr.write("a warning\\n")
    """
    assert run_script(tmp_path, body).usable


def test_crash_before_printing_is_unusable_with_signal_and_stderr(tmp_path):
    body = """
        sys.stderr.write("ptxas fatal: something broke\\n"); sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGSEGV)
    """
    result = run_script(tmp_path, body)
    assert not result.usable
    assert "SIGSEGV" in result.reason and "before printing a result" in result.reason
    assert result.exit_code == -11 and not result.timed_out
    assert "ptxas fatal: something broke" in result.reason


def test_exit_without_result_is_unusable(tmp_path):
    result = run_script(tmp_path, "print('hello')")
    assert not result.usable
    assert "exited with code 0 before printing a result" in result.reason
    assert "stderr was empty" in result.reason


def test_python_error_before_printing_keeps_the_traceback_tail(tmp_path):
    result = run_script(tmp_path, "raise ModuleNotFoundError(\"No module named 'mxmoe.x'\")\n")
    assert not result.usable
    assert "exited with code 1" in result.reason and "ModuleNotFoundError" in result.reason


def test_hang_times_out_and_is_unusable(tmp_path):
    start = time.monotonic()
    result = run_script(tmp_path, "time.sleep(600)", timeout=2)
    assert time.monotonic() - start < 20
    assert not result.usable and "timed out after 2 s" in result.reason
    assert result.exit_code is None and result.timed_out


def test_hang_with_a_grandchild_holding_the_pipes_is_killed(tmp_path):
    # A stuck ptxas inherits the child's stdout; killing only the child would leave us waiting.
    body = """
        import subprocess
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        time.sleep(600)
    """
    start = time.monotonic()
    result = run_script(tmp_path, body, timeout=2)
    assert time.monotonic() - start < 20
    assert not result.usable and "timed out" in result.reason


def test_correct_result_then_hang_at_exit_is_usable_after_a_grace(tmp_path, monkeypatch):
    # A driver that hangs tearing down: waiting the whole timeout would only waste time.
    monkeypatch.setattr(watch, "EXIT_GRACE_S", 0.5)
    start = time.monotonic()
    result = run_script(tmp_path, f"print({result_line()!r}, flush=True)\ntime.sleep(600)",
                        timeout=60)
    assert time.monotonic() - start < 20
    assert result.usable and "hung at exit" in result.note and result.exit_code is None


def test_correct_result_then_hang_until_the_timeout_is_usable(tmp_path):
    result = run_script(tmp_path, f"print({result_line()!r}, flush=True)\ntime.sleep(600)",
                        timeout=2)
    assert result.usable and "timed out after 2 s" in result.note


def test_child_that_closes_its_pipes_and_hangs_is_killed(tmp_path):
    body = "os.close(1); os.close(2); time.sleep(600)"
    result = run_script(tmp_path, body, timeout=2)
    assert not result.usable and "timed out" in result.reason
    assert "stderr was empty" in result.reason


def test_large_output_does_not_block_the_child(tmp_path):
    # More than a pipe buffer (64 KiB) on both streams before the result.
    body = f"""
        sys.stderr.write("e" * 300_000 + "\\n"); sys.stderr.flush()
        print("o" * 300_000)
        print({result_line()!r}, flush=True)
    """
    result = run_script(tmp_path, body)
    assert result.usable, result.reason


@pytest.mark.parametrize("line, expected", [
    (result_line(ok=False, max_rel_err=None, reason="CompilationError: bad layout"),
     "CompilationError: bad layout"),
    (result_line(ok=False, max_rel_err=0.7, reason="swigluoai: max relative error 0.7"),
     "max relative error 0.7"),
    # The parent checks the error itself: a child saying ok with a large error is wrong.
    (result_line(ok=True, max_rel_err=0.5), "wrong answer"),
    (result_line(ok=True, max_rel_err=None), "wrong answer"),
    (f'{probe.RESULT_MARKER} {{"backend": "{BACKEND}", "ok": true, "max_rel_err": NaN}}',
     "wrong answer"),
])
def test_wrong_answer_is_unusable_with_reason(tmp_path, line, expected):
    result = run_script(tmp_path, f"print({line!r}, flush=True)")
    assert not result.usable and expected in result.reason


@pytest.mark.parametrize("line, expected", [
    (f"{probe.RESULT_MARKER} {{not json", "not JSON"),
    (f"{probe.RESULT_MARKER} [1, 2]", "expected a JSON object"),
    (f'{probe.RESULT_MARKER} {{"backend": "{BACKEND}", "ok": "yes"}}', "'ok' true or false"),
    (f'{probe.RESULT_MARKER} {{"backend": "{BACKEND}", "ok": true, "max_rel_err": "0"}}',
     "'max_rel_err' a number"),
    (result_line(backend="bf16"), "expected backend 'triton_dequant', got 'bf16'"),
])
def test_garbage_result_is_unusable(tmp_path, line, expected):
    result = run_script(tmp_path, f"print({line!r}, flush=True)")
    assert not result.usable
    assert "unusable result" in result.reason and expected in result.reason


def test_child_that_cannot_start_is_unusable():
    result = probe.run_child(BACKEND, "cuda:0", command=["/nonexistent/python-for-mxmoe"])
    assert not result.usable and "could not start the probe child" in result.reason


def test_judge_reads_the_last_result_line():
    out = "\n".join([result_line(ok=False, reason="first"), result_line(ok=True)])
    assert probe.judge(BACKEND, stdout=out, stderr="", exit_code=0).usable


def test_long_stderr_is_cut_to_its_tail():
    stderr = "\n".join(f"line {n}" for n in range(1000))
    result = probe.judge(BACKEND, stdout="", stderr=stderr, exit_code=1)
    assert "line 999" in result.reason and "line 0 " not in result.reason
    assert len(result.reason) < 1000


def test_timeout_comes_from_the_environment(monkeypatch):
    assert probe.probe_timeout() == probe.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(probe.TIMEOUT_ENV, "7.5")
    assert probe.probe_timeout() == 7.5
    monkeypatch.setenv(probe.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="MXMOE_PROBE_TIMEOUT must be a number.*'soon'"):
        probe.probe_timeout()


# --------------------------------------------------------------------------- the real child


def test_real_child_for_the_torch_backend_on_the_cpu():
    result = probe.run_child("torch", "cpu", timeout=120)
    assert result.usable, result.reason
    assert result.exit_code == 0 and result.max_rel_err < 1e-2  # fp16 output rounding only


@pytest.mark.interpreter
def test_real_child_runs_a_triton_kernel_under_the_interpreter():
    # The child inherits TRITON_INTERPRET=1 and uses float16 (the interpreter's bf16 is wrong).
    result = probe.run_child("triton_dequant", "cpu", timeout=300)
    assert result.usable, result.reason
    assert result.max_rel_err < 1e-2


def test_real_child_prints_one_result_line_and_no_import_warning():
    # -W error: running the module must not warn that it was imported before it ran.
    cmd = [sys.executable, "-W", "error", "-m", "mxmoe.backends.probe", "--backend", "torch",
           "--device", "cpu", "--dtype", "float32"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=watch.child_env())
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(probe.RESULT_MARKER)]
    assert out.returncode == 0 and len(lines) == 1, out.stderr
    payload = json.loads(lines[0].split(" ", 1)[1])
    assert payload["ok"] is True and payload["max_rel_err"] < 1e-5 and payload["backend"] == "torch"


def test_child_main_reports_an_error_as_a_result(capsys):
    assert probe.main(["--backend", "no_such_backend", "--device", "cpu"]) == 1
    line = capsys.readouterr().out.strip().splitlines()[-1]
    payload = json.loads(line.split(" ", 1)[1])
    assert payload["ok"] is False and "ValueError: unknown backend 'no_such_backend'" in \
        payload["reason"]


def test_child_main_reports_a_static_check_failure(capsys, monkeypatch):
    import triton  # noqa: F401  (first under the session's TRITON_INTERPRET: see test_backends)

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert probe.main(["--backend", "triton_scaled", "--device", "cpu"]) == 1
    payload = json.loads(capsys.readouterr().out.strip().split(" ", 1)[1])
    assert "TRITON_INTERPRET=1" in payload["reason"]


# --------------------------------------------------------------------------- cache and memo


class FakeChild:
    """Stands in for `child_command`: counts runs and plays one script."""

    def __init__(self, tmp_path, body=None):
        self.runs = 0
        self.command = child_script(tmp_path, body or f"print({result_line()!r}, flush=True)",
                                    name="counted_child.py")

    def __call__(self, backend, device):
        self.runs += 1
        return self.command


@pytest.fixture
def fake_child(tmp_path, monkeypatch):
    child = FakeChild(tmp_path)
    monkeypatch.setattr(probe, "child_command", child)
    monkeypatch.setattr(probe, "probe_key", lambda device: FAKE_KEY)
    return child


def cache_file(isolated_cache):
    return isolated_cache / probe.CACHE_FILE_NAME


def test_verdict_is_written_to_the_cache_file(fake_child, isolated_cache):
    result = probe.probe(BACKEND, "cuda:0")
    assert result.usable and result.source == "fresh" and fake_child.runs == 1
    data = json.loads(cache_file(isolated_cache).read_text())
    entry = data["entries"][FAKE_KEY[0]]
    assert data["format"] == probe.CACHE_FORMAT and entry["key"] == FAKE_KEY[1]
    assert entry["results"][BACKEND]["usable"] is True
    names = {p.name for p in isolated_cache.iterdir()}
    assert probe.CACHE_FILE_NAME in names and not any(n.endswith(".tmp") for n in names)


def test_verdict_is_memoized_within_a_process(fake_child, isolated_cache):
    first = probe.probe(BACKEND, "cuda:0")
    cache_file(isolated_cache).unlink()
    assert probe.probe(BACKEND, "cuda:0") is first and fake_child.runs == 1


def test_cache_file_is_reused_by_a_new_process(fake_child):
    probe.probe(BACKEND, "cuda:0")
    probe.forget(cache_file=False)  # what a new process starts with
    result = probe.probe(BACKEND, "cuda:0")
    assert fake_child.runs == 1 and result.usable and result.source == "cache"


def test_failed_verdict_is_cached_too(tmp_path, monkeypatch):
    child = FakeChild(tmp_path, body="os.abort()")
    monkeypatch.setattr(probe, "child_command", child)
    monkeypatch.setattr(probe, "probe_key", lambda device: FAKE_KEY)
    assert not probe.probe(BACKEND, "cuda:0").usable
    probe.forget(cache_file=False)
    result = probe.probe(BACKEND, "cuda:0")
    assert child.runs == 1 and not result.usable and "SIGABRT" in result.reason


@pytest.mark.parametrize("retry_after, runs", [(probe.TIMEOUT_RETRY_S, 1), (0.0, 2)],
                         ids=["recent timeout believed", "old timeout retried"])
def test_cached_timeout_is_retried_once_old(tmp_path, monkeypatch, retry_after, runs):
    child = FakeChild(tmp_path, body="time.sleep(600)")
    monkeypatch.setattr(probe, "child_command", child)
    monkeypatch.setattr(probe, "probe_key", lambda device: FAKE_KEY)
    monkeypatch.setattr(probe, "TIMEOUT_RETRY_S", retry_after)
    monkeypatch.setenv(probe.TIMEOUT_ENV, "1")
    first = probe.probe(BACKEND, "cuda:0")
    assert first.timed_out and not first.usable
    probe.forget(cache_file=False)
    time.sleep(0.01)
    probe.probe(BACKEND, "cuda:0")
    assert child.runs == runs


def test_each_backend_is_probed_separately(fake_child):
    probe.probe(BACKEND, "cuda:0")
    probe.probe("triton_scaled", "cuda:0")
    assert fake_child.runs == 2


@pytest.mark.parametrize("content, warns", [
    (b"{not json", True),
    (b"\xff\xfe\x00binary", True),
    (b"[]", True),
    (b'{"format": 999, "entries": {}}', True),
    (b'{"format": 1, "entries": []}', True),
    (b'{"format": 1, "entries": {"key-one": 5}}', False),
    (b'{"format": 1, "entries": {"key-one": {"key": {"device": "Fake GPU", "driver": "1.0", '
     b'"sources": "aaaa"}, "results": {"triton_dequant": {"usable": "maybe"}}}}}', False),
], ids=["not json", "not utf-8", "a list", "other format", "entries a list", "entry a number",
        "result malformed"])
def test_corrupt_cache_file_is_ignored_and_rewritten(fake_child, isolated_cache, content, warns,
                                                     recwarn):
    path = cache_file(isolated_cache)
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    assert probe.probe(BACKEND, "cuda:0").usable and fake_child.runs == 1
    damaged = [w for w in recwarn if "is damaged" in str(w.message)]
    assert len(damaged) == (1 if warns else 0)
    data = json.loads(path.read_text())
    assert data["entries"][FAKE_KEY[0]]["results"][BACKEND]["usable"] is True


def test_unwritable_cache_directory_is_not_fatal(fake_child, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv(probe.CACHE_DIR_ENV, str(blocker / "cache"))  # a directory under a file
    with pytest.warns(RuntimeWarning, match="cannot write the backend probe cache"):
        assert probe.probe(BACKEND, "cuda:0").usable
    assert probe.probe(BACKEND, "cuda:0").usable and fake_child.runs == 1  # memo still holds


def test_key_change_probes_again_and_keeps_both(fake_child, isolated_cache, monkeypatch):
    probe.probe(BACKEND, "cuda:0")
    new_sources = ("key-two", {**FAKE_KEY[1], "sources": "bbbb"})  # a kernel was edited
    monkeypatch.setattr(probe, "probe_key", lambda device: new_sources)
    probe.probe(BACKEND, "cuda:0")
    assert fake_child.runs == 2
    entries = json.loads(cache_file(isolated_cache).read_text())["entries"]
    assert set(entries) == {"key-one", "key-two"}


def test_entry_whose_key_differs_is_not_trusted(fake_child, isolated_cache, monkeypatch):
    probe.probe(BACKEND, "cuda:0")
    probe.forget(cache_file=False)
    same_id_other_key = (FAKE_KEY[0], {**FAKE_KEY[1], "driver": "2.0"})
    monkeypatch.setattr(probe, "probe_key", lambda device: same_id_other_key)
    probe.probe(BACKEND, "cuda:0")
    assert fake_child.runs == 2


def test_cache_keeps_only_the_newest_entries(fake_child, isolated_cache, monkeypatch):
    monkeypatch.setattr(probe, "MAX_CACHE_ENTRIES", 2)
    for n in range(3):
        monkeypatch.setattr(probe, "probe_key", lambda device, n=n: (f"k{n}", {"n": n}))
        probe.probe(BACKEND, "cuda:0")
        time.sleep(0.01)
    entries = json.loads(cache_file(isolated_cache).read_text())["entries"]
    assert set(entries) == {"k1", "k2"}


# A process of its own that probes once (a fake child that logs each run and takes a moment,
# so that processes started together overlap) and prints the verdict it got.
_RANK_SCRIPT = """
import json, sys, time
from pathlib import Path
from mxmoe.backends import probe

runs_log, go = Path(sys.argv[1]), Path(sys.argv[2])
child = [sys.executable, "-c",
         "import sys, time; open(sys.argv[1], 'a').write('run '); time.sleep(0.5); "
         "print(sys.argv[2], flush=True)", str(runs_log), sys.argv[3]]
probe.child_command = lambda backend, device: child
probe.probe_key = lambda device: ("key-one", {"device": "Fake GPU", "driver": "1.0"})
while not go.exists():  # start together
    time.sleep(0.005)
result = probe.probe("triton_dequant", "cuda:0")
print(json.dumps({"usable": result.usable, "max_rel_err": result.max_rel_err}))
"""


@pytest.mark.parametrize("processes", [2, 8])
def test_processes_starting_together_run_one_child_and_agree(tmp_path, isolated_cache,
                                                             processes):
    runs_log, go = tmp_path / "runs.log", tmp_path / "go"
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    env = {**watch.child_env(), probe.CACHE_DIR_ENV: str(isolated_cache)}
    ranks = [subprocess.Popen([sys.executable, str(script), str(runs_log), str(go), result_line()],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(processes)]
    time.sleep(1.0)  # let every interpreter reach the barrier (imports take a while)
    go.touch()
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks), [err for _, err in outputs]
    verdicts = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert verdicts == [{"usable": True, "max_rel_err": 1e-3}] * processes
    assert runs_log.read_text().count("run") == 1  # the others waited and read its verdict
    data = json.loads(cache_file(isolated_cache).read_text())  # one valid file
    assert data["entries"]["key-one"]["results"][BACKEND]["usable"] is True
    assert not [p for p in isolated_cache.iterdir() if p.name.endswith(".tmp")]


def test_forget_drops_memo_and_file(fake_child, isolated_cache):
    probe.probe(BACKEND, "cuda:0")
    probe.forget()
    assert not cache_file(isolated_cache).exists()
    probe.probe(BACKEND, "cuda:0")
    assert fake_child.runs == 2


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(probe.CACHE_DIR_ENV, str(tmp_path / "x"))
    assert probe.cache_path() == tmp_path / "x" / probe.CACHE_FILE_NAME
    monkeypatch.delenv(probe.CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert probe.cache_dir() == tmp_path / "xdg" / "mxmoe"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert probe.cache_dir() == tmp_path / "home" / ".cache" / "mxmoe"


def test_source_digest_is_stable_hex():
    digest = probe.source_digest()
    assert digest == probe.source_digest() and len(digest) == 16
    int(digest, 16)


def test_source_digest_covers_kernels_backends_and_routing():
    package = Path(cache.__file__).resolve().parent
    files = cache._files(package, probe.PROBED_SOURCES, (".py", ".json"))
    names = {p.relative_to(package).as_posix() for p in files}
    assert {"backends/probe/watch.py", "backends/probe/child.py", "kernels/__init__.py",
            "routing.py", "format.py"} <= names
    assert "cli/info.py" not in names


# --------------------------------------------------------------------------- on the GPU


@pytest.mark.gpu
def test_probe_key_names_the_gpu_and_versions():
    key_id, key = probe.probe_key(torch.device("cuda"))
    assert key["device"] == torch.cuda.get_device_name(torch.cuda.current_device())
    assert {"driver", "torch", "triton", "mxmoe", "sources", "dequant_ptx"} <= set(key)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton_dequant", "triton_scaled", "bf16"])
def test_real_probe_on_the_gpu_says_usable(backend):
    result = probe.probe(backend, "cuda")
    assert result.usable, result.reason
    assert result.max_rel_err <= probe.TOLERANCE


def test_probe_key_tells_the_two_nibble_conversions_apart(monkeypatch):
    """MXMOE_DEQUANT_PTX changes the compiled code, so a verdict for one does not stand for
    the other."""
    monkeypatch.setattr(probe_key_module, "device_fingerprint",
                        lambda device: {"device": "Fake GPU"})
    monkeypatch.setattr(probe_key_module, "_KEYS", {})
    id_ptx, key_ptx = probe_key_module._key_of("cuda:0", "1")
    id_portable, key_portable = probe_key_module._key_of("cuda:0", "0")
    assert id_ptx != id_portable
    assert key_ptx["dequant_ptx"] == "1" and key_portable["dequant_ptx"] == "0"
    assert probe_key_module._key_of("cuda:0", "1")[0] == id_ptx  # stable

"""The cache files (mxmoe.cache): atomic, locked, keyed; damaged files ignored with a warning.
The probe's use of them is tested in test_probe.py, tuning's here and in test_configs.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from mxmoe import cache


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path / "c"))
    monkeypatch.setattr(cache, "_warned", set())
    return tmp_path / "c"


def entry_file(max_entries=8):
    return cache.EntryFile("things.json", 1, max_entries, "test cache")


def test_update_writes_one_keyed_entry_and_no_temp_file(isolated):
    assert entry_file().update("id1", {"k": 1}, lambda e: e.update(value=3))
    assert entry_file().entry("id1", {"k": 1})["value"] == 3
    assert entry_file().entry("id1", {"k": 2}) is None  # same id, other key: not trusted
    assert not [p for p in isolated.iterdir() if p.name.endswith(".tmp")]


def test_only_the_newest_entries_are_kept():
    for n in range(4):
        entry_file(max_entries=2).update(f"id{n}", {"n": n}, lambda e: None)
        time.sleep(0.01)
    assert set(entry_file().entries()) == {"id2", "id3"}


@pytest.mark.parametrize("content", [b"{oops", b"\xff\xfe", b"[1]", b'{"format": 7}'],
                         ids=["not json", "not utf-8", "a list", "other format"])
def test_damaged_file_is_ignored_with_one_warning_and_rewritten(isolated, content):
    isolated.mkdir()
    (isolated / "things.json").write_bytes(content)
    with pytest.warns(RuntimeWarning, match="test cache .* is damaged"):
        assert entry_file().entries() == {}
    assert entry_file().update("id", {}, lambda e: e.update(v=1))
    assert json.loads((isolated / "things.json").read_text())["entries"]["id"]["v"] == 1


def test_lock_not_had_within_the_timeout_says_so(isolated):
    path = isolated / "x.json"
    with cache.file_lock(path) as first:
        assert first
        script = ("import sys; from pathlib import Path; from mxmoe import cache\n"
                  "with cache.file_lock(Path(sys.argv[1]), timeout=0.2) as held: print(held)")
        out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True,
                             text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


# Each process records its own M into the tuning cache at the same moment, then reads the table.
# Its writes are slowed (as a slow disk would make them) so that, without the lock, two
# processes' read-modify-write cycles overlap and one entry is lost every time.
_RANK_SCRIPT = """
import json, sys, time
from pathlib import Path
from mxmoe import cache, tuning_cache
from mxmoe.settings import DeviceFacts

rank, go = int(sys.argv[1]), Path(sys.argv[2])
facts = DeviceFacts("cuda", "Test GPU", (9, 0), 132, False)
tuning_cache.key_of(facts)  # (imports and the source digest done before the start)
write = cache.atomic_write_text
cache.atomic_write_text = lambda path, text: (time.sleep(0.2), write(path, text))
(go.parent / f"ready-{rank}").touch()
while not go.exists():
    time.sleep(0.005)
assert tuning_cache.record(facts, "triton_dequant", "H64_I64_E8_k2", 2 ** rank,
                           {"block_m": 16 * (rank + 1)})
print(json.dumps(sorted(tuning_cache.table(facts)["configs"]["triton_dequant"]["H64_I64_E8_k2"])))
"""


@pytest.mark.parametrize("processes", [2, 8])
def test_processes_recording_together_lose_no_entry(tmp_path, isolated, processes):
    from mxmoe import tuning_cache
    from mxmoe.backends.probe.watch import child_env
    from mxmoe.settings import DeviceFacts

    go = tmp_path / "go"
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    env = {**child_env(), cache.CACHE_DIR_ENV: str(isolated)}
    ranks = [subprocess.Popen([sys.executable, str(script), str(r), str(go)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(processes)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{r}").exists() for r in range(processes)):
        assert time.monotonic() < deadline and all(rank.poll() is None for rank in ranks), \
            "a rank did not get ready"
        time.sleep(0.01)
    go.touch()
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks), [err for _, err in outputs]
    tuning_cache.forget()
    facts = DeviceFacts("cuda", "Test GPU", (9, 0), 132, False)
    entries = tuning_cache.table(facts)["configs"]["triton_dequant"]["H64_I64_E8_k2"]
    assert entries == {str(2 ** r): {"block_m": 16 * (r + 1)} for r in range(processes)}
    assert [p.name for p in isolated.iterdir() if p.suffix == ".json"] == ["tuned.json"]
    assert not [p for p in isolated.iterdir() if p.name.endswith(".tmp")]

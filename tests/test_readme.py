"""Every Python snippet of README.md runs as written, on the CPU.

A snippet that cannot run here is preceded by ``<!-- not run by tests/test_readme.py: REASON
-->``. The checkpoints the snippets name (``gpt-oss-20b/``, ``Qwen3-30B-A3B-MXFP4A16/``) are
tiny ones of the same formats, written into the working directory the snippets run in.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from checkpoints import dense_moe, hf_config, mxfp4_tensors, write_checkpoint

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"(?:<!-- (not run by tests/test_readme\.py: [^>]*) -->\n)?```python\n(.*?)```",
                    re.S)


def _snippets() -> list[tuple[int, str, str | None]]:
    text = README.read_text()
    return [(text[:m.start()].count("\n") + 1, m[2], m[1]) for m in _BLOCK.finditer(text)]


SNIPPETS = _snippets()


def test_readme_has_snippets_and_every_skip_says_why():
    assert len([s for s in SNIPPETS if s[2] is None]) >= 3
    for line, _, reason in SNIPPETS:
        assert reason is None or len(reason) > len("not run by tests/test_readme.py: ") + 5, line


@pytest.fixture
def checkpoint_dir(tmp_path, monkeypatch):
    moe = dense_moe(4, 64, 64, seed=3)
    write_checkpoint(tmp_path / "gpt-oss-20b", mxfp4_tensors(moe, 0, "transformers"),
                     config=hf_config(moe, 2))
    ct = pytest.importorskip("ct_checkpoints")
    ct.quantize_and_save(ct.tiny_model("qwen3_moe"), tmp_path / "Qwen3-30B-A3B-MXFP4A16")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("line, code", [(line, code) for line, code, reason in SNIPPETS
                                        if reason is None], ids=lambda v: f"line {v}"
                         if isinstance(v, int) else "")
def test_snippet_runs_as_written(checkpoint_dir, line, code):
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})

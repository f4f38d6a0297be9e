"""First-use tuning (MXMOE_AUTOTUNE=1) with a fake timer: when it tunes, what it stores, and
when it must not (off, already tuned, CUDA-graph capture, torch.compile tracing)."""

from __future__ import annotations

import pytest
import torch

from mxmoe import autotune, cache, tuning_cache
from mxmoe.settings import DeviceFacts
from mxmoe.kernels import configs
from mxmoe.kernels.configs import MoEConfig

FACTS = DeviceFacts("cuda", "NVIDIA H200", (9, 0), 132, False)
QWEN3 = (2048, 768, 128, 8)  # H, I, E, k: in no shipped table


@pytest.fixture(autouse=True)
def fresh(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path / "user-cache"))
    monkeypatch.setenv(autotune.ENV, "1")
    autotune.refresh()
    tuning_cache.forget()
    yield
    autotune.refresh()
    tuning_cache.forget()


def key(m=64):
    return autotune.TuneKey.of("triton_dequant", FACTS, m, *QWEN3)


class Timer:
    def __init__(self, seconds):
        self.seconds, self.calls = seconds, []

    def __call__(self, cfg):
        self.calls.append(cfg)
        return self.seconds(cfg)


CANDIDATES = [MoEConfig(block_n=n) for n in (32, 64, 128)]


def test_first_call_times_the_candidates_and_keeps_the_fastest():
    timer = Timer(lambda cfg: abs(cfg.block_n - 64))
    assert autotune.maybe_tune(key(), CANDIDATES, timer) == CANDIDATES[1]
    assert timer.calls == CANDIDATES
    assert configs.select("triton_dequant", FACTS, 64, *QWEN3) == CANDIDATES[1]


def test_a_later_call_and_a_new_process_time_nothing():
    autotune.maybe_tune(key(), CANDIDATES, Timer(lambda cfg: cfg.block_n))
    later = Timer(lambda cfg: 0.0)
    assert autotune.maybe_tune(key(70), CANDIDATES, later) is None  # same size class
    autotune.refresh()
    tuning_cache.forget()  # what a new process starts with: only the file
    assert autotune.maybe_tune(key(), CANDIDATES, later) is None and later.calls == []
    assert configs.explain("triton_dequant", FACTS, 64, *QWEN3).source == "user cache"


def test_another_size_class_is_tuned_on_its_own():
    autotune.maybe_tune(key(64), CANDIDATES, Timer(lambda cfg: cfg.block_n))
    timer = Timer(lambda cfg: -cfg.block_n)
    assert autotune.maybe_tune(key(1024), CANDIDATES, timer) == CANDIDATES[2]


def test_off_by_default(monkeypatch):
    monkeypatch.delenv(autotune.ENV)
    autotune.refresh()
    timer = Timer(lambda cfg: 0.0)
    assert autotune.maybe_tune(key(), CANDIDATES, timer) is None and timer.calls == []


def test_never_while_torch_compile_traces(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    timer = Timer(lambda cfg: 0.0)
    assert autotune.maybe_tune(key(), CANDIDATES, timer) is None and timer.calls == []


def test_never_while_a_cuda_graph_is_captured(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    timer = Timer(lambda cfg: 0.0)
    assert autotune.maybe_tune(key(), CANDIDATES, timer) is None and timer.calls == []


def test_candidates_that_fail_are_skipped():
    def seconds(cfg):
        if cfg.block_n == 32:
            raise RuntimeError("out of shared memory")
        return float("inf") if cfg.block_n == 64 else 1.0

    with pytest.warns(RuntimeWarning, match="out of shared memory"):
        assert autotune.maybe_tune(key(), CANDIDATES, Timer(seconds)) == CANDIDATES[2]


def test_nothing_stored_when_no_candidate_runs():
    assert autotune.maybe_tune(key(), CANDIDATES, Timer(lambda cfg: float("inf"))) is None
    assert not autotune.is_tuned(key())


def test_candidates_start_with_the_default_and_are_few_and_distinct():
    found = autotune.candidates(key(1))
    assert found[0] == configs.select("triton_dequant", FACTS, 1, *QWEN3)
    assert len(found) == len(set(found)) <= autotune.MAX_CANDIDATES
    assert any(c.split_k > 1 for c in found)  # decode: a K split is worth timing


@pytest.mark.parametrize("kernels", ["decode", "prefill"])
def test_never_where_the_decode_or_prefill_kernels_run(monkeypatch, kernels):
    # Those kernels have configs of their own; a general-kernel config handed to the plan
    # would force the general kernel onto the call (on MMA_LANES weights, 1.3-1.8x slower).
    import dataclasses
    import types

    from mxmoe import settings
    from mxmoe.backends import triton as triton_backends
    from mxmoe.kernels import fused_moe

    monkeypatch.setattr(settings, "_current",
                        dataclasses.replace(settings.current(), interpret=False))
    monkeypatch.setattr(fused_moe, "uses_decode_kernels", lambda call, inner: kernels == "decode")
    monkeypatch.setattr(fused_moe, "uses_prefill_kernels",
                        lambda call, inner: kernels == "prefill")
    tuned = []
    monkeypatch.setattr(autotune, "maybe_tune", lambda *a: tuned.append(a))
    call = types.SimpleNamespace(device=torch.device("cuda"))
    backend = triton_backends.triton_dequant()
    assert backend._tuned_config(call, None) is None and not tuned

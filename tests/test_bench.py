"""`mxmoe bench` on the CPU: the floor formula, rotations, the baseline, the JSON, the tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mxmoe.bench import report
from mxmoe.bench.baseline import DenseBaseline
from mxmoe.bench.ceilings import H100_COPY_BYTES_PER_S, H100_MATMUL_FLOPS_PER_S
from mxmoe.bench.floors import dense_expert_bytes, expert_bytes, layer_flops, layer_floor
from mxmoe.bench.problems import MODELS, CPU_MODEL, make_rotations, make_weights
from mxmoe.bench.timing import RepPolicy
from mxmoe.cli import main
from mxmoe.testing import relative_error
from mxmoe.reference import fused_experts_reference

ROOT = Path(__file__).resolve().parents[1]


def gpt_oss_floor(model: str, m: int, touched: int):
    shape = MODELS[model]
    return layer_floor(num_tokens=m, hidden=shape.hidden, inter=shape.inter, top_k=shape.top_k,
                       touched_experts=touched, bias_itemsize=2,
                       copy_bytes_per_s=H100_COPY_BYTES_PER_S,
                       matmul_flops_per_s=H100_MATMUL_FLOPS_PER_S)


# --- floors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("model, m, touched, expected_s, bound", [
    ("20b", 1, 4, 17.5e-6, "memory"),  # FACTS: M=1 -> 17.5 us (4 experts)
    ("20b", 64, 32, 140e-6, "memory"),  # FACTS: M=64 -> 140 us (all 32 experts)
    ("20b", 16384, 32, 4.46e-3, "compute"),  # FACTS: M=16384 -> 4.46 ms (compute bound)
])
def test_floor_reproduces_facts(model, m, touched, expected_s, bound):
    floor = gpt_oss_floor(model, m, touched)
    assert floor.seconds == pytest.approx(expected_s, rel=0.02)
    assert floor.bound == bound


def test_floor_counts_only_touched_experts():
    one, four = gpt_oss_floor("120b", 1, 1), gpt_oss_floor("120b", 1, 4)
    assert four.bytes == pytest.approx(4 * one.bytes)


def test_expert_bytes_match_the_tensors():
    weights = make_weights(CPU_MODEL, torch.bfloat16, "cpu")
    per_expert = weights.nbytes / CPU_MODEL.experts
    assert expert_bytes(CPU_MODEL.hidden, CPU_MODEL.inter, 2) == per_expert


def test_dense_floor_is_the_bf16_weights():
    # 20b at M=1: 4 experts x 3·2880² bf16 weights (+ biases) = 199 MB at 3.02 TB/s = 66 us
    shape = MODELS["20b"]
    dense = layer_floor(num_tokens=1, hidden=shape.hidden, inter=shape.inter, top_k=4,
                        touched_experts=4, bias_itemsize=2, copy_bytes_per_s=3.02e12,
                        matmul_flops_per_s=732e12,
                        bytes_per_expert=dense_expert_bytes(shape.hidden, shape.inter, 2))
    assert dense.seconds == pytest.approx(4 * (3 * 2880**2 + 3 * 2880) * 2 / 3.02e12)
    assert dense.seconds / gpt_oss_floor("20b", 1, 4).seconds == pytest.approx(3.76, rel=0.01)


def test_layer_flops_formula():
    # 2·M·k·(H·2I + I·H) with M=3, k=2, H=64, I=32
    assert layer_flops(3, 64, 32, 2) == 2 * 3 * 2 * (64 * 64 + 32 * 64)


def test_floor_rejects_nonpositive_ceilings():
    with pytest.raises(ValueError, match="ceilings must be positive"):
        layer_floor(num_tokens=1, hidden=64, inter=64, top_k=1, touched_experts=1,
                    bias_itemsize=2, copy_bytes_per_s=0, matmul_flops_per_s=1)


# --- repetitions and rotations -----------------------------------------------------------------

def test_rep_policy_bounds():
    policy = RepPolicy(budget_s=0.5, min_reps_small=200, min_reps_large=20, small_s=5e-4,
                       max_reps=2000, cap_s=10.0)
    assert policy.reps(20e-6) == 2000  # decode: capped by max_reps
    assert policy.reps(4e-4) == 1250  # budget / time
    assert policy.reps(4e-3) == 125
    assert policy.reps(0.1) == 20  # large M: at least 20
    assert policy.reps(1.0) == 10  # 20 would pass cap_s
    assert policy.reps(100.0) == 3  # never fewer than 3 ...
    # ... unless a minimum below 3 is asked for
    assert RepPolicy(min_reps_small=1, min_reps_large=1, cap_s=1.0).reps(5.0) == 1


def test_decode_rotations_touch_disjoint_experts():
    model = MODELS["20b"]
    rotations = make_rotations(model, 1, 4, torch.float32, "cpu")
    assert rotations.disjoint_experts
    sets = [set(r.topk_ids.flatten().tolist()) for r in rotations.inputs]
    for i in range(len(sets)):  # consecutive replays, the wrap-around included
        assert not sets[i] & sets[(i + 1) % len(sets)], sets
    assert all(r.touched_experts == model.top_k for r in rotations.inputs)


def test_torch_route_is_the_route_specification():
    from mxmoe import route
    from mxmoe.bench.problems import torch_route

    logits = torch.randn(33, 32, generator=torch.Generator().manual_seed(3))
    weights, ids = torch_route(logits, 4)
    expected_weights, expected_ids = route(logits, 4)  # on the CPU: route's torch path
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-6, atol=0)


def test_large_m_rotations_are_random_and_count_touched_experts():
    rotations = make_rotations(CPU_MODEL, 16, 3, torch.float32, "cpu")
    assert not rotations.disjoint_experts
    for r in rotations.inputs:
        assert r.touched_experts == len(set(r.topk_ids.flatten().tolist()))
    assert not torch.equal(rotations.inputs[0].hidden_states, rotations.inputs[1].hidden_states)


# --- the baseline ------------------------------------------------------------------------------

@pytest.mark.parametrize("m", [1, 13], ids=["one token", "M*k > E"])
def test_baseline_matches_reference(m):
    weights = make_weights(CPU_MODEL, torch.float32, "cpu")
    inputs = make_rotations(CPU_MODEL, m, 1, torch.float32, "cpu").inputs[0]
    ref = fused_experts_reference(inputs.hidden_states, weights.w13, weights.w2,
                                  inputs.topk_weights, inputs.topk_ids,
                                  w13_bias=weights.w13_bias, w2_bias=weights.w2_bias)
    baseline = DenseBaseline(weights, torch.float32)
    baseline.select(inputs)
    for method in ("mm_loop", baseline.method):
        out = baseline.forward(inputs.hidden_states, inputs.router_logits, method)
        assert relative_error(out, ref) < 1e-5, method


def test_baseline_falls_back_to_loop_without_grouped_mm(monkeypatch):
    weights = make_weights(CPU_MODEL, torch.float32, "cpu")
    inputs = make_rotations(CPU_MODEL, 4, 1, torch.float32, "cpu").inputs[0]
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    baseline = DenseBaseline(weights, torch.float32)
    assert baseline.select(inputs) == "mm_loop"
    assert baseline.label == "baseline_mm_loop"
    assert any("_grouped_mm" in note for note in baseline.notes)


# --- results, tables, markdown -----------------------------------------------------------------

def synthetic_results() -> dict:
    rows = []
    for m, floor in ((1, 0.0175), (16384, 4.46)):
        for backend, ms, err, graph in (("triton_dequant", 2 * floor, 1e-3, True),
                                        ("auto", 2.1 * floor, 1e-3, True),
                                        ("baseline_grouped_mm", 1.5 * floor, 5e-2, True),
                                        ("torch", 50 * floor, 0.0, False)):
            rows.append({"model": "gpt-oss-20b", "M": m, "backend": backend, "ms": ms,
                         "floor_ms": floor, "ratio": ms / floor, "max_rel_err": err,
                         "graph": graph, "status": "ok" if err <= 2e-2 else "FAIL",
                         "error": None, "bound": "memory" if m == 1 else "compute"})
        rows.append({"model": "gpt-oss-20b", "M": m, "backend": "triton_scaled", "ms": None,
                     "floor_ms": floor, "ratio": None, "max_rel_err": None, "graph": False,
                     "status": "error", "error": "RuntimeError: boom"})
    return {
        "schema": report.SCHEMA, "device": "NVIDIA H100 80GB HBM3",
        "versions": {"driver": "580.1", "cuda": "13.0", "torch": "2.11.0", "triton": "3.6.0"},
        "git_sha": "abc1234", "date": "2026-11-25 01:00 UTC",
        "ceilings": {"copy_gb_per_s": 3020.0, "matmul_tflop_per_s": 732.0, "source": "given"},
        "settings": {"dtype": "bfloat16", "rotations": 4, "tolerance": 2e-2},
        "models": {"gpt-oss-20b": MODELS["20b"].as_dict()},
        "notes": [], "complete": True, "rows": rows,
    }


def test_text_table_marks_fastest_failures_and_errors():
    text = report.render_text(synthetic_results())
    for needle in ("NVIDIA H100 80GB HBM3", "driver: 580.1", "CUDA: 13.0", "torch: 2.11.0",
                   "Triton: 3.6.0", "git: abc1234", "2026-11-25"):
        assert needle in text
    assert "FAIL" in text  # the baseline is over the tolerance
    point = report.summarize(synthetic_results()["rows"])[0]
    assert point["fastest"] == "triton_dequant"  # a FAIL row is never the fastest
    assert point["auto_vs_best"] == pytest.approx(1.05)
    assert "triton_scaled at M=1,16384: RuntimeError: boom" in text


def test_json_is_strict_and_validates(tmp_path):
    results = synthetic_results()
    results["rows"][0]["max_rel_err"] = float("inf")
    path = tmp_path / "r.json"
    report.write_json(results, path)
    loaded = report.load_json(path)  # json.loads would accept NaN; the file must not hold any
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()
    assert loaded["rows"][0]["max_rel_err"] is None


def test_validate_names_the_missing_key():
    results = synthetic_results()
    del results["rows"][1]["floor_ms"]
    with pytest.raises(ValueError, match="row 1 has no 'floor_ms'"):
        report.validate(results)


def test_results_path_slug(tmp_path):
    path = report.results_path(tmp_path, "NVIDIA H100 80GB HBM3", "2026-11-25 01:00 UTC")
    assert path.name == "nvidia-h100-80gb-hbm3-2026-11-25.json"
    path.write_text("{}")
    assert report.results_path(tmp_path, "NVIDIA H100 80GB HBM3", "2026-11-25") != path
    assert report.results_path(tmp_path, "cpu (x86_64)", "2026-11-25").name == "cpu-2026-11-25.json"
    tagged = report.results_path(tmp_path, "NVIDIA H100 80GB HBM3", "2026-11-25", tag="120b")
    assert tagged.name == "nvidia-h100-80gb-hbm3-2026-11-25-120b.json"


def test_render_benchmarks_script(tmp_path):
    source = tmp_path / "nvidia-h100-2026-11-25.json"
    report.write_json(synthetic_results(), source)
    output = tmp_path / "BENCHMARKS.md"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "render_benchmarks.py"), str(source),
                    "--output", str(output)], check=True, capture_output=True, text=True)
    md = output.read_text()
    assert "## gpt-oss-20b" in md
    assert "| M | floor ms | bound | triton_dequant |" in md
    assert "| 1 | 0.0175 | memory | 0.035 2.00x |" in md
    assert "FAIL" in md and "triton_dequant" in md
    assert "nvidia-h100-2026-11-25.json" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "![" not in md
    else:
        assert "![time and floor against M](nvidia-h100-2026-11-25.png)" in md
        assert (tmp_path / "nvidia-h100-2026-11-25.png").stat().st_size > 0


def test_render_benchmarks_merges_runs_of_one_card(tmp_path):
    first, second = synthetic_results(), synthetic_results()
    for row in second["rows"]:
        row["model"] = "gpt-oss-120b"
    second["models"] = {"gpt-oss-120b": MODELS["120b"].as_dict()}
    second["ceilings"] = {**second["ceilings"], "copy_gb_per_s": 2990.0}
    report.write_json(first, tmp_path / "a.json")
    report.write_json(second, tmp_path / "b.json")
    output, merged = tmp_path / "BENCHMARKS.md", tmp_path / "merged.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "render_benchmarks.py"),
                    str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--merged-json",
                    str(merged), "--output", str(output), "--no-plot"],
                   check=True, capture_output=True, text=True)
    md = output.read_text()
    assert "## gpt-oss-20b" in md and "## gpt-oss-120b" in md
    assert "copy 3020 GB/s" in md and "copy 2990 GB/s" in md  # each run's own ceilings
    assert len(report.load_json(merged)["rows"]) == 2 * len(first["rows"])


def test_merge_refuses_two_cards():
    other = synthetic_results()
    other["device"] = "NVIDIA H200"
    with pytest.raises(ValueError, match="different devices"):
        report.merge([synthetic_results(), other], ["a", "b"])


# --- the runner --------------------------------------------------------------------------------

def test_runner_records_failures_and_goes_on(monkeypatch, tmp_path):
    from mxmoe.bench import runner
    from mxmoe.bench.ceilings import given_ceilings

    real = runner.backend_layer

    def layer(name, weights):
        if name == "triton_dequant":  # raises: an error row, the others still run
            def broken(inputs):
                raise RuntimeError("kernel exploded")
            return broken
        if name == "triton_scaled":  # wrong by 50%: a FAIL row, still timed
            inner = real("torch", weights)
            return lambda inputs: inner(inputs) * 1.5
        return real(name, weights)

    monkeypatch.setattr(runner, "backend_layer", layer)
    settings = runner.Settings(
        device=torch.device("cpu"), dtype=torch.float32, models=[CPU_MODEL], tokens=[1, 4],
        paths=["triton_dequant", "triton_scaled", "torch", "baseline"], rotations=2,
        policy=RepPolicy(budget_s=0.01, min_reps_small=1, min_reps_large=1, max_reps=3),
        json_path=tmp_path / "r.json")
    lines = []
    results = runner.Runner(settings, given_ceilings(10, 0.1), {"device": "cpu"},
                            log=lines.append).run()
    assert results["complete"]
    by = {(r["backend"], r["M"]): r for r in report.load_json(tmp_path / "r.json")["rows"]}
    for m in (1, 4):
        assert by["triton_dequant", m]["status"] == "error"
        assert by["triton_dequant", m]["error"] == "RuntimeError: kernel exploded"
        assert by["triton_scaled", m]["status"] == "FAIL"
        assert by["triton_scaled", m]["ms"] > 0 and by["triton_scaled", m]["max_rel_err"] > 0.4
        assert by["torch", m]["status"] == "ok"
        assert by["baseline_grouped_mm", m]["status"] == "ok"
    assert sum("Traceback" in line for line in lines) == 1  # printed once per path, not per M


# --- the command -------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of mxmoe bench")
def test_bench_quick_on_cpu_writes_json(tmp_path, capsys):
    # triton_dequant runs in the interpreter (conftest sets TRITON_INTERPRET=1 without a GPU);
    # the other Triton backends are left out to keep this short.
    rc = main(["bench", "--quick", "--out", str(tmp_path), "--ceilings", "10", "0.1",
               "--backends", "torch", "triton_dequant", "auto", "baseline"])
    assert rc == 0
    (path,) = tmp_path.glob("*.json")
    results = report.load_json(path)
    assert results["complete"]
    assert results["ceilings"]["source"] == "given"
    assert any("not performance numbers" in n for n in results["notes"])
    rows = results["rows"]
    assert {r["M"] for r in rows} == {1, 4}
    by_path = {r["backend"]: r for r in rows}
    assert set(by_path) == {"torch", "triton_dequant", "auto", "baseline_grouped_mm"}
    assert by_path["triton_dequant"]["status"] in report.STATUSES
    for name in ("torch", "auto", "baseline_grouped_mm"):
        row = by_path[name]
        assert row["status"] == "ok" and row["ms"] > 0 and row["max_rel_err"] < 1e-4, row
        assert row["floor_ms"] > 0 and row["ratio"] == pytest.approx(row["ms"] / row["floor_ms"])
        assert row["graph"] is False
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-2].startswith("results: ")
    assert "M  floor ms" in out


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of mxmoe bench")
def test_bench_sets_the_interpreter_before_triton_is_imported(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    code = ("import sys, mxmoe.cli as cli; cli.build_parser(); "
            "assert 'triton' not in sys.modules, 'triton imported before bench ran'; "
            f"sys.exit(cli.main(['bench', '--quick', '--tokens', '1', '--backends', 'torch', "
            f"'--no-plot', '--ceilings', '10', '0.1', '--out', {str(tmp_path)!r}]))")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True,
                   text=True, timeout=120)
    (path,) = tmp_path.glob("*.json")
    notes = json.loads(path.read_text())["notes"]
    assert any("TRITON_INTERPRET=1 set by `mxmoe bench`" in n for n in notes), notes


def test_bench_rejects_unknown_path(tmp_path):
    with pytest.raises(SystemExit, match="unknown path 'nope'"):
        main(["bench", "--backends", "nope", "--out", str(tmp_path), "--ceilings", "1", "1"])



# --- the GPU timing code, driven by fake CUDA events (control flow only) -----------------------

class _FakeEvent:
    def __init__(self, enable_timing=False):
        self.t = None

    def record(self, stream=None):
        import time

        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


@pytest.fixture
def fake_cuda(monkeypatch):
    state = {"mode": 0, "sleeps": 0}
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: state.__setitem__(
        "sleeps", state["sleeps"] + 1), raising=False)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: state["mode"])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode",
                        lambda mode: state.__setitem__("mode", mode))
    return state


class _FakeGraph:
    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1


def test_time_graphs_cycles_through_every_graph(fake_cuda):
    from mxmoe.bench.timing import time_graphs

    graphs = [_FakeGraph() for _ in range(3)]
    policy = RepPolicy(budget_s=0.01, min_reps_small=120, min_reps_large=120, max_reps=120)
    timing = time_graphs(graphs, policy)
    assert timing.graph and timing.reps == 120 and timing.ms >= 0
    assert timing.ms_min <= timing.ms <= timing.ms_p90
    assert timing.ms_batch_mean is not None and timing.ms_batch_mean >= 0
    counts = [g.replays for g in graphs]
    assert max(counts) - min(counts) <= 1  # the rotation is even
    assert fake_cuda["sleeps"] == 3  # one sleep per batch of 50 timed replays


def test_time_eager_cuda_rotates_inputs(fake_cuda):
    from mxmoe.bench.timing import time_eager_cuda

    seen = []
    policy = RepPolicy(budget_s=0.01, min_reps_small=10, min_reps_large=10, max_reps=10)
    timing = time_eager_cuda(lambda inputs: seen.append(inputs), ["a", "b"], policy)
    assert not timing.graph and timing.reps == 10
    assert seen == ["a", "b"] * (len(seen) // 2) + ["a"] * (len(seen) % 2)  # never a repeat


def test_host_sync_reason(fake_cuda):
    from mxmoe.bench.timing import host_sync_reason

    def syncs(inputs):
        assert fake_cuda["mode"] == "error"
        raise RuntimeError("called a synchronizing CUDA operation")

    def breaks(inputs):
        raise RuntimeError("an unrelated failure")

    assert "synchronizing" in host_sync_reason(syncs, None)
    assert fake_cuda["mode"] == 0  # restored
    assert host_sync_reason(lambda inputs: None, None) is None
    with pytest.raises(RuntimeError, match="unrelated"):
        host_sync_reason(breaks, None)
    assert fake_cuda["mode"] == 0


class _ReplayGraph:
    """Stands in for a captured CUDA graph: a replay recomputes into the static output."""

    def __init__(self, fn, inputs, out, writes=True):
        self.fn, self.inputs, self.out, self.writes = fn, inputs, out, writes

    def replay(self):
        if self.writes:
            self.out.copy_(self.fn(self.inputs))


class _FakeHostMeter:
    calls = 0

    def measure(self, fn, input_sets, seconds_per_call):
        from mxmoe.bench.host import HostCost

        self.calls += 1
        fn(input_sets[0])
        return HostCost(us=400.0, us_min=350.0, reps=20, launches=5, kernels=4, bare_us=100.0,
                        bare_direct_us=70.0)


def test_runner_gpu_branch_with_fakes(fake_cuda, monkeypatch, tmp_path):
    """The CUDA branch of the runner (sync check, capture, NaN-filled replay check, graph or
    eager timing) driven on the CPU: CUDA events, capture and the sync check are fakes."""
    from mxmoe.bench import runner
    from mxmoe.bench.ceilings import given_ceilings

    made = {}  # path name -> its layer function
    real_layer = runner.backend_layer

    def layer(name, weights):
        made[name] = real_layer("torch" if name != "auto" else "auto", weights)
        return made[name]

    def sync_reason(fn, inputs):  # "torch" synchronises with the host (as the reference does)
        return "called a synchronizing CUDA operation" if fn is made.get("torch") else None

    def capture(fn, input_sets):
        if fn is made.get("triton_scaled"):
            raise RuntimeError("operation not permitted when stream is capturing")
        outputs = [fn(inputs) for inputs in input_sets]
        writes = fn is not made.get("bf16")  # bf16's replays leave the output unwritten
        return [_ReplayGraph(fn, i, o, writes) for i, o in zip(input_sets, outputs)], outputs

    monkeypatch.setattr(runner, "capture_graphs", capture)
    monkeypatch.setattr(runner, "host_sync_reason", sync_reason)
    monkeypatch.setattr(runner, "backend_layer", layer)
    monkeypatch.setattr(runner, "_cuda_alive", lambda device: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    settings = runner.Settings(
        device=torch.device("cpu"), dtype=torch.float32, models=[CPU_MODEL], tokens=[1, 4],
        paths=["torch", "triton_scaled", "bf16", "auto", "baseline"], rotations=3,
        policy=RepPolicy(budget_s=0.01, min_reps_small=5, min_reps_large=5, max_reps=5),
        json_path=tmp_path / "r.json")
    run = runner.Runner(settings, given_ceilings(10, 0.1), {"device": "fake"},
                        log=lambda line: None)
    run.gpu = True
    run.host_meter = _FakeHostMeter()
    results = run.run()
    assert results["complete"]
    by = {(r["backend"], r["M"]): r for r in results["rows"]}
    for m in (1, 4):
        torch_row = by["torch", m]
        assert not torch_row["graph"] and torch_row["status"] == "ok"
        assert "eager: called a synchronizing CUDA operation" in torch_row["detail"]
        scaled = by["triton_scaled", m]
        assert not scaled["graph"] and scaled["status"] == "ok"
        assert "eager: capture failed: RuntimeError" in scaled["detail"]
        unwritten = by["bf16", m]
        assert unwritten["graph"] and unwritten["status"] == "FAIL"
        assert unwritten["ms"] is not None and "NaN" in unwritten["error"]
        auto = by["auto", m]
        assert auto["graph"] and auto["status"] == "ok" and auto["reps"] == 5
        assert "auto -> torch" in auto["detail"]
        assert by["baseline_grouped_mm", m]["graph"]
        for row in (torch_row, scaled, auto):  # every path gets its host cost
            assert row["host_us"] == 400.0 and row["launches"] == 5
            assert row["host_bare_us"] == 100.0 and row["host_ratio"] == pytest.approx(4.0)
    assert run.host_meter.calls == len(results["rows"])
    text = report.render_text(results)
    assert "host cost of an eager call" in text and "400 /5 4.0x" in text


# --- the layer row, the peer row, the host cost on the CPU -----------------------------------------

def test_runner_layer_row_and_unavailable_peer_and_no_host_on_cpu(tmp_path):
    from mxmoe.bench import runner
    from mxmoe.bench.ceilings import given_ceilings

    settings = runner.Settings(
        device=torch.device("cpu"), dtype=torch.float32, models=[CPU_MODEL], tokens=[3],
        paths=["torch", "layer", "triton_kernels"], rotations=2,
        policy=RepPolicy(budget_s=0.01, min_reps_small=1, min_reps_large=1, max_reps=2),
        json_path=tmp_path / "r.json")
    results = runner.Runner(settings, given_ceilings(10, 0.1), {"device": "cpu"},
                            log=lambda line: None).run()
    assert results["complete"]
    by = {r["backend"]: r for r in report.load_json(tmp_path / "r.json")["rows"]}
    layer = by["MXFP4MoE"]
    assert layer["status"] == "ok" and layer["max_rel_err"] < 1e-5, layer
    assert "router included" in layer["detail"]
    peer = by["triton_kernels"]
    assert peer["status"] == "skipped" and "CUDA" in peer["error"] and peer["ms"] is None
    assert "skipped" in report.render_text(results)
    for name in ("torch", "MXFP4MoE"):
        assert by[name]["host_us"] is None and "no GPU" in by[name]["host_note"]


def test_layer_path_reference_routes_from_its_router():
    from mxmoe.bench.runner import MoELayerPath

    weights = make_weights(CPU_MODEL, torch.float32, "cpu")
    inputs = make_rotations(CPU_MODEL, 5, 1, torch.float32, "cpu").inputs[0]
    layer = MoELayerPath(weights)
    out, ref = layer(inputs), layer.reference(inputs)
    assert relative_error(out, ref) < 1e-5
    # not the rotations' routing: the router logits of the inputs are not the layer's
    other = fused_experts_reference(inputs.hidden_states, weights.w13, weights.w2,
                                    inputs.topk_weights, inputs.topk_ids,
                                    w13_bias=weights.w13_bias, w2_bias=weights.w2_bias)
    assert relative_error(other, ref) > 1e-2


# --- where results go --------------------------------------------------------------------------

def test_default_results_dir_is_a_user_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("MXMOE_RESULTS_DIR", raising=False)
    monkeypatch.delenv("MXMOE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert report.default_results_dir() == tmp_path / "xdg" / "mxmoe" / "results"
    monkeypatch.setenv("MXMOE_CACHE_DIR", str(tmp_path / "cache"))
    assert report.default_results_dir() == tmp_path / "cache" / "results"
    monkeypatch.setenv("MXMOE_RESULTS_DIR", str(tmp_path / "mine"))
    assert report.default_results_dir() == tmp_path / "mine"


def test_committed_results_dir_is_the_checkouts():
    assert report.committed_results_dir() == ROOT / "benchmarks" / "results"


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of mxmoe bench")
def test_bench_writes_to_the_user_directory_not_the_working_directory(tmp_path, monkeypatch,
                                                                      capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MXMOE_RESULTS_DIR", str(tmp_path / "user"))
    rc = main(["bench", "--tokens", "1", "--backends", "torch", "--no-plot",
               "--ceilings", "10", "0.1"])
    assert rc == 0
    assert not (tmp_path / "benchmarks").exists()
    (path,) = (tmp_path / "user").glob("*.json")
    assert f"results: {path}" in capsys.readouterr().out


def test_out_and_committed_exclude_each_other(tmp_path):
    with pytest.raises(SystemExit):
        main(["bench", "--committed", "--out", str(tmp_path)])

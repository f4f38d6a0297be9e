"""`mxmoe bench --model-e2e` (mxmoe.bench.e2e): its checks and accounting on their own, then the
tiny gpt-oss end to end on the CPU (a few seconds): the JSON's fields, the greedy agreement,
errors recorded instead of raised, and the time limit."""

from __future__ import annotations

import json
from collections import namedtuple
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from mxmoe.bench import e2e, e2e_report
from mxmoe.cli import main

pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")

# -- compare_greedy -------------------------------------------------------------------------------


def test_compare_greedy_equal_prefix_is_equal_even_when_later_tokens_differ():
    check = e2e.compare_greedy([5, 6, 7, 8, 9], [5, 6, 7, 1, 1], n=3)
    assert check == {"n": 3, "compared": 3, "equal": True, "first_divergence": None}


def test_compare_greedy_names_the_first_differing_position():
    check = e2e.compare_greedy([5, 6, 7, 8], [5, 6, 0, 8], n=4)
    assert check["equal"] is False and check["first_divergence"] == 2


def test_compare_greedy_at_token_zero():
    assert e2e.compare_greedy([1, 2], [2, 2], n=2)["first_divergence"] == 0


def test_compare_greedy_a_short_candidate_diverges_where_it_ends():
    check = e2e.compare_greedy([1, 2, 3, 4], [1, 2], n=4)
    assert check == {"n": 4, "compared": 2, "equal": False, "first_divergence": 2}


def test_compare_greedy_a_short_reference_is_not_equal_either():
    assert e2e.compare_greedy([1], [1, 2, 3], n=3)["first_divergence"] == 1


def test_compare_greedy_accepts_tensors_and_rejects_n_below_one():
    assert e2e.compare_greedy(torch.tensor([3, 4]), torch.tensor([3, 4]), n=2)["equal"]
    with pytest.raises(ValueError, match="n must be >= 1"):
        e2e.compare_greedy([1], [1], n=0)


def test_logit_margins_are_top1_minus_top2_of_row_zero():
    steps = [torch.tensor([[0.0, 3.0, 1.0], [9.0, 0.0, 0.0]]), torch.tensor([[2.0, 2.0, -1.0]])]
    assert e2e.logit_margins(steps) == [2.0, 0.0]


def test_decode_rate_leaves_the_prefill_and_first_token_out():
    rate = e2e.decode_rate(batch=8, new_tokens=11, t_one=0.5, t_all=1.5)
    assert rate["decode_s"] == pytest.approx(1.0)
    assert rate["tokens_per_s"] == pytest.approx(80.0)  # 8 sequences x 10 steps in 1 s
    assert rate["ms_per_step"] == pytest.approx(100.0)
    assert rate["generate_tokens_per_s"] == pytest.approx(88 / 1.5)
    assert e2e.decode_rate(1, 4, t_one=1.0, t_all=0.9)["tokens_per_s"] is None


# -- moe_share_from_events, on events shaped like torch.profiler's ---------------------------------

Kernel = namedtuple("Kernel", "name duration")


def _event(name, *, kernels=(), children=(), cpu_us=0.0, device=DeviceType.CPU):
    return SimpleNamespace(name=name, device_type=device, is_async=False,
                           kernels=[Kernel(*k) for k in kernels], cpu_children=list(children),
                           cpu_time_total=cpu_us)


def _profile():
    """A prefill forward and two decode steps; an argmax between the steps; the device-side
    copy of a MoE range (a GPU user annotation, which is no kernel) to be ignored."""
    def step(moe_kernel_us, other_us, phase):
        mm = _event("aten::mm", kernels=[("gemm", moe_kernel_us)])
        moe = _event(getattr(e2e, f"MOE_{phase.upper()}"), children=[mm], cpu_us=50.0,
                     kernels=[(getattr(e2e, f"MOE_{phase.upper()}"), 999.0)])
        attn = _event("aten::bmm", kernels=[("attn", other_us)])
        fwd = _event(getattr(e2e, f"FORWARD_{phase.upper()}"), children=[moe, attn],
                     cpu_us=80.0)
        return [fwd, moe, mm, attn]

    events = step(300.0, 100.0, "prefill") + step(30.0, 10.0, "decode")
    events += [_event("aten::argmax", kernels=[("argmax", 5.0)])]
    events += step(20.0, 10.0, "decode")
    events += [_event(e2e.MOE_DECODE, device=DeviceType.CUDA, kernels=[])]
    return events


def test_moe_share_on_device_kernels_counts_decode_kernels_only():
    share = e2e.moe_share_from_events(_profile(), device_kernels=True)
    assert share["moe_s"] == pytest.approx(50e-6)  # 30 + 20 us inside the decode MoE ranges
    assert share["total_s"] == pytest.approx(75e-6)  # 40 + 5 + 30: the argmax counts as decode
    assert share["moe_share"] == pytest.approx(50 / 75)
    assert share["decode_forwards"] == 2
    assert share["host_moe_share"] == pytest.approx(100 / 160)  # host wall time beside it


def test_moe_share_on_the_host_is_wall_time_inside_the_decode_forwards():
    share = e2e.moe_share_from_events(_profile(), device_kernels=False)
    assert share["moe_share"] == pytest.approx(100 / 160)
    assert "host" in share["basis"]


def test_moe_share_of_an_empty_profile_is_none():
    assert e2e.moe_share_from_events([], device_kernels=True)["moe_share"] is None


# -- the model ------------------------------------------------------------------------------


def test_built_experts_are_mxfp4_exact_in_bf16():
    """What use_mxmoe quantizes (each expert as [N, K]) dequantizes to the weights bit for bit."""
    from mxmoe.format import quantize_mxfp4

    model = e2e.build_model("tiny", torch.device("cpu"), torch.bfloat16, seed=3)
    experts = model.model.layers[1].mlp.experts
    for weight in (experts.gate_up_proj, experts.down_proj):
        assert weight.dtype == torch.bfloat16 and weight.abs().sum() > 0
        again = quantize_mxfp4(weight.transpose(1, 2)).dequantize(torch.bfloat16)
        assert torch.equal(again.transpose(1, 2), weight)
    assert model.generation_config.eos_token_id is None


# -- end to end on the tiny model (mxmoe.bench.e2e and its report, mxmoe.bench.e2e_report) ----

SMALL = ["--e2e-batches", "1", "2", "--e2e-new-tokens", "3", "--e2e-prefill-tokens", "12"]


def _run(tmp_path, monkeypatch, *extra):
    monkeypatch.setenv("MXMOE_GIT_SHA", "abc1234")
    out = tmp_path / "out"
    rc = main(["bench", "--model-e2e", "--e2e-config", "tiny", "--out", str(out), *extra])
    (path,) = out.glob("*.json")
    return rc, json.loads(path.read_text()), path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    try:
        yield _run(tmp_path_factory.mktemp("e2e"), mp, *SMALL, "--tag", "ci")
    finally:
        mp.undo()


def test_tiny_run_writes_the_environment_and_settings(tiny_run):
    rc, results, path = tiny_run
    assert rc == 0 and results["complete"] is True and results["errors"] == 0
    assert path.name.endswith("-e2e-tiny-ci.json")
    assert results["schema"] == e2e_report.SCHEMA
    assert results["git_sha"] == "abc1234"
    assert results["device"].startswith("cpu") and results["date"]
    assert results["versions"]["torch"] == torch.__version__
    assert results["versions"]["transformers"]
    assert results["command"].startswith("mxmoe ")
    assert results["settings"]["decode_batches"] == [1, 2]
    assert results["settings"]["new_tokens"] == 3 and results["settings"]["check_tokens"] == 32
    assert results["model"]["name"] == "gpt-oss-tiny"
    assert results["model"]["parameters"] > 0
    assert results["triton_kernels"]["status"] == "skipped" and results["triton_kernels"]["error"]
    assert set(results["phases"]) >= {"build", "use_mxmoe", "mxmoe eager"}


def test_tiny_run_measures_both_configurations(tiny_run):
    _, results, _ = tiny_run
    for name in e2e_report.CONFIG_NAMES:
        config = results["configs"][name]
        decode = {(r["batch"], r["mode"]): r for r in config["decode"]}
        assert set(decode) == {(b, m) for b in (1, 2)
                               for m in (e2e_report.EAGER, e2e_report.STATIC)}
        for row in decode.values():
            assert row["status"] == "ok" and row["tokens_per_s"] > 0 and row["ms_per_step"] > 0
            assert row["compiled"] is False  # transformers compiles on accelerators only
        (prefill,) = config["prefill"]
        assert prefill["prompt_tokens"] == 12 and prefill["tokens_per_s"] > 0
        shares = config["moe_share"]
        assert [r["batch"] for r in shares] == [1, 2]
        assert all(0 < r["moe_share"] < 1 and r["decode_forwards"] == r["decode_steps"]
                   for r in shares)
    bf16, mx = (results["configs"][n] for n in e2e_report.CONFIG_NAMES)
    assert bf16["block_class"] == "GptOssMLP" and mx["block_class"] == "GptOssMXFP4MoE"
    # fp32 experts here: MXFP4 is 4.25 bits per weight against 32 (biases kept as they are).
    assert 0 < mx["expert_bytes"] < bf16["expert_bytes"] / 5
    assert mx["auto_backends"] == ["torch"]


def test_tiny_run_patched_greedy_tokens_equal_the_unpatched(tiny_run):
    _, results, _ = tiny_run
    check = results["check"]
    assert check["status"] == "ok" and check["n"] == 32 and check["compared"] == 32
    assert check["equal"] is True and check["first_divergence"] is None
    ref, cand = (results["configs"][n]["greedy"][0]["tokens"] for n in e2e_report.CONFIG_NAMES)
    assert len(ref) == 32 and ref == cand
    assert len(results["configs"][e2e_report.BF16]["greedy"][0]["logit_margins"]) == 32


def test_tiny_run_table_shows_every_measure(tiny_run):
    _, results, _ = tiny_run
    table = e2e_report.render_table(results)
    for text in ("decode tok/s B=2 (eager)", "static cache, not compiled", "prefill tok/s 12",
                 "MoE share of decode B=1", "expert weights", "equal for the first 32 tokens",
                 "triton_kernels: not run"):
        assert text in table, text


def test_a_failing_measurement_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    generate = e2e.Session.generate

    def failing_static(self, input_ids, new_tokens, cache=None, **kwargs):
        if cache == e2e_report.STATIC:
            raise RuntimeError("compile failed: simulated")
        return generate(self, input_ids, new_tokens, cache, **kwargs)

    monkeypatch.setattr(e2e.Session, "generate", failing_static)
    rc, results, _ = _run(tmp_path, monkeypatch, *SMALL, "--e2e-prefill-tokens", "10")
    assert rc == 1 and results["complete"] is False and results["errors"] == 2
    for name in e2e_report.CONFIG_NAMES:
        static = [r for r in results["configs"][name]["decode"] if r["mode"] == e2e_report.STATIC]
        assert static[0]["status"] == "error"
        assert "RuntimeError: compile failed: simulated" in static[0]["error"]
        # Not tried again at the larger batch once it failed.
        assert static[1]["status"] == "skipped" and "failed at batch 1" in static[1]["error"]
        eager = [r for r in results["configs"][name]["decode"] if r["mode"] == e2e_report.EAGER]
        assert all(r["status"] == "ok" for r in eager)


def test_past_the_time_limit_points_are_skipped_not_run(tmp_path, monkeypatch):
    rc, results, _ = _run(tmp_path, monkeypatch, *SMALL, "--time-limit", "0")
    assert rc == 0 and results["complete"] is False
    rows = [r for n in e2e_report.CONFIG_NAMES for k in ("greedy", "decode", "prefill", "moe_share")
            for r in results["configs"][n][k]]
    assert rows and all(r["status"] == "skipped" and "time limit" in r["error"] for r in rows)
    assert results["check"]["status"] == "error"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is the CPU's")
def test_full_size_configs_are_refused_without_a_gpu(tmp_path):
    with pytest.raises(SystemExit, match="needs a GPU"):
        main(["bench", "--model-e2e", "--e2e-config", "20b", "--out", str(tmp_path)])


@pytest.mark.parametrize("flags, message", [
    (["--e2e-new-tokens", "1"], "new_tokens must be >= 2"),
    (["--e2e-batches", "0"], "decode_batches must be >= 1"),
])
def test_bad_sizes_are_refused(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        main(["bench", "--model-e2e", "--e2e-config", "tiny", "--out", str(tmp_path), *flags])


def test_table_of_a_gpu_shaped_result_shows_compile_memory_and_errors(tiny_run):
    """The GPU-only parts of the table, on the tiny results edited to look like a GPU run."""
    import copy

    _, results, _ = tiny_run
    results = copy.deepcopy(results)
    results["settings"]["dtype"] = "bfloat16"
    for name, gib in ((e2e_report.BF16, 38.0), (e2e_report.MXMOE, 10.0)):
        config = results["configs"][name]
        config["expert_bytes"], config["peak_bytes"] = int(gib * 2**30), int((gib + 9) * 2**30)
        for row in config["decode"]:
            row["compiled"] = row["mode"] == e2e_report.STATIC
    failed = results["configs"][e2e_report.BF16]["decode"][-1]
    failed.update(status="error", error="BackendCompilerFailed: simulated")
    table = e2e_report.render_table(results)
    assert "transformers bf16" in table and "static cache + compile" in table
    assert "expert weights GiB" in table and "3.80x" in table  # 38 / 10 GiB
    assert "peak allocated GiB" in table and "47.00" in table and "19.00" in table
    assert (f"error: {e2e_report.BF16} decode batch=2, mode=static, prompt_tokens=8: "
            "BackendCompilerFailed: simulated") in table


# -- the schedule of the compiled points ----------------------------------------------------------


def test_static_priority_is_smallest_then_largest_then_the_rest_from_large_to_small():
    assert e2e.static_priority([1, 8, 64]) == [1, 64, 8]
    assert e2e.static_priority([64, 1, 16, 4]) == [1, 64, 16, 4]
    assert e2e.static_priority([2, 1]) == [1, 2]
    assert e2e.static_priority([8, 8]) == [8]


def test_static_estimate_uses_the_prior_then_the_observed_compile_then_the_reused_graph():
    eager = {"status": "ok", "t_one_s": 1.0, "t_all_s": 4.0}
    assert e2e.static_estimate_s([], eager) == pytest.approx(e2e.COMPILE_PRIOR_S + 5.0)
    assert e2e.static_estimate_s([], None) == pytest.approx(e2e.COMPILE_PRIOR_S
                                                             + e2e.RUN_PRIOR_S)
    one = [{"status": "ok", "warmup_s": 40.0}]
    assert e2e.static_estimate_s(one, eager) == pytest.approx(45.0)
    failed = [{"status": "error"}]
    assert e2e.static_estimate_s(failed, eager) == pytest.approx(e2e.COMPILE_PRIOR_S + 5.0)
    two = one + [{"status": "ok", "warmup_s": 60.0}]
    assert e2e.static_estimate_s(two, eager) == pytest.approx(60.0 * e2e.REUSED_GRAPH_FACTOR
                                                               + 5.0)


def test_budget_keeps_room_for_the_points_ranked_above():
    assert e2e.budget_skip_reason(0.0, None, 1e9, []) is None
    assert e2e.budget_skip_reason(10.0, 100.0, 90.0, []) is None
    reason = e2e.budget_skip_reason(10.0, 100.0, 50.0, [("transformers_bf16 B=1", 45.0)])
    assert reason.startswith("time budget: estimated 50 s, 90 s left before the time limit")
    assert "45 s kept for the points ranked above it (transformers_bf16 B=1)" in reason
    assert "0 s left" in e2e.budget_skip_reason(200.0, 100.0, 1.0, [])


# -- the divergence diagnosis's arithmetic ------------------------------------------------------


def test_token_rel_errors_per_token_max_and_mean():
    ref = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    cand = torch.tensor([[3.0, 4.5], [1.0, 0.0]])
    errors = e2e.token_rel_errors(ref, cand)
    assert errors["rel_err_max"] == pytest.approx(0.1)  # 0.5 / 5
    assert errors["rel_err_mean"] == pytest.approx(0.05)
    assert errors["max_abs_err_over_max_abs"] == pytest.approx(0.5 / 4)


def test_routing_agreement_compares_sets_not_order():
    ref = torch.tensor([[0, 1], [2, 3], [1, 2]])
    cand = torch.tensor([[1, 0], [2, 1], [1, 2]])
    assert e2e.routing_agreement(ref, cand) == pytest.approx(2 / 3)


def test_logits_comparison_names_the_differing_positions_and_margins():
    ref = torch.tensor([[5.0, 4.0, 0.0], [0.0, 1.0, 3.0]])
    cand = torch.tensor([[4.0, 4.5, 0.0], [0.0, 1.0, 3.0]])
    out = e2e.logits_comparison(ref, cand)
    assert out["top1_agreement"] == pytest.approx(0.5)
    assert out["differing_positions"] == [0] and out["reference_margin_at_differing"] == [1.0]
    assert out["first"]["reference_top1"] == 0 and out["first"]["candidate_top1"] == 1
    assert out["first"]["candidate_gap_to_reference_top1"] == pytest.approx(0.5)
    assert out["max_abs_diff"] == pytest.approx(1.0)


def _layer(i, err, ref_fp32=4e-3, cand_fp32=3e-3):
    return {"layer": i, "rel_err_mean": err, "rel_err_max": err * 3,
            "reference_vs_fp32_rel_err_mean": ref_fp32, "candidate_vs_fp32_rel_err_mean": cand_fp32}


def test_verdict_rounding_semantic_and_unclear():
    rounding = e2e.diagnosis_verdict([_layer(0, 5e-3), _layer(1, 6e-3)])
    assert rounding["kind"] == "rounding" and rounding["as_close_to_fp32"] is True
    assert "as close to float32" in rounding["text"]
    further = e2e.diagnosis_verdict([_layer(0, 5e-3, cand_fp32=3e-2)])
    assert further["kind"] == "rounding" and further["as_close_to_fp32"] is False
    semantic = e2e.diagnosis_verdict([_layer(0, 5e-3), _layer(1, 0.9), _layer(2, 0.8)])
    assert semantic["kind"] == "semantic" and semantic["layers"] == [1, 2]
    assert "layer 1" in semantic["text"]
    assert e2e.diagnosis_verdict([_layer(0, 0.1)])["kind"] == "unclear"
    assert e2e.diagnosis_verdict([])["kind"] == "unknown"


def test_fp32_mxmoe_equals_transformers_with_clamps_and_biases_active():
    """On the CPU in float32, with the swiglu clamps active (gate values ~100, past the limit
    of 7) and non-zero expert biases, every patched block gives the unpatched block's output
    (float32 rounding only), and greedy generation agrees: no semantic mismatch in the gpt-oss
    integration (activation constants, biases, interleaving, routing)."""
    import copy

    from mxmoe.integrations.transformers import use_mxmoe

    torch.manual_seed(0)
    model = e2e.build_model("tiny", torch.device("cpu"), torch.float32, seed=4)
    with torch.no_grad():
        for layer in model.model.layers:
            experts = layer.mlp.experts
            experts.gate_up_proj.mul_(200.0)
            experts.gate_up_proj_bias.normal_(0.0, 2.0)
            experts.down_proj_bias.normal_(0.0, 0.5)
    e2e.make_experts_mxfp4_exact(model)
    reference = copy.deepcopy(model)
    use_mxmoe(model, backend="torch")
    x = torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(5))
    for ref_layer, layer in zip(reference.model.layers, model.model.layers):
        experts = ref_layer.mlp.experts
        flat = x.reshape(-1, 64)
        assert (flat @ experts.gate_up_proj[0]).abs().max() > 3 * experts.limit  # clamps bite
        with torch.no_grad():
            ref_out, out = ref_layer.mlp(x)[0], layer.mlp(x)[0]
        assert e2e.token_rel_errors(ref_out, out)["rel_err_max"] < 1e-5
        assert e2e.token_rel_errors(e2e.moe_fp32_reference(ref_layer.mlp, x), ref_out)[
            "rel_err_max"] < 1e-5
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference.generate(ids, max_new_tokens=32, do_sample=False)
        got = model.generate(ids, max_new_tokens=32, do_sample=False)
    assert torch.equal(expected, got)


# -- the run's new parts, on the tiny model ----------------------------------------------------


def test_tiny_run_repeats_the_eager_decode_and_keeps_the_fastest(tiny_run):
    _, results, _ = tiny_run
    for name in e2e_report.CONFIG_NAMES:
        for row in results["configs"][name]["decode"]:
            if row["mode"] != e2e_report.EAGER or row["status"] != "ok":
                continue
            # The tiny model's generate calls take milliseconds: every repeat fits the budget.
            assert len(row["t_all_runs_s"]) == len(row["t_one_runs_s"]) == 3
            assert row["t_all_s"] == min(row["t_all_runs_s"])
            assert row["t_one_s"] == min(row["t_one_runs_s"])


def test_tiny_run_plans_every_point_and_records_each(tiny_run):
    _, results, _ = tiny_run
    assert results["schema"] == "mxmoe-e2e/2"
    planned = results["planned"]
    kinds = [(p["config"], p["kind"], p.get("mode")) for p in planned]
    # Eager timings of both configurations first, then the compiled ones (mxmoe's first), and
    # the profiled MoE shares last: nothing timed runs after a profiler.
    shares = sum(kind == "moe_share" for _, kind, _ in kinds)
    assert {c for c, kind, _ in kinds if kind == "moe_share"} == set(e2e_report.CONFIG_NAMES)
    assert all(kind == "moe_share" for _, kind, _ in kinds[-shares:])
    timed = kinds[:-shares]
    assert timed[-4:] == [(e2e_report.MXMOE, "decode", e2e_report.STATIC)] * 2 + [
        (e2e_report.BF16, "decode", e2e_report.STATIC)] * 2
    assert all(mode != e2e_report.STATIC for _, _, mode in timed[:-4])
    for point in planned:
        rows = results["configs"][point["config"]][point["kind"]]
        assert any(e2e._row_key(point["kind"], r) == e2e._row_key(point["kind"], point)
                   for r in rows), point
    assert results["in_progress"] is None
    assert results["memory"]["run_peak_raw_bytes"] is None  # no GPU
    static = [r for r in results["configs"][e2e_report.MXMOE]["decode"]
              if r["mode"] == e2e_report.STATIC]
    assert all(r["estimate_s"] >= 0 and r["warmup_steps"] == e2e.STATIC_WARMUP_STEPS
               and r["point_s"] >= 0 for r in static)
    # The first compiled point has only the prior; the next one the compile just observed.
    assert static[0]["estimate_s"] >= e2e.COMPILE_PRIOR_S > static[1]["estimate_s"]
    assert results["settings"]["static_schedule"]["priority"] == [1, 2]
    assert set(results["phases"]) >= {"mxmoe diagnosis", "mxmoe static cache B=1",
                                      "transformers_bf16 static cache B=2",
                                      "MoE share of decode (profiler, after every timing)"}
    # The phases ran in that order: the diagnosis after mxmoe's timings, the profiles last.
    order = list(results["phases"])
    assert order.index("mxmoe eager") < order.index("mxmoe diagnosis")
    assert order[-1] == "MoE share of decode (profiler, after every timing)"


def test_tiny_run_diagnosis_compares_every_layer(tiny_run):
    _, results, _ = tiny_run
    diagnosis = results["diagnosis"]
    assert diagnosis["status"] == "ok"
    assert diagnosis["teacher_forced_tokens"] == 32 and diagnosis["prompt_tokens"] == 8
    assert [r["layer"] for r in diagnosis["layers"]] == [0, 1]
    for row in diagnosis["layers"]:
        assert row["rel_err_max"] < 1e-4 and row["rel_err_mean"] <= row["rel_err_max"]
        assert row["candidate_vs_fp32_rel_err_mean"] < 1e-4
        assert row["reference_vs_fp32_rel_err_mean"] < 1e-4
        assert row["decode_token_rel_err"] < 1e-4 and row["routing_agreement"] == 1.0
        assert row["hidden_rel_diff_mean"] < 1e-4
    logits = diagnosis["logits"]
    assert logits["positions"] == 32 and logits["top1_agreement"] == 1.0
    assert logits["differing_positions"] == []
    assert logits["first"]["reference_top1"] == logits["first"]["candidate_top1"]
    assert diagnosis["verdict"]["kind"] == "rounding"
    table = e2e_report.render_table(results)
    assert "divergence diagnosis: every layer within rounding" in table
    assert "rel err mean" in table and "routing" in table


def test_the_budget_skips_a_compiled_point_to_keep_room_for_a_higher_ranked_one(
        tmp_path, monkeypatch):
    """mxmoe B=2 (ranked below transformers B=1) would eat the time transformers B=1 needs:
    skipped, the rest run."""
    estimates = {(e2e_report.MXMOE, 1): 1.0, (e2e_report.MXMOE, 2): 995.0,
                 (e2e_report.BF16, 1): 10.0, (e2e_report.BF16, 2): 1.0}
    monkeypatch.setattr(e2e.Session, "_static_estimate",
                        lambda self, name, batch: estimates[(name, batch)])
    rc, results, _ = _run(tmp_path, monkeypatch, *SMALL, "--e2e-no-diagnosis",
                          "--time-limit", "1000")
    assert rc == 0 and results["complete"] is False
    static = {(name, r["batch"]): r for name in e2e_report.CONFIG_NAMES
              for r in results["configs"][name]["decode"] if r["mode"] == e2e_report.STATIC}
    skipped = static[(e2e_report.MXMOE, 2)]
    assert skipped["status"] == "skipped" and skipped["estimate_s"] == 995.0
    assert "kept for the points ranked above it (transformers_bf16 B=1)" in skipped["error"]
    for key in ((e2e_report.MXMOE, 1), (e2e_report.BF16, 1), (e2e_report.BF16, 2)):
        assert static[key]["status"] == "ok", key
    assert "time budget" in e2e_report.render_table(results)


def test_sigterm_ends_the_run_cleanly_recording_the_rest_as_skipped(tmp_path, monkeypatch):
    import os
    import signal

    generate = e2e.Session.generate

    def terminated_at_static(self, input_ids, new_tokens, cache=None, **kwargs):
        if cache == e2e_report.STATIC:
            os.kill(os.getpid(), signal.SIGTERM)  # as `timeout` does
        return generate(self, input_ids, new_tokens, cache, **kwargs)

    monkeypatch.setattr(e2e.Session, "generate", terminated_at_static)
    rc, results, _ = _run(tmp_path, monkeypatch, *SMALL, "--e2e-no-diagnosis")
    assert rc == 0 and results["complete"] is False
    assert results["interrupted"].startswith("signal SIGTERM")
    assert signal.getsignal(signal.SIGTERM) is not None  # the handler was put back
    mx = [r for r in results["configs"][e2e_report.MXMOE]["decode"]
          if r["mode"] == e2e_report.STATIC]
    assert mx[0]["status"] == "skipped" and "interrupted during this point" in mx[0]["error"]
    assert mx[1]["status"] == "skipped" and "the run was interrupted" in mx[1]["error"]
    bf16 = [r for r in results["configs"][e2e_report.BF16]["decode"]
            if r["mode"] == e2e_report.STATIC]
    assert [r["batch"] for r in bf16] == [1, 2]
    assert all(r["status"] == "skipped" and "interrupted" in r["error"] for r in bf16)
    eager = [r for n in e2e_report.CONFIG_NAMES for r in results["configs"][n]["decode"]
             if r["mode"] == e2e_report.EAGER]
    assert len(eager) == 4 and all(r["status"] == "ok" for r in eager)
    assert "interrupted: signal SIGTERM" in e2e_report.render_table(results)


def test_mxmoe_only_builds_layer_by_layer_and_measures_mxmoe_alone(tmp_path, monkeypatch):
    rc, results, _ = _run(tmp_path, monkeypatch, "--e2e-mxmoe-only", "--e2e-batches", "1",
                          "--e2e-new-tokens", "3", "--e2e-prefill-tokens", "12",
                          "--e2e-no-compile")
    assert rc == 0 and results["complete"] is True and results["settings"]["mxmoe_only"]
    bf16 = results["configs"][e2e_report.BF16]
    assert bf16["description"].startswith("not run")
    assert all(bf16[kind] == [] for kind in e2e_report.KINDS)
    mx = results["configs"][e2e_report.MXMOE]
    assert mx["block_class"] == "GptOssMXFP4MoE" and mx["expert_bytes"] > 0
    assert [r["status"] for k in e2e_report.KINDS for r in mx[k]] == ["ok"] * 4
    assert len(mx["greedy"][0]["tokens"]) == 32
    assert results["check"]["status"] == "skipped"
    assert results["diagnosis"]["status"] == "skipped"
    assert "use_mxmoe" in results["model"]["weights"]


def test_mxmoe_only_build_never_materializes_the_bf16_experts_at_once(monkeypatch):
    """Each layer's bf16 experts exist only while that layer is patched."""
    from mxmoe.integrations import transformers as integration

    seen = []
    use = integration.use_mxmoe

    def counting(model, **kwargs):
        live = [layer.mlp.experts.gate_up_proj.is_meta for layer in model.model.layers
                if hasattr(layer.mlp, "experts")]
        seen.append((len(model.model.layers), live))
        return use(model, **kwargs)

    monkeypatch.setattr(integration, "use_mxmoe", counting)
    model = e2e.build_model_mxmoe_only("tiny", torch.device("cpu"), torch.float32, 0, "torch")
    assert seen == [(1, [False]), (2, [False])]  # layer 0 already patched when layer 1 is shown
    assert len(model.model.layers) == 2
    assert all(type(b).__name__ == "GptOssMXFP4MoE" for b in e2e.moe_blocks(model))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is the CPU's")
def test_120b_is_accepted_and_refused_without_a_gpu(tmp_path):
    with pytest.raises(SystemExit, match="needs a GPU"):
        main(["bench", "--model-e2e", "--e2e-config", "120b", "--out", str(tmp_path)])


def test_120b_config_is_mxmoe_only():
    assert "120b" in e2e.MXMOE_ONLY_CONFIGS
    config = e2e.MODEL_CONFIGS["120b"]
    assert config["num_hidden_layers"] == 36 and config["num_local_experts"] == 128
    bf16_experts = (config["num_hidden_layers"] * config["num_local_experts"] * 3
                    * config["hidden_size"] * config["intermediate_size"] * 2)
    assert bf16_experts > 141e9  # why: more than one H200


def test_the_fallback_gate_is_transformers_gate():
    model = e2e.build_model("tiny", torch.device("cpu"), torch.float32, seed=6)
    experts = model.model.layers[0].mlp.experts
    gate_up = torch.randn(5, 128, generator=torch.Generator().manual_seed(7)) * 10
    assert torch.allclose(e2e._gpt_oss_gate(gate_up, experts.alpha, experts.limit),
                          experts._apply_gate(gate_up))

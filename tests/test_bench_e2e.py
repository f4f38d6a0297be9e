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

"""`mxmoe tune` without a GPU: shapes, TP shards, the plan and its estimate, the staged search
with a fake timer, where the results go, and the command line."""

from __future__ import annotations

import io
import json

import pytest

from mxmoe import cache, tune, tuning_cache
from mxmoe.cli import build_parser
from mxmoe.cli import tune as cli_tune
from mxmoe.settings import DeviceFacts
from mxmoe.distributed import intermediate_range
from mxmoe.kernels import configs
from mxmoe.kernels.configs import MoEConfig

FACTS = DeviceFacts("cuda", "Test GPU", (9, 0), 132, False)


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path / "user-cache"))
    tuning_cache.forget()
    yield
    tuning_cache.forget()


def test_shape_parses_four_numbers_and_an_optional_activation():
    assert tune.parse_shape("2048,768,128,8,silu") == tune.Shape(
        2048, 768, 128, 8, "silu", False, "2048,768,128,8,silu")
    assert tune.parse_shape("64, 96, 3, 2").activation == "swigluoai"


@pytest.mark.parametrize("text", ["1,2,3", "64,96,3,4x", "64,96,3,4,gelu", "64,96,2,3",
                                  "64,100,3,2"],
                         ids=["three numbers", "not a number", "unknown activation", "k > E",
                              "I not a multiple of 32"])
def test_bad_shape_is_refused_naming_it(text):
    with pytest.raises(ValueError, match="--shapes"):
        tune.parse_shape(text)


def test_tp_shards_of_gpt_oss_follow_the_distributed_split():
    shards = tune.model_shapes(["gpt-oss-20b"], [1, 2, 4, 8])
    assert [s.intermediate for s in shards] == [2880, 1440, 736, 704, 384, 352]
    for tp in (2, 4, 8):
        per_rank = {len(intermediate_range(2880, tp, r)) for r in range(tp)}
        assert per_rank == {s.intermediate for s in shards if s.label.endswith(f"tp{tp}")}
    assert {(s.hidden, s.num_experts, s.top_k) for s in shards} == {(2880, 32, 4)}


def test_first_model_names_still_work():
    assert tune.model_shapes(["20b"]) == [tune.MODELS["gpt-oss-20b"]]


def test_estimate_counts_every_candidate_of_the_plan():
    jobs = tune.plan([tune.MODELS["gpt-oss-20b"]], [1, 4096], ["triton_dequant"])
    count, seconds = tune.estimate_seconds(jobs)
    assert count == sum(tune.candidate_count(m, 4, 32) for m in (1, 4096))
    assert seconds == pytest.approx(count * tune.SECONDS_PER_CANDIDATE)


class FakeTimer:
    """Seconds from a formula over the config: the fastest is known in advance."""

    def __init__(self, fail_if=lambda cfg: False):
        self.calls = []
        self.fail_if = fail_if

    def __call__(self, backend, shape, m, cfg):
        self.calls.append((backend, shape.key, m, cfg))
        if self.fail_if(cfg):
            return float("inf")
        seconds = abs(cfg.block_n - 64) + abs(cfg.block_k - 128) + cfg.num_stages
        seconds += 0.5 * (cfg.split_k != 1) + (0 if backend == "triton_dequant" else 1000)
        return seconds * 1e-6


def test_staged_search_finds_the_fake_timers_optimum_and_counts_as_estimated():
    timer = FakeTimer()
    job = tune.Job(tune.MODELS["gpt-oss-20b"], 1, "triton_dequant")
    progress = tune.Progress(tune.candidate_count(1, 4, 32), stream=io.StringIO())
    best, _ = tune.tune_point(timer, job, progress)
    assert (best.block_n, best.block_k, best.num_stages, best.split_k) == (64, 128, 2, 1)
    assert len(timer.calls) == progress.done == progress.total


def test_search_skips_candidates_that_do_not_run():
    timer = FakeTimer(fail_if=lambda cfg: cfg.block_n == 64)
    best, _ = tune.tune_point(timer, tune.Job(tune.MODELS["gpt-oss-20b"], 1, "triton_dequant"))
    assert best.block_n != 64


def test_results_go_to_the_user_cache_and_select_reads_them():
    jobs = tune.plan([tune.MODELS["gpt-oss-20b"]], [64], ["triton_dequant", "triton_scaled"])
    results = tune.tune(jobs, FakeTimer(), tune.UserCacheWriter(FACTS), log=lambda *a: None)
    best = results[("H2880_I2880_E32_k4", 64)]["triton_dequant"][0]
    chosen = configs.explain("triton_dequant", FACTS, 64, 2880, 2880, 32, 4)
    assert chosen.source == "user cache" and chosen.config == best
    table = tuning_cache.table(FACTS)
    assert table["fastest"]["H2880_I2880_E32_k4"]["64"] == "triton_dequant"


def test_maintainers_table_is_written_in_the_shipped_format(tmp_path, monkeypatch):
    path = tmp_path / "tables" / "test-gpu.json"
    writer = tune.TableWriter(path, FACTS, copy_tb_s=4.25)
    jobs = tune.plan([tune.parse_shape("64,96,3,2")], [1, 16], ["triton_dequant"])
    tune.tune(jobs, FakeTimer(), writer, log=lambda *a: None)
    data = json.loads(path.read_text())
    assert data["format"] == configs.TABLE_FORMAT and data["capability"] == [9, 0]
    assert data["sm_count"] == 132 and data["copy_tb_s"] == 4.25
    assert set(data["configs"]["triton_dequant"]["H64_I96_E3_k2"]) == {"1", "16"}
    monkeypatch.setattr(configs, "_TABLE_DIR", path.parent)
    configs.clear_memo()
    chosen = configs.explain("triton_dequant", FACTS, 16, 64, 96, 3, 2)
    assert chosen.source == "table"
    # It records the kernels' sources it was tuned on: no staleness note for these ones.
    assert data["kernel_sources"] == configs.current_kernel_sources()
    assert "other kernel sources" not in chosen.detail
    configs.clear_memo()


def run_cli(argv, capsys):
    args = build_parser().parse_args(["tune", *argv])
    code = args._run(args)
    return code, capsys.readouterr().out


def test_dry_run_prints_the_plan_and_its_estimate(capsys):
    code, out = run_cli(["--models", "gpt-oss-20b", "--tp", "1", "4", "--shapes",
                         "2048,768,128,8,silu", "--tokens", "1", "64", "--dry-run"], capsys)
    assert code == 0
    assert "8 points" in out and "candidates: about" in out
    assert "H2880_I736_E32_k4" in out and "H2048_I768_E128_k8" in out


def test_old_modes_option_becomes_backend_names():
    args = build_parser().parse_args(["tune", "--models", "20b", "--modes", "dequant",
                                      "scaled", "--tokens", "1"])
    assert [j.backend for j in cli_tune.jobs_of(args)] == ["triton_dequant", "triton_scaled"]


def test_help_describes_the_options_and_offers_the_models(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["tune", "--help"])
    out = capsys.readouterr().out
    for word in ("--shapes", "--tp", "--write-shipped-table", "--dry-run", "user cache",
                 "qwen3-30b-a3b", "mixtral-8x7b", "deepseek-v3", "triton_scaled", "--modes",
                 "dequant is triton_dequant"):
        assert word in out, word


def test_unknown_model_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["tune", "--models", "llama"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.gpu
def test_graph_timer_times_a_forced_config_and_the_config_is_the_one_run():
    import torch

    from mxmoe.reference import fused_experts_reference

    shape = tune.parse_shape("256,96,8,2")
    args = tune.problem_args(shape, 16, torch.bfloat16)
    ref = fused_experts_reference(args.hidden_states, args.w13, args.w2, args.topk_weights,
                                  args.topk_ids, w13_bias=args.w13_bias, w2_bias=args.w2_bias,
                                  activation=shape.activation)
    for cfg in (MoEConfig(block_n=32, block_k=32), MoEConfig(block_m=32, swap_ab=True,
                                                             split_k=2)):
        out = tune.run_with_config("triton_dequant", args, cfg)
        err = (out.float() - ref.float()).abs().max() / ref.float().abs().max()
        assert err < 2e-2, cfg
    seconds = tune.GraphTimer()("triton_dequant", shape, 16, MoEConfig())
    assert 0 < seconds < 0.1

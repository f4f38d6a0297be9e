"""Config lookup: tuned entries by pairs per expert, heuristics otherwise."""

import json

import pytest

from mxmoe.kernels import configs


@pytest.fixture
def table(tmp_path, monkeypatch):
    data = {"configs": {"dequant": {
        "H64_I64_E8_k2": {"1": {"block_m": 16, "block_n": 32}, "512": {"block_m": 128}},
        "H64_I64_E32_k2": {"64": {"block_m": 32}, "1024": {"block_m": 48},
                           "2048": {"block_m": 64}},
    }}}
    (tmp_path / "test-gpu.json").write_text(json.dumps(data))
    monkeypatch.setattr(configs, "_TABLE_DIR", tmp_path)
    configs._load_table.cache_clear()
    yield
    configs._load_table.cache_clear()


def block_m(m, e):
    cfg = configs.lookup("Test GPU", "dequant", m, 64, 64, e, 2)
    return cfg and cfg.block_m


def test_exact_problem_entry_within_a_factor_of_two(table):
    assert block_m(1, 8) == 16
    assert block_m(600, 8) == 128  # 150 pairs per expert vs the entry's 128


def test_far_from_every_entry_falls_back_to_the_heuristics(table):
    assert block_m(40, 8) is None  # 10 pairs per expert: 40x and 13x away


def test_another_expert_count_lends_its_entry_by_pairs_per_expert(table):
    assert block_m(8192, 128) == 64  # 128 pairs per expert: E=32's M=2048 (tie with E=8's 512)
    assert block_m(16, 8) == 32  # 4 pairs per expert: E=32's M=64 entry


def test_nearest_entry_wins_over_this_problems_farther_one(table):
    # 64 pairs per expert: E=8's own M=512 entry is 2x away, E=32's M=1024 matches exactly.
    assert block_m(256, 8) == 48


def test_on_a_tie_this_problems_entry_wins(table):
    assert block_m(512, 8) == 128  # E=8's M=512 and E=32's M=2048: both 128 pairs per expert
    assert block_m(2048, 32) == 64


def test_unknown_device_has_no_table():
    assert configs.lookup("Some Other GPU", "dequant", 1, 64, 64, 8, 2) is None


def test_tune_split_k_stage_only_at_decode_sizes():
    from mxmoe.kernels.configs import MoEConfig
    from mxmoe.tune import stage4

    best = MoEConfig(swap_ab=True)
    decode = stage4(best, 1, 4, 32)
    assert decode and all(c.swap_ab for c in decode)
    assert {(c.split_k, c.split_k2) for c in decode} >= {(2, 1), (1, 2), (4, 4)}
    assert (1, 1) not in {(c.split_k, c.split_k2) for c in decode}
    assert stage4(best, 4096, 4, 32) == []


def test_gemm2_config_inherits_or_overrides_split():
    from mxmoe.kernels.configs import MoEConfig

    assert MoEConfig(split_k=3).gemm2().split_k == 3
    assert MoEConfig(split_k=3, split_k2=1).gemm2().split_k == 1
    assert MoEConfig(split_k=1, split_k2=2).gemm2().split_k == 2

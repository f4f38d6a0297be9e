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


# --------------------------------------------------------------------------- select: the order

from mxmoe import cache, tuning_cache  # noqa: E402
from mxmoe.settings import DeviceFacts  # noqa: E402
from mxmoe.kernels.configs import MoEConfig  # noqa: E402

H100 = DeviceFacts("cuda", "NVIDIA H100 80GB HBM3", (9, 0), 132, False)
H200 = DeviceFacts("cuda", "NVIDIA H200", (9, 0), 132, False)
L40S = DeviceFacts("cuda", "NVIDIA L40S", (8, 9), 142, False)
GPT_OSS_20B = (2880, 2880, 32, 4)


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    """Every test gets an empty user cache of its own and no memoised answers."""
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path / "user-cache"))
    monkeypatch.setattr(cache, "_warned", set())
    tuning_cache.forget()
    yield tmp_path / "user-cache"
    tuning_cache.forget()


def explain(facts, m, shape=GPT_OSS_20B, backend="triton_dequant"):
    return configs.explain(backend, facts, m, *shape)


@pytest.fixture
def shipped_h100_as_first_format(tmp_path, monkeypatch):
    """The shipped H100 table rewritten in the first format (kernel mode names, no format)."""
    shipped = json.loads((configs._TABLE_DIR / "nvidia-h100-80gb-hbm3.json").read_text())
    legacy = {"device": shipped["device"], "fastest": shipped["fastest"],
              "configs": {"dequant": shipped["configs"]["triton_dequant"]}}
    legacy_dir = tmp_path / "legacy"
    legacy_dir.mkdir()
    (legacy_dir / "nvidia-h100-80gb-hbm3.json").write_text(json.dumps(legacy))
    return legacy_dir


def test_first_format_table_gives_the_same_configs_as_the_shipped_one(
        shipped_h100_as_first_format, monkeypatch):
    tokens = [1, 2, 3, 5, 16, 33, 64, 100, 256, 300, 512, 777, 1024, 3000, 4096, 16384, 50000]
    problems = [GPT_OSS_20B, (2880, 2880, 128, 4)]
    shipped = [configs.lookup("NVIDIA H100 80GB HBM3", "triton_dequant", m, *p)
               for p in problems for m in tokens]
    configs.clear_memo()
    monkeypatch.setattr(configs, "_TABLE_DIR", shipped_h100_as_first_format)
    first = [configs.lookup("NVIDIA H100 80GB HBM3", "dequant", m, *p)
             for p in problems for m in tokens]
    configs.clear_memo()
    assert first == shipped and sum(c is not None for c in shipped) > len(tokens)


def test_mode_and_backend_names_look_up_the_same_entries():
    for m in (1, 64, 4096):
        assert (configs.lookup("NVIDIA H100 80GB HBM3", "dequant", m, *GPT_OSS_20B)
                == configs.lookup("NVIDIA H100 80GB HBM3", "triton_dequant", m, *GPT_OSS_20B))


def test_shipped_table_serves_its_own_device():
    chosen = explain(H100, 64)
    assert chosen.source == "table"
    assert chosen.config == configs.lookup(H100.name, "triton_dequant", 64, *GPT_OSS_20B)


def test_an_h200_borrows_the_h100_table_through_its_family():
    for m in (1, 64, 512, 4096, 16384):
        chosen = explain(H200, m)
        assert chosen.source == "family table", m
        assert "sm_90" in chosen.detail and "132 SMs" in chosen.detail
        assert chosen.config == configs.lookup(H100.name, "triton_dequant", m, *GPT_OSS_20B)


def test_another_family_gets_configs_derived_from_the_tuned_points():
    chosen = explain(L40S, 64)
    assert chosen.source == "derived"


def test_user_cache_comes_before_the_shipped_table():
    mine = MoEConfig(block_m=32, block_n=32, block_k=32, num_warps=2, num_stages=2)
    assert explain(H100, 64).config != mine
    tuning_cache.record(H100, "triton_dequant", "H2880_I2880_E32_k4", 64, mine.to_json())
    chosen = explain(H100, 64)
    assert chosen.source == "user cache" and chosen.config == mine
    assert explain(H200, 64).source == "family table"  # another device: not its entry


def test_user_cache_entry_of_another_driver_is_not_used(monkeypatch):
    from mxmoe import devices

    mine = MoEConfig(block_m=32, block_n=32, block_k=32)
    tuning_cache.record(H100, "triton_dequant", "H2880_I2880_E32_k4", 64, mine.to_json())
    assert explain(H100, 64).source == "user cache"
    stack = devices.software_stack()
    monkeypatch.setattr(devices, "software_stack", lambda: {**stack, "driver": "updated"})
    tuning_cache.forget()
    assert explain(H100, 64).source == "table"


def test_damaged_user_cache_is_ignored_with_a_warning(user_cache):
    user_cache.mkdir(parents=True)
    (user_cache / tuning_cache.FILE_NAME).write_text("{half a file")
    with pytest.warns(RuntimeWarning, match="tuning cache .* is damaged"):
        assert explain(H100, 64).source == "table"


def test_select_is_memoised_per_size_class_and_sees_a_new_tuning():
    first = configs.select("triton_dequant", H100, 60, *GPT_OSS_20B)
    assert configs.select("triton_dequant", H100, 70, *GPT_OSS_20B) is first  # both M ~ 64
    mine = MoEConfig(block_m=32, block_n=32, block_k=32)
    tuning_cache.record(H100, "triton_dequant", "H2880_I2880_E32_k4", 64, mine.to_json())
    assert configs.select("triton_dequant", H100, 60, *GPT_OSS_20B) == mine


def test_no_device_and_the_interpreter_get_the_heuristics():
    assert configs.select("triton_dequant", None, 64, *GPT_OSS_20B) == \
        configs.heuristic_config(64, 4, 32, False)
    assert configs.select("triton_dequant", H100, 64, *GPT_OSS_20B, interpret=True) == \
        configs.heuristic_config(64, 4, 32, True)


@pytest.mark.parametrize("m, expected", [(1, 1), (2, 2), (3, 4), (5, 4), (6, 8), (700, 512),
                                         (800, 1024), (0, 1)])
def test_size_class_is_the_nearest_power_of_two(m, expected):
    assert configs.size_class(m) == expected


# --------------------------------------------------------------------------- derived heuristics


def h100_points():
    return configs._tuned_points("triton_dequant",
                                 [configs._load_table("nvidia-h100-80gb-hbm3")])


def test_derived_config_at_a_tuned_point_is_that_point():
    table = configs._load_table("nvidia-h100-80gb-hbm3")["configs"]["triton_dequant"]
    for m, entry in table["H2880_I2880_E32_k4"].items():
        derived = configs.derived_config(h100_points(), int(m), *GPT_OSS_20B, sm_count=132)
        assert derived.to_json() == MoEConfig(**entry).to_json(), m


def test_derived_m_tile_follows_pairs_per_expert():
    qwen3 = (2048, 768, 128, 8)
    small = configs.derived_config(h100_points(), 1, *qwen3, sm_count=132)
    large = configs.derived_config(h100_points(), 16384, *qwen3, sm_count=132)
    assert small.block_m == 16 and large.block_m >= 128


def test_derived_tiles_are_no_wider_than_the_problem():
    points = [configs.TunedPoint(1.0, 4096, 4096, MoEConfig(block_n=256, block_k=256))]
    cfg = configs.derived_config(points, 1, 64, 32, 8, 2, sm_count=1)  # N1 = 64, K1 = 64
    assert cfg.block_n <= 64 and cfg.block_k <= 64
    g2 = cfg.gemm2()
    assert g2.block_n <= 64 and g2.block_k <= 32  # GEMM2: N = H = 64, K = I = 32


def test_derived_gemm1_splits_k_only_when_sms_would_idle():
    points = [configs.TunedPoint(0.25, 512, 4096, MoEConfig(block_m=16, block_n=128,
                                                            block_k=128))]
    # One token, one expert of N = 512: 4 programs on 132 SMs; K = 4096 splits 4 ways.
    few = configs.derived_config(points, 1, 4096, 256, 8, 1, sm_count=132)
    assert few.split_k == 4 and few.gemm2().split_k == 1
    # 8 experts of N = 28672: thousands of programs already.
    many = configs.derived_config(points, 1, 4096, 14336, 8, 8, sm_count=132)
    assert many.split_k == 1


def test_fastest_backend_prefers_the_user_cache_and_falls_back_to_none():
    assert configs.fastest_backend(H100, 64, *GPT_OSS_20B) is None  # the table has no verdict
    cfg = MoEConfig().to_json()
    tuning_cache.record(H100, "triton_scaled", "H2880_I2880_E32_k4", 64, cfg,
                        fastest="triton_scaled")
    assert configs.fastest_backend(H100, 64, *GPT_OSS_20B) == "triton_scaled"
    assert configs.fastest_backend(None, 64, *GPT_OSS_20B) is None


def test_derived_configs_use_the_devices_own_table_beside_its_familys(tmp_path, monkeypatch):
    # Two sm_90 tables: the device's own and a sibling's, neither holding the asked shape.
    for slug, key, sms in (("own-gpu", "H64_I64_E8_k2", 132), ("sibling-gpu", "H128_I128_E8_k2",
                                                                 114)):
        (tmp_path / f"{slug}.json").write_text(json.dumps({
            "format": 2, "capability": [9, 0], "sm_count": sms,
            "configs": {"triton_dequant": {key: {"1": {"block_m": 16, "block_n": 32}}}}}))
    monkeypatch.setattr(configs, "_TABLE_DIR", tmp_path)
    configs.clear_memo()
    try:
        own = DeviceFacts("cuda", "Own GPU", (9, 0), 132, False)
        chosen = explain(own, 1, shape=(4096, 1024, 16, 2))
        assert chosen.source == "derived"
        assert chosen.detail == "from 2 tuned points"  # the own table's and the sibling's
    finally:
        configs.clear_memo()


def test_a_damaged_shipped_table_is_ignored_with_a_warning(tmp_path, monkeypatch):
    (tmp_path / "broken-gpu.json").write_text("{half a table")
    monkeypatch.setattr(configs, "_TABLE_DIR", tmp_path)
    configs.clear_memo()
    try:
        broken = DeviceFacts("cuda", "Broken GPU", (9, 0), 132, False)
        with pytest.warns(RuntimeWarning,
                          match="shipped config table .*broken-gpu.json is damaged"):
            assert explain(broken, 64).source == "heuristic"
    finally:
        configs.clear_memo()


def test_a_damaged_entry_in_a_sound_user_cache_is_ignored_with_a_warning(user_cache):
    mine = MoEConfig(block_m=32, block_n=32, block_k=32)
    tuning_cache.record(H100, "triton_dequant", "H2880_I2880_E32_k4", 64, mine.to_json())
    path = user_cache / tuning_cache.FILE_NAME
    data = json.loads(path.read_text())
    (entry,) = data["entries"].values()
    entry["configs"] = ["not", "a", "map"]
    path.write_text(json.dumps(data))
    tuning_cache.forget()
    with pytest.warns(RuntimeWarning, match="entry in the tuning cache .* is damaged"):
        assert explain(H100, 64).source == "table"


def test_a_shipped_table_of_other_kernel_sources_says_so(tmp_path, monkeypatch):
    # The shipped H100 table predates the digest: every answer from it carries the note.
    assert "tuned for other kernel sources" in explain(H100, 64).detail
    assert "tuned for other kernel sources" in explain(H200, 64).detail  # its family table
    current = json.loads((configs._TABLE_DIR / "nvidia-h100-80gb-hbm3.json").read_text())
    current["kernel_sources"] = configs.current_kernel_sources()
    (tmp_path / "nvidia-h100-80gb-hbm3.json").write_text(json.dumps(current))
    monkeypatch.setattr(configs, "_TABLE_DIR", tmp_path)
    configs.clear_memo()
    try:
        chosen = explain(H100, 64)
        assert chosen.source == "table" and chosen.detail == "nvidia-h100-80gb-hbm3"
    finally:
        configs.clear_memo()

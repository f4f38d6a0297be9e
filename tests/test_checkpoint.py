"""Loading gpt-oss MoE layers: both namings, sharding, config.json, rank slices, and errors."""

import json

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file

import mxmoe
from mxmoe.checkpoint import NAMINGS, load_gpt_oss_moe
from mxmoe.distributed import expert_range, intermediate_range, w13_row_ranges

from checkpoints import quiet_cpu  # noqa: F401 (autouse fixture)
from checkpoints import record_slice_reads
from checkpoints import (dense_moe, hf_config, mxfp4_tensors, openai_config, other_tensors,
                         write_checkpoint)
from helpers import rel_err

CONFIGS = {"transformers": hf_config, "openai": openai_config}


def _write(tmp_path, naming="transformers", *, e=4, h=64, i=64, shards=1, config=True,
           top_k=2, limit=7.0, edit=None):
    """A two-layer MXFP4 checkpoint; returns (directory, {layer: DenseMoE})."""
    moes = {0: dense_moe(e, h, i, seed=10), 1: dense_moe(e, h, i, seed=11)}
    tensors = other_tensors(list(moes), naming, h)
    for layer, moe in moes.items():
        tensors.update(mxfp4_tensors(moe, layer, naming))
    if edit is not None:
        edit(tensors)
    cfg = CONFIGS[naming](moes[0], top_k, limit=limit) if config else None
    return write_checkpoint(tmp_path / "ckpt", tensors, shards=shards, config=cfg), moes


def _name(naming, role, layer=1):
    return NAMINGS[naming][role].format(i=layer)


@pytest.mark.parametrize("config", [True, False], ids=["config.json", "no config"])
@pytest.mark.parametrize("shards", [1, 2], ids=["one file", "sharded"])
@pytest.mark.parametrize("naming", ["transformers", "openai"])
def test_loads_layer_in_either_naming(tmp_path, naming, shards, config):
    path, moes = _write(tmp_path, naming, shards=shards, config=config, limit=6.5)
    layer = mxmoe.MXFP4MoE.from_gpt_oss(path, 1, top_k=None if config else 2,
                                        dtype=torch.float32, backend="torch")
    expected = moes[1].layer(top_k=2, limit=6.5 if config else 7.0)
    assert layer.top_k == 2 and layer.limit == (6.5 if config else 7.0)
    assert torch.equal(layer.w13_blocks, expected.w13_blocks)
    assert torch.equal(layer.w2_scales, expected.w2_scales)
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(layer(x), expected(x), rtol=0, atol=0)


def test_loads_from_a_single_safetensors_file(tmp_path):
    path, moes = _write(tmp_path, "openai")
    layer = mxmoe.MXFP4MoE.from_gpt_oss(path / "model.safetensors", 0, dtype=torch.float32,
                                        backend="torch")
    x = torch.randn(4, 64)
    torch.testing.assert_close(layer(x), moes[0].layer(top_k=2)(x), rtol=0, atol=0)


def test_default_dtype_is_bf16_and_blocks_stay_uint8(tmp_path):
    path, _ = _write(tmp_path)
    layer = mxmoe.MXFP4MoE.from_gpt_oss(path, 0)
    assert layer.router.weight.dtype == torch.bfloat16 and layer.w13_bias.dtype == torch.bfloat16
    assert layer.w13_blocks.dtype == torch.uint8 and layer.w13_blocks.shape == (4, 128, 32)
    assert layer.w2_blocks.shape == (4, 64, 32) and layer.w2_scales.shape == (4, 64, 2)


def test_top_k_argument_overrides_config(tmp_path):
    path, _ = _write(tmp_path, top_k=2)
    assert mxmoe.MXFP4MoE.from_gpt_oss(path, 0, top_k=3).top_k == 3


def test_reads_only_the_layer_tensors_and_only_their_slices(tmp_path, monkeypatch):
    path, _ = _write(tmp_path, shards=2)
    requested = record_slice_reads(monkeypatch)
    load_gpt_oss_moe(path, 1, experts=range(1, 3))
    assert set(requested) == {n.format(i=1) for n in NAMINGS["transformers"].values()}


def test_expert_slice_reads_those_rows_uneven_e5_over_2(tmp_path):
    path, _ = _write(tmp_path, e=5)
    full = load_gpt_oss_moe(path, 1, dtype=torch.float32)
    sizes = []
    for rank in range(2):
        experts = expert_range(5, 2, rank)
        part = load_gpt_oss_moe(path, 1, experts=experts, dtype=torch.float32)
        sel = slice(experts.start, experts.stop)
        sizes.append(part.w13.shape[0])
        assert torch.equal(part.w13.blocks, full.w13.blocks[sel])
        assert torch.equal(part.w13.scales, full.w13.scales[sel])
        assert torch.equal(part.w2.blocks, full.w2.blocks[sel])
        assert torch.equal(part.w2_bias, full.w2_bias[sel])
        assert torch.equal(part.router_weight, full.router_weight)  # the router stays whole
    assert sizes == [3, 2]


@pytest.mark.parametrize("activation", ["swigluoai", "silu"])
def test_intermediate_slice_reads_w13_rows_and_w2_columns_i96_over_2(tmp_path, activation):
    path, _ = _write(tmp_path, i=96)
    full = load_gpt_oss_moe(path, 0, activation=activation, dtype=torch.float32)
    widths = []
    for rank in range(2):
        inter = intermediate_range(96, 2, rank)
        widths.append(len(inter))
        part = load_gpt_oss_moe(path, 0, intermediate=inter, activation=activation,
                                keep_w2_bias=rank == 0, dtype=torch.float32)
        rows = torch.cat([torch.arange(r.start, r.stop)
                          for r in w13_row_ranges(96, inter, activation)])
        assert torch.equal(part.w13.blocks, full.w13.blocks[:, rows])
        assert torch.equal(part.w13.scales, full.w13.scales[:, rows])
        assert torch.equal(part.w13_bias, full.w13_bias[:, rows])
        # w2 [E, H, I]: bytes [start/2, stop/2) and scales [start/32, stop/32) of each row.
        assert torch.equal(part.w2.blocks, full.w2.blocks[..., inter.start // 2:inter.stop // 2])
        assert torch.equal(part.w2.scales, full.w2.scales[..., inter.start // 32:inter.stop // 32])
        assert (part.w2_bias is None) == (rank != 0)
    assert widths == [64, 32]


def _layer_from(weights, expert_map=None):
    return mxmoe.MXFP4MoE(weights.w13, weights.w2, weights.router_weight, weights.router_bias,
                          weights.w13_bias, weights.w2_bias, top_k=2, backend="torch",
                          activation=weights.activation, expert_map=expert_map)


@pytest.mark.parametrize("activation", ["swigluoai", "silu"])
def test_tensor_parallel_slices_sum_to_the_whole_layer(tmp_path, activation):
    path, _ = _write(tmp_path, i=96)
    whole = _layer_from(load_gpt_oss_moe(path, 0, activation=activation, dtype=torch.float32))
    x = torch.randn(7, 64)
    total = sum(
        _layer_from(load_gpt_oss_moe(path, 0, intermediate=intermediate_range(96, 2, r),
                                     keep_w2_bias=r == 0, activation=activation,
                                     dtype=torch.float32))(x)
        for r in range(2)
    )
    assert rel_err(total, whole(x)) < 1e-5


class _FakeGroups:
    """Stands in for torch.distributed: this process is `rank` of each fake group."""

    def __init__(self, monkeypatch, positions):
        self.positions = positions  # group -> (rank, world)
        monkeypatch.setattr(dist, "is_available", lambda: True)
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_rank", lambda group=None: self.positions[group][0])
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: self.positions[group][1])
        # Global ranks of each group, for the check that ep and tp groups are orthogonal.
        self.ranks = {}
        monkeypatch.setattr(dist, "get_process_group_ranks", lambda group: self.ranks[group])
        # The sum over ranks is done by the test: each rank's output stays partial.
        monkeypatch.setattr(dist, "all_reduce", lambda tensor, group=None: None)


@pytest.mark.parametrize(
    "ep_world,tp_world",
    [(2, 1), (1, 2), (2, 2), (8, 1)],
    ids=["ep 2 (E=5 uneven)", "tp 2 (I=96 uneven)", "ep 2 x tp 2", "ep 8 > E=5 (empty ranks)"],
)
def test_from_gpt_oss_with_groups_sums_to_the_whole_layer(tmp_path, monkeypatch, ep_world,
                                                          tp_world):
    path, _ = _write(tmp_path, e=5, i=96)
    whole = mxmoe.MXFP4MoE.from_gpt_oss(path, 1, dtype=torch.float32, backend="torch")
    x = torch.randn(6, 64)
    ep, tp = object(), object()
    fake = _FakeGroups(monkeypatch, {})
    total = torch.zeros(6, 64)
    for ep_rank in range(ep_world):
        for tp_rank in range(tp_world):
            fake.positions = {ep: (ep_rank, ep_world), tp: (tp_rank, tp_world), None: (0, 1)}
            # An ep x tp mesh with tp inner: global rank = ep_rank * tp_world + tp_rank.
            fake.ranks = {ep: [r * tp_world + tp_rank for r in range(ep_world)],
                          tp: [ep_rank * tp_world + r for r in range(tp_world)]}
            layer = mxmoe.MXFP4MoE.from_gpt_oss(
                path, 1, dtype=torch.float32, backend="torch",
                ep_group=ep if ep_world > 1 else None, tp_group=tp if tp_world > 1 else None)
            experts = expert_range(5, ep_world, ep_rank)
            assert layer.w13.shape[0] == len(experts)
            assert layer.w2.shape[2] == len(intermediate_range(96, tp_world, tp_rank))
            assert (layer.w2_bias is None) == (tp_rank != 0)
            if ep_world > 1:
                want = torch.full((5,), -1, dtype=torch.int32)
                want[experts.start:experts.stop] = torch.arange(len(experts), dtype=torch.int32)
                assert torch.equal(layer.expert_map, want)
            total += layer(x)
    assert rel_err(total, whole(x)) < 1e-5


def _drop(name):
    return lambda t: t.pop(name)


def _replace(name, value):
    return lambda t: t.__setitem__(name, value)


@pytest.mark.parametrize(
    "edit,fragment",
    [
        (_drop(_name("transformers", "w2_bias")),
         r"missing tensor.*model\.layers\.1\.mlp\.experts\.down_proj_bias"),
        (_replace(_name("transformers", "w2_scales"), torch.zeros(4, 64, 1, dtype=torch.uint8)),
         r"down_proj_scales' has shape \[4, 64, 1\], expected \[4, 64, 2\]"),
        (_replace(_name("transformers", "router_weight"), torch.zeros(4, 32)),
         r"router\.weight' has shape \[4, 32\], expected \[4, 64\]"),
        (_replace(_name("transformers", "w13_blocks"),
                  torch.zeros(4, 128, 4, 8, dtype=torch.uint8)),
         r"gate_up_proj_blocks' has shape \(4, 128, 4, 8\), expected \[E, 2I, H/32, 16\]"),
        (_replace(_name("transformers", "w13_blocks"),
                  torch.zeros(4, 128, 2, 16, dtype=torch.int8)),
         r"gate_up_proj_blocks' has dtype I8, expected U8"),
        (_replace(_name("transformers", "w13_bias"), torch.zeros(4, 128, dtype=torch.int32)),
         r"gate_up_proj_bias' has dtype I32, expected BF16 or F16 or F32"),
    ],
    ids=["missing tensor", "wrong scales shape", "wrong router shape", "blocks not [.., 16]",
         "blocks not uint8", "bias not float"],
)
def test_bad_checkpoint_raises_naming_tensor_and_shapes(tmp_path, edit, fragment):
    path, _ = _write(tmp_path, shards=2, edit=edit)
    with pytest.raises(ValueError, match=fragment):
        mxmoe.MXFP4MoE.from_gpt_oss(path, 1)


def test_no_top_k_anywhere_is_a_clear_error(tmp_path):
    path, _ = _write(tmp_path, config=False)
    with pytest.raises(ValueError, match=r"top_k is required.*num_experts_per_tok"):
        mxmoe.MXFP4MoE.from_gpt_oss(path, 0)


def test_config_disagreeing_with_tensors(tmp_path):
    path, _ = _write(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["num_local_experts"] = 8
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError,
                       match=r"num_local_experts = 8.*gate_up_proj_blocks.*experts = 4"):
        mxmoe.MXFP4MoE.from_gpt_oss(path, 0)


def test_absent_layer_says_which_layers_exist(tmp_path):
    path, _ = _write(tmp_path)
    with pytest.raises(ValueError, match=r"layer 7: no MXFP4 MoE tensors.*layers with MXFP4 "
                                         r"experts here: 0\.\.1"):
        mxmoe.MXFP4MoE.from_gpt_oss(path, 7)
    # The same through format detection (once an AttributeError there).
    with pytest.raises(ValueError, match=r"layer 7: no MXFP4 MoE tensors.*here: 0\.\.1"):
        mxmoe.MXFP4MoE.from_pretrained(path, 7)


def test_format_can_be_named_and_is_checked(tmp_path):
    path, moes = _write(tmp_path)
    layer = mxmoe.MXFP4MoE.from_pretrained(path, 1, format="gpt-oss", dtype=torch.float32)
    assert torch.equal(layer.w13.dequantize(), moes[1].w13)
    with pytest.raises(ValueError, match=r"format must be one of \['gpt-oss', "
                                         r"'compressed-tensors', 'quark'\] or None"):
        mxmoe.MXFP4MoE.from_pretrained(path, 1, format="mxfp4")
    with pytest.raises(ValueError, match="is not .mxfp4-pack-quantized."):
        mxmoe.MXFP4MoE.from_pretrained(path, 1, format="compressed-tensors")


def test_dense_checkpoint_points_to_quantize(tmp_path):
    save_file({"model.layers.0.mlp.experts.gate_up_proj": torch.zeros(2, 64, 64)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="mxmoe quantize"):
        mxmoe.MXFP4MoE.from_gpt_oss(tmp_path, 0, top_k=1)


def test_cuda_device_without_cuda_is_said_in_mxmoe_words(tmp_path, monkeypatch):
    # torch's own error is a bare "AssertionError: Torch not compiled with CUDA enabled".
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path, _ = _write(tmp_path)
    for load in (mxmoe.MXFP4MoE.from_pretrained, mxmoe.MXFP4MoE.from_gpt_oss):
        with pytest.raises(ValueError, match=r"device='cuda'.*pass device='cpu'"):
            load(path, 0, device="cuda")


def test_missing_path_and_missing_shard(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        mxmoe.MXFP4MoE.from_gpt_oss(tmp_path / "nope", 0)
    path, _ = _write(tmp_path, shards=2)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match=r"names model-00002-of-00002\.safetensors"):
        mxmoe.MXFP4MoE.from_gpt_oss(path, 0)


def test_tp_group_larger_than_the_blocks_of_i(tmp_path, monkeypatch):
    path, _ = _write(tmp_path, i=64)  # 2 blocks of 32
    tp = object()
    _FakeGroups(monkeypatch, {tp: (0, 3), None: (0, 3)})
    with pytest.raises(ValueError, match=r"3 ranks needs at least 3 blocks.*I = 64 has 2"):
        mxmoe.MXFP4MoE.from_gpt_oss(path, 0, tp_group=tp)


def test_process_not_in_group(tmp_path, monkeypatch):
    path, _ = _write(tmp_path)
    ep = object()
    _FakeGroups(monkeypatch, {ep: (-1, 2), None: (5, 8)})
    with pytest.raises(ValueError, match=r"global rank 5\) is not a member of ep_group"):
        mxmoe.MXFP4MoE.from_gpt_oss(path, 0, ep_group=ep)


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(experts=range(2, 6)), r"experts range\(2, 6\) is outside \[0, 4\)"),
        (dict(intermediate=range(16, 64)), r"multiples of 32"),
        (dict(intermediate=range(0, 96)), r"outside \[0, 64\)"),
    ],
    ids=["experts past E", "intermediate cuts a block", "intermediate past I"],
)
def test_bad_slices(tmp_path, kwargs, fragment):
    path, _ = _write(tmp_path)
    with pytest.raises(ValueError, match=fragment):
        load_gpt_oss_moe(path, 0, **kwargs)


@pytest.mark.gpu
@pytest.mark.slow
def test_gpt_oss_20b_shaped_layer_from_synthetic_checkpoint_on_every_backend(tmp_path):
    """A whole gpt-oss-20b-shaped layer (E=32, H=I=2880: 90 scale blocks, not a multiple of 64)
    read straight onto the GPU, then every usable backend against the torch reference."""
    from helpers import rms_err

    e, h, i = 32, 2880, 2880
    g = torch.Generator().manual_seed(0)

    def codes(*shape):
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)

    def scales(*shape):  # 2**-8 .. 2**-5: outputs of order one, some past the swiglu limit
        return torch.randint(119, 123, shape, dtype=torch.uint8, generator=g)

    names = {role: n.format(i=0) for role, n in NAMINGS["transformers"].items()}
    tensors = {
        names["w13_blocks"]: codes(e, 2 * i, h // 32, 16),
        names["w13_scales"]: scales(e, 2 * i, h // 32),
        names["w13_bias"]: (torch.randn(e, 2 * i, generator=g) * 0.1).bfloat16(),
        names["w2_blocks"]: codes(e, h, i // 32, 16),
        names["w2_scales"]: scales(e, h, i // 32),
        names["w2_bias"]: (torch.randn(e, h, generator=g) * 0.1).bfloat16(),
        names["router_weight"]: (torch.randn(e, h, generator=g) * h**-0.5).bfloat16(),
        names["router_bias"]: torch.zeros(e, dtype=torch.bfloat16),
    }
    path = write_checkpoint(tmp_path, tensors, config={"num_experts_per_tok": 4})
    layer = mxmoe.MXFP4MoE.from_gpt_oss(path, 0, device="cuda")
    assert layer.w13_blocks.device.type == "cuda" and layer.w13_blocks.dtype == torch.uint8
    assert layer.router.weight.dtype == torch.bfloat16

    for m in (1, 64):
        x = torch.randn(m, h, device="cuda", generator=torch.Generator("cuda").manual_seed(m))
        x = x.bfloat16()
        layer.backend = "torch"
        ref = layer(x)
        for name, (usable, _) in mxmoe.backends("cuda").items():
            if not usable or name == "torch":
                continue
            layer.backend = name
            out = layer(x)
            assert out.shape == (m, h) and out.dtype == torch.bfloat16, name
            assert rel_err(out, ref) < 2e-2 and rms_err(out, ref) < 1e-2, (name, m)

"""`mxmoe quantize`: round trip, layouts, refusals, atomicity and verification."""

import json

import pytest
import torch
from safetensors import safe_open

import mxmoe
from mxmoe import convert
from mxmoe.cli import main

from checkpoints import quiet_cpu  # noqa: F401 (autouse fixture)
from checkpoints import bf16_gpt_oss_tensors, dense_moe, hf_config, write_checkpoint


def _read_all(directory) -> dict:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})
    return out


def _bf16_checkpoint(path, *, shards=2, config=True):
    moes = {0: dense_moe(seed=30, bf16_exact=True), 1: dense_moe(seed=31, bf16_exact=True)}
    write_checkpoint(path, bf16_gpt_oss_tensors(moes), shards=shards,
                     config=hf_config(moes[0], 2) if config else None)
    (path / "tokenizer.json").write_text('{"tokens": []}')
    return moes


def test_round_trip_sharded_gpt_oss_bf16(tmp_path, capsys):
    moes = _bf16_checkpoint(tmp_path / "in")
    assert main(["quantize", str(tmp_path / "in"), str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    assert "mxmoe quantize: 100.0%" in capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "in").iterdir())
    assert (out / "tokenizer.json").read_text() == '{"tokens": []}'

    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    assert "model.layers.*.mlp.router" in config["quantization_config"]["modules_to_not_convert"]
    assert config["num_experts_per_tok"] == 2

    before, after = _read_all(tmp_path / "in"), _read_all(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(after)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                 for t in after.values())
    for name, shard in index["weight_map"].items():
        with safe_open(str(out / shard), framework="pt") as handle:
            assert name in handle.keys()
    for name, t in before.items():
        if name.endswith(("gate_up_proj", "down_proj")):
            assert name not in after
            assert after[name + "_blocks"].dtype == torch.uint8
        else:  # copied byte for byte
            assert after[name].dtype == t.dtype and torch.equal(after[name], t), name
    assert after["model.layers.1.mlp.experts.gate_up_proj_blocks"].shape == (4, 128, 2, 16)
    assert after["model.layers.1.mlp.experts.down_proj_scales"].shape == (4, 64, 2)

    for layer, moe in moes.items():
        loaded = mxmoe.MXFP4MoE.from_gpt_oss(out, layer, dtype=torch.float32, backend="torch")
        expected = moe.layer(top_k=2)
        assert torch.equal(loaded.w13_blocks, expected.w13_blocks)
        assert torch.equal(loaded.w2_scales, expected.w2_scales)
        x = torch.randn(3, 4, 64)
        torch.testing.assert_close(loaded(x), expected(x), rtol=0, atol=0)


def test_single_file_without_config(tmp_path):
    _bf16_checkpoint(tmp_path / "in", shards=1, config=False)
    assert main(["quantize", str(tmp_path / "in"), str(tmp_path / "out"), "--quiet"]) == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["model.safetensors", "tokenizer.json"]
    loaded = mxmoe.MXFP4MoE.from_gpt_oss(tmp_path / "out", 0, top_k=2)
    assert loaded.w13.shape == (4, 128, 64)


def test_pattern_for_other_layouts(tmp_path):
    """Per-expert 2-D weights [N, K] (not transposed) and a stacked one stored [E, K, N]."""
    g = torch.Generator().manual_seed(3)
    w1 = torch.randn(96, 64, generator=g)
    stacked = torch.randn(3, 64, 32, generator=g)
    write_checkpoint(tmp_path / "in", {"moe.experts.0.w1.weight": w1.bfloat16(),
                                       "moe.stacked": stacked,
                                       "moe.gate.weight": torch.randn(3, 64, generator=g)},
                     config={})
    args = ["quantize", str(tmp_path / "in"), str(tmp_path / "out"), "--quiet"]
    assert main(args + ["--pattern", r"moe\.experts\.\d+\.w1\.weight"]) == 0
    after = _read_all(tmp_path / "out")
    want = mxmoe.quantize_mxfp4(w1.bfloat16().float())
    assert torch.equal(after["moe.experts.0.w1.weight_blocks"], want.blocks.reshape(96, 2, 16))
    assert torch.equal(after["moe.experts.0.w1.weight_scales"], want.scales)
    assert torch.equal(after["moe.stacked"], stacked)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    # "moe" holds moe.stacked, copied, but also the converted experts: it must not be listed.
    assert config["quantization_config"]["modules_to_not_convert"] == ["moe.gate"]

    assert main(args + ["--force", "--pattern", r"moe\.stacked", "--transposed"]) == 0
    after = _read_all(tmp_path / "out")
    want = mxmoe.quantize_mxfp4(stacked.transpose(1, 2))
    assert after["moe.stacked_blocks"].shape == (3, 32, 2, 16)
    assert torch.equal(after["moe.stacked_blocks"].flatten(-2), want.blocks)


def test_scale_rounding_ceil(tmp_path):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(2, 32, 64, generator=g).bfloat16()  # [E, K, N], gpt-oss-like name
    write_checkpoint(tmp_path / "in", {"model.layers.0.mlp.experts.down_proj": w})
    for rounding in ("floor", "ceil"):
        out = tmp_path / rounding
        assert main(["quantize", str(tmp_path / "in"), str(out), "--quiet",
                     "--scale-rounding", rounding]) == 0
        got = _read_all(out)["model.layers.0.mlp.experts.down_proj_scales"]
        want = mxmoe.quantize_mxfp4(w.float().transpose(1, 2), scale_rounding=rounding)
        assert torch.equal(got, want.scales)
    assert not torch.equal(_read_all(tmp_path / "floor")["model.layers.0.mlp.experts."
                                                                "down_proj_scales"], got)


@pytest.mark.parametrize(
    "out,fragment",
    [
        ("in", "into IN_DIR"),
        ("in/sub", "into IN_DIR"),
        (".", "contains IN_DIR"),
        ("full", "not empty (pass --force"),
    ],
    ids=["OUT_DIR is IN_DIR", "OUT_DIR inside IN_DIR", "IN_DIR inside OUT_DIR",
         "non-empty OUT_DIR"],
)
def test_refusals(tmp_path, capsys, out, fragment):
    _bf16_checkpoint(tmp_path / "in", shards=1)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    listing = sorted(p.name for p in (tmp_path / "in").iterdir())
    assert main(["quantize", str(tmp_path / "in"), str(tmp_path / out)]) == 1
    assert fragment in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == listing
    assert (tmp_path / "full" / "keep.txt").exists()


def test_force_replaces_a_non_empty_out_dir(tmp_path):
    _bf16_checkpoint(tmp_path / "in", shards=1)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("x")
    args = ["quantize", str(tmp_path / "in"), str(tmp_path / "out"), "--force", "--quiet"]
    assert main(args) == 0
    assert not (tmp_path / "out" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


@pytest.mark.parametrize(
    "tensors,config,fragment",
    [
        ({"x.weight": torch.zeros(4, 4)}, None, "no tensor in .* matches the expert pattern"),
        ({"model.layers.0.mlp.experts.down_proj": torch.zeros(2, 48, 64)}, None,
         r"'model\.layers\.0\.mlp\.experts\.down_proj' has shape \[2, 48, 64\].*K = 48"),
        ({"model.layers.0.mlp.experts.down_proj": torch.zeros(2, 32, 64, dtype=torch.int8)}, None,
         r"down_proj' matches the expert pattern but has dtype I8"),
        ({"model.layers.0.mlp.experts.down_proj": torch.zeros(2, 32, 64)},
         {"quantization_config": {"quant_method": "mxfp4"}}, "already has a quantization_config"),
    ],
    ids=["nothing matches", "K not a multiple of 32", "integer weights", "already quantized"],
)
def test_unconvertible_inputs(tmp_path, tensors, config, fragment):
    write_checkpoint(tmp_path / "in", tensors, config=config)
    with pytest.raises(ValueError, match=fragment):
        convert.quantize_checkpoint(tmp_path / "in", tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_failure_midway_leaves_no_out_dir(tmp_path, monkeypatch):
    _bf16_checkpoint(tmp_path / "in", shards=2)
    real = convert._quantized_chunks
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the second shard's first expert weight
            raise RuntimeError("disk full (simulated)")
        yield from real(*args, **kwargs)

    monkeypatch.setattr(convert, "_quantized_chunks", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        convert.quantize_checkpoint(tmp_path / "in", tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no OUT_DIR, no temp dir

    # With --force, the old OUT_DIR survives a failed run untouched.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("x")
    calls.clear()
    with pytest.raises(RuntimeError, match="simulated"):
        convert.quantize_checkpoint(tmp_path / "in", tmp_path / "out", force=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]


def test_verification_catches_a_corrupted_write(tmp_path, monkeypatch):
    _bf16_checkpoint(tmp_path / "in", shards=1)
    real = convert._write_file

    def corrupting(plan, target, *args):
        real(plan, target, *args)
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF  # the last byte of the last tensor
        target.write_bytes(bytes(data))

    monkeypatch.setattr(convert, "_write_file", corrupting)
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        convert.quantize_checkpoint(tmp_path / "in", tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_output_directory_mode_follows_the_umask(tmp_path):
    # Like mkdir: 0777 less the umask, not mkdtemp's private 0700.
    import os
    import stat

    from mxmoe.convert import quantize_checkpoint

    from checkpoints import bf16_gpt_oss_tensors, dense_moe, write_checkpoint

    src = write_checkpoint(tmp_path / "bf16", bf16_gpt_oss_tensors({0: dense_moe(2, 64, 32)}))
    old = os.umask(0o027)
    try:
        quantize_checkpoint(src, tmp_path / "out", progress=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750

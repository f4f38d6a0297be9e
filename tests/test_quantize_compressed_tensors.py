"""`mxmoe quantize --format compressed-tensors`: a bf16 Qwen3-MoE / Mixtral checkpoint, as
transformers saves it, becomes llm-compressor's MXFP4A16 (``mxfp4-pack-quantized``): its config
is what compressed-tensors itself writes for the scheme, its bytes decompress (by the real
compressed-tensors) to mxmoe's quantization of the bf16 weights, transformers loads it, and
`MXFP4MoE.from_pretrained` reads it back equal to the transformers block."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import mxmoe
from mxmoe.cli import main

from checkpoints import quiet_cpu  # noqa: F401 (autouse fixture)
from helpers import rel_err

C = pytest.importorskip("ct_checkpoints")

from compressed_tensors.compressors import MXFP4PackedCompressor  # noqa: E402
from compressed_tensors.quantization import (QuantizationConfig,  # noqa: E402
                                             preset_name_to_scheme)

#: (MoE prefix, gate, up, down) in the names transformers saves.
NAMES = {"qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
         "mixtral": ("block_sparse_moe", "w1", "w3", "w2")}


def _tensors(directory) -> dict:
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


@pytest.fixture(scope="module", params=list(NAMES))
def converted(request, tmp_path_factory):
    """(family, bf16 input dir, compressed-tensors output dir)."""
    root = tmp_path_factory.mktemp(request.param)
    C.tiny_model(request.param).to(torch.bfloat16).save_pretrained(root / "bf16")
    assert main(["quantize", str(root / "bf16"), str(root / "mxfp4"),
                 "--format", "compressed-tensors", "--quiet"]) == 0
    return request.param, root / "bf16", root / "mxfp4"


def _expert(family, layer, j, proj):
    prefix, *projections = NAMES[family]
    return f"model.layers.{layer}.{prefix}.experts.{j}.{projections[proj]}"


def test_config_is_what_compressed_tensors_writes_for_mxfp4a16(converted, tmp_path):
    family, _, out = converted
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    # What ModelCompressor.update_config writes for the same scheme (tests/ct_checkpoints.py),
    # but for the modules quantized (it also quantizes attention) and its own version.
    real = C.quantize_and_save(C.tiny_model(family), tmp_path / "real")
    theirs = json.loads((real.path / "config.json").read_text())["quantization_config"]
    for config in (qc, theirs):
        config.pop("version", None)
    assert {**qc, "ignore": None} == {**theirs, "ignore": None}
    parsed = QuantizationConfig.model_validate(qc)
    assert parsed.config_groups["group_0"].weights.model_dump() == \
        preset_name_to_scheme("MXFP4A16", ["Linear"]).weights.model_dump()
    prefix = NAMES[family][0]
    ignore = set(qc["ignore"])
    assert {"lm_head", f"model.layers.0.{prefix}.gate", "model.layers.1.self_attn.q_proj"} <= ignore
    assert not any("experts" in m or "embed" in m for m in ignore)


def test_bytes_decompress_to_mxmoes_quantization_of_the_bf16_weights(converted):
    family, bf16, out = converted
    before, after = _tensors(bf16), _tensors(out)
    scheme = preset_name_to_scheme("MXFP4A16", ["Linear"])
    for layer in range(C.LAYERS):
        for j in range(C.E):
            for proj in range(3):
                module = _expert(family, layer, j, proj)
                assert module + ".weight" not in after
                state = {s: after[f"{module}.{s}"] for s in ("weight_packed", "weight_scale")}
                assert all(t.dtype == torch.uint8 for t in state.values())
                theirs = MXFP4PackedCompressor.decompress(state, scheme)["weight"].float()
                ours = mxmoe.quantize_mxfp4(before[module + ".weight"].float())
                assert torch.equal(state["weight_packed"], ours.blocks)
                assert torch.equal(state["weight_scale"], ours.scales)
                torch.testing.assert_close(theirs, ours.dequantize(), rtol=0, atol=0)
    for name, t in before.items():  # everything else copied byte for byte
        if ".experts." not in name:
            assert torch.equal(after[name], t), name


def test_transformers_loads_it_and_mxmoe_reads_it_back(converted):
    family, _, out = converted
    model = C.load_decompressed(out)  # compressed-tensors' own decompression, in transformers
    x = torch.randn(2, 5, C.H, generator=torch.Generator().manual_seed(1))
    for layer in range(C.LAYERS):
        ours = mxmoe.MXFP4MoE.from_pretrained(out, layer, dtype=torch.float32, backend="torch")
        assert ours.activation is mxmoe.Activation.SILU and ours.top_k == C.TOP_K
        block = model.model.layers[layer].mlp
        expected = block(x)
        expected = expected[0] if isinstance(expected, tuple) else expected
        assert rel_err(ours(x), expected) < 1e-5
        packed = _tensors(out)
        for j in range(C.E):
            gate, up = (packed[_expert(family, layer, j, p) + ".weight_packed"] for p in (0, 1))
            assert torch.equal(ours.w13_blocks[j], torch.cat([gate, up]))


def test_default_format_is_unchanged_and_names_the_other_one(converted, tmp_path, capsys):
    _, bf16, _ = converted
    assert main(["quantize", str(bf16), str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "gate_up_proj" in err and "--format compressed-tensors" in err


def test_a_fused_3d_expert_tensor_is_refused_by_name(tmp_path, capsys):
    from checkpoints import bf16_gpt_oss_tensors, dense_moe, write_checkpoint

    write_checkpoint(tmp_path / "in", bf16_gpt_oss_tensors({0: dense_moe(seed=5)}))
    assert main(["quantize", str(tmp_path / "in"), str(tmp_path / "out"), "--format",
                 "compressed-tensors", "--pattern", r".*gate_up_proj", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "model.layers.0.mlp.experts.gate_up_proj" in err and "2-D" in err
    assert not (tmp_path / "out").exists()

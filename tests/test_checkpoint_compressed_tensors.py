"""compressed-tensors MXFP4A16 checkpoints (Qwen3-MoE, Mixtral) written by compressed-tensors
itself (tests/ct_checkpoints.py), read by `MXFP4MoE.from_pretrained`: the bytes are the file's,
they mean what compressed-tensors means by them, the layer equals transformers' block on the
decompressed model, and every way a checkpoint can be wrong is named."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mxmoe

from checkpoints import quiet_cpu  # noqa: F401 (autouse fixture)
from checkpoints import record_slice_reads
from helpers import rel_err

C = pytest.importorskip("ct_checkpoints")

from mxmoe.checkpoints import SafetensorsCheckpoint  # noqa: E402
from mxmoe.checkpoints.compressed_tensors import load_ct_moe, read_ct_spec  # noqa: E402

FAMILIES = ["qwen3_moe", "mixtral"]
#: (prefix, gate, up, down) names the writer used.
NAMES = {"qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
         "mixtral": ("block_sparse_moe", "w1", "w3", "w2")}


@pytest.fixture(scope="module", params=FAMILIES)
def ckpt(request, tmp_path_factory):
    return C.quantize_and_save(C.tiny_model(request.param),
                               tmp_path_factory.mktemp(request.param) / "ckpt")


@pytest.fixture(scope="module")
def decompressed(ckpt):
    return C.load_decompressed(ckpt.path)


def _file_tensor(ckpt, name):
    with safe_open(str(ckpt.path / "model.safetensors"), "pt") as f:
        return f.get_tensor(name)


def _copy(ckpt, tmp_path, *, edit_tensors=None, edit_config=None):
    """A copy of the checkpoint with its tensors and/or config.json edited."""
    out = tmp_path / "edited"
    shutil.copytree(ckpt.path, out)
    if edit_tensors is not None:
        tensors = load_file(str(out / "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(out / "model.safetensors"))
    if edit_config is not None:
        config = json.loads((out / "config.json").read_text())
        edit_config(config)
        (out / "config.json").write_text(json.dumps(config))
    return out


def _expert(ckpt, layer, j, proj, suffix):
    prefix, *projections = NAMES[ckpt.family]
    return f"model.layers.{layer}.{prefix}.experts.{j}.{projections[proj]}.{suffix}"


def test_packed_bytes_are_the_files_stacked_gate_then_up(ckpt):
    layer = mxmoe.MXFP4MoE.from_pretrained(ckpt.path, 1, backend="torch")
    for j in range(C.E):
        for suffix, ours13, ours2 in (("weight_packed", layer.w13_blocks, layer.w2_blocks),
                                      ("weight_scale", layer.w13_scales, layer.w2_scales)):
            gate, up, down = (_file_tensor(ckpt, _expert(ckpt, 1, j, p, suffix)) for p in range(3))
            assert torch.equal(ours13[j], torch.cat([gate, up]))
            assert torch.equal(ours2[j], down)


def test_reads_only_the_layer_tensors_and_only_by_slice(ckpt, monkeypatch):
    requested = record_slice_reads(monkeypatch)
    mxmoe.MXFP4MoE.from_pretrained(ckpt.path, 1, backend="torch")
    prefix = NAMES[ckpt.family][0]
    expected = {_expert(ckpt, 1, j, p, suffix) for j in range(C.E) for p in range(3)
                for suffix in ("weight_packed", "weight_scale")}
    assert expected <= set(requested)
    # Beside the experts only that layer's router is read; no other layer's tensor at all.
    assert all(name.startswith(f"model.layers.1.{prefix}.") for name in requested), requested


def test_weights_decode_to_what_compressed_tensors_decompresses(ckpt):
    # The nibble order and the scale encoding, checked against the library that wrote them.
    from compressed_tensors.compressors import MXFP4PackedCompressor
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme("MXFP4A16", ["Linear"])
    layer = mxmoe.MXFP4MoE.from_pretrained(ckpt.path, 0, backend="torch")
    for j in range(C.E):
        for proj, ours in ((0, layer.w13[j].dequantize()[:C.I]), (1, layer.w13[j].dequantize()[C.I:]),
                           (2, layer.w2[j].dequantize())):
            state = {s: _file_tensor(ckpt, _expert(ckpt, 0, j, proj, s))
                     for s in ("weight_packed", "weight_scale")}
            theirs = MXFP4PackedCompressor.decompress(state, scheme)["weight"]
            torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=0)


def test_router_and_activation_follow_the_family(ckpt):
    layer = mxmoe.MXFP4MoE.from_pretrained(ckpt.path, 0)
    assert layer.activation is mxmoe.Activation.SILU
    assert layer.router.bias is None and layer.top_k == C.TOP_K
    assert layer.renormalize  # Mixtral always; this Qwen3-MoE has norm_topk_prob = true
    assert layer.router.weight.dtype == torch.bfloat16 and layer.w13_blocks.dtype == torch.uint8


@pytest.mark.parametrize("layer_index", [0, 1])
def test_layer_equals_the_transformers_block_on_the_decompressed_model(ckpt, decompressed,
                                                                       layer_index):
    ours = mxmoe.MXFP4MoE.from_pretrained(ckpt.path, layer_index, dtype=torch.float32,
                                          backend="torch")
    block = decompressed.model.layers[layer_index].mlp
    x = torch.randn(3, 7, C.H, generator=torch.Generator().manual_seed(layer_index))
    expected = block(x)
    assert isinstance(expected, torch.Tensor)
    assert rel_err(ours(x), expected) < 1e-5


@pytest.mark.parametrize("ckpt", ["qwen3_moe"], indirect=True)
def test_qwen3_without_norm_topk_prob_keeps_the_softmax_probabilities(ckpt, tmp_path):
    path = _copy(ckpt, tmp_path, edit_config=lambda c: c.update(norm_topk_prob=False))
    ours = mxmoe.MXFP4MoE.from_pretrained(path, 0, dtype=torch.float32, backend="torch")
    assert not ours.renormalize
    theirs = C.load_decompressed(path).model.layers[0].mlp
    assert not theirs.gate.norm_topk_prob
    x = torch.randn(2, 5, C.H, generator=torch.Generator().manual_seed(3))
    assert rel_err(ours(x), theirs(x)) < 1e-5
    renormalized = mxmoe.MXFP4MoE.from_pretrained(ckpt.path, 0, dtype=torch.float32,
                                                  backend="torch")
    assert rel_err(renormalized(x), theirs(x)) > 1e-2  # the flag matters on these inputs


def test_a_rank_reads_its_experts_and_its_slice_of_i(ckpt):
    with SafetensorsCheckpoint(ckpt.path) as c:
        spec = read_ct_spec(c, 1)
        whole = load_ct_moe(c, spec)
        part = load_ct_moe(c, spec, range(1, 3), range(32, 64))
    i = C.I
    want13 = torch.cat([whole.w13.blocks[1:3, 32:i], whole.w13.blocks[1:3, i + 32:]], dim=1)
    assert torch.equal(part.w13.blocks, want13)
    assert torch.equal(part.w2.blocks, whole.w2.blocks[1:3, :, 16:32])
    assert torch.equal(part.w2.scales, whole.w2.scales[1:3, :, 1:2])


def test_missing_expert_tensor_is_named(ckpt, tmp_path):
    name = _expert(ckpt, 0, 2, 1, "weight_scale")
    path = _copy(ckpt, tmp_path, edit_tensors=lambda t: t.pop(name))
    with pytest.raises(ValueError, match=f"missing tensor '{name}'"):
        mxmoe.MXFP4MoE.from_pretrained(path, 0)


def test_wrong_shape_is_named_with_both_shapes(ckpt, tmp_path):
    name = _expert(ckpt, 0, 1, 2, "weight_packed")
    path = _copy(ckpt, tmp_path, edit_tensors=lambda t: t.update({name: t[name][:, :16].clone()}))
    with pytest.raises(ValueError, match=rf"tensor '{name}' has shape \[64, 16\], expected "
                                         rf"\[64, 32\]"):
        mxmoe.MXFP4MoE.from_pretrained(path, 0)


def test_an_expert_fewer_than_config_says_is_named(ckpt, tmp_path):
    def drop_last(tensors):
        for key in [k for k in tensors if f".experts.{C.E - 1}." in k and "layers.0." in k]:
            del tensors[key]

    path = _copy(ckpt, tmp_path, edit_tensors=drop_last)
    with pytest.raises(ValueError, match=f"layer 0 has {C.E - 1} experts"):
        mxmoe.MXFP4MoE.from_pretrained(path, 0)


@pytest.mark.parametrize("scheme, message", [
    ("nvfp4", "nvfp4-pack-quantized .*NVFP4.* is not 'mxfp4-pack-quantized'"),
    ("mxfp4-activations", "quantizes the activations too"),
    ("group-16", r"group_size': 16"),
])
def test_a_scheme_that_is_not_mxfp4_weights_is_refused(ckpt, tmp_path, scheme, message):
    def edit(config):
        qc = config["quantization_config"]
        group = qc["config_groups"]["group_0"]
        if scheme == "nvfp4":
            qc["format"] = group["format"] = "nvfp4-pack-quantized"
        elif scheme == "mxfp4-activations":
            group["input_activations"] = dict(group["weights"], dynamic=True)
        else:
            group["weights"]["group_size"] = 16

    path = _copy(ckpt, tmp_path, edit_config=edit)
    with pytest.raises(ValueError, match=message):
        mxmoe.MXFP4MoE.from_pretrained(path, 0)


def test_nvfp4_global_scale_tensor_is_named(ckpt, tmp_path):
    name = _expert(ckpt, 0, 0, 0, "weight_global_scale")
    path = _copy(ckpt, tmp_path, edit_tensors=lambda t: t.update({name: torch.ones(1)}))
    with pytest.raises(ValueError, match=f"tensor '{name}' is a global scale: NVFP4"):
        mxmoe.MXFP4MoE.from_pretrained(path, 0)


def test_unknown_family_and_other_methods_are_refused(ckpt, tmp_path):
    path = _copy(ckpt, tmp_path, edit_config=lambda c: c.update(model_type="qwen2_moe"))
    with pytest.raises(ValueError, match="model_type 'qwen2_moe' is not an MoE family"):
        mxmoe.MXFP4MoE.from_pretrained(path, 0)
    other = tmp_path / "other"
    shutil.copytree(path, other)
    config = json.loads((other / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8"}
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'fp8' is not an MXFP4 format mxmoe reads"):
        mxmoe.MXFP4MoE.from_pretrained(other, 0)


@pytest.mark.parametrize("ckpt", ["qwen3_moe"], indirect=True)
def test_a_dense_qwen3_layer_is_named(ckpt, tmp_path):
    path = _copy(ckpt, tmp_path, edit_config=lambda c: c.update(mlp_only_layers=[1]))
    with pytest.raises(ValueError, match="layer 1 of this Qwen3-MoE is a dense MLP"):
        mxmoe.MXFP4MoE.from_pretrained(path, 1)


def test_the_gpt_oss_reader_refuses_it_and_the_activation_is_the_familys(ckpt):
    with pytest.raises(ValueError, match="no MXFP4 MoE tensors"):
        mxmoe.MXFP4MoE.from_gpt_oss(ckpt.path, 0)
    with pytest.raises(ValueError, match="experts are silu with \\[gate \\| up\\] rows, not "
                                         "swigluoai"):
        mxmoe.MXFP4MoE.from_pretrained(ckpt.path, 0, activation="swigluoai")
    assert mxmoe.MXFP4MoE.from_pretrained(ckpt.path, 0, activation="silu").top_k == C.TOP_K


def test_cuda_device_without_cuda_is_said_in_mxmoe_words(ckpt, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device='cuda'.*pass device='cpu'"):
        mxmoe.MXFP4MoE.from_pretrained(ckpt.path, 0, device="cuda")

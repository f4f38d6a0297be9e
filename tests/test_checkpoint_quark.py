"""AMD Quark MXFP4 checkpoints (Qwen3-MoE, Mixtral) exported by Quark itself
(tests/quark_checkpoints.py; skipped without the optional extra ``quark``), read by
`MXFP4MoE.from_pretrained`: the bytes are the file's, they decode to what Quark dequantizes them
to, the layer equals transformers' block on the dequantized model and Quark's own reloaded
block, the patched model generates what the unpatched one does, and every way a checkpoint can
be wrong is named."""

from __future__ import annotations

import copy
import json
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mxmoe

from checkpoints import quiet_cpu  # noqa: F401 (autouse fixture)
from helpers import rel_err

Q = pytest.importorskip("quark_checkpoints")

from mxmoe.checkpoints import SafetensorsCheckpoint, detect_format  # noqa: E402
from mxmoe.checkpoints.quark import load_quark_moe, read_quark_spec  # noqa: E402
from mxmoe.integrations.transformers import SparseMXFP4MoE, use_mxmoe  # noqa: E402

FAMILIES = ["qwen3_moe", "mixtral"]
#: transformers 5 names Mixtral's experts like Qwen3-MoE's, and so does Quark's export.
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROMPT = torch.tensor([[3, 17, 42, 5, 60, 11, 8]])


@pytest.fixture(scope="module", params=FAMILIES)
def ckpt(request, tmp_path_factory):
    return Q.quantize_and_save(Q.tiny_model(request.param),
                               tmp_path_factory.mktemp(request.param) / "ckpt")


@pytest.fixture(scope="module")
def reloaded(ckpt):
    return Q.load_reloaded(ckpt.path, ckpt.family)


@pytest.fixture(scope="module")
def dequantized(ckpt):
    return Q.load_dequantized(ckpt.path, ckpt.family)


def _file_tensor(path, name):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return f.get_tensor(name)


def _expert(layer, j, proj, suffix=None):
    module = f"model.layers.{layer}.mlp.experts.{j}.{PROJECTIONS[proj]}"
    return module if suffix is None else f"{module}.{suffix}"


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
        edit_config(config["quantization_config"])
        (out / "config.json").write_text(json.dumps(config))
    return out


def test_quark_wrote_the_layout_the_reader_expects(ckpt):
    # What the module docstring of mxmoe.checkpoints.quark states, as this Quark wrote it.
    qc = json.loads((ckpt.path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "quark" and qc["export"]["weight_format"] == "real_quantized"
    weight = qc["global_quant_config"]["weight"]
    assert {k: weight[k] for k in ("dtype", "qscheme", "group_size", "scale_format",
                                   "ch_axis")} == {"dtype": "fp4", "qscheme": "per_group",
                                                   "group_size": 32, "scale_format": "e8m0",
                                                   "ch_axis": -1}
    assert qc["global_quant_config"]["input_tensors"] is None
    with SafetensorsCheckpoint(ckpt.path) as c:
        assert detect_format(c, 0) == "quark"
        assert c.header(_expert(0, 0, 0, "weight")) == ("U8", (Q.I, Q.H // 2))
        assert c.header(_expert(0, 0, 2, "weight_scale")) == ("U8", (Q.H, Q.I // 32))
        assert c.header("model.layers.0.mlp.gate.weight") == ("F32", (Q.E, Q.H))


def test_packed_bytes_are_the_files_stacked_gate_then_up(ckpt):
    layer = mxmoe.MXFP4MoE.from_pretrained(ckpt.path, 1, backend="torch")
    for j in range(Q.E):
        for suffix, ours13, ours2 in (("weight", layer.w13_blocks, layer.w2_blocks),
                                      ("weight_scale", layer.w13_scales, layer.w2_scales)):
            gate, up, down = (_file_tensor(ckpt.path, _expert(1, j, p, suffix))
                              for p in range(3))
            assert torch.equal(ours13[j], torch.cat([gate, up]))
            assert torch.equal(ours2[j], down)


def test_weights_decode_to_what_quark_dequantizes(ckpt, reloaded):
    # The nibble order and the scale encoding, checked against the library that wrote them.
    theirs = Q.dequantized_weights(reloaded)
    for index in range(Q.LAYERS):
        layer = mxmoe.MXFP4MoE.from_pretrained(ckpt.path, index, backend="torch")
        for j in range(Q.E):
            w13, w2 = layer.w13[j].dequantize(), layer.w2[j].dequantize()
            for proj, ours in ((0, w13[:Q.I]), (1, w13[Q.I:]), (2, w2)):
                torch.testing.assert_close(ours, theirs[_expert(index, j, proj)], rtol=0, atol=0)


def test_router_and_activation_follow_the_family(ckpt):
    layer = mxmoe.MXFP4MoE.from_pretrained(ckpt.path, 0)
    assert layer.activation is mxmoe.Activation.SILU
    assert layer.router.bias is None and layer.top_k == Q.TOP_K
    assert layer.renormalize  # Mixtral always; this Qwen3-MoE has norm_topk_prob = true
    assert layer.router.weight.dtype == torch.bfloat16 and layer.w13_blocks.dtype == torch.uint8


@pytest.mark.parametrize("layer_index", [0, 1])
def test_layer_equals_the_transformers_block_on_the_dequantized_model(ckpt, dequantized,
                                                                       layer_index):
    ours = mxmoe.MXFP4MoE.from_pretrained(ckpt.path, layer_index, dtype=torch.float32,
                                          backend="torch")
    block = dequantized.model.layers[layer_index].mlp
    x = torch.randn(3, 7, Q.H, generator=torch.Generator().manual_seed(layer_index))
    expected = block(x)
    assert isinstance(expected, torch.Tensor)
    assert rel_err(ours(x), expected) < 1e-5


def test_layer_equals_quarks_own_reloaded_block(ckpt, reloaded):
    # Quark's per-expert QParamsLinear, dequantizing in their forward, and its router.
    ours = mxmoe.MXFP4MoE.from_pretrained(ckpt.path, 1, dtype=torch.float32, backend="torch")
    x = torch.randn(2, 5, Q.H, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = reloaded.model.layers[1].mlp(x)
    assert rel_err(ours(x), expected) < 1e-5


def test_greedy_generation_of_the_patched_model_equals_the_unpatched(ckpt, dequantized):
    patched = use_mxmoe(copy.deepcopy(dequantized), backend="torch")
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    want = dequantized.generate(PROMPT, **kwargs)
    assert torch.equal(patched.generate(PROMPT, **kwargs), want)
    assert len(set(want[0, PROMPT.shape[1]:].tolist())) > 1  # not one token repeated
    # use_mxmoe requantized Quark's dequantized experts: the file's bytes come back.
    for index, layer in enumerate(patched.model.layers):
        assert isinstance(layer.mlp, SparseMXFP4MoE)
        for j in range(Q.E):
            gate, up = (_file_tensor(ckpt.path, _expert(index, j, p, "weight")) for p in (0, 1))
            assert torch.equal(layer.mlp.w13_blocks[j], torch.cat([gate, up]))


@pytest.mark.parametrize("ckpt", ["mixtral"], indirect=True)
def test_mixtrals_own_names_read_the_same_bytes(ckpt, tmp_path):
    # A Quark export of transformers 4's Mixtral: block_sparse_moe.experts.j.w1 / w3 / w2.
    def rename(tensors):
        for name in list(tensors):
            new = name.replace(".mlp.", ".block_sparse_moe.")
            new = re.sub(r"\.(gate|up|down)_proj\.",
                         lambda m: "." + dict(gate="w1", up="w3", down="w2")[m[1]] + ".", new)
            tensors[new] = tensors.pop(name)

    path = _copy(ckpt, tmp_path, edit_tensors=rename)
    ours = mxmoe.MXFP4MoE.from_pretrained(path, 0, backend="torch")
    want = mxmoe.MXFP4MoE.from_pretrained(ckpt.path, 0, backend="torch")
    assert torch.equal(ours.w13_blocks, want.w13_blocks)
    assert torch.equal(ours.w2_scales, want.w2_scales)
    assert torch.equal(ours.router.weight, want.router.weight)


def test_a_rank_reads_its_experts_and_its_slice_of_i(ckpt):
    with SafetensorsCheckpoint(ckpt.path) as c:
        spec = read_quark_spec(c, 1)
        whole = load_quark_moe(c, spec)
        part = load_quark_moe(c, spec, range(1, 3), range(32, 64))
    i = Q.I
    want13 = torch.cat([whole.w13.blocks[1:3, 32:i], whole.w13.blocks[1:3, i + 32:]], dim=1)
    assert torch.equal(part.w13.blocks, want13)
    assert torch.equal(part.w2.blocks, whole.w2.blocks[1:3, :, 16:32])
    assert torch.equal(part.w2.scales, whole.w2.scales[1:3, :, 1:2])


def test_missing_expert_tensor_is_named(ckpt, tmp_path):
    name = _expert(0, 2, 1, "weight_scale")
    path = _copy(ckpt, tmp_path, edit_tensors=lambda t: t.pop(name))
    with pytest.raises(ValueError, match=f"missing tensor '{re.escape(name)}'"):
        mxmoe.MXFP4MoE.from_pretrained(path, 0)


def test_wrong_shape_is_named_with_both_shapes(ckpt, tmp_path):
    name = _expert(0, 1, 2, "weight")
    path = _copy(ckpt, tmp_path, edit_tensors=lambda t: t.update({name: t[name][:, :16].clone()}))
    with pytest.raises(ValueError, match=rf"tensor '{re.escape(name)}' has shape \[64, 16\], "
                                         rf"expected \[64, 32\]"):
        mxmoe.MXFP4MoE.from_pretrained(path, 0)


def test_an_expert_fewer_than_config_says_is_named(ckpt, tmp_path):
    def drop_last(tensors):
        for key in [k for k in tensors if f".experts.{Q.E - 1}." in k and "layers.0." in k]:
            del tensors[key]

    path = _copy(ckpt, tmp_path, edit_tensors=drop_last)
    with pytest.raises(ValueError, match=f"layer 0 has {Q.E - 1} experts"):
        mxmoe.MXFP4MoE.from_pretrained(path, 0)


def test_mxfp4_activations_as_quark_writes_them_are_refused(tmp_path):
    # Quark's scheme "mxfp4": the same weights, and the activations quantized on the fly.
    w4a4 = Q.quantize_and_save(Q.tiny_model("qwen3_moe"), tmp_path / "w4a4", scheme="mxfp4")
    with pytest.raises(ValueError, match=r"global_quant_config quantizes the activations too "
                                         r"\(fp4 per_group; Quark's 'mxfp4'"):
        mxmoe.MXFP4MoE.from_pretrained(w4a4.path, 0)


def _weight(qc):
    return qc["global_quant_config"]["weight"]


@pytest.mark.parametrize("ckpt", ["qwen3_moe"], indirect=True)
@pytest.mark.parametrize("edit, message", [
    (lambda qc: _weight(qc).update(dtype="fp8_e4m3", qscheme="per_tensor", group_size=None),
     r"has weight \{'dtype': 'fp8_e4m3', 'qscheme': 'per_tensor', 'group_size': None\}"),
    (lambda qc: _weight(qc).update(group_size=16), r"'group_size': 16\}, expected "
                                                   r"\{'group_size': 32\}"),
    (lambda qc: _weight(qc).update(scale_format=None), r"'scale_format': None\}.*one E8M0"),
    (lambda qc: _weight(qc).update(dtype="mx", mx_element_dtype="fp4"),
     "dtype 'mx' keeps each scale inline"),
    (lambda qc: _weight(qc).update(ch_axis=0), "ch_axis = 0: its groups of 32 run along N"),
    (lambda qc: qc["global_quant_config"].update(output_tensors=dict(_weight(qc),
                                                                      is_dynamic=True)),
     "quantizes the outputs too"),
    (lambda qc: qc["export"].update(weight_format="fake_quantized"),
     "weight_format 'fake_quantized'"),
    (lambda qc: qc["exclude"].append("*experts*"),
     r"exclude pattern '\*experts\*' leaves 'model\.layers\.0\.mlp\.experts\.0\.gate_proj' "
     r"unquantized"),
    (lambda qc: qc["layer_quant_config"].update(
        {"*down_proj": dict(qc["global_quant_config"], weight=dict(
            _weight(qc), dtype="int4", qscheme="per_group", scale_format=None))}),
     r"layer_quant_config\['\*down_proj'\] has weight \{'dtype': 'int4'"),
    (lambda qc: qc["layer_type_quant_config"].update(
        {"Linear": dict(qc["global_quant_config"], weight=[_weight(qc), _weight(qc)])}),
     r"layer_type_quant_config\['Linear'\] quantizes the weights in 2 steps"),
], ids=["fp8-weights", "group-16", "float-scales", "mx-inline-scales", "groups-along-n",
        "quantized-outputs", "fake-quantized-export", "experts-excluded",
        "int4-down-by-name", "two-step-weights-by-type"])
def test_a_config_that_is_not_mxfp4_weights_is_refused(ckpt, tmp_path, edit, message):
    path = _copy(ckpt, tmp_path, edit_config=edit)
    with pytest.raises(ValueError, match=message):
        mxmoe.MXFP4MoE.from_pretrained(path, 0)


@pytest.mark.parametrize("ckpt", ["qwen3_moe"], indirect=True)
def test_a_layer_config_for_the_experts_overrides_a_global_one_that_is_not_mxfp4(ckpt,
                                                                                  tmp_path):
    # Attention in FP8, experts in MXFP4 (as AMD's "-MXFP4-AttnFP8" exports): the experts' own
    # pattern decides, as in Quark's get_layer_quant_config.
    def edit(qc):
        experts = copy.deepcopy(qc["global_quant_config"])
        _weight(qc).update(dtype="fp8_e4m3", qscheme="per_tensor", group_size=None)
        qc["layer_quant_config"] = {"*self_attn*": qc["global_quant_config"],
                                    "*experts*": experts}

    path = _copy(ckpt, tmp_path, edit_config=edit)
    ours = mxmoe.MXFP4MoE.from_pretrained(path, 0, backend="torch")
    assert torch.equal(ours.w13_blocks,
                       mxmoe.MXFP4MoE.from_pretrained(ckpt.path, 0, backend="torch").w13_blocks)


@pytest.mark.parametrize("ckpt", ["qwen3_moe"], indirect=True)
def test_a_static_activation_scale_is_named(ckpt, tmp_path):
    name = _expert(0, 1, 0, "input_scale")
    path = _copy(ckpt, tmp_path, edit_tensors=lambda t: t.update({name: torch.ones(())}))
    with pytest.raises(ValueError, match=f"tensor '{re.escape(name)}' is an activation scale"):
        mxmoe.MXFP4MoE.from_pretrained(path, 0)


@pytest.mark.parametrize("ckpt", ["qwen3_moe"], indirect=True)
def test_a_quantized_router_is_named(ckpt, tmp_path):
    name = "model.layers.0.mlp.gate.weight_scale"
    path = _copy(ckpt, tmp_path, edit_tensors=lambda t: t.update(
        {name: torch.full((Q.E, Q.H // 32), 127, dtype=torch.uint8)}))
    with pytest.raises(ValueError, match=rf"tensor '{re.escape(name)}': the router is quantized"
                                         rf".*exclude '\*\.gate'"):
        mxmoe.MXFP4MoE.from_pretrained(path, 0)


def test_the_format_can_be_named_and_the_activation_is_the_familys(ckpt):
    assert mxmoe.MXFP4MoE.from_pretrained(ckpt.path, 0, format="quark").top_k == Q.TOP_K
    with pytest.raises(ValueError, match="no MXFP4 MoE tensors"):
        mxmoe.MXFP4MoE.from_gpt_oss(ckpt.path, 0)
    with pytest.raises(ValueError, match="experts are silu with \\[gate \\| up\\] rows, not "
                                         "swigluoai"):
        mxmoe.MXFP4MoE.from_pretrained(ckpt.path, 0, activation="swigluoai")

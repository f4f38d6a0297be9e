"""AMD Quark MXFP4 checkpoints of DeepSeek-V3 exported by Quark itself with its ``deepseek_v3``
template (tests/quark_checkpoints.py; skipped without the optional extra ``quark``), read by
`MXFP4MoE.from_pretrained`: routed and shared experts hold the file's bytes, the layer equals
transformers' block on the model Quark dequantizes, use_mxmoe on that model generates what it
does, and a shared-experts config that is not MXFP4 is named."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors import safe_open

import mxmoe
from mxmoe.layer import MXFP4GatedMLP

from checkpoints import quiet_cpu  # noqa: F401 (autouse fixture)
from helpers import rel_err

Q = pytest.importorskip("quark_checkpoints")
C = pytest.importorskip("ct_checkpoints")
pytest.importorskip("transformers.models.deepseek_v3")

from mxmoe.integrations.transformers import use_mxmoe  # noqa: E402

FAMILY = "deepseek_v3"
PROJ = ("gate_proj", "up_proj", "down_proj")
PROMPT = torch.tensor([[3, 17, 42, 5, 60, 11, 8]])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return Q.quantize_and_save(Q.tiny_model(FAMILY), tmp_path_factory.mktemp(FAMILY) / "ckpt")


@pytest.fixture(scope="module")
def dequantized(ckpt):
    return Q.load_dequantized(ckpt.path, FAMILY)


def _file_tensor(path, name):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return f.get_tensor(name)


def test_it_is_detected_as_quark(ckpt):
    from mxmoe.checkpoints import SafetensorsCheckpoint, detect_format

    with SafetensorsCheckpoint(ckpt.path) as c:
        assert detect_format(c, 1) == "quark"


@pytest.mark.parametrize("layer_index", [1, 2])
def test_routed_and_shared_bytes_are_the_files(ckpt, layer_index):
    layer = mxmoe.MXFP4MoE.from_pretrained(ckpt.path, layer_index, backend="torch",
                                           layout=None)
    prefix = f"model.layers.{layer_index}.mlp"
    for suffix, w13, w2 in (("weight", layer.w13_blocks, layer.w2_blocks),
                            ("weight_scale", layer.w13_scales, layer.w2_scales)):
        for j in range(C.DS_E):
            gate, up, down = (_file_tensor(ckpt.path, f"{prefix}.experts.{j}.{p}.{suffix}")
                              for p in PROJ)
            assert torch.equal(w13[j], torch.cat([gate, up])) and torch.equal(w2[j], down)
    shared = layer.shared_experts
    assert isinstance(shared, MXFP4GatedMLP)
    gate, up, down = (_file_tensor(ckpt.path, f"{prefix}.shared_experts.{p}.weight")
                      for p in PROJ)
    assert torch.equal(shared.w13_blocks[0], torch.cat([gate, up]))
    assert torch.equal(shared.w2_blocks[0], down)


@pytest.mark.parametrize("layer_index", [1, 2])
def test_layer_equals_the_transformers_block_on_quarks_dequantization(ckpt, dequantized,
                                                                      layer_index):
    ours = mxmoe.MXFP4MoE.from_pretrained(ckpt.path, layer_index, dtype=torch.float32,
                                          backend="torch")
    block = dequantized.model.layers[layer_index].mlp
    x = torch.randn(3, 7, C.H, generator=torch.Generator().manual_seed(layer_index))
    assert rel_err(ours(x), block(x)) < 1e-5
    ours.router_correction_bias.zero_()  # the bias is part of what matched
    assert rel_err(ours(x), block(x)) > 1e-2


def test_use_mxmoe_generates_what_the_dequantized_model_does(dequantized):
    patched = use_mxmoe(copy.deepcopy(dequantized), backend="torch")
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(patched.generate(PROMPT, **kwargs), dequantized.generate(PROMPT, **kwargs))


def test_shared_experts_under_a_non_mxfp4_config_are_named(ckpt, tmp_path):
    out = tmp_path / "edited"
    shutil.copytree(ckpt.path, out)
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    int4 = dict(qc["global_quant_config"],
                weight=dict(qc["global_quant_config"]["weight"], dtype="int4"))
    qc["layer_quant_config"] = {"*shared_experts*": int4}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"layer_quant_config\['\*shared_experts\*'\] has "
                                         r"weight \{'dtype': 'int4'\}"):
        mxmoe.MXFP4MoE.from_pretrained(out, 1)

"""Damaged gpt-oss checkpoints: every one raises a clear error, no half-built layer comes back.

A small checkpoint in the HF transformers naming is written with safetensors, then damaged one
way per case: truncated, a corrupt header, a tensor of the wrong dtype or shape, a missing
tensor, an unreadable config.json. `MXFP4MoE.from_gpt_oss` must raise ValueError (or an OSError)
whose message names the file or the tensor at fault; safetensors' own SafetensorError is not
enough, as it is neither and callers cannot catch it as a bad-input error.
"""

from __future__ import annotations

import json
import re
import struct

import pytest
import torch
from safetensors.torch import save_file

from mxmoe import MXFP4MoE, quantize_mxfp4

E, H, I, TOP_K, LAYER = 4, 64, 32, 2, 0  # noqa: E741
PREFIX = f"model.layers.{LAYER}.mlp"
BLOCKS = f"{PREFIX}.experts.gate_up_proj_blocks"
SCALES = f"{PREFIX}.experts.gate_up_proj_scales"
DOWN_BLOCKS = f"{PREFIX}.experts.down_proj_blocks"
DOWN_SCALES = f"{PREFIX}.experts.down_proj_scales"
DOWN_BIAS = f"{PREFIX}.experts.down_proj_bias"
ROUTER = f"{PREFIX}.router.weight"
FILE = "model.safetensors"
BAD_INPUT = (ValueError, OSError)


def gpt_oss_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """One MoE layer in the HF transformers gpt-oss naming (blocks [..., K/32, 16])."""
    g = torch.Generator().manual_seed(seed)
    w13 = quantize_mxfp4(torch.randn(E, 2 * I, H, generator=g) * H**-0.5)
    w2 = quantize_mxfp4(torch.randn(E, H, I, generator=g) * I**-0.5)
    return {
        BLOCKS: w13.blocks.reshape(E, 2 * I, H // 32, 16).contiguous(),
        SCALES: w13.scales.contiguous(),
        f"{PREFIX}.experts.gate_up_proj_bias": (torch.randn(E, 2 * I, generator=g) * 0.1)
        .to(torch.bfloat16),
        DOWN_BLOCKS: w2.blocks.reshape(E, H, I // 32, 16).contiguous(),
        DOWN_SCALES: w2.scales.contiguous(),
        DOWN_BIAS: (torch.randn(E, H, generator=g) * 0.1).to(torch.bfloat16),
        ROUTER: torch.randn(E, H, generator=g).to(torch.bfloat16),
        f"{PREFIX}.router.bias": torch.zeros(E, dtype=torch.bfloat16),
    }


def write_checkpoint(directory, tensors=None, config=None):
    directory.mkdir(parents=True, exist_ok=True)
    save_file(gpt_oss_tensors() if tensors is None else tensors, str(directory / FILE))
    config = {"num_experts_per_tok": TOP_K} if config is None else config
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def load(directory):
    return MXFP4MoE.from_gpt_oss(directory, LAYER, dtype=torch.float32)


def assert_clear_error(directory, fragment: str):
    with pytest.raises(BAD_INPUT, match=re.escape(fragment)):
        load(directory)


def test_the_undamaged_checkpoint_loads(tmp_path):
    layer = load(write_checkpoint(tmp_path / "ckpt"))
    x = torch.randn(3, H)
    assert layer(x).shape == (3, H) and torch.isfinite(layer(x)).all()


# ---------------------------------------------------------------------------------------------
# The file itself is damaged: the error names the file
# ---------------------------------------------------------------------------------------------


def _truncate(path, keep_fraction: float):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


def _header_length(path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


@pytest.mark.parametrize("damage", [
    pytest.param(lambda p: _truncate(p, 0.9), id="truncated in the tensor data"),
    pytest.param(lambda p: p.write_bytes(p.read_bytes()[: 8 + _header_length(p) + 3]),
                 id="truncated just after the header"),
    pytest.param(lambda p: p.write_bytes(p.read_bytes()[:20]), id="truncated inside the header"),
    pytest.param(lambda p: p.write_bytes(p.read_bytes()[:5]),
                 id="truncated inside the length field"),
    pytest.param(lambda p: p.write_bytes(b""), id="empty file"),
    pytest.param(lambda p: p.write_bytes(struct.pack("<Q", 2**40) + p.read_bytes()[8:]),
                 id="header length past the end"),
    pytest.param(lambda p: p.write_bytes(p.read_bytes()[:8] + b"{not json" + p.read_bytes()[17:]),
                 id="header is not JSON"),
    pytest.param(lambda p: p.write_bytes(b"\x00" * 64), id="all zeros"),
])
def test_damaged_file_names_the_file(tmp_path, damage):
    directory = write_checkpoint(tmp_path / "ckpt")
    damage(directory / FILE)
    assert_clear_error(directory, FILE)


def test_unreadable_config_names_config_json(tmp_path):
    directory = write_checkpoint(tmp_path / "ckpt")
    (directory / "config.json").write_text("{num_experts_per_tok: 4")
    assert_clear_error(directory, "config.json")


# ---------------------------------------------------------------------------------------------
# A tensor is wrong: the error names the tensor
# ---------------------------------------------------------------------------------------------


def _without(name):
    def edit(tensors):
        del tensors[name]
    return edit


def _replace(name, fn):
    def edit(tensors):
        tensors[name] = fn(tensors[name]).contiguous()
    return edit


TENSOR_CASES = [
    pytest.param(_without(DOWN_SCALES), DOWN_SCALES, id="missing down_proj_scales"),
    pytest.param(_without(BLOCKS), BLOCKS, id="missing gate_up_proj_blocks"),
    pytest.param(_without(ROUTER), ROUTER, id="missing router weight"),
    pytest.param(_replace(BLOCKS, lambda t: t.view(torch.int8)), BLOCKS, id="int8 blocks"),
    pytest.param(_replace(BLOCKS, lambda t: t.to(torch.float16)), BLOCKS, id="fp16 blocks"),
    pytest.param(_replace(SCALES, lambda t: t.to(torch.float32)), SCALES, id="float scales"),
    pytest.param(_replace(DOWN_SCALES, lambda t: t.to(torch.int32)), DOWN_SCALES,
                 id="int32 scales"),
    pytest.param(_replace(DOWN_BIAS, lambda t: t.to(torch.int64)), DOWN_BIAS, id="int bias"),
    pytest.param(_replace(SCALES, lambda t: t[..., :1]), SCALES, id="scales of half of H"),
    pytest.param(_replace(BLOCKS, lambda t: t[..., :15]), BLOCKS, id="15 bytes a block"),
    pytest.param(_replace(DOWN_BLOCKS, lambda t: t[:3]), DOWN_BLOCKS, id="down_proj for 3 experts"),
    pytest.param(_replace(ROUTER, lambda t: t[:, :32]), ROUTER, id="router of the wrong H"),
]


@pytest.mark.parametrize("edit, name", TENSOR_CASES)
def test_bad_tensor_names_the_tensor(tmp_path, edit, name):
    tensors = gpt_oss_tensors()
    edit(tensors)
    directory = write_checkpoint(tmp_path / "ckpt", tensors)
    assert_clear_error(directory, name)


def test_absent_layer_is_a_clear_error(tmp_path):
    directory = write_checkpoint(tmp_path / "ckpt")
    with pytest.raises(BAD_INPUT, match="layer"):
        MXFP4MoE.from_gpt_oss(directory, 5)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(BAD_INPUT, match=re.escape(str(tmp_path / "nowhere"))):
        MXFP4MoE.from_gpt_oss(tmp_path / "nowhere", 0)

"""Equivalence with transformers' gpt-oss: its MoE block and its MXFP4 checkpoint loader.

transformers' bf16 layout is ``gate_up_proj [E, H, 2I]`` (columns interleave gate/up) and
``down_proj [E, I, H]``: the transposes of our w13 ``[E, 2I, H]`` and w2 ``[E, H, I]``. Its router
takes the top-k logits then a softmax over those k; its swiglu clamps gate above at the limit
and up to [-limit, limit], then ``gate * sigmoid(alpha * gate) * (up + 1)``. Everything runs in
float32 on MXFP4-representable weights, so the tolerance measures only summation order.
"""

import pytest
import torch

import mxmoe
from mxmoe.convert import quantize_checkpoint

from checkpoints import quiet_cpu  # noqa: F401 (autouse fixture)
from checkpoints import dense_moe, hf_config, mxfp4_tensors, openai_config, write_checkpoint
from helpers import rel_err

gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
from transformers import GptOssConfig  # noqa: E402

E, H, I, TOP_K, LIMIT = 4, 64, 64, 2, 7.0


def _config(**kwargs) -> GptOssConfig:
    return GptOssConfig(
        hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=TOP_K,
        swiglu_limit=LIMIT, experts_implementation="eager", **kwargs,
    )


def _transformers_block(moe) -> torch.nn.Module:
    block = gpt_oss.GptOssMLP(_config()).float().eval()
    block.router.weight.copy_(moe.router_weight)
    block.router.bias.copy_(moe.router_bias)
    block.experts.gate_up_proj.copy_(moe.w13.transpose(1, 2))
    block.experts.gate_up_proj_bias.copy_(moe.w13_bias)
    block.experts.down_proj.copy_(moe.w2.transpose(1, 2))
    block.experts.down_proj_bias.copy_(moe.w2_bias)
    return block


def _inputs(scale: float) -> torch.Tensor:
    return torch.randn(2, 9, H, generator=torch.Generator().manual_seed(5)) * scale


@pytest.mark.parametrize("naming", ["transformers", "openai"])
def test_from_gpt_oss_matches_transformers_gpt_oss_mlp(tmp_path, naming):
    moe = dense_moe(E, H, I, seed=21)
    config = (hf_config if naming == "transformers" else openai_config)(moe, TOP_K, limit=LIMIT)
    path = write_checkpoint(tmp_path, mxfp4_tensors(moe, 0, naming), config=config)
    ours = mxmoe.MXFP4MoE.from_gpt_oss(path, 0, dtype=torch.float32, backend="torch")
    theirs = _transformers_block(moe)
    # Large inputs so that the swiglu clamp is active on some gates and ups.
    x = _inputs(8.0)
    h = x.reshape(-1, H) @ moe.w13.reshape(-1, H).T
    assert (h[:, 0::2] > LIMIT).any() and (h[:, 1::2].abs() > LIMIT).any()
    expected, _ = theirs(x)
    assert rel_err(ours(x), expected) < 1e-5


def test_from_dense_with_transposed_transformers_weights_matches(tmp_path):
    moe = dense_moe(E, H, I, seed=22)
    theirs = _transformers_block(moe)
    ex = theirs.experts
    ours = mxmoe.MXFP4MoE.from_dense(
        theirs.router.weight, theirs.router.bias, ex.gate_up_proj.transpose(1, 2),
        ex.down_proj.transpose(1, 2), ex.gate_up_proj_bias, ex.down_proj_bias, top_k=TOP_K,
        limit=LIMIT, backend="torch",
    )
    x = _inputs(1.0)
    assert rel_err(ours(x), theirs(x)[0]) < 1e-5


def test_quantize_output_loads_in_transformers_and_matches_from_gpt_oss(tmp_path):
    """transformers saves a bf16 gpt-oss, `mxmoe quantize` converts it, transformers loads the
    MXFP4 result (dequantizing on the CPU) and its MoE blocks equal ours on those bytes."""
    from transformers import GptOssForCausalLM, Mxfp4Config

    config = _config(vocab_size=32, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=32, layer_types=["full_attention"] * 2)
    torch.manual_seed(0)
    model = GptOssForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    quantize_checkpoint(tmp_path / "bf16", tmp_path / "mxfp4", progress=False)

    loaded = GptOssForCausalLM.from_pretrained(
        tmp_path / "mxfp4", quantization_config=Mxfp4Config(dequantize=True),
        dtype=torch.float32,
    ).eval()
    for layer in range(2):
        original = model.model.layers[layer].mlp.experts
        block = loaded.model.layers[layer].mlp
        # transformers' dequantized weights are exactly our MXFP4 of the bf16 originals.
        want = mxmoe.quantize_mxfp4(original.gate_up_proj.float().transpose(1, 2))
        torch.testing.assert_close(block.experts.gate_up_proj,
                                   want.dequantize().transpose(1, 2), rtol=0, atol=0)
        ours = mxmoe.MXFP4MoE.from_gpt_oss(tmp_path / "mxfp4", layer, dtype=torch.float32,
                                           backend="torch")
        x = _inputs(1.0)
        assert rel_err(ours(x), block(x)[0]) < 1e-5

"""Tiny gpt-oss checkpoints written by the tests: MXFP4 in both namings, and bf16."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mxmoe
from mxmoe.checkpoint import NAMINGS


@pytest.fixture(autouse=True)
def quiet_cpu():
    """No autograd for these tiny forwards (import this fixture into a module; the single
    intra-op thread comes from conftest.py)."""
    with torch.no_grad():
        yield


@dataclass
class DenseMoE:
    """One layer's weights in float32, the expert weights MXFP4-representable (so that
    quantizing them is lossless): w13 [E, 2I, H] (gate/up rows interleaved), w2 [E, H, I]."""

    router_weight: torch.Tensor
    router_bias: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor
    w13_bias: torch.Tensor
    w2_bias: torch.Tensor

    @property
    def shape(self):
        e, two_i, h = self.w13.shape
        return e, h, two_i // 2

    def layer(self, top_k, **kwargs) -> mxmoe.MXFP4MoE:
        return mxmoe.MXFP4MoE.from_dense(
            self.router_weight, self.router_bias, self.w13, self.w2, self.w13_bias, self.w2_bias,
            top_k=top_k, backend="torch", **kwargs,
        )


def dense_moe(e=4, h=64, i=64, *, seed=0, bf16_exact=False) -> DenseMoE:
    """Random weights; ``bf16_exact`` rounds the router and biases through bf16 (for checkpoints
    stored in bf16 that must compare exactly)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        x = torch.randn(*shape, generator=g) * scale
        return x.bfloat16().float() if bf16_exact else x

    def representable(x):
        return mxmoe.quantize_mxfp4(x).dequantize(torch.float32)

    return DenseMoE(
        router_weight=randn(e, h, scale=h**-0.5),
        router_bias=randn(e, scale=0.1),
        w13=representable(randn(e, 2 * i, h, scale=h**-0.5)),
        w2=representable(randn(e, h, i, scale=i**-0.5)),
        w13_bias=randn(e, 2 * i, scale=0.1),
        w2_bias=randn(e, h, scale=0.1),
    )


def mxfp4_tensors(moe: DenseMoE, layer: int, naming: str, dtype=torch.float32) -> dict:
    """The layer's tensors under the checkpoint names of ``naming`` (transformers | openai)."""
    w13 = mxmoe.quantize_mxfp4(moe.w13)
    w2 = mxmoe.quantize_mxfp4(moe.w2)
    e, h, i = moe.shape
    roles = {
        "w13_blocks": w13.blocks.reshape(e, 2 * i, h // 32, 16),
        "w13_scales": w13.scales,
        "w13_bias": moe.w13_bias.to(dtype),
        "w2_blocks": w2.blocks.reshape(e, h, i // 32, 16),
        "w2_scales": w2.scales,
        "w2_bias": moe.w2_bias.to(dtype),
        "router_weight": moe.router_weight.to(dtype),
        "router_bias": moe.router_bias.to(dtype),
    }
    names = NAMINGS[naming]
    return {names[role].format(i=layer): t.contiguous() for role, t in roles.items()}


def other_tensors(layers, naming: str, h: int) -> dict:
    """Non-MoE tensors a real checkpoint carries around the experts."""
    g = torch.Generator().manual_seed(1)
    if naming == "openai":
        out = {f"block.{i}.mlp.norm.scale": torch.ones(h) for i in layers}
        out["embedding.weight"] = torch.randn(10, h, generator=g)
        return out
    out = {f"model.layers.{i}.self_attn.q_proj.weight": torch.randn(h, h, generator=g)
           for i in layers}
    out["model.embed_tokens.weight"] = torch.randn(10, h, generator=g).bfloat16()
    out["model.norm.weight"] = torch.ones(h)
    return out


def write_checkpoint(directory: Path, tensors: dict, *, shards: int = 1, config: dict | None = None
                     ) -> Path:
    """Write ``tensors`` into ``directory``: one model.safetensors, or ``shards`` files and a
    model.safetensors.index.json (tensors dealt round-robin, so a layer spans files)."""
    directory.mkdir(parents=True, exist_ok=True)
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = sorted(tensors)
        weight_map = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[s::shards]}
            save_file(part, str(directory / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return directory


def hf_config(moe: DenseMoE, top_k: int, *, limit: float = 7.0, layers: int = 2) -> dict:
    e, h, i = moe.shape
    return {"model_type": "gpt_oss", "num_hidden_layers": layers, "num_local_experts": e,
            "hidden_size": h, "intermediate_size": i, "num_experts_per_tok": top_k,
            "swiglu_limit": limit, "torch_dtype": "bfloat16"}


def openai_config(moe: DenseMoE, top_k: int, *, limit: float = 7.0, layers: int = 2) -> dict:
    e, h, i = moe.shape
    return {"num_hidden_layers": layers, "num_experts": e, "hidden_size": h,
            "intermediate_size": i, "experts_per_token": top_k, "swiglu_limit": limit}


def bf16_gpt_oss_tensors(moes: dict[int, DenseMoE]) -> dict:
    """gpt-oss's bf16 layout (transformers): gate_up_proj [E, H, 2I], down_proj [E, I, H]."""
    out = {}
    for i, moe in moes.items():
        p = f"model.layers.{i}.mlp"
        out[f"{p}.experts.gate_up_proj"] = moe.w13.transpose(1, 2).bfloat16().contiguous()
        out[f"{p}.experts.gate_up_proj_bias"] = moe.w13_bias.bfloat16()
        out[f"{p}.experts.down_proj"] = moe.w2.transpose(1, 2).bfloat16().contiguous()
        out[f"{p}.experts.down_proj_bias"] = moe.w2_bias.bfloat16()
        out[f"{p}.router.weight"] = moe.router_weight.bfloat16()
        out[f"{p}.router.bias"] = moe.router_bias.bfloat16()
    h = next(iter(moes.values())).shape[1]
    out.update(other_tensors(list(moes), "transformers", h))
    return out


def record_slice_reads(monkeypatch) -> list[str]:
    """The names every checkpoint read takes by slice from now on (the list fills as they are
    read); a whole-tensor read fails the test."""
    from mxmoe.checkpoints import files

    requested: list[str] = []
    real_open = files._open

    class Recorder:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_slice(self, name):
            requested.append(name)
            return self.inner.get_slice(name)

        def get_tensor(self, name):  # whole-tensor reads are not expected
            raise AssertionError(f"get_tensor({name!r})")

    monkeypatch.setattr(files, "_open", lambda p: Recorder(real_open(p)))
    return requested

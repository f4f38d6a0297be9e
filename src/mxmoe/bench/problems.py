"""Benchmark shapes, and random MoE problems whose inputs and routings rotate between replays."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..constants import MXFP4_BLOCK_SIZE
from ..format import MXFP4Tensor
from ..testing import random_mxfp4, seeded_generator


@dataclass(frozen=True)
class ModelShape:
    """The expert shapes of one MoE layer."""

    name: str
    hidden: int  # H
    inter: int  # I
    experts: int  # E
    top_k: int  # k

    def as_dict(self) -> dict:
        return {"hidden": self.hidden, "inter": self.inter, "experts": self.experts,
                "top_k": self.top_k}


#: The two gpt-oss layers (FACTS.md), by the short name `--models` takes.
MODELS = {
    "20b": ModelShape("gpt-oss-20b", hidden=2880, inter=2880, experts=32, top_k=4),
    "120b": ModelShape("gpt-oss-120b", hidden=2880, inter=2880, experts=128, top_k=4),
}
#: Without a GPU: small enough for the Triton interpreter (few programs per launch).
CPU_MODEL = ModelShape("cpu-small", hidden=64, inter=64, experts=8, top_k=2)

GPU_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
GPU_TOKENS_QUICK = (1, 16, 128, 1024, 4096, 16384)
CPU_TOKENS = (1, 4, 16)
CPU_TOKENS_QUICK = (1, 4)


def custom_model(hidden: int, inter: int, experts: int, top_k: int) -> ModelShape:
    """A `--custom H I E K` shape; ValueError naming the bad value."""
    if hidden <= 0 or hidden % MXFP4_BLOCK_SIZE:
        raise ValueError(
            f"--custom: H must be a positive multiple of {MXFP4_BLOCK_SIZE}, got {hidden}")
    if inter <= 0 or inter % MXFP4_BLOCK_SIZE:
        raise ValueError(
            f"--custom: I must be a positive multiple of {MXFP4_BLOCK_SIZE}, got {inter}")
    if experts < 1:
        raise ValueError(f"--custom: E must be >= 1, got {experts}")
    if not 1 <= top_k <= experts:
        raise ValueError(f"--custom: K must be in [1, E={experts}], got {top_k}")
    return ModelShape(f"custom-H{hidden}-I{inter}-E{experts}-k{top_k}", hidden, inter, experts,
                      top_k)


def torch_route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The router in plain torch, as `mxmoe.route` specifies it (top-k of the float32 logits,
    softmax over those k) but without its fused Triton kernel, which it runs on a GPU. The
    reference routing and the baseline use this one; a test pins it to `route`'s torch path."""
    top_logits, ids = torch.topk(router_logits.to(torch.float32), top_k, dim=-1, sorted=True)
    return torch.softmax(top_logits, dim=-1), ids.to(torch.int32)


@dataclass
class Weights:
    """The layer's weights: shared by every M and every path (they are the model)."""

    model: ModelShape
    w13: MXFP4Tensor  # [E, 2I, H]
    w2: MXFP4Tensor  # [E, H, I]
    w13_bias: torch.Tensor  # [E, 2I]
    w2_bias: torch.Tensor  # [E, H]
    #: The router of the `MXFP4MoE` row (the other paths take the rotations' router logits).
    router_weight: torch.Tensor  # [E, H] float32
    router_bias: torch.Tensor  # [E] float32

    @property
    def nbytes(self) -> int:
        biases = (self.w13_bias.numel() * self.w13_bias.element_size()
                  + self.w2_bias.numel() * self.w2_bias.element_size())
        return self.w13.nbytes + self.w2.nbytes + biases


def make_weights(model: ModelShape, dtype: torch.dtype, device, seed: int = 0) -> Weights:
    """The layer's weights, drawn on ``device`` (`mxmoe.testing.random_mxfp4` as bytes: no
    float copy of gpt-oss-120b's experts is ever made)."""
    device = torch.device(device)
    g = seeded_generator(seed, device)
    e, h, i = model.experts, model.hidden, model.inter
    w13 = random_mxfp4((e, 2 * i, h), g, quantized=False)
    w2 = random_mxfp4((e, h, i), g, quantized=False)
    w13_bias = (torch.randn(e, 2 * i, device=device, generator=g) * 0.1).to(dtype)
    w2_bias = (torch.randn(e, h, device=device, generator=g) * 0.1).to(dtype)
    router_weight = torch.randn(e, h, device=device, generator=g) * h**-0.5
    router_bias = torch.randn(e, device=device, generator=g) * 0.1
    return Weights(model, w13, w2, w13_bias, w2_bias, router_weight, router_bias)


@dataclass
class Inputs:
    """One rotation: the layer's inputs, and (for floors and the reference) its routing."""

    hidden_states: torch.Tensor  # [M, H]
    router_logits: torch.Tensor  # [M, E] float32
    topk_weights: torch.Tensor  # [M, k] (what `route` gives for router_logits)
    topk_ids: torch.Tensor  # [M, k]
    touched_experts: int  # distinct experts in topk_ids


@dataclass
class Rotations:
    """``count`` input sets for one M; consecutive replays use consecutive sets, cyclically."""

    num_tokens: int
    inputs: list[Inputs] = field(default_factory=list)
    #: True when consecutive sets (the last and the first included) route to disjoint experts.
    disjoint_experts: bool = False

    @property
    def mean_touched_experts(self) -> float:
        return sum(r.touched_experts for r in self.inputs) / len(self.inputs)


# Logit given to the experts a rotation must avoid: far below any random logit, still finite
# (a -inf row would make the softmax NaN if every expert were excluded).
_EXCLUDED_LOGIT = -1.0e4


def make_rotations(model: ModelShape, num_tokens: int, count: int, dtype: torch.dtype, device,
                   seed: int = 1) -> Rotations:
    """``count`` independent inputs and routings for M = ``num_tokens``.

    At decode sizes a replay touches few experts (M=1 on gpt-oss: 4 experts, ~53 MB of packed
    weights, about the H100's 50 MB L2), so a replay that repeated the previous routing could
    read its weights from L2. When ``3·M·k <= E`` each set therefore avoids the experts of the
    set before it (and the last also those of the first), so consecutive replays share no
    expert; at larger M the touched weights are several times the L2 anyway and the routing is
    left random.
    """
    if count < 1:
        raise ValueError(f"rotations must be >= 1, got {count}")
    device = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + num_tokens)
    m, e, k = num_tokens, model.experts, model.top_k
    disjoint = count > 1 and 3 * m * k <= e
    rotations = Rotations(num_tokens=m, disjoint_experts=disjoint)
    used: list[set[int]] = []
    for r in range(count):
        logits = torch.randn(m, e, generator=g)
        if disjoint:
            avoid = set(used[-1]) if used else set()
            if r == count - 1 and r > 0:
                avoid |= used[0]
            if avoid:
                logits[:, sorted(avoid)] = _EXCLUDED_LOGIT
        logits = logits.to(device)
        # The reference routing: the torch specification, on the device. A path whose router
        # picks other experts fails the check (random logits make exact ties vanishingly rare).
        weights, ids = torch_route(logits, k)
        experts = set(ids.flatten().tolist())
        used.append(experts)
        rotations.inputs.append(Inputs(
            hidden_states=torch.randn(m, model.hidden, generator=g).to(dtype).to(device),
            router_logits=logits,
            topk_weights=weights,
            topk_ids=ids,
            touched_experts=len(experts),
        ))
    return rotations

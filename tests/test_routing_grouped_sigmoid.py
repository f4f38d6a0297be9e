"""DeepSeek-V3's grouped sigmoid router (`mxmoe.router.route_grouped_sigmoid`) against
transformers' own `DeepseekV3TopkRouter`, its invariants, one case worked by hand, and its
argument checks."""

from __future__ import annotations

import pytest
import torch

from mxmoe.router import route_grouped_sigmoid
from mxmoe.routing import GroupedSigmoidRouting

transformers = pytest.importorskip("transformers")
modeling = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")


def _transformers_router(num_experts, n_group, topk_group, top_k, norm, scaling, bias):
    """transformers' router whose logits are its input: H = E and the weight is the identity."""
    config = transformers.DeepseekV3Config(
        hidden_size=num_experts, n_routed_experts=num_experts, n_group=n_group,
        topk_group=topk_group, num_experts_per_tok=top_k, norm_topk_prob=norm,
        routed_scaling_factor=scaling)
    router = modeling.DeepseekV3TopkRouter(config)
    with torch.no_grad():
        router.weight.copy_(torch.eye(num_experts))
        router.e_score_correction_bias.copy_(bias)
    return router


def _by_id(weights, ids):
    """(ids sorted per token, their weights): transformers' top-k is unsorted."""
    order = ids.long().argsort(dim=-1)
    return ids.long().gather(1, order), weights.gather(1, order)


CASES = {
    # name: (E, n_group, topk_group, top_k, norm_topk_prob, routed_scaling_factor)
    "DeepSeek-V3's own sizes (256 experts, 8 groups, 4 kept, top-8)": (256, 8, 4, 8, True, 2.5),
    "groups limit the choice (topk_group < n_group)": (16, 4, 2, 4, True, 2.5),
    "one group kept, top-k spans it": (16, 4, 1, 4, True, 1.0),
    "norm_topk_prob false keeps the raw sigmoid scores": (16, 4, 2, 4, False, 2.5),
    "every group kept (topk_group == n_group)": (12, 3, 3, 5, True, 1.5),
    "one group of all experts (n_group = 1)": (8, 1, 1, 2, False, 1.0),
    "uneven kept groups with top-1": (32, 8, 3, 1, True, 2.5),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_equals_transformers_deepseek_v3_router_on_random_logits(case):
    num_experts, n_group, topk_group, top_k, norm, scaling = CASES[case]
    gen = torch.Generator().manual_seed(num_experts * 7 + top_k)
    logits = torch.randn(64, num_experts, generator=gen) * 2
    bias = torch.randn(num_experts, generator=gen) * 0.3
    theirs = _transformers_router(num_experts, n_group, topk_group, top_k, norm, scaling, bias)
    their_logits, their_weights, their_ids = theirs(logits)
    torch.testing.assert_close(their_logits, logits, rtol=0, atol=0)  # the identity router

    weights, ids = route_grouped_sigmoid(logits, bias, top_k,
                                         GroupedSigmoidRouting(n_group, topk_group, scaling),
                                         renormalize=norm)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert weights.shape == ids.shape == (64, top_k)
    ours_ids, ours_w = _by_id(weights, ids)
    their_ids, their_w = _by_id(their_weights, their_ids)
    assert torch.equal(ours_ids, their_ids)
    torch.testing.assert_close(ours_w, their_w)


def test_the_correction_bias_moves_the_choice_between_groups_but_not_the_weights():
    # Worked by hand: E = 4 in 2 groups of 2, one group kept, top-1.
    # sigmoid(logits) = [0.731, 0.5, 0.5, 0.269]: group 0 is worth 1.231, group 1 0.769.
    logits = torch.tensor([[1.0, 0.0, 0.0, -1.0]])
    routing = GroupedSigmoidRouting(n_group=2, topk_group=1, scaling_factor=2.0)
    weights, ids = route_grouped_sigmoid(logits, torch.zeros(4), 1, routing, renormalize=False)
    assert ids.tolist() == [[0]]
    torch.testing.assert_close(weights, 2.0 * torch.sigmoid(torch.tensor([[1.0]])))
    # +0.5 on expert 2: group 1 is worth 0.5 + 0.5 + 0.269 = 1.269 > 1.231 and expert 2 wins in
    # it; its weight is its uncorrected score, 0.5, times 2.
    bias = torch.tensor([0.0, 0.0, 0.5, 0.0])
    weights, ids = route_grouped_sigmoid(logits, bias, 1, routing, renormalize=False)
    assert ids.tolist() == [[2]]
    torch.testing.assert_close(weights, torch.tensor([[1.0]]))
    # Renormalised, a top-1 weight is the scaling factor itself.
    weights, _ = route_grouped_sigmoid(logits, bias, 1, routing, renormalize=True)
    torch.testing.assert_close(weights, torch.tensor([[2.0]]))


def test_invariants_kept_groups_order_and_sums():
    gen = torch.Generator().manual_seed(5)
    num_experts, n_group, topk_group, top_k, scaling = 32, 8, 3, 6, 2.5
    logits = torch.randn(100, num_experts, generator=gen)
    bias = torch.randn(num_experts, generator=gen) * 0.2
    routing = GroupedSigmoidRouting(n_group, topk_group, scaling)
    weights, ids = route_grouped_sigmoid(logits, bias, top_k, routing)
    choice = torch.sigmoid(logits) + bias
    # Distinct experts, from at most topk_group groups, ordered by corrected score.
    assert all(len(set(row)) == top_k for row in ids.tolist())
    groups = ids.long() // (num_experts // n_group)
    assert all(len(set(row)) <= topk_group for row in groups.tolist())
    chosen = choice.gather(1, ids.long())
    assert torch.all(chosen[:, :-1] >= chosen[:, 1:])
    torch.testing.assert_close(weights.sum(-1), torch.full((100,), scaling))
    raw, raw_ids = route_grouped_sigmoid(logits, bias, top_k, routing, renormalize=False)
    assert torch.equal(raw_ids, ids)
    torch.testing.assert_close(raw, scaling * torch.sigmoid(logits).gather(1, ids.long()))


def test_bf16_logits_are_scored_in_float32():
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(8, 16, generator=gen).bfloat16()
    routing = GroupedSigmoidRouting(4, 2, 1.0)
    weights, ids = route_grouped_sigmoid(logits, torch.zeros(16), 3, routing)
    want, want_ids = route_grouped_sigmoid(logits.float(), torch.zeros(16), 3, routing)
    assert weights.dtype == torch.float32
    assert torch.equal(ids, want_ids) and torch.equal(weights, want)


@pytest.mark.parametrize("routing, top_k, bias, error, message", [
    (GroupedSigmoidRouting(3, 1), 2, torch.zeros(16), ValueError,
     r"routing.n_group must divide E = 16, got 3"),
    (GroupedSigmoidRouting(4, 5), 2, torch.zeros(16), ValueError,
     r"routing.topk_group must be in \[1, n_group=4\], got 5"),
    (GroupedSigmoidRouting(4, 1), 5, torch.zeros(16), ValueError,
     r"top_k = 5 is more than the 4 experts of the topk_group = 1 groups kept"),
    (GroupedSigmoidRouting(4, 2, float("nan")), 2, torch.zeros(16), ValueError,
     r"routing.scaling_factor must be finite"),
    (GroupedSigmoidRouting(4, 2), 2, torch.zeros(15), ValueError,
     r"correction_bias must be \[E\] = \(16,\), got \(15,\)"),
    (GroupedSigmoidRouting(4, 2), 2, torch.zeros(16, dtype=torch.int32), TypeError,
     r"correction_bias must be a floating tensor"),
    ((4, 2), 2, torch.zeros(16), TypeError, r"routing must be an mxmoe.routing.GroupedSigmoid"),
], ids=["n_group not dividing E", "topk_group > n_group", "top-k past the kept experts",
        "NaN scaling factor", "bias of the wrong length", "integer bias", "routing not the type"])
def test_bad_arguments_are_named(routing, top_k, bias, error, message):
    with pytest.raises(error, match=message):
        route_grouped_sigmoid(torch.randn(4, 16), bias, top_k, routing)

"""Routing in pure torch: router logits -> top-k experts, and the alignment of (token, slot)
pairs by expert: the contracts the kernels implement.

`route_torch` is the router's math (the public router, `mxmoe.route`, validates its arguments
and dispatches to it or to the Triton router: `mxmoe.router`); `route_grouped_sigmoid_torch` is
DeepSeek-V3's grouped sigmoid router (`GroupedSigmoidRouting`; validated by
`mxmoe.router.route_grouped_sigmoid`, pure torch everywhere). `align_by_expert` is the
device-side pure-torch alignment (no host synchronisation, static output sizes, so a forward
that uses it can be captured in a CUDA graph); `align_by_expert_reference` is the plain loop it
is tested against. The Triton kernels use the same output contract (see `Alignment`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["route_torch", "GroupedSigmoidRouting", "route_grouped_sigmoid_torch",
           "Alignment", "align_by_expert", "align_by_expert_reference",
           "max_aligned_blocks"]


def route_torch(
    router_logits: torch.Tensor, top_k: int, renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The router in pure torch, on arguments `mxmoe.route` validated: what it computes
    everywhere but in eager CUDA calls (there the fused Triton router computes the same).

    Returns ``(topk_weights float32 [M, top_k], topk_ids int32 [M, top_k])``, highest weight
    first: softmax over the top-k logits with ``renormalize`` (equal to dividing the chosen
    probabilities by their sum), else the probabilities of the softmax over all E.
    """
    logits = router_logits.to(torch.float32)
    # Rank by the logits, not by softmax probabilities: probabilities far below the top one
    # underflow to equal zeros and would be ranked arbitrarily.
    top_logits, ids = torch.topk(logits, top_k, dim=-1, sorted=True)
    if renormalize:
        weights = torch.softmax(top_logits, dim=-1)
    else:
        weights = torch.softmax(logits, dim=-1).gather(-1, ids)
    return weights, ids.to(torch.int32)


@dataclass(frozen=True)
class GroupedSigmoidRouting:
    """DeepSeek-V3's router settings (config.json ``n_group``, ``topk_group``,
    ``routed_scaling_factor``; ``norm_topk_prob`` is the layer's ``renormalize``).

    The E experts form ``n_group`` groups of ``E / n_group`` consecutive experts; only the
    ``topk_group`` best groups are candidates for a token's top-k; the chosen weights are
    multiplied by ``scaling_factor``.
    """

    n_group: int
    topk_group: int
    scaling_factor: float = 1.0


def route_grouped_sigmoid_torch(
    router_logits: torch.Tensor, correction_bias: torch.Tensor, top_k: int,
    routing: GroupedSigmoidRouting, renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's router ("noaux_tc") in pure torch, on arguments
    `mxmoe.router.route_grouped_sigmoid` validated.

    1. ``scores = sigmoid(logits)`` in float32; ``choice = scores + correction_bias`` (the
       bias only steers the choice, it never enters a weight).
    2. Each group's worth is the sum of its two largest ``choice`` values; the
       ``routing.topk_group`` best groups stay, the others' experts are out.
    3. The top-k experts by ``choice`` among those left; their weights are their *uncorrected*
       ``scores``, divided by their sum (plus 1e-20, as DeepSeek) when ``renormalize``, then
       multiplied by ``routing.scaling_factor``.

    Returns ``(topk_weights float32 [M, top_k], topk_ids int32 [M, top_k])``, ordered by the
    corrected score, highest first (so the weights need not be descending). Ties are broken as
    ``torch.topk`` breaks them.
    """
    num_tokens, num_experts = router_logits.shape
    per_group = num_experts // routing.n_group
    scores = torch.sigmoid(router_logits.to(torch.float32))
    choice = scores + correction_bias.to(torch.float32)
    grouped = choice.view(num_tokens, routing.n_group, per_group)
    # A group of one expert has no second best: its worth is that expert alone.
    group_worth = grouped.topk(min(2, per_group), dim=-1).values.sum(dim=-1)
    kept_groups = group_worth.topk(routing.topk_group, dim=-1).indices
    kept = torch.zeros_like(group_worth, dtype=torch.bool).scatter_(1, kept_groups, True)
    candidates = grouped.masked_fill(~kept.unsqueeze(-1), float("-inf"))
    ids = candidates.view(num_tokens, num_experts).topk(top_k, dim=-1, sorted=True).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * routing.scaling_factor
    return weights, ids.to(torch.int32)


@dataclass
class Alignment:
    """The (token, slot) pairs sorted by local expert, each expert's run padded to ``block_m``.

    - ``sorted_ids`` int32 ``[max_blocks * block_m]``: flat pair index ``token * top_k + slot``,
      or the sentinel ``M * top_k`` for padding.
    - ``expert_ids`` int32 ``[max_blocks]``: the local expert of each block, -1 for blocks past
      the end (pairs routed to remote experts are left out entirely).
    - ``num_tokens_post_padded`` int32 ``[1]``: rows in use, a multiple of ``block_m``.

    The sizes depend only on (M, top_k, E_local, block_m), never on the data.
    """

    sorted_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_tokens_post_padded: torch.Tensor
    block_m: int


def max_aligned_blocks(num_pairs: int, num_local_experts: int, block_m: int) -> int:
    """An upper bound on the blocks an alignment can use, known before looking at the ids.

    Every used block holds at least one pair, so there are at most ``num_pairs`` of them; and
    each expert wastes less than one block, so at most ``ceil(num_pairs / block_m) + E``.
    """
    if num_pairs == 0:
        return 0
    return min(num_pairs, -(-num_pairs // block_m) + num_local_experts)


def _local_expert_of_pairs(
    topk_ids: torch.Tensor, num_local_experts: int, expert_map: torch.Tensor | None
) -> torch.Tensor:
    """int64 ``[M * top_k]`` local expert of each pair; remote (or out-of-range) -> E_local."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    if expert_map is not None:
        in_range = (flat >= 0) & (flat < expert_map.numel())
        local = expert_map.to(torch.int64)[flat.clamp(0, max(expert_map.numel() - 1, 0))]
        local = torch.where(in_range, local, -1)
    else:
        local = flat
    valid = (local >= 0) & (local < num_local_experts)
    return torch.where(valid, local, num_local_experts)


def align_by_expert(
    topk_ids: torch.Tensor,
    block_m: int,
    num_local_experts: int,
    expert_map: torch.Tensor | None = None,
) -> Alignment:
    """Device-side alignment in pure torch, with no host synchronisation."""
    device = topk_ids.device
    num_pairs = topk_ids.numel()
    num_experts = num_local_experts
    max_blocks = max_aligned_blocks(num_pairs, num_experts, block_m)
    sentinel = num_pairs

    bucket = _local_expert_of_pairs(topk_ids, num_experts, expert_map)
    # Bucket E holds the pairs of remote experts; it gets no blocks (its padded size is 0).
    # Every table below has E + 1 entries, so bucket E indexes them even when E is 0.
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, bucket, torch.ones_like(bucket))
    padded = torch.cat([(counts[:num_experts] + block_m - 1) // block_m * block_m,
                        counts.new_zeros(1)])
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    count_start = torch.cumsum(counts, 0) - counts

    order = torch.sort(bucket, stable=True).indices
    sorted_bucket = bucket[order]
    rank = torch.arange(num_pairs, device=device) - count_start[sorted_bucket]
    position = padded_start[sorted_bucket] + rank
    # Remote pairs go to a scratch slot past the end, then are cut off.
    position = torch.where(sorted_bucket < num_experts, position, max_blocks * block_m)
    sorted_ids = torch.full((max_blocks * block_m + 1,), sentinel, dtype=torch.int64, device=device)
    sorted_ids.scatter_(0, position, order)
    sorted_ids = sorted_ids[:-1]

    block_start = torch.arange(max_blocks, device=device) * block_m
    block_expert = torch.searchsorted(padded_end[:num_experts], block_start, right=True)
    expert_ids = torch.where(block_expert < num_experts, block_expert, -1)
    total = padded_end[-1:]
    return Alignment(
        sorted_ids=sorted_ids.to(torch.int32),
        expert_ids=expert_ids.to(torch.int32),
        num_tokens_post_padded=total.to(torch.int32),
        block_m=block_m,
    )


def align_by_expert_reference(
    topk_ids: torch.Tensor,
    block_m: int,
    num_local_experts: int,
    expert_map: torch.Tensor | None = None,
) -> Alignment:
    """The same contract as `align_by_expert`, written as a plain loop on the CPU."""
    num_pairs = topk_ids.numel()
    max_blocks = max_aligned_blocks(num_pairs, num_local_experts, block_m)
    bucket = _local_expert_of_pairs(topk_ids.cpu(), num_local_experts,
                                    None if expert_map is None else expert_map.cpu()).tolist()
    sorted_ids: list[int] = []
    expert_ids: list[int] = []
    for expert in range(num_local_experts):
        pairs = [p for p, b in enumerate(bucket) if b == expert]
        if not pairs:
            continue
        blocks = -(-len(pairs) // block_m)
        sorted_ids += pairs + [num_pairs] * (blocks * block_m - len(pairs))
        expert_ids += [expert] * blocks
    used = len(sorted_ids)
    sorted_ids += [num_pairs] * (max_blocks * block_m - used)
    expert_ids += [-1] * (max_blocks - len(expert_ids))
    return Alignment(
        sorted_ids=torch.tensor(sorted_ids, dtype=torch.int32),
        expert_ids=torch.tensor(expert_ids, dtype=torch.int32),
        num_tokens_post_padded=torch.tensor([used], dtype=torch.int32),
        block_m=block_m,
    )

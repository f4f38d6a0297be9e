"""Routing: `route` against gpt-oss's router, and the alignment of (token, slot) pairs by expert."""

from __future__ import annotations

import re

import pytest
import torch

from mxmoe import route
from mxmoe.routing import align_by_expert, align_by_expert_reference, max_aligned_blocks


def gpt_oss_route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss's router after the Linear: top-k over the logits, then softmax over those k."""
    top = torch.topk(logits, k, dim=-1, sorted=True)
    return torch.softmax(top.values, dim=-1), top.indices


def logits(m: int, e: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(m, e, generator=torch.Generator().manual_seed(seed)) * scale


# ---------------------------------------------------------------------------------------------
# route
# ---------------------------------------------------------------------------------------------

ROUTE_CASES = [(33, 32, 4), (7, 128, 4), (5, 3, 1), (4, 8, 8), (1, 5, 2)]
ROUTE_IDS = ["gpt-oss-20b", "gpt-oss-120b", "top-1", "k = E", "one token"]


@pytest.mark.parametrize("m,e,k", ROUTE_CASES, ids=ROUTE_IDS)
def test_route_equals_gpt_oss_topk_then_softmax(m, e, k):
    x = logits(m, e)
    weights, ids = route(x, k)
    ref_weights, ref_ids = gpt_oss_route(x, k)
    assert torch.equal(ids, ref_ids.to(torch.int32))
    # The same float32 softmax over the same k logits: equal bit for bit.
    assert torch.equal(weights, ref_weights)


def test_route_picks_gpt_oss_experts_when_the_softmax_underflows():
    # exp(-150) is below float32's smallest subnormal: a softmax over all E makes experts 1..4
    # exactly 0, tied. gpt-oss ranks them by their logits, so route must too.
    x = torch.tensor([[0.0, -150.0, -170.0, -160.0, -200.0],
                      [-300.0, -100.0, 0.0, -250.0, -120.0]])
    weights, ids = route(x, 3)
    ref_weights, ref_ids = gpt_oss_route(x, 3)
    assert ids.tolist() == [[0, 1, 3], [2, 1, 4]] == ref_ids.tolist()
    assert torch.equal(weights, ref_weights)


def test_renormalize_false_keeps_the_full_softmax_probabilities():
    x = logits(6, 16, seed=1)
    weights, ids = route(x, 4, renormalize=False)
    probs = torch.softmax(x, dim=-1)
    torch.testing.assert_close(weights, probs.gather(1, ids.long()), rtol=1e-6, atol=0)
    assert (weights.sum(dim=1) < 1).all()
    assert torch.equal(ids, route(x, 4)[1])


def test_renormalized_weights_sum_to_one_and_are_sorted_highest_first():
    weights, _ = route(logits(9, 32, seed=2), 4)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(9), rtol=1e-6, atol=0)
    assert (weights[:, :-1] >= weights[:, 1:]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32 logits", "fp16 logits", "bf16 logits"])
def test_route_returns_float32_weights_and_int32_ids(dtype):
    weights, ids = route(logits(5, 8, seed=3).to(dtype), 2)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert weights.shape == ids.shape == (5, 2)


def test_top_k_equal_to_e_selects_every_expert_once():
    weights, ids = route(logits(6, 7, seed=4), 7)
    assert torch.equal(ids.sort(dim=1).values, torch.arange(7, dtype=torch.int32).expand(6, 7))
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(6), rtol=1e-6, atol=0)


def test_route_passes_the_gradient_to_logits_that_want_it(monkeypatch):
    # The fused router (chosen here as on a GPU, run by the interpreter) returns tensors with
    # no autograd history: a router being trained must take the differentiable torch path.
    from mxmoe import router as router_module

    monkeypatch.setattr(router_module, "_use_triton_router", lambda router_logits: True)
    leaf = logits(5, 8, seed=3).requires_grad_()
    weights, ids = route(leaf, 2)
    assert weights.requires_grad
    (weights * torch.arange(2.0)).sum().backward()
    expected_leaf = leaf.detach().clone().requires_grad_()
    expected, expected_ids = gpt_oss_route(expected_leaf, 2)
    (expected * torch.arange(2.0)).sum().backward()
    assert torch.equal(ids, expected_ids.to(torch.int32))
    torch.testing.assert_close(leaf.grad, expected_leaf.grad)
    with torch.no_grad():  # no gradient wanted: the fused router again, its outputs plain
        weights, _ = route(leaf, 2)
    assert not weights.requires_grad


def test_route_with_no_tokens_returns_empty():
    weights, ids = route(torch.zeros(0, 8), 2)
    assert weights.shape == ids.shape == (0, 2)


@pytest.mark.parametrize(
    "x,k,error,fragment",
    [
        (torch.zeros(2, 4), 0, ValueError, "top_k must be in [1, E=4], got 0"),
        (torch.zeros(2, 4), 5, ValueError, "top_k must be in [1, E=4], got 5"),
        (torch.zeros(2, 4), 2.0, TypeError, "top_k must be an int, got float"),
        (torch.zeros(2, 4), True, TypeError, "top_k must be an int, got bool"),
        (torch.zeros(2, 4, dtype=torch.int64), 2, TypeError, "floating tensor, got torch.int64"),
        (torch.zeros(8), 2, ValueError, "router_logits must be [M, E], got shape (8,)"),
        ([[0.0, 1.0]], 1, TypeError, "router_logits must be a torch.Tensor, got list"),
    ],
    ids=["k = 0", "k > E", "float k", "bool k", "int logits", "1-D logits", "list logits"],
)
def test_route_rejects_bad_arguments(x, k, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        route(x, k)


# ---------------------------------------------------------------------------------------------
# Alignment by expert
# ---------------------------------------------------------------------------------------------


def random_ids(m: int, k: int, e: int, seed: int = 0) -> torch.Tensor:
    """[m, k] distinct experts per token, as a router picks them."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(m, e, generator=g).topk(k, dim=1).indices.to(torch.int32)


#: (M, k, E_global, block_m, expert_map or None), each named by the case it covers.
ALIGN_CASES = {
    "gpt-oss shape": (64, 4, 32, 16, None),
    "M*k < block_m": (3, 2, 8, 64, None),
    "block_m = 1": (9, 3, 5, 1, None),
    "prime E": (17, 2, 13, 4, None),
    "k = E": (5, 4, 4, 8, None),
    "one token": (1, 4, 32, 16, None),
    "no tokens": (0, 4, 8, 16, None),
    "expert map, remote experts": (20, 2, 8, 4, [-1, 0, -1, 1, 2, -1, -1, 3]),
    "expert map, no local expert": (6, 2, 4, 4, [-1, -1, -1, -1]),
    "expert map, permuted": (11, 3, 6, 2, [5, 4, 3, 2, 1, 0]),
}


def case_ids(m, k, e, block_m, expert_map, seed=0):
    ids = random_ids(m, k, e, seed)
    emap = None if expert_map is None else torch.tensor(expert_map, dtype=torch.int32)
    # With an all -1 map this rank holds no expert at all: E_local = 0.
    e_local = e if emap is None else int(emap.max().item()) + 1
    return ids, emap, e_local


def local_expert(ids: torch.Tensor, expert_map) -> list[int]:
    """The local expert of each flat pair, -1 for remote, written out in Python."""
    flat = ids.reshape(-1).tolist()
    return flat if expert_map is None else [expert_map[i] for i in flat]


def assert_alignment_equal(a, b) -> None:
    assert torch.equal(a.sorted_ids, b.sorted_ids)
    assert torch.equal(a.expert_ids, b.expert_ids)
    assert torch.equal(a.num_tokens_post_padded, b.num_tokens_post_padded)
    assert a.block_m == b.block_m


@pytest.mark.parametrize("case", ALIGN_CASES.values(), ids=ALIGN_CASES.keys())
@pytest.mark.parametrize("seed", [0, 1])
def test_device_alignment_equals_the_reference_loop(case, seed):
    # Both sort stably (pairs of one expert keep their flat order), so the comparison is exact.
    m, k, e, block_m, expert_map = case
    ids, emap, e_local = case_ids(m, k, e, block_m, expert_map, seed)
    assert_alignment_equal(align_by_expert(ids, block_m, e_local, emap),
                           align_by_expert_reference(ids, block_m, e_local, emap))


@pytest.mark.parametrize("case", ALIGN_CASES.values(), ids=ALIGN_CASES.keys())
def test_alignment_invariants(case):
    m, k, e, block_m, expert_map = case
    ids, emap, e_local = case_ids(m, k, e, block_m, expert_map)
    al = align_by_expert(ids, block_m, e_local, emap)
    local = local_expert(ids, expert_map)
    num_pairs = m * k
    sentinel = num_pairs
    sorted_ids = al.sorted_ids.tolist()
    expert_ids = al.expert_ids.tolist()
    used = al.num_tokens_post_padded.item()

    for t in (al.sorted_ids, al.expert_ids, al.num_tokens_post_padded):
        assert t.dtype == torch.int32
    # The kernel reads every block of block_m rows, so the used rows are whole blocks.
    assert used % block_m == 0
    # Every local pair appears exactly once, and nothing else except the sentinel.
    real = [p for p in sorted_ids if p != sentinel]
    assert sorted(real) == [p for p, x in enumerate(local) if x >= 0]
    # Past the used rows there is only padding, and those blocks have no expert.
    assert all(p == sentinel for p in sorted_ids[used:])
    assert all(x == -1 for x in expert_ids[used // block_m:])
    # Each used block holds pairs of its own expert only, and at least one of them.
    for b in range(used // block_m):
        block = [p for p in sorted_ids[b * block_m:(b + 1) * block_m] if p != sentinel]
        assert block and all(local[p] == expert_ids[b] for p in block)
    # Each expert's run is its pairs padded up to a multiple of block_m; an expert with no pairs
    # gets no block; the runs come in expert order.
    for expert in range(e_local):
        count = local.count(expert)
        assert expert_ids.count(expert) == -(-count // block_m)
    used_experts = expert_ids[:used // block_m]
    assert used_experts == sorted(used_experts)
    # Within an expert's run the pairs keep their flat order (both implementations are stable).
    assert real == sorted(real, key=lambda p: local[p])


def test_counts_sum_to_m_times_k_without_an_expert_map():
    m, k, e, block_m = 37, 4, 32, 16
    al = align_by_expert(random_ids(m, k, e), block_m, e)
    real = al.sorted_ids[al.sorted_ids != m * k]
    assert real.numel() == m * k
    assert torch.equal(real.sort().values, torch.arange(m * k, dtype=torch.int32))


def test_all_tokens_on_one_expert_fill_consecutive_blocks():
    m, block_m = 10, 4
    ids = torch.full((m, 1), 5, dtype=torch.int32)
    al = align_by_expert(ids, block_m, 8)
    assert al.num_tokens_post_padded.tolist() == [12]
    assert al.sorted_ids[:12].tolist() == list(range(10)) + [10, 10]
    assert al.expert_ids[:3].tolist() == [5, 5, 5]
    assert (al.expert_ids[3:] == -1).all()


def test_remote_pairs_are_left_out():
    # Global experts 0 and 2 are local (as 0 and 1); 1 and 3 are held by another rank.
    ids = torch.tensor([[0, 1], [3, 2], [2, 0]], dtype=torch.int32)
    emap = torch.tensor([0, -1, 1, -1], dtype=torch.int32)
    al = align_by_expert(ids, 2, 2, emap)
    # Flat pairs: 0 -> e0, 1 remote, 2 remote, 3 -> e1, 4 -> e1, 5 -> e0.
    assert al.num_tokens_post_padded.tolist() == [4]
    assert al.sorted_ids[:4].tolist() == [0, 5, 3, 4]
    assert al.expert_ids[:2].tolist() == [0, 1]


def test_block_m_1_has_no_padding():
    m, k, e = 9, 3, 5
    al = align_by_expert(random_ids(m, k, e), 1, e)
    assert al.num_tokens_post_padded.item() == m * k
    assert (al.sorted_ids != m * k).all()


def test_int64_ids_align_like_int32():
    ids = random_ids(13, 2, 6)
    assert_alignment_equal(align_by_expert(ids.long(), 4, 6), align_by_expert(ids, 4, 6))


def adversarial_ids(m, k, e, block_m):
    """Each expert gets block_m * q + 1 pairs where it can: the most padding there can be."""
    flat = [(i // (block_m + 1)) % e for i in range(m * k)]
    return torch.tensor(flat, dtype=torch.int32).reshape(m, k)


@pytest.mark.parametrize(
    "m,k,e,block_m",
    [(64, 4, 32, 16), (3, 2, 8, 64), (100, 1, 7, 8), (5, 4, 4, 1), (0, 2, 4, 16)],
    ids=["gpt-oss shape", "M*k < block_m", "prime E", "block_m = 1", "no tokens"],
)
def test_sizes_depend_only_on_m_k_e_block_m(m, k, e, block_m):
    # Static sizes let a forward be captured in a CUDA graph; the bound must hold for any ids.
    bound = max_aligned_blocks(m * k, e, block_m)
    for ids in (random_ids(m, k, e, seed=5), random_ids(m, k, e, seed=6),
                adversarial_ids(m, k, e, block_m), torch.zeros(m, k, dtype=torch.int32)):
        for align in (align_by_expert, align_by_expert_reference):
            al = align(ids, block_m, e)
            assert al.sorted_ids.shape == (bound * block_m,)
            assert al.expert_ids.shape == (bound,)
            assert al.num_tokens_post_padded.shape == (1,)
            assert al.num_tokens_post_padded.item() <= bound * block_m


def test_max_aligned_blocks_bound():
    # No pairs, no blocks; otherwise at most one block per pair, and at most one wasted block
    # per expert beyond ceil(pairs / block_m).
    assert max_aligned_blocks(0, 8, 16) == 0
    assert max_aligned_blocks(3, 8, 64) == 3
    assert max_aligned_blocks(256, 32, 16) == 16 + 32
    assert max_aligned_blocks(10, 3, 1) == 10

"""The Triton kernels against the pure-torch reference, under TRITON_INTERPRET=1 on the CPU.

fp16 and fp32 only: the interpreter computes bf16 wrongly (bf16 is checked on the GPU by
scripts/gpu_check.py). Shapes are tiny (interpreter time grows with programs x loop trips) but
awkward: H and I multiples of 32 and not of the tiles, one token, prime E, k = E, remote experts,
experts with no tokens.
"""

from __future__ import annotations

import json

import pytest
import torch

import mxmoe
from helpers import make_moe, random_expert_map, rel_err
from mxmoe.reference import fused_experts_reference
from mxmoe.routing import align_by_expert_reference

pytestmark = pytest.mark.interpreter

# Tiles of 32 rows x 64 K: H = I = 96 leaves a partial tile along N and K in both GEMMs.
TINY = {"block_m": 16, "block_n": 32, "block_k": 64, "num_warps": 4, "num_stages": 1}
STRATEGIES = {
    "one dot": {},
    "two half-dots": {"split_dot": True},
    "swap-AB": {"swap_ab": True},
    "two half-dots, swap-AB": {"split_dot": True, "swap_ab": True},
}
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}

# (reason, M, H, I, E, k)
SHAPES = [
    pytest.param(1, 96, 96, 5, 2, id="one token"),
    pytest.param(13, 64, 96, 7, 3, id="prime E, I not a multiple of the N tile"),
    pytest.param(6, 96, 32, 3, 3, id="k = E, I one scale block"),
    pytest.param(3, 32, 64, 6, 1, id="fewer pairs than experts: empty experts"),
]


@pytest.fixture
def config(monkeypatch):
    def use(**overrides):
        monkeypatch.setenv("MXMOE_CONFIG", json.dumps({**TINY, **overrides}))
    monkeypatch.setenv("MXMOE_POISON", "1")
    return use


def run_both(kw, backend, **options):
    out = mxmoe.fused_experts(**kw, backend=backend, **options)
    activation = mxmoe.Activation(options.get("activation", "swigluoai"))
    ref_options = {k: v for k, v in options.items() if k != "activation"}
    ref = fused_experts_reference(**kw, activation=activation, **ref_options)
    return out, ref


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("m, h, i, e, k", SHAPES)
def test_dequant_matches_reference(config, strategy, m, h, i, e, k):
    config(**STRATEGIES[strategy])
    kw = make_moe(m, h, i, e, k, dtype=torch.float16, seed=m)
    out, ref = run_both(kw, "triton_dequant")
    assert out.dtype == torch.float16
    assert rel_err(out, ref) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("activation", ["swigluoai", "silu"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_dequant_activations_and_dtypes(config, dtype, activation, strategy):
    config(**STRATEGIES[strategy])
    kw = make_moe(7, 96, 96, 5, 2, dtype=dtype, seed=1)
    out, ref = run_both(kw, "triton_dequant", activation=activation)
    assert rel_err(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("on_input", [False, True], ids=["weight on output", "weight on input"])
@pytest.mark.parametrize("bias", [True, False], ids=["biases", "no biases"])
def test_dequant_router_weight_and_biases(config, on_input, bias):
    config(swap_ab=True)
    kw = make_moe(5, 64, 64, 4, 2, dtype=torch.float32, seed=2, bias=bias)
    out, ref = run_both(kw, "triton_dequant", apply_router_weight_on_input=on_input)
    assert rel_err(out, ref) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("strategy", ["one dot", "swap-AB"])
def test_expert_map_with_remote_experts(config, strategy):
    """Global experts 0..6; this rank holds 2, 5 and 6 as local 0, 1, 2."""
    config(**STRATEGIES[strategy])
    kw = make_moe(9, 64, 64, 3, 2, dtype=torch.float32, seed=3, e_global=7)
    expert_map = torch.full((7,), -1, dtype=torch.int32)
    expert_map[torch.tensor([2, 5, 6])] = torch.arange(3, dtype=torch.int32)
    out, ref = run_both(kw, "triton_dequant", expert_map=expert_map)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOLERANCE[torch.float32]


def test_all_experts_remote_gives_zeros(config):
    config()
    kw = make_moe(4, 64, 32, 2, 2, dtype=torch.float32, seed=4, e_global=5)
    expert_map = torch.tensor([-1, -1, -1, 0, 1], dtype=torch.int32)
    kw["topk_ids"] = torch.tensor([[0, 1], [2, 0], [1, 2], [0, 2]], dtype=torch.int32)
    out = mxmoe.fused_experts(**kw, expert_map=expert_map, backend="triton_dequant")
    assert torch.equal(out, torch.zeros_like(out))


def test_all_tokens_on_one_expert(config):
    config()
    kw = make_moe(20, 64, 64, 4, 1, dtype=torch.float32, seed=5)
    kw["topk_ids"] = torch.full((20, 1), 2, dtype=torch.int32)
    out, ref = run_both(kw, "triton_dequant")
    assert rel_err(out, ref) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("backend", ["triton_scaled", "bf16"])
@pytest.mark.parametrize("swap", [False, True], ids=["A x W^T", "swap-AB"])
def test_other_weight_modes(config, backend, swap):
    config(swap_ab=swap)
    kw = make_moe(7, 96, 64, 5, 2, dtype=torch.float16, seed=6)
    out, ref = run_both(kw, backend)
    assert rel_err(out, ref) < TOLERANCE[torch.float16]


def test_zero_tokens_returns_empty(config):
    config()
    kw = make_moe(0, 64, 64, 3, 2, dtype=torch.float16)
    out = mxmoe.fused_experts(**kw, backend="triton_dequant")
    assert out.shape == (0, 64) and out.dtype == torch.float16


def test_scale_nan_propagates(config):
    config()
    kw = make_moe(4, 64, 64, 2, 2, dtype=torch.float32, seed=7)
    kw["topk_ids"] = torch.tensor([[0, 1]] * 4, dtype=torch.int32)
    kw["w2"].scales[0, 3, 0] = 255  # expert 0, output column 3
    out = mxmoe.fused_experts(**kw, backend="triton_dequant")
    assert torch.isnan(out[:, 3]).all()
    assert torch.isfinite(out[:, :3]).all() and torch.isfinite(out[:, 4:]).all()


@pytest.mark.parametrize(
    "m, k, e, block_m, mapped",
    [
        pytest.param(1, 4, 32, 16, False, id="decode: one token, many empty experts"),
        pytest.param(7, 2, 5, 4, False, id="runs longer than a block"),
        pytest.param(33, 3, 7, 16, True, id="expert map with remote experts"),
        pytest.param(5, 5, 5, 1, True, id="block_m = 1, k = E"),
        pytest.param(70, 4, 128, 16, False, id="E = 128, several chunks of pairs"),
        pytest.param(150, 2, 6, 8, True, id="more pairs than the multi-program chunks hold"),
    ],
)
@pytest.mark.parametrize("programs", ["one", "multi"])
def test_triton_alignment_equals_reference(m, k, e, block_m, mapped, programs, monkeypatch):
    import mxmoe.kernels.align as fm
    from mxmoe.kernels.align import align

    if programs == "multi":  # interpreter sizes: 4 chunks of pairs, steps of 16
        monkeypatch.setattr(fm, "ALIGN_ONE_PROGRAM_MAX_PAIRS", 0)

    g = torch.Generator().manual_seed(m)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(m)]).to(torch.int32)
    num_local, expert_map = e, None
    if mapped:
        num_local = e // 2 + 1
        expert_map = random_expert_map(e, num_local, g)
    got = align(ids, block_m, num_local, e, expert_map)
    want = align_by_expert_reference(ids, block_m, num_local, expert_map)
    assert torch.equal(got.sorted_ids, want.sorted_ids)
    assert torch.equal(got.expert_ids, want.expert_ids)
    assert torch.equal(got.num_tokens_post_padded, want.num_tokens_post_padded)


@pytest.mark.parametrize("m, e, k, renormalize", [
    pytest.param(5, 32, 4, True, id="gpt-oss-20b router"),
    pytest.param(3, 7, 7, True, id="k = E"),
    pytest.param(17, 128, 4, False, id="full-softmax weights, rows across programs"),
])
def test_triton_router_equals_torch(m, e, k, renormalize):
    import triton

    from mxmoe.kernels._route import route_kernel

    logits = torch.randn(m, e, generator=torch.Generator().manual_seed(e))
    weights = torch.empty(m, k)
    ids = torch.empty(m, k, dtype=torch.int32)
    block_e = triton.next_power_of_2(e)
    rows = max(1, min(16, 4096 // block_e))
    route_kernel[(triton.cdiv(m, rows),)](
        logits, weights, ids, m, e, logits.stride(0), logits.stride(1), TOP_K=k,
        K_PAD=triton.next_power_of_2(k), RENORMALIZE=renormalize, BLOCK_E=block_e, ROWS=rows)
    want_w, want_ids = mxmoe.route(logits, k, renormalize=renormalize)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w, rtol=1e-6, atol=1e-7)


# Split-K: K = 96 or 160 in tiles of 32 gives 3 or 5 K tiles, so 2 slices are uneven and 4
# slices leave none empty only because _k_slices shrinks the count (5 tiles / 4 -> 3 slices).
SPLITS = [
    pytest.param({"split_k": 2}, id="GEMM1 split 2, GEMM2 inherits"),
    pytest.param({"split_k": 4, "split_k2": 1}, id="GEMM1 only"),
    pytest.param({"split_k": 1, "split_k2": 3}, id="GEMM2 only"),
    pytest.param({"split_k": 64, "split_k2": 64}, id="more slices than K tiles"),
]


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("swap", [False, True], ids=["A x W^T", "swap-AB"])
@pytest.mark.parametrize("activation", ["swigluoai", "silu"])
def test_split_k_matches_reference(config, split, swap, activation):
    config(block_k=32, swap_ab=swap, **split)
    kw = make_moe(5, 160, 96, 5, 2, dtype=torch.float32, seed=11)
    out, ref = run_both(kw, "triton_dequant", activation=activation)
    assert rel_err(out, ref) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("on_input", [False, True], ids=["weight on output", "weight on input"])
def test_split_k_bias_once_and_router_weight(config, on_input):
    """The bias goes in once (slice 0), the routing weight into every slice."""
    config(block_k=32, split_k=3, split_k2=3)
    kw = make_moe(4, 96, 96, 3, 2, dtype=torch.float32, seed=12)
    kw["w13_bias"] = kw["w13_bias"] * 50  # a bias counted 3 times would show at once
    kw["w2_bias"] = kw["w2_bias"] * 50
    out, ref = run_both(kw, "triton_dequant", apply_router_weight_on_input=on_input)
    assert rel_err(out, ref) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("backend", ["triton_scaled", "bf16"])
def test_split_k_other_weight_modes_and_remote_experts(config, backend):
    config(block_k=32, split_k=2, split_k2=2, swap_ab=True)
    kw = make_moe(9, 96, 64, 3, 2, dtype=torch.float16, seed=13, e_global=7)
    expert_map = torch.full((7,), -1, dtype=torch.int32)
    expert_map[torch.tensor([1, 4, 6])] = torch.arange(3, dtype=torch.int32)
    out, ref = run_both(kw, backend, expert_map=expert_map)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOLERANCE[torch.float16]


def test_split_k_nan_scale_stays_in_its_column(config):
    config(block_k=32, split_k=2, split_k2=2)
    kw = make_moe(4, 64, 64, 2, 2, dtype=torch.float32, seed=7)
    kw["topk_ids"] = torch.tensor([[0, 1]] * 4, dtype=torch.int32)
    kw["w2"].scales[0, 3, 1] = 255  # expert 0, output column 3, second K slice
    out = mxmoe.fused_experts(**kw, backend="triton_dequant")
    assert torch.isnan(out[:, 3]).all()
    assert torch.isfinite(out[:, :3]).all() and torch.isfinite(out[:, 4:]).all()


def test_k_slices_never_empty():
    from mxmoe.kernels.configs import MoEConfig
    from mxmoe.kernels.fused_moe import _k_slices

    for k in (32, 96, 160, 2880):
        for split in (1, 2, 3, 4, 7, 64):
            cfg = MoEConfig(block_k=64, split_k=split)
            slices, per = _k_slices(k, cfg)
            assert per % 64 == 0 and 1 <= slices <= split
            assert (slices - 1) * per < k <= slices * per  # every slice has a K tile
    with pytest.raises(ValueError, match="split_k"):
        MoEConfig(split_k=0)

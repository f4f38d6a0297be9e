"""The Triton kernels under the interpreter: never read outside their inputs, drop out-of-range
pairs, take strided inputs, pass NaN on, and match the reference at the edge sizes.

Every output buffer is NaN-poisoned (MXMOE_POISON=1), so an element never written fails.
Interpreter rules (tests/conftest.py): float16/float32 only, tiny shapes.

Out-of-bounds reads are caught without a sanitizer by canaries: the weights, activations and
biases are views into larger buffers whose extra experts, rows and columns hold NaN (scale byte
255 for the weights). A kernel that reads one unmasked element outside a view returns NaN.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from helpers import make_moe, rel_err
from mxmoe import Activation, MXFP4Tensor, fused_experts
from mxmoe.backends import get_backend
from mxmoe.constants import E8M0_NAN
from mxmoe.reference import fused_experts_reference
from mxmoe.validation import check_fused_experts_args

pytestmark = [
    pytest.mark.interpreter,
    # The interpreter's numpy warns on NaN and Inf arithmetic, which these tests do on purpose.
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

TRITON_BACKENDS = ["triton_dequant", "triton_scaled", "bf16"]
ALL_BACKENDS = ["torch", *TRITON_BACKENDS]
# Normalized max error. fp16: the kernel rounds the activation between the GEMMs and the output to fp16 (2**-11
# relative each); fp32: exact dot products, only the summation order differs. triton_scaled
# takes fp32 activations as bf16 operands (tl.dot_scaled has no fp32 operand): 2**-9.
TOLERANCE = {torch.float16: 1e-2, torch.float32: 1e-4}

# Tiles that do not divide the test sizes, so that every N and K tail is exercised: the
# interpreter's default tiles (block_n = block_k = 32) divide every multiple of 32.
TAIL_CONFIGS = {
    "plain": dict(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=1),
    "swap_ab": dict(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=1, swap_ab=True),
    "split_dot": dict(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=1,
                      split_dot=True),
}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("MXMOE_POISON", "1")


def tolerance(backend: str, dtype: torch.dtype) -> float:
    if backend == "triton_scaled" and dtype == torch.float32:
        # bf16 operands in both GEMMs (2**-9 relative each) and cancellation in the sums:
        # measured up to 1.1e-2 normalized; the tolerance of bf16 on the GPU.
        return 2e-2
    return TOLERANCE[dtype]


def reference(kw: dict) -> torch.Tensor:
    args = {k: v for k, v in kw.items() if k != "backend"}
    args["activation"] = Activation.parse(args.get("activation", "swigluoai"))
    return fused_experts_reference(**args)


def run_unchecked(backend: str, kw: dict, **bad) -> torch.Tensor:
    """Run a backend directly on `kw` with some arguments replaced after validation (the GPU
    path without MXMOE_VALIDATE, where the data is never read)."""
    call = check_fused_experts_args(
        kw["hidden_states"], kw["w13"], kw["w2"], kw["topk_weights"], kw["topk_ids"],
        w13_bias=kw.get("w13_bias"), w2_bias=kw.get("w2_bias"),
        activation=kw.get("activation", "swigluoai"), alpha=1.702, limit=7.0,
        expert_map=kw.get("expert_map"),
        apply_router_weight_on_input=kw.get("apply_router_weight_on_input", False),
    )
    return get_backend(backend).run(dataclasses.replace(call, **bad))


def split_map(e_global: int, e_local: int, seed: int) -> torch.Tensor:
    """An expert map: ``e_local`` random global experts are local (in random order), the rest -1."""
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(e_global, generator=g)[:e_local]
    expert_map = torch.full((e_global,), -1, dtype=torch.int32)
    expert_map[chosen] = torch.randperm(e_local, generator=g).to(torch.int32)
    return expert_map


# ---------------------------------------------------------------------------------------------
# Out-of-range ids and expert-map values: masked, contribute nothing
# ---------------------------------------------------------------------------------------------


def _out_of_range_problem(with_map: bool, id_dtype: torch.dtype):
    """A valid problem, the same with bad ids (and map values), and the pairs that are bad."""
    e_local, e_global = 4, 6 if with_map else 4
    kw = make_moe(7, 64, 32, e_local, 3, dtype=torch.float16, seed=3, e_global=e_global)
    kw["topk_ids"] = kw["topk_ids"].to(id_dtype)
    if with_map:
        kw["expert_map"] = split_map(e_global, e_local, seed=3).to(id_dtype)
    ids = kw["topk_ids"].clone()
    bad = torch.zeros_like(ids, dtype=torch.bool)
    wild = [e_global, -1, e_global + 100, -(2**31)]
    if id_dtype == torch.int64:
        # Would wrap onto a valid expert if narrowed to int32 before the range check.
        wild += [2**32 + 1, -(2**32) + 2]
    for n, value in enumerate(wild):
        m, j = divmod(2 * n + 1, 3)
        ids[m % 7, j] = value
        bad[m % 7, j] = True
    bad_map = None
    if with_map:
        # Global expert of slot (6, 0) mapped out of range: E_local and -5. Keep the id valid.
        bad_map = kw["expert_map"].clone()
        target = int(kw["topk_ids"][6, 0])
        bad_map[target] = e_local
        bad = bad | ((ids == target) & ~bad)
        second = int(kw["topk_ids"][5, 2])
        if second != target:
            bad_map[second] = -5
            bad = bad | ((ids == second) & ~bad)
    # The expected answer: the bad pairs routed to an extra, remote global expert instead.
    base = kw.get("expert_map", torch.arange(e_local, dtype=id_dtype))
    expected_map = torch.cat([base, torch.tensor([-1], dtype=id_dtype)])
    dropped = dict(kw, topk_ids=torch.where(bad, e_global, ids), expert_map=expected_map)
    return kw, ids, bad_map, dropped


@pytest.mark.parametrize("align_path", ["one_program", "multi_program"])
@pytest.mark.parametrize("id_dtype, with_map", [
    (torch.int32, True), (torch.int64, False), (torch.int64, True),
], ids=["int32 ids, expert map", "int64 ids", "int64 ids, expert map"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_out_of_range_pairs_are_dropped(backend, id_dtype, with_map, align_path, monkeypatch):
    if align_path == "multi_program":
        if backend == "torch":
            pytest.skip("the torch backend has no alignment")
        import mxmoe.kernels.align as fm

        monkeypatch.setattr(fm, "ALIGN_ONE_PROGRAM_MAX_PAIRS", 0)
    kw, bad_ids, bad_map, dropped = _out_of_range_problem(with_map, id_dtype)
    bad = {"topk_ids": bad_ids}
    if bad_map is not None:
        bad["expert_map"] = bad_map
    out = run_unchecked(backend, kw, **bad)
    expected = reference(dropped)
    assert rel_err(out, expected) <= tolerance(backend, torch.float16)


def test_out_of_range_ids_never_reach_the_torch_reference_unchecked():
    """The reference maps ids outside the expert map to -1 instead of indexing past it."""
    from mxmoe.reference import local_expert_ids

    expert_map = torch.tensor([1, -1, 0])
    ids = torch.tensor([[0, 3], [-1, 2], [2**40, 1]])
    assert local_expert_ids(ids, expert_map).tolist() == [[1, -1], [-1, 0], [-1, -1]]


# ---------------------------------------------------------------------------------------------
# Canaries: strided views into NaN-padded buffers; nothing outside a view is read
# ---------------------------------------------------------------------------------------------


def _nan_padded_mxfp4(w: MXFP4Tensor) -> MXFP4Tensor:
    """The same weights as a view into a buffer with a NaN expert before and after, NaN rows
    after each expert and NaN bytes after each row (scale 255, codes 0xFF)."""
    e, n, kb = w.blocks.shape
    ks = w.scales.shape[-1]
    blocks = torch.full((e + 2, n + 3, kb + 16), 0xFF, dtype=torch.uint8)
    scales = torch.full((e + 2, n + 3, ks + 1), E8M0_NAN, dtype=torch.uint8)
    blocks[1:e + 1, :n, :kb] = w.blocks
    scales[1:e + 1, :n, :ks] = w.scales
    return MXFP4Tensor(blocks[1:e + 1, :n, :kb], scales[1:e + 1, :n, :ks])


def _nan_padded(t: torch.Tensor) -> torch.Tensor:
    """The same 2-D tensor as a view into a NaN buffer with extra rows and columns around it."""
    rows, cols = t.shape
    buf = torch.full((rows + 3, cols + 40), float("nan"), dtype=t.dtype)
    buf[1:rows + 1, 8:cols + 8] = t
    return buf[1:rows + 1, 8:cols + 8]


@pytest.mark.parametrize("config", list(TAIL_CONFIGS), ids=list(TAIL_CONFIGS))
@pytest.mark.parametrize("backend", TRITON_BACKENDS)
def test_nothing_outside_the_inputs_is_read(backend, config, monkeypatch):
    if backend != "triton_dequant" and config == "split_dot":
        pytest.skip("split_dot is a strategy of triton_dequant only")
    monkeypatch.setenv("MXMOE_CONFIG", json.dumps(TAIL_CONFIGS[config]))
    # H = 96, I = 32 with 64-wide tiles: a tail in N and K of both GEMMs.
    kw = make_moe(7, 96, 32, 4, 2, dtype=torch.float16, seed=5)
    expected = reference(kw)
    padded = dict(
        kw,
        hidden_states=_nan_padded(kw["hidden_states"]),
        w13=_nan_padded_mxfp4(kw["w13"]),
        w2=_nan_padded_mxfp4(kw["w2"]),
        w13_bias=_nan_padded(kw["w13_bias"]),
        w2_bias=_nan_padded(kw["w2_bias"]),
    )
    assert not padded["w13"].blocks.is_contiguous()
    # Ids E (the NaN expert after the last) and -1 (the one before) must be masked, too.
    bad_ids = kw["topk_ids"].clone()
    bad_ids[0, 0], bad_ids[3, 1] = 4, -1
    dropped_ids = bad_ids.clone()
    dropped_ids[0, 0], dropped_ids[3, 1] = 4, 4
    expected_dropped = reference(dict(kw, topk_ids=dropped_ids,
                                      expert_map=torch.tensor([0, 1, 2, 3, -1])))

    out = fused_experts(**padded, backend=backend)
    assert rel_err(out, expected) <= 1e-2
    out = run_unchecked(backend, padded, topk_ids=bad_ids)
    assert rel_err(out, expected_dropped) <= 1e-2


# ---------------------------------------------------------------------------------------------
# Strided inputs: the same answer as contiguous ones
# ---------------------------------------------------------------------------------------------


def _strided(kw: dict) -> dict:
    """Every tensor argument as a non-contiguous view of the same values."""
    x = kw["hidden_states"]
    ids, weights = kw["topk_ids"], kw["topk_weights"]
    m, k = ids.shape
    wide_ids = torch.zeros(2 * m, k + 2, dtype=ids.dtype)
    wide_ids[::2, 1:k + 1] = ids
    wide_weights = torch.zeros(m, 3 * k, dtype=weights.dtype)
    wide_weights[:, ::3] = weights
    out = dict(
        kw,
        hidden_states=x.t().contiguous().t(),  # column-major
        topk_ids=wide_ids[::2, 1:k + 1],
        topk_weights=wide_weights[:, ::3],
        w13=_nan_padded_mxfp4(kw["w13"]),
        w2=_nan_padded_mxfp4(kw["w2"]),
        w13_bias=kw["w13_bias"].t().contiguous().t(),
    )
    if kw.get("expert_map") is not None:
        wide_map = torch.full((2 * kw["expert_map"].numel(),), 99, dtype=kw["expert_map"].dtype)
        wide_map[::2] = kw["expert_map"]
        out["expert_map"] = wide_map[::2]
    for name in ("hidden_states", "topk_ids", "topk_weights", "w13_bias"):
        assert not out[name].is_contiguous() or out[name].shape[1] == 1, name
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_strided_inputs(backend, dtype):
    kw = make_moe(5, 64, 32, 4, 2, dtype=dtype, seed=7, e_global=6)
    kw["expert_map"] = split_map(6, 4, seed=7)
    expected = reference(kw)
    out = fused_experts(**_strided(kw), backend=backend)
    assert rel_err(out, expected) <= tolerance(backend, dtype)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_top_1_column_sliced_from_wider_ids(backend):
    """``ids[:, :1]`` of a [M, 2] tensor: reshape(-1) of it is a view with stride 2, which a
    kernel indexing a flat array would misread."""
    kw = make_moe(5, 64, 32, 4, 1, dtype=torch.float16, seed=8)
    wide = torch.stack([kw["topk_ids"][:, 0], (kw["topk_ids"][:, 0] + 1) % 4], dim=1)
    assert wide[:, :1].reshape(-1).stride() == (2,)
    out = fused_experts(**dict(kw, topk_ids=wide[:, :1]), backend=backend)
    assert rel_err(out, reference(kw)) <= 1e-2


# ---------------------------------------------------------------------------------------------
# NaN and Inf propagate
# ---------------------------------------------------------------------------------------------


def _same_non_finite(out: torch.Tensor, expected: torch.Tensor) -> None:
    out = out.float()
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    assert torch.equal(torch.isinf(out), torch.isinf(expected))
    finite = torch.isfinite(expected)
    assert rel_err(out[finite], expected[finite]) <= 1e-2


@pytest.mark.parametrize("activation", ["swigluoai", "silu"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nan_scale_propagates(backend, activation):
    kw = make_moe(6, 64, 32, 4, 2, dtype=torch.float16, seed=9)
    kw["activation"] = activation
    w13 = MXFP4Tensor(kw["w13"].blocks.clone(), kw["w13"].scales.clone())
    w2 = MXFP4Tensor(kw["w2"].blocks.clone(), kw["w2"].scales.clone())
    e_a, e_b = int(kw["topk_ids"][0, 0]), int(kw["topk_ids"][1, 1])
    w13.scales[e_a, 3, 1] = E8M0_NAN  # an up row (swigluoai) / gate row (silu)
    w13.scales[e_a, 6, 0] = E8M0_NAN  # a gate row (swigluoai)
    w2.scales[e_b, 5, 0] = E8M0_NAN  # output column 5 of expert e_b
    kw.update(w13=w13, w2=w2)
    expected = reference(kw)
    assert torch.isnan(expected).any() and not torch.isnan(expected).all()
    _same_non_finite(fused_experts(**kw, backend=backend), expected)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nan_and_inf_activations_propagate(backend):
    kw = make_moe(6, 64, 32, 4, 2, dtype=torch.float16, seed=10)
    x = kw["hidden_states"].clone()
    x[1, 7] = float("nan")
    x[3, 0] = float("inf")
    x[4, 9] = float("-inf")
    kw["hidden_states"] = x
    expected = reference(kw)
    assert not torch.isfinite(expected[[1, 3, 4]]).all()
    assert torch.isfinite(expected[[0, 2, 5]]).all()
    _same_non_finite(fused_experts(**kw, backend=backend), expected)


# ---------------------------------------------------------------------------------------------
# Edge sizes
# ---------------------------------------------------------------------------------------------


EDGE_CASES = {
    "M = 0": dict(m=0, e=4, k=2),
    "M = 1": dict(m=1, e=4, k=2),
    "k = E": dict(m=5, e=3, k=3),
    "prime E, k = 1": dict(m=9, e=7, k=1),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("case", list(EDGE_CASES), ids=list(EDGE_CASES))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_edge_sizes(backend, case, dtype):
    c = EDGE_CASES[case]
    kw = make_moe(c["m"], 64, 32, c["e"], c["k"], dtype=dtype, seed=11)
    out = fused_experts(**kw, backend=backend)
    assert out.shape == (c["m"], 64) and out.dtype == dtype
    if c["m"]:
        assert rel_err(out, reference(kw)) <= tolerance(backend, dtype)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_experts_without_tokens(backend):
    """E = 7, every token on experts 5 and 2: five experts get no pair, two get many."""
    kw = make_moe(6, 64, 32, 7, 2, dtype=torch.float16, seed=12)
    kw["topk_ids"] = torch.tensor([[5, 2]] * 6, dtype=torch.int32)
    out = fused_experts(**kw, backend=backend)
    assert rel_err(out, reference(kw)) <= 1e-2


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
def test_every_expert_remote(backend):
    """All pairs on other ranks: the output is exactly zero (not NaN, not unwritten)."""
    kw = make_moe(4, 64, 32, 2, 2, dtype=torch.float16, seed=13, e_global=4)
    kw["expert_map"] = torch.tensor([-1, -1, -1, -1], dtype=torch.int32)
    out = fused_experts(**kw, backend=backend)
    assert torch.equal(out, torch.zeros_like(out))

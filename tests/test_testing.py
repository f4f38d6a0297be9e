"""`mxmoe.testing`: seeded random problems, the one relative error and its NaN rule, poison."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mxmoe.reference import fused_experts_reference
from mxmoe.testing import (poison_, poisoned, random_expert_map, random_moe, random_mxfp4,
                           relative_error, rms_error, seeded_generator)

ROOT = Path(__file__).resolve().parents[1]


def test_imports_without_pytest_or_triton():
    code = ("import sys; sys.modules['pytest'] = None; import mxmoe.testing; "
            "assert 'triton' not in sys.modules, 'triton imported'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                   env={"PYTHONPATH": str(ROOT / "src")}, timeout=120)


def test_random_moe_is_seeded_and_seeds_differ():
    a, b, c = (random_moe(5, 64, 32, 4, 2, seed=s) for s in (3, 3, 4))
    assert torch.equal(a.w13.blocks, b.w13.blocks) and torch.equal(a.hidden_states, b.hidden_states)
    assert not torch.equal(a.hidden_states, c.hidden_states)


def test_random_moe_shapes_dtypes_and_routing():
    p = random_moe(7, 96, 64, 5, 2, torch.float16, seed=1)
    assert p.hidden_states.shape == (7, 96) and p.hidden_states.dtype == torch.float16
    assert p.w13.shape == (5, 128, 96) and p.w2.shape == (5, 96, 64)
    assert p.w13_bias.shape == (5, 128) and p.w2_bias.dtype == torch.float16
    assert p.topk_ids.dtype == torch.int32 and p.topk_weights.dtype == torch.float32
    torch.testing.assert_close(p.topk_weights.sum(-1), torch.ones(7))
    assert p.expert_map is None
    ref = fused_experts_reference(**p.kwargs())  # the kwargs are the operator's
    assert ref.shape == (7, 96) and torch.isfinite(ref).all()


def test_random_moe_without_bias_draws_the_same_weights():
    with_bias, without = random_moe(3, 64, 32, 4, 2, seed=2), random_moe(3, 64, 32, 4, 2, seed=2,
                                                                         bias=False)
    assert without.w13_bias is None and without.w2_bias is None
    assert torch.equal(with_bias.w2.blocks, without.w2.blocks)
    assert torch.equal(with_bias.topk_ids, without.topk_ids)


def test_random_moe_expert_map_routes_over_global_experts():
    p = random_moe(40, 64, 32, 3, 2, seed=5, num_global_experts=9, with_expert_map=True)
    kw = p.kwargs(expert_map=True, activation=True)
    assert kw["activation"] == "swigluoai"
    emap = kw["expert_map"]
    assert emap.shape == (9,) and emap.dtype == torch.int32
    assert sorted(emap[emap >= 0].tolist()) == [0, 1, 2]
    assert int(p.topk_ids.max()) >= 3  # some pairs go to remote experts
    with pytest.raises(ValueError, match="num_global_experts"):
        random_moe(1, 64, 32, 4, 2, num_global_experts=3)


def test_random_expert_map_rejects_more_local_than_global():
    with pytest.raises(ValueError, match="num_local"):
        random_expert_map(3, 4, seeded_generator(0))


@pytest.mark.parametrize("quantized", [True, False], ids=["quantized", "bytes"])
def test_random_mxfp4_scale_keeps_outputs_order_one(quantized):
    w = random_mxfp4((4, 32, 512), seeded_generator(0), quantized=quantized)
    rms = w.dequantize().pow(2).mean().sqrt().item()
    assert 0.5 * 512**-0.5 < rms < 2 * 512**-0.5
    assert w.blocks.dtype == torch.uint8 and w.scales.shape == (4, 32, 16)


# --- the error and its NaN rule ------------------------------------------------------------------

def test_relative_error_is_max_over_max():
    ref = torch.tensor([1.0, -4.0, 2.0])
    assert relative_error(ref + torch.tensor([0.0, 0.0, 0.4]), ref) == pytest.approx(0.1)
    assert rms_error(ref, ref) == 0.0
    assert relative_error(torch.empty(0), torch.empty(0)) == 0.0


def test_nan_in_output_where_reference_is_finite_is_infinite_error():
    ref = torch.ones(4)
    out = ref.clone()
    out[2] = float("nan")
    assert relative_error(out, ref) == math.inf and rms_error(out, ref) == math.inf
    out[2] = float("inf")
    assert relative_error(out, ref) == math.inf


def test_nan_where_reference_is_nan_is_expected_and_left_out():
    ref = torch.tensor([1.0, float("nan"), 2.0])
    out = torch.tensor([1.0, float("nan"), 2.2])
    assert relative_error(out, ref) == pytest.approx(0.1)


def test_finite_output_where_reference_is_nan_hides_a_bad_weight():
    ref = torch.tensor([1.0, float("nan")])
    assert relative_error(torch.tensor([1.0, 0.0]), ref) == math.inf


def test_infinite_reference_must_be_matched():
    ref = torch.tensor([1.0, float("inf")])
    assert relative_error(torch.tensor([1.0, float("inf")]), ref) == 0.0
    assert relative_error(torch.tensor([1.0, 1e30]), ref) == math.inf


def test_relative_error_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="differ in shape"):
        relative_error(torch.ones(2, 3), torch.ones(3, 2))


# --- poison ----------------------------------------------------------------------------------------

def test_poison_fills_floats_with_nan_and_integers_with_their_largest_value():
    assert torch.isnan(poison_(torch.zeros(3, dtype=torch.float16))).all()
    assert (poison_(torch.zeros(2, dtype=torch.uint8)) == 255).all()  # E8M0 NaN scale
    assert (poisoned((2, 2), torch.int32) == 2**31 - 1).all()
    assert torch.isnan(poisoned((1,), torch.bfloat16)).all()

"""`layouts.scales_fold`: the data fact that lets the prefill GEMM fold 2**126 into the scale,
remembered per tensor version and part of every plan's key (CPU)."""

from __future__ import annotations

import torch

from mxmoe import MXFP4Tensor, plans
from mxmoe.layouts import FOLD_MAX_SCALE, scales_fold


def _scales(high: int) -> torch.Tensor:
    s = torch.full((3, 4, 2), 100, dtype=torch.uint8)
    s[1, 2, 1] = high
    return s


def test_fold_holds_exactly_up_to_the_bound():
    assert scales_fold(_scales(FOLD_MAX_SCALE))
    assert not scales_fold(_scales(FOLD_MAX_SCALE + 1))
    assert not scales_fold(_scales(255))  # NaN scales take the general conversion
    assert scales_fold(torch.empty(0, 1, dtype=torch.uint8))


def test_fold_is_remembered_and_asked_again_after_an_in_place_write():
    s = _scales(120)
    assert scales_fold(s)
    assert s._mxmoe_scales_fold == (s._version, True)
    s[0, 0, 0] = 200  # bumps the version counter
    assert not scales_fold(s)
    s.copy_(_scales(1))
    assert scales_fold(s)


def test_inference_tensors_are_answered_once():
    with torch.inference_mode():
        s = _scales(120)
    assert scales_fold(s)
    assert scales_fold(s)


def test_the_fold_fact_is_part_of_the_plan_key():
    blocks = torch.zeros(3, 4, 32, dtype=torch.uint8)
    x = torch.zeros(2, 64)
    ids = torch.zeros(2, 1, dtype=torch.int32)
    weights = torch.ones(2, 1)

    def key(high):
        w = MXFP4Tensor(blocks, _scales(high)).to_layout("mma_lanes")
        return plans.signature(x, w, w, weights, ids, None, None, "silu", 1.0, 7.0, None,
                               False, "auto")

    assert key(110) == key(128)
    assert key(110) != key(129)
    # Other layouts never look at the data.
    plain = MXFP4Tensor(blocks, _scales(200))
    plain_key = plans.signature(x, plain, plain, weights, ids, None, None, "silu", 1.0, 7.0,
                                None, False, "auto")
    assert not hasattr(plain.scales, "_mxmoe_scales_fold") and plain_key is not None

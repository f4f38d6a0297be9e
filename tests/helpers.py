"""Helpers for tests: thin names over `mxmoe.testing` (random problems, errors, expert maps)."""

from __future__ import annotations

import torch

from mxmoe.testing import random_expert_map, random_moe, relative_error, rms_error

__all__ = ["make_moe", "rel_err", "rms_err", "random_expert_map"]

#: Normalised max error with `mxmoe.testing`'s NaN rule.
rel_err = relative_error
#: Normalised RMS error, same rule.
rms_err = rms_error


def make_moe(m, h, i, e, k, *, dtype=torch.float32, device="cpu", seed=0, bias=True,
             e_global=None):
    """`fused_experts` keyword arguments of `mxmoe.testing.random_moe` (ids routed over
    ``e_global`` experts when given)."""
    return random_moe(m, h, i, e, k, dtype, device, seed=seed, bias=bias,
                      num_global_experts=e_global).kwargs()

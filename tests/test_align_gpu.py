"""The Triton alignments on the GPU at serving sizes, against the reference loop."""

from __future__ import annotations

import pytest
import torch

from helpers import random_expert_map
from mxmoe.routing import align_by_expert_reference

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("m, k, e, block_m, mapped", [
    (1, 4, 32, 16, False),
    (256, 4, 32, 16, False),  # 1024 pairs: the one-program kernel's largest
    (257, 4, 32, 32, False),  # the multi-program kernels' smallest
    (4096, 4, 128, 64, True),
    (16384, 4, 32, 128, False),
    (16384, 4, 128, 256, True),
    (40000, 8, 64, 128, False),  # 320000 pairs: 64 chunks of 5000
    (8, 8, 512, 16, False),  # 64 pairs, 1024 expert bins: the one-program kernel, 32 pairs a step
    (3000, 8, 1000, 16, False),  # 1024 bins: 32 pairs a step, 32 chunks of 768
])
def test_alignment_on_gpu_equals_reference(m, k, e, block_m, mapped):
    from mxmoe.kernels.align import align

    g = torch.Generator().manual_seed(m)
    ids = torch.randint(0, e, (m, k), generator=g, dtype=torch.int32)
    num_local, expert_map = e, None
    if mapped:
        num_local = e // 2 + 3
        expert_map = random_expert_map(e, num_local, g)
    got = align(ids.cuda(), block_m, num_local, e,
                expert_map.cuda() if expert_map is not None else None)
    want = align_by_expert_reference(ids, block_m, num_local, expert_map)
    used = int(want.num_tokens_post_padded)
    assert int(got.num_tokens_post_padded) == used
    assert torch.equal(got.sorted_ids.cpu()[:used], want.sorted_ids[:used])
    assert (got.sorted_ids.cpu()[used:] == m * k).all()
    blocks = used // block_m
    assert torch.equal(got.expert_ids.cpu()[:blocks], want.expert_ids[:blocks])
    assert (got.expert_ids.cpu()[blocks:] == -1).all()

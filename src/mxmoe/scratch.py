"""Who owns the scratch buffers of a planned call.

An eager call keeps its plan's workspace, one per CUDA stream, from call to call (no
allocation a call). Inside the ``mxmoe::fused_experts`` operator, which is how torch.compile runs
the experts, every buffer is made fresh for the call instead: torch.compile's CUDA-graph trees
(``mode="reduce-overhead"``, transformers' static-cache decode) run the graph's first calls
eagerly with allocations going to the graph's private pool, and reject a pool tensor that stays
alive outside the graph's outputs. `is_current_stream_capturing` does not tell those runs apart
from plain eager ones, so the operator says so itself (`fresh_per_call`).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

__all__ = ["kept", "fresh_per_call"]

_local = threading.local()


def kept() -> bool:
    """Whether a plan may keep its workspace past this call (False inside the operator)."""
    return not getattr(_local, "fresh", 0)


@contextmanager
def fresh_per_call():
    """Within: planned calls allocate their scratch for the call and keep none."""
    _local.fresh = getattr(_local, "fresh", 0) + 1
    try:
        yield
    finally:
        _local.fresh -= 1

"""Kernel configurations: tuned tables shipped with the package, and heuristics otherwise.

A table (``configs/<device-slug>.json``) maps a problem (hidden, intermediate, experts, top_k)
and an M bucket to a config; lookups take the nearest M. Devices without a table get
`heuristic_config`.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

_TABLE_DIR = Path(__file__).with_name("configs")


@dataclass(frozen=True)
class MoEConfig:
    """Block sizes and launch parameters for both GEMMs of one fused-MoE call."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3
    split_dot: bool = False  # dequant strategy: two half-dots (True) or one interleaved dot
    swap_ab: bool = False  # compute C^T = W X^T (weights as the dot's left operand)
    # K slices of GEMM1, each its own program (decode: more programs than experts x N tiles);
    # > 1 moves the activation into its own small kernel.
    split_k: int = 1
    # GEMM2 may use its own N/K tiles and split (same block_m: the alignment is shared).
    block_n2: int | None = None
    block_k2: int | None = None
    num_warps2: int | None = None
    num_stages2: int | None = None
    split_k2: int | None = None

    def __post_init__(self):
        for name in ("split_k", "split_k2"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"MoEConfig.{name} must be a positive int, got {value!r}")

    def gemm2(self) -> "MoEConfig":
        return MoEConfig(
            block_m=self.block_m,
            block_n=self.block_n2 or self.block_n,
            block_k=self.block_k2 or self.block_k,
            num_warps=self.num_warps2 or self.num_warps,
            num_stages=self.num_stages2 or self.num_stages,
            split_dot=self.split_dot,
            swap_ab=self.swap_ab,
            split_k=self.split_k2 or self.split_k,
        )

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def heuristic_config(num_tokens: int, top_k: int, num_experts: int, interpret: bool) -> MoEConfig:
    """A sound default when no table covers the problem."""
    if interpret:
        # The interpreter's cost grows with programs x loop trips: few, small tiles.
        return MoEConfig(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=1)
    # The gpt-oss-20b configs tuned on the H100 with the PTX conversion (benchmarks/NOTES.md),
    # by pairs per expert: decode keeps W as the dot's right operand with narrow N tiles;
    # swap-AB pays from a few dozen pairs per expert.
    pairs_per_expert = num_tokens * top_k / max(num_experts, 1)
    if pairs_per_expert <= 16:
        return MoEConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=3)
    if pairs_per_expert <= 64:
        return MoEConfig(block_m=32, block_n=64, block_k=64, num_warps=4, num_stages=4,
                         swap_ab=True)
    if pairs_per_expert <= 256:
        return MoEConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=3)
    return MoEConfig(block_m=128, block_n=64, block_k=64, num_warps=4, num_stages=3,
                     swap_ab=True, block_n2=128)


@functools.lru_cache(maxsize=None)
def _load_table(slug: str) -> dict:
    path = _TABLE_DIR / f"{slug}.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _problem_key(hidden: int, inter: int, num_experts: int, top_k: int) -> str:
    return f"H{hidden}_I{inter}_E{num_experts}_k{top_k}"


#: A tuned entry stands for problems whose pairs per expert are within this factor of its own.
_NEAREST_FACTOR = 2.0


def lookup(device_name: str, mode: str, num_tokens: int, hidden: int, inter: int,
           num_experts: int, top_k: int) -> MoEConfig | None:
    """The tuned config nearest in pairs per expert (M * k / E, what sets the M tile), or None.

    Candidates are the entries of this exact problem and of the same H, I and k with another E
    (the per-expert GEMMs are the same shape: gpt-oss-120b's M = 2048 has the pairs per expert
    of gpt-oss-20b's M = 512). The nearest wins; on a tie, this exact problem's entry. An
    entry more than a factor of 2 away is not used: the heuristics are a better guess than a
    tile tuned for another regime (measured: 120b's M = 1024 entry at M = 16384 ran 2.2x slower
    than 20b's tuned prefill config).
    """
    configs_of_mode = _load_table(device_slug(device_name)).get("configs", {}).get(mode, {})
    wanted = num_tokens * top_k / max(num_experts, 1)
    exact = _problem_key(hidden, inter, num_experts, top_k)
    best = None
    for key, entries in configs_of_mode.items():
        if not (key == exact or (key.startswith(f"H{hidden}_I{inter}_")
                                 and key.endswith(f"_k{top_k}"))):
            continue
        experts = int(key.split("_E")[1].split("_")[0])
        for m, entry in entries.items():
            rank = (_log_ratio(int(m) * top_k / experts, wanted), key != exact, key, int(m))
            if best is None or rank < best[0]:
                best = (rank, entry)
    if best is None or best[0][0] > math.log(_NEAREST_FACTOR) + 1e-9:
        return None
    return MoEConfig(**best[1])


def _log_ratio(a: float, b: float) -> float:
    return abs(math.log(max(a, 1e-9) / max(b, 1e-9)))


def preferred_backend(device_name: str, num_tokens: int, hidden: int, inter: int,
                      num_experts: int, top_k: int) -> str | None:
    """The fastest packed backend for this size class according to the tuned table, or None."""
    table = _load_table(device_slug(device_name))
    entries = table.get("fastest", {}).get(_problem_key(hidden, inter, num_experts, top_k))
    if not entries:
        return None
    nearest = min(entries, key=lambda m: abs(int(m) - num_tokens))
    return entries[nearest]

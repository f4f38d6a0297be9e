"""Kernel configurations: which tiles and schedule a fused-MoE call launches with.

`select(backend, device_facts, M, H, I, E, k)` is what the call path asks. It answers, in order:

1. the **user cache** (``tuned.json`` in ``~/.cache/mxmoe`` or ``$MXMOE_CACHE_DIR``, written by
   `mxmoe tune` and first-use tuning; see `mxmoe.tuning_cache`);
2. the **shipped table of this exact device** (``configs/<device-slug>.json``);
3. a shipped table of the **same architecture family** (the same compute capability, e.g. any
   sm_90 part: an H200 borrows the H100's table), the nearest in SM count;
4. **heuristics derived from the tuned data**: the tuned config nearest in (pairs per expert,
   N, K), fitted to this problem's N and K (`derived_config`); `heuristic_config` when there
   is no tuned data at all.

In a table, a problem (hidden, intermediate, experts, top_k) and an M map to a config; a lookup
takes the entry nearest in pairs per expert (`lookup`). Tables are keyed by backend name
(``triton_dequant``, ``triton_scaled``, ``bf16``); the first tables, keyed by kernel mode
(``dequant``, ...), are still read. Answers are memoised per (backend, device, problem, size
class: M rounded to the nearest power of two), so a repeated call costs a dict lookup.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..devices import device_slug, family
from ..settings import DeviceFacts

_TABLE_DIR = Path(__file__).with_name("configs")
#: The format of a shipped table written today (the first tables have no "format" key).
TABLE_FORMAT = 2
#: Kernel mode names of the first tables -> backend names.
_LEGACY_MODES = {"dequant": "triton_dequant", "scaled": "triton_scaled", "dense": "bf16"}


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


__all__ = ["MoEConfig", "Selection", "clear_memo", "derived_config", "device_slug",
           "explain", "fastest_backend", "heuristic_config", "lookup", "preferred_backend", "select", "size_class"]


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


def backend_name(name: str) -> str:
    """A backend name, also for the kernel mode names of the first tables ("dequant")."""
    return _LEGACY_MODES.get(name, name)


@functools.lru_cache(maxsize=None)
def _load_table(slug: str) -> dict:
    """The shipped table of ``slug`` with its configs keyed by backend name; {} if none."""
    path = _TABLE_DIR / f"{slug}.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        _damaged_table(path, f"{type(exc).__name__}: {exc}")
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("configs") or {}, dict):
        _damaged_table(path, "not a table of configs")
        return {}
    configs = {backend_name(name): entries
               for name, entries in (data.get("configs") or {}).items()}
    return {**data, "configs": configs, "fastest": data.get("fastest") or {}}


def _damaged_table(path, why: str) -> None:
    # Once a process per table (`_load_table` is memoised): its device takes the other lookups.
    warnings.warn(f"mxmoe: the shipped config table {path} is damaged ({why}); it is ignored "
                  f"and the lookup goes on without it", RuntimeWarning, stacklevel=3)


@functools.lru_cache(maxsize=None)
def _shipped_slugs() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in _TABLE_DIR.glob("*.json")))


def _problem_key(hidden: int, inter: int, num_experts: int, top_k: int) -> str:
    return f"H{hidden}_I{inter}_E{num_experts}_k{top_k}"


def _parse_problem_key(key: str) -> tuple[int, int, int, int] | None:
    try:
        h, i, e, k = key.split("_")
        return int(h[1:]), int(i[1:]), int(e[1:]), int(k[1:])
    except ValueError:
        return None


#: A tuned entry stands for problems whose pairs per expert are within this factor of its own.
_NEAREST_FACTOR = 2.0


def lookup(device_name: str, mode: str, num_tokens: int, hidden: int, inter: int,
           num_experts: int, top_k: int) -> MoEConfig | None:
    """The shipped table's config nearest in pairs per expert (M * k / E), or None.

    ``mode`` is a backend name (or a first-table mode name). See `_nearest` for which entries
    stand for a problem.
    """
    table = _load_table(device_slug(device_name))
    return _nearest(table.get("configs", {}).get(backend_name(mode), {}), num_tokens, hidden,
                    inter, num_experts, top_k)


def _nearest(configs_of_backend: dict, num_tokens: int, hidden: int, inter: int,
             num_experts: int, top_k: int) -> MoEConfig | None:
    """The tuned config nearest in pairs per expert (what sets the M tile), or None.

    Candidates are the entries of this exact problem and of the same H, I and k with another E
    (the per-expert GEMMs are the same shape: gpt-oss-120b's M = 2048 has the pairs per expert
    of gpt-oss-20b's M = 512). The nearest wins; on a tie, this exact problem's entry. An
    entry more than a factor of 2 away is not used: the heuristics are a better guess than a
    tile tuned for another regime (measured: 120b's M = 1024 entry at M = 16384 ran 2.2x slower
    than 20b's tuned prefill config).
    """
    wanted = num_tokens * top_k / max(num_experts, 1)
    exact = _problem_key(hidden, inter, num_experts, top_k)
    best = None
    for key, entries in configs_of_backend.items():
        shape = _parse_problem_key(key)
        if shape is None or (shape[0], shape[1], shape[3]) != (hidden, inter, top_k):
            continue
        experts = shape[2]
        for m, entry in (entries.items() if isinstance(entries, dict) else ()):
            cfg = _config_or_none(entry)
            if cfg is None or not str(m).isdigit():
                continue  # a damaged entry of a hand-edited cache is skipped, not fatal
            rank = (_log_ratio(int(m) * top_k / experts, wanted), key != exact, key, int(m))
            if best is None or rank < best[0]:
                best = (rank, cfg)
    if best is None or best[0][0] > math.log(_NEAREST_FACTOR) + 1e-9:
        return None
    return best[1]


def _config_or_none(entry) -> MoEConfig | None:
    try:
        return MoEConfig(**entry)
    except (TypeError, ValueError):
        return None


def _log_ratio(a: float, b: float) -> float:
    return abs(math.log(max(a, 1e-9) / max(b, 1e-9)))


def preferred_backend(device_name: str, num_tokens: int, hidden: int, inter: int,
                      num_experts: int, top_k: int) -> str | None:
    """The fastest packed backend for this size class according to the tuned table, or None."""
    table = _load_table(device_slug(device_name))
    return _fastest(table, num_tokens, hidden, inter, num_experts, top_k)


def _fastest(table: dict, num_tokens, hidden, inter, num_experts, top_k) -> str | None:
    entries = table.get("fastest", {}).get(_problem_key(hidden, inter, num_experts, top_k))
    if not entries:
        return None
    nearest = min(entries, key=lambda m: abs(int(m) - num_tokens))
    return entries[nearest]


# --------------------------------------------------------------------------- select


@dataclass(frozen=True)
class Selection:
    """A config and where it came from (for `mxmoe info`, benchmarks and tests)."""

    config: MoEConfig
    #: "user cache", "table", "family table", "derived" or "heuristic".
    source: str
    #: Which table, and for a family table what it was tuned on ("nvidia-h100-80gb-hbm3: sm_90,
    #: 132 SMs, 3.0 TB/s copy").
    detail: str = ""


def size_class(num_tokens: int) -> int:
    """M rounded to the nearest power of two (in log scale): the M a selection is made for."""
    m = max(int(num_tokens), 1)
    low = 1 << (m.bit_length() - 1)
    return low * 2 if m * m > 2 * low * low else low


_MEMO: dict[tuple, MoEConfig] = {}


def select(backend: str, device_facts: DeviceFacts | None, num_tokens: int, hidden: int,
           intermediate: int, num_experts: int, top_k: int, *,
           interpret: bool = False) -> MoEConfig:
    """The config for one call (see the module docstring for the order). Memoised per
    (backend, device, problem, `size_class`): a repeated call costs one dict lookup.

    Args:
        device_facts: `mxmoe.settings.device_facts(device)`; None or a CPU device: the
            heuristics.
        interpret: Triton runs under its interpreter (few, small tiles).
    """
    key = (backend, device_facts, hidden, intermediate, num_experts, top_k,
           size_class(num_tokens), interpret)
    found = _MEMO.get(key)
    if found is None:
        found = _MEMO[key] = explain(backend, device_facts, num_tokens, hidden, intermediate,
                                     num_experts, top_k, interpret=interpret).config
    return found


def clear_memo() -> None:
    """Forget `select`'s answers and the tables read (after a table or the cache changed)."""
    _MEMO.clear()
    _load_table.cache_clear()
    _shipped_slugs.cache_clear()


def explain(backend: str, device_facts: DeviceFacts | None, num_tokens: int, hidden: int,
            intermediate: int, num_experts: int, top_k: int, *,
            interpret: bool = False) -> Selection:
    """`select`'s answer with its source, computed afresh (for M = `size_class` of M)."""
    from .. import tuning_cache

    backend = backend_name(backend)
    m = size_class(num_tokens)
    shape = (m, hidden, intermediate, num_experts, top_k)
    if interpret or device_facts is None or device_facts.type != "cuda":
        return Selection(heuristic_config(m, top_k, num_experts, interpret), "heuristic")
    user = tuning_cache.table(device_facts)
    found = _nearest(user["configs"].get(backend, {}), *shape)
    if found is not None:
        return Selection(found, "user cache", str(tuning_cache.path()))
    slug = device_slug(device_facts.name)
    own = _load_table(slug)
    found = _nearest(own.get("configs", {}).get(backend, {}), *shape)
    if found is not None:
        return Selection(found, "table", slug + _staleness(own))
    family = _family_tables(device_facts)
    for slug, table in family:
        found = _nearest(table["configs"].get(backend, {}), *shape)
        if found is not None:
            return Selection(found, "family table", _describe(slug, table) + _staleness(table))
    # This device's own table lends its points too (it has none for this shape, but its other
    # shapes are the nearest evidence), then its family's; without a family, every table.
    points = _tuned_points(backend, [user, own] + [t for _, t in family] if family else
                           [user] + [_load_table(s) for s in _shipped_slugs()])
    if points:
        cfg = derived_config(points, *shape, sm_count=device_facts.sm_count)
        return Selection(cfg, "derived", f"from {len(points)} tuned points")
    return Selection(heuristic_config(m, top_k, num_experts, False), "heuristic")


def fastest_backend(device_facts: DeviceFacts | None, num_tokens: int, hidden: int,
                    intermediate: int, num_experts: int, top_k: int) -> str | None:
    """Which backend the tuned data calls fastest for this size class, or None: the user
    cache, then this device's table, then its family's (what `backend="auto"` may prefer)."""
    if device_facts is None or device_facts.type != "cuda":
        return None
    from .. import tuning_cache

    shape = (size_class(num_tokens), hidden, intermediate, num_experts, top_k)
    tables = [tuning_cache.table(device_facts), _load_table(device_slug(device_facts.name))]
    for table in tables + [t for _, t in _family_tables(device_facts)]:
        found = _fastest(table, *shape)
        if found is not None:
            return backend_name(found)
    return None


def _family_tables(facts: DeviceFacts) -> list[tuple[str, dict]]:
    """Shipped tables of other devices with this compute capability, nearest SM count first."""
    if family(facts.capability) is None:
        return []
    own, found = device_slug(facts.name), []
    for slug in _shipped_slugs():
        table = _load_table(slug)
        capability = table.get("capability")
        if slug != own and capability and tuple(capability) == tuple(facts.capability):
            sms = table.get("sm_count") or 0
            found.append((abs(sms - facts.sm_count), slug, table))
    return [(slug, table) for _, slug, table in sorted(found, key=lambda t: t[:2])]


def current_kernel_sources() -> str:
    """The digest of the kernels' sources that tuned configs are valid for (the user cache's
    key holds it; a shipped table records it as ``kernel_sources`` when `mxmoe tune` writes
    it)."""
    from ..cache import source_digest
    from ..tuning_cache import TUNED_SOURCES

    return source_digest(TUNED_SOURCES, (".py",))


def _staleness(table: dict) -> str:
    """A note for a shipped table tuned on other kernel sources than these (or not saying)."""
    if table.get("kernel_sources") == current_kernel_sources():
        return ""
    return ("; tuned for other kernel sources than these (retune: mxmoe tune "
            "--write-shipped-table)")


def _describe(slug: str, table: dict) -> str:
    parts = [family(tuple(table.get("capability") or ())) or "unknown family"]
    if table.get("sm_count"):
        parts.append(f"{table['sm_count']} SMs")
    if table.get("copy_tb_s"):
        parts.append(f"{table['copy_tb_s']} TB/s copy")
    return f"{slug}: tuned on {', '.join(parts)}"


# --------------------------------------------------------------------------- derived heuristics


@dataclass(frozen=True)
class TunedPoint:
    """One tuned entry as a point: (pairs per expert, GEMM1 N = 2I, K = H) -> config."""

    pairs_per_expert: float
    n: int
    k: int
    config: MoEConfig
    #: The tuned problem's experts and top-k: on a tie, a point of this very problem wins.
    num_experts: int = 0
    top_k: int = 0


def _tuned_points(backend: str, tables: list[dict]) -> list[TunedPoint]:
    points = []
    for table in tables:
        for key, entries in table.get("configs", {}).get(backend, {}).items():
            shape = _parse_problem_key(key)
            if shape is None:
                continue
            h, i, e, k = shape
            for m, entry in (entries.items() if isinstance(entries, dict) else ()):
                cfg = _config_or_none(entry)
                if cfg is not None and str(m).isdigit():
                    points.append(TunedPoint(int(m) * k / e, 2 * i, h, cfg, e, k))
    return points


#: In the distance between problems, a factor 2 in N or K counts as much as this factor in
#: pairs per expert (which sets the M tile and whether weights are the dot's left operand).
_SHAPE_WEIGHT = 0.5
#: Below this many programs per SM, GEMM1 is split along K (decode of a few narrow experts).
_MIN_PROGRAMS_PER_SM = 1.0


def derived_config(points: list[TunedPoint], num_tokens: int, hidden: int, intermediate: int,
                   num_experts: int, top_k: int, *, sm_count: int) -> MoEConfig:
    """A config for an untuned problem, from the tuned points: the one nearest in
    (log pairs per expert, log N, log K), fitted to this problem.

    Fitting keeps the tuned tile and schedule where they fit and changes only what the shape
    forces: N and K tiles no wider than the (power-of-two padded) N and K of each GEMM, and a
    split along K of GEMM1 when the grid would leave SMs idle (few experts x N tiles at decode)
    and K is long enough to split.
    """
    pairs = num_tokens * top_k / max(num_experts, 1)
    n1, k1 = 2 * intermediate, hidden

    def distance(p: TunedPoint) -> float:
        return (_log_ratio(p.pairs_per_expert, pairs)
                + _SHAPE_WEIGHT * (abs(math.log2(p.n / n1)) + abs(math.log2(p.k / k1))))

    def rank(p: TunedPoint):
        other_problem = (p.num_experts, p.top_k) != (num_experts, top_k)
        return (round(distance(p), 9), other_problem, p.pairs_per_expert, p.n, p.k)

    base = min(points, key=rank).config
    return fit_config(base, num_tokens, hidden, intermediate, num_experts, top_k,
                      sm_count=sm_count)


def fit_config(cfg: MoEConfig, num_tokens: int, hidden: int, intermediate: int,
               num_experts: int, top_k: int, *, sm_count: int) -> MoEConfig:
    """``cfg`` with tiles no wider than the problem and GEMM1 split along K if SMs sit idle."""
    n1, k1, n2, k2 = 2 * intermediate, hidden, hidden, intermediate
    g2 = cfg.gemm2()
    fitted = replace(
        cfg,
        block_n=min(cfg.block_n, _pow2_at_least(n1, 16)),
        block_k=min(cfg.block_k, _pow2_at_least(k1, 32)),
        block_n2=min(g2.block_n, _pow2_at_least(n2, 16)),
        block_k2=min(g2.block_k, _pow2_at_least(k2, 32)),
    )
    if cfg.split_k == 1 and cfg.split_k2 in (None, 1):
        pairs = num_tokens * top_k
        row_tiles = min(num_experts, pairs) + pairs // fitted.block_m
        programs = row_tiles * math.ceil(n1 / fitted.block_n)
        split = 1
        while (programs * split < _MIN_PROGRAMS_PER_SM * sm_count and split < 4
               and k1 // (2 * split) >= 2 * fitted.block_k):
            split *= 2
        if split > 1:
            fitted = replace(fitted, split_k=split, split_k2=1)
    if fitted.block_n2 == fitted.block_n and cfg.block_n2 is None:
        fitted = replace(fitted, block_n2=None)
    if fitted.block_k2 == fitted.block_k and cfg.block_k2 is None:
        fitted = replace(fitted, block_k2=None)
    return fitted


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, 1 << max(int(n) - 1, 0).bit_length())

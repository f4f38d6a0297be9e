"""Helpers for testing and measuring mxmoe: random MoE problems, one relative error, poisoned
buffers. Used by the tests, `mxmoe check`, `mxmoe tune`, `mxmoe bench` and the backend probe.

Importable without pytest and without Triton (torch and mxmoe's pure-torch modules only).

- `random_moe`: a seeded random problem (MXFP4 weights, optional biases, routing, optional
  expert map, any dtype and device), as the keyword arguments of `fused_experts`.
- `random_mxfp4`: random MXFP4 weights, quantized from a float tensor or made directly as bytes
  (cheap at gpt-oss-120b size).
- `relative_error` / `rms_error`: the error of an output against the reference, with one NaN
  rule (below).
- `poison_` / `poisoned`: buffers filled with a value no correct kernel writes there.

The NaN rule of `relative_error` and `rms_error`, element by element: where the reference is
finite, a NaN or an infinity in the output is an infinite error; where the reference is NaN
(a NaN weight scale or activation propagates), the output must be NaN too (a finite value there
hides a bad weight: infinite error), and the element is left out of the norms; where the
reference is infinite, the output must equal it. The norms are taken over the finite reference
elements only, so one NaN row does not make the error of the others unmeasurable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "RandomMoE",
    "random_moe",
    "random_mxfp4",
    "random_expert_map",
    "seeded_generator",
    "relative_error",
    "rms_error",
    "poison_",
    "poisoned",
]


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The one generator a random problem draws from. On the CPU (the default) a seed gives the
    same numbers whichever device the problem is moved to."""
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


# --------------------------------------------------------------------------- random problems

def _e2m1_rms() -> float:
    from .constants import F4_E2M1_VALUES

    return math.sqrt(sum(v * v for v in F4_E2M1_VALUES) / len(F4_E2M1_VALUES))


def random_mxfp4(shape: tuple[int, ...], generator: torch.Generator,
                 device: torch.device | str | None = None, *, quantized: bool = True):
    """Random MXFP4 weights of logical shape ``[..., K]`` whose values have an RMS of about
    ``K**-0.5`` (so a layer's outputs stay O(1)).

    ``quantized=True``: Gaussian values drawn on the generator's device, moved to ``device``
    and quantized there with `quantize_mxfp4` (the OCP rule). ``quantized=False``: the packed
    bytes drawn directly, every code equally likely, each block's scale within a factor 2 of the
    one that gives that RMS; no float tensor is ever made, so gpt-oss-120b's 2.1 G weights are
    cheap on any device (the bytes are drawn on the generator's device).
    """
    from .constants import E8M0_EXPONENT_BIAS, MXFP4_BLOCK_SIZE
    from .format import MXFP4Tensor, quantize_mxfp4

    *lead, k = shape
    device = torch.device(device) if device is not None else generator.device
    if quantized:
        values = torch.randn(*shape, generator=generator, device=generator.device) * k**-0.5
        return quantize_mxfp4(values.to(device))
    center = E8M0_EXPONENT_BIAS + round(math.log2(1.0 / (_e2m1_rms() * math.sqrt(k))))
    blocks = torch.randint(0, 256, (*lead, k // 2), dtype=torch.uint8, device=generator.device,
                           generator=generator)
    scales = torch.randint(center - 1, center + 2, (*lead, k // MXFP4_BLOCK_SIZE),
                           dtype=torch.uint8, device=generator.device, generator=generator)
    return MXFP4Tensor(blocks.to(device), scales.to(device))


def random_expert_map(num_global: int, num_local: int, generator: torch.Generator) -> torch.Tensor:
    """int32 ``[num_global]`` expert map: ``num_local`` random global experts numbered
    0..num_local-1, the others remote (-1). On the generator's device."""
    if not 0 <= num_local <= num_global:
        raise ValueError(f"random_expert_map: num_local must be in [0, num_global={num_global}], "
                         f"got {num_local}")
    device = generator.device
    expert_map = torch.full((num_global,), -1, dtype=torch.int32, device=device)
    chosen = torch.randperm(num_global, generator=generator, device=device)[:num_local]
    expert_map[chosen] = torch.arange(num_local, dtype=torch.int32, device=device)
    return expert_map


@dataclass
class RandomMoE:
    """A random MoE problem: the arguments of `fused_experts` (and of the reference)."""

    hidden_states: torch.Tensor  # [M, H] dtype
    w13: object  # MXFP4Tensor [E, 2I, H]
    w2: object  # MXFP4Tensor [E, H, I]
    topk_weights: torch.Tensor  # [M, k] float32
    topk_ids: torch.Tensor  # [M, k] int32, in [0, E_global)
    w13_bias: torch.Tensor | None  # [E, 2I] dtype
    w2_bias: torch.Tensor | None  # [E, H] dtype
    expert_map: torch.Tensor | None = None  # [E_global] int32
    activation: str = "swigluoai"

    def kwargs(self, *, activation: bool = False, expert_map: bool = False) -> dict:
        """``fused_experts(**p.kwargs())``: the tensors by keyword; ``activation`` and
        ``expert_map`` added when asked for (some callers pass their own)."""
        out = dict(hidden_states=self.hidden_states, w13=self.w13, w2=self.w2,
                   topk_weights=self.topk_weights, topk_ids=self.topk_ids,
                   w13_bias=self.w13_bias, w2_bias=self.w2_bias)
        if activation:
            out["activation"] = self.activation
        if expert_map:
            out["expert_map"] = self.expert_map
        return out


def random_moe(num_tokens: int, hidden: int, inter: int, num_experts: int, top_k: int,
               dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", *,
               seed: int = 0, bias: bool = True, activation: str = "swigluoai",
               num_global_experts: int | None = None, with_expert_map: bool = False,
               ) -> RandomMoE:
    """A seeded random MoE problem: M = ``num_tokens`` tokens of width H = ``hidden``, E =
    ``num_experts`` local experts of intermediate size I = ``inter``, ``top_k`` experts a token.

    Everything is drawn from one CPU generator (`seeded_generator(seed)`), in this order: w13,
    w2, router logits, activations, biases, expert map; then moved to ``device`` (the weights
    quantized there). The routing is `mxmoe.route` (softmax over the top-k logits) of random
    logits over ``num_global_experts`` (default E) experts, computed on the CPU. With
    ``with_expert_map`` an expert map picks which E of the global experts are local (the
    routed ids then include remote experts). ``activation`` is recorded, not used: the weights
    are random, so either w13 row layout (interleaved or halves) fits them.
    """
    from .router import route

    device = torch.device(device)
    e_global = num_global_experts or num_experts
    if e_global < num_experts:
        raise ValueError(f"random_moe: num_global_experts ({e_global}) must be >= num_experts "
                         f"({num_experts})")
    g = seeded_generator(seed)
    w13 = random_mxfp4((num_experts, 2 * inter, hidden), g, device)
    w2 = random_mxfp4((num_experts, hidden, inter), g, device)
    topk_weights, topk_ids = route(torch.randn(num_tokens, e_global, generator=g), top_k)
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    b13 = b2 = None
    if bias:
        b13 = (torch.randn(num_experts, 2 * inter, generator=g) * 0.1).to(dtype).to(device)
        b2 = (torch.randn(num_experts, hidden, generator=g) * 0.1).to(dtype).to(device)
    expert_map = random_expert_map(e_global, num_experts, g).to(device) if with_expert_map else None
    return RandomMoE(hidden_states=x.to(device), w13=w13, w2=w2,
                     topk_weights=topk_weights.to(device), topk_ids=topk_ids.to(device),
                     w13_bias=b13, w2_bias=b2, expert_map=expert_map, activation=activation)


# --------------------------------------------------------------------------- errors

def _normalised_error(out: torch.Tensor, ref: torch.Tensor, norm) -> float:
    """``norm(out - ref) / norm(ref)`` in float64 over the elements where the reference is
    finite, or ``inf`` where the NaN rule (module docstring) is broken."""
    if out.shape != ref.shape:
        raise ValueError(f"relative_error: out {tuple(out.shape)} and ref {tuple(ref.shape)} "
                         f"differ in shape")
    out, ref = out.detach().double(), ref.detach().to(out.device).double()
    finite = torch.isfinite(ref)
    bad = (finite & ~torch.isfinite(out)) | (torch.isnan(ref) & ~torch.isnan(out))
    bad |= torch.isinf(ref) & (out != ref)
    if bool(bad.any()):
        return math.inf
    out, ref = out[finite], ref[finite]
    if ref.numel() == 0:
        return 0.0
    return float(norm(out - ref) / norm(ref).clamp_min(1e-30))


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Normalised max error ``max |out - ref| / max |ref|`` over the elements where the
    reference is finite; ``inf`` where the module's NaN rule is broken (NaN or Inf in the
    output where the reference is finite, a finite output where the reference is NaN).
    0.0 for empty tensors; the denominator is at least 1e-30."""
    return _normalised_error(out, ref, lambda t: t.abs().max())


def rms_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Normalised RMS error ``||out - ref|| / ||ref||``, same NaN rule as `relative_error`."""
    return _normalised_error(out, ref, torch.linalg.vector_norm)


# --------------------------------------------------------------------------- poisoned buffers

def _poison_value(dtype: torch.dtype):
    if dtype.is_floating_point or dtype.is_complex:
        return float("nan")
    if dtype == torch.bool:
        return True
    # The largest value: for uint8 that is 255, the E8M0 NaN scale; for ids, out of range.
    return torch.iinfo(dtype).max


def poison_(tensor: torch.Tensor) -> torch.Tensor:
    """Fill ``tensor`` in place with a value no correct kernel leaves there (NaN for floats,
    the dtype's largest value for integers) and return it, so an element never written shows."""
    return tensor.fill_(_poison_value(tensor.dtype))


def poisoned(shape, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """A new poisoned buffer: `torch.empty` filled as `poison_` fills."""
    return torch.full(tuple(shape), _poison_value(dtype), dtype=dtype, device=device)


def decode_fused_experts(hidden_states, w13, w2, topk_weights, topk_ids, *,
                         config1=None,
                         config2=None, **options) -> torch.Tensor:
    """The whole MoE layer on the decode GEMMs with the given configs: ``[M, H]``.

    Arguments and ``options`` as `mxmoe.fused_experts`'s (validated as there, with its
    defaults), with ``w13`` and ``w2`` in a layout the decode kernels read (plain or
    group_halves). ``config1`` / ``config2``: the two GEMMs' configs (one variant; for "gemv"
    one ``block_m``: they share the alignment); defaults: the direct GEMMs' configs of the
    dispatch (`direct_configs`).
    """
    from .constants import GPT_OSS_SWIGLU_ALPHA, GPT_OSS_SWIGLU_LIMIT
    from .format import MXFP4Tensor
    from .kernels.decode import direct_configs
    from .kernels.fused_moe import fused_moe
    from .kernels.inner_product import InnerProduct
    from .kernels.decode import word_layout
    from .validation import check_fused_experts_args

    for name, w in (("w13", w13), ("w2", w2)):
        if not isinstance(w, MXFP4Tensor):
            raise ValueError(f"decode_fused_experts: {name} must be an MXFP4Tensor, got {w!r}")
        word_layout(w.layout)
    # `fused_experts`' defaults for what is not given.
    options = {"w13_bias": None, "w2_bias": None, "expert_map": None, "activation": "swigluoai",
               "alpha": GPT_OSS_SWIGLU_ALPHA, "limit": GPT_OSS_SWIGLU_LIMIT, **options}
    call = check_fused_experts_args(hidden_states, w13, w2, topk_weights, topk_ids, **options)
    defaults = direct_configs(call.problem.num_tokens)
    cfg1 = config1 or defaults[0]
    cfg2 = config2 or (cfg1 if config1 else defaults[1])
    if cfg1.variant == "gemv" and cfg1.block_m != cfg2.block_m:
        raise ValueError(f"decode_fused_experts: config1.block_m {cfg1.block_m} != "
                         f"config2.block_m {cfg2.block_m} (the GEMMs share one alignment)")
    if call.problem.num_tokens == 0:
        return hidden_states.new_zeros(hidden_states.shape)
    return fused_moe(call, InnerProduct.DEQUANT, "triton_dequant", config=(cfg1, cfg2))


def prefill_fused_experts(hidden_states, w13, w2, topk_weights, topk_ids, *, config=None,
                          **options) -> torch.Tensor:
    """The whole MoE layer on the prefill GEMMs (`mxmoe.kernels.prefill`) with the given
    `PrefillConfig` (None: `default_prefill_config` for the call's pairs per expert), whatever
    the dispatch would pick: ``[M, H]``. Arguments and ``options`` as `mxmoe.fused_experts`'s
    (validated as there, with its defaults), with ``w13`` and ``w2`` in the MMA_LANES layout."""
    from .constants import GPT_OSS_SWIGLU_ALPHA, GPT_OSS_SWIGLU_LIMIT
    from .kernels.fused_moe import fused_moe
    from .kernels.inner_product import InnerProduct
    from .kernels.prefill import default_prefill_config
    from .validation import check_fused_experts_args

    options = {"w13_bias": None, "w2_bias": None, "expert_map": None, "activation": "swigluoai",
               "alpha": GPT_OSS_SWIGLU_ALPHA, "limit": GPT_OSS_SWIGLU_LIMIT, **options}
    call = check_fused_experts_args(hidden_states, w13, w2, topk_weights, topk_ids, **options)
    if call.problem.num_tokens == 0:
        return hidden_states.new_zeros(hidden_states.shape)
    config = config or default_prefill_config(call.problem.pairs_per_expert)
    return fused_moe(call, InnerProduct.DEQUANT, "triton_dequant", config=config)

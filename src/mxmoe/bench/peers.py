"""The peer path of `mxmoe bench`: OpenAI's triton_kernels, driven as vLLM drives it for gpt-oss.

``triton_kernels`` (v3.5.1, the copy vLLM 0.16 vendors) is never a dependency of mxmoe: it is
imported only when this path is selected and only if it imports (put its folder on
``PYTHONPATH``). What the adapter does, read from triton_kernels and from vLLM 0.16's
``triton_kernel_moe_forward`` and ``_swizzle_mxfp4`` (no code taken from either):

- Weights, converted once (`convert_weights`) from the same packed weights every other path
  uses: ``w13`` blocks ``[E, 2I, H/2]`` uint8 + scales ``[E, 2I, H/32]`` (gpt-oss rows, gate
  and up interleaved), ``w2`` ``[E, H, I/2]`` + ``[E, H, I/32]``. triton_kernels multiplies
  ``x [M, K] @ w [E, K, N]`` with the MX scales along K, so each weight is transposed (a view:
  ``[E, K/2, N]``, K the contiguous axis) and wrapped as FP4, its scales as ``[E, K/32, N]``;
  then laid out for the device: on sm_90 `HopperMXValueLayout` / `HopperMXScaleLayout` with
  ``mx_axis=1`` and ``num_warps=8`` (and the opt-flag constraint ``split_k=1``), as vLLM does;
  on sm_100 and newer triton_kernels' default (Blackwell) layouts, with vLLM's constraints
  ``is_persistent`` and ``epilogue_subtile=1``; elsewhere the plain strided layout. The
  biases become float32 ``[E, N]`` (vLLM's dtype). I is padded with zeros to a multiple of 64,
  as vLLM pads it for this backend (exact: a zero gate/up pair gives swiglu 0, and a zero
  column of w2 adds nothing); gpt-oss's 2880 needs none.
- A call (`TritonKernelsLayer`): ``routing(router_logits, k, sm_first=False)`` (top-k of the
  logits, softmax over those k; the same float32 logits every path gets), then `matmul_ogs`
  with ``gather_indx`` and the fused swiglu (``alpha``, ``limit``, reduction 2: gate and up
  interleaved, as gpt-oss) into ``[1, M*k, I]``, then `matmul_ogs` with ``scatter_indx`` and
  the routing weights as ``gammas`` into ``[1, M, H]``. bf16 activations only (vLLM asserts
  it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..constants import E8M0_EXPONENT_BIAS, GPT_OSS_SWIGLU_ALPHA, GPT_OSS_SWIGLU_LIMIT

#: The path name `mxmoe bench --backends` takes.
TRITON_KERNELS = "triton_kernels"
#: vLLM pads the intermediate size to this for the triton_kernels backend on CUDA.
INTER_ALIGN = 64
#: vLLM's `num_warps` for the Hopper scale layout (not the batched-MoE case).
HOPPER_NUM_WARPS = 8


class PeerUnavailable(RuntimeError):
    """The peer cannot run here (not installed, no CUDA device, unsupported dtype): the row is
    `skipped` with this reason and the run goes on."""


def import_error() -> str | None:
    """Why ``triton_kernels`` does not import (its first line), or None when it does."""
    try:
        import triton_kernels.matmul_ogs  # noqa: F401
        import triton_kernels.routing  # noqa: F401
        import triton_kernels.swiglu  # noqa: F401
        import triton_kernels.tensor  # noqa: F401
    except Exception as exc:  # ImportError, or an API mismatch with the installed Triton
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        return f"triton_kernels does not import ({type(exc).__name__}: {first})"
    return None


def unavailable_reason(device: torch.device) -> str | None:
    """Why the peer cannot run on ``device``, or None."""
    if device.type != "cuda":
        return "triton_kernels needs a CUDA GPU"
    return import_error()


def pad_inter(w13, w2, w13_bias: torch.Tensor, multiple: int = INTER_ALIGN):
    """``(w13, w2, w13_bias)`` with I padded by zeros to a multiple of ``multiple``: new rows
    of w13 (zero codes, gate/up pairs at the end), new columns of w2, zero biases. The padding's
    scales are 2**0 (any finite scale: the codes are zero). Returns the inputs when I already
    is a multiple."""
    from ..format import MXFP4Tensor

    w13, w2 = w13.plain(), w2.plain()
    inter = w2.shape[-1]
    pad = -inter % multiple
    if pad == 0:
        return w13, w2, w13_bias
    one = E8M0_EXPONENT_BIAS
    blocks13 = torch.nn.functional.pad(w13.blocks, (0, 0, 0, 2 * pad))
    scales13 = torch.nn.functional.pad(w13.scales, (0, 0, 0, 2 * pad), value=one)
    blocks2 = torch.nn.functional.pad(w2.blocks, (0, pad // 2))
    scales2 = torch.nn.functional.pad(w2.scales, (0, pad // 32), value=one)
    bias = None if w13_bias is None else torch.nn.functional.pad(w13_bias, (0, 2 * pad))
    return MXFP4Tensor(blocks13, scales13), MXFP4Tensor(blocks2, scales2), bias


@dataclass
class PeerWeight:
    """One weight in triton_kernels' tensors: the FP4 values and the precision config that
    carries the scales."""

    value: object  # triton_kernels.tensor.Tensor, logical [E, K, N] FP4
    scale: object  # triton_kernels.tensor.Tensor, [E, K/32, N] uint8 (in its layout)
    precision: object  # triton_kernels.matmul_ogs.PrecisionConfig
    bias: torch.Tensor | None  # [E, N] float32


def layouts_for(capability: tuple[int, int] | None):
    """``(value layout class, its kwargs, scale layout class, its kwargs)`` for a device of
    compute ``capability`` (None: the strided layout)."""
    from triton_kernels.tensor_details import layout

    if capability is not None and capability[0] == 9:
        return (layout.HopperMXValueLayout, {"mx_axis": 1},
                layout.HopperMXScaleLayout, {"mx_axis": 1, "num_warps": HOPPER_NUM_WARPS})
    if capability is not None and capability[0] >= 10:
        value, value_opts = layout.make_default_matmul_mxfp4_w_layout(mx_axis=1)
        scale, scale_opts = layout.make_default_matmul_mxfp4_w_scale_layout(
            mx_axis=1, num_warps=HOPPER_NUM_WARPS)
        return value, value_opts, scale, scale_opts
    return layout.StridedLayout, {}, layout.StridedLayout, {}


def convert_weight(w, bias: torch.Tensor | None, capability: tuple[int, int] | None
                   ) -> PeerWeight:
    """An `MXFP4Tensor` ``[E, N, K]`` (any mxmoe layout) and its bias ``[E, N]`` as
    triton_kernels' ``w [E, K, N]`` FP4 + scales, in the layouts of ``capability``. Pure torch
    (runs on the CPU too)."""
    from triton_kernels.matmul_ogs import FlexCtx, PrecisionConfig
    from triton_kernels.numerics import InFlexData
    from triton_kernels.tensor import FP4, convert_layout, wrap_torch_tensor

    plain = w.plain()
    value_cls, value_opts, scale_cls, scale_opts = layouts_for(capability)
    # [E, N, K/2] -> [E, K/2, N] view, K contiguous: wrap_torch_tensor doubles that axis (FP4).
    value = convert_layout(wrap_torch_tensor(plain.blocks.transpose(-2, -1), dtype=FP4),
                           value_cls, **value_opts)
    scale = convert_layout(wrap_torch_tensor(plain.scales.transpose(-2, -1)), scale_cls,
                           **scale_opts)
    precision = PrecisionConfig(weight_scale=scale, flex_ctx=FlexCtx(rhs_data=InFlexData()))
    return PeerWeight(value, scale, precision,
                      None if bias is None else bias.to(torch.float32).contiguous())


def _set_opt_flag_constraints(capability: tuple[int, int]) -> None:
    """vLLM's constraints on triton_kernels' config choice (process-wide in triton_kernels)."""
    from triton_kernels.matmul_ogs_details import opt_flags

    if capability[0] == 9:
        opt_flags.update_opt_flags_constraints({"split_k": 1})
    elif capability[0] == 10:
        opt_flags.update_opt_flags_constraints({"is_persistent": True, "epilogue_subtile": 1})


class TritonKernelsLayer:
    """The whole layer through triton_kernels; ``layer(inputs) -> [M, H]`` like every path.

    Made once per model (the weight conversion is the load step); raises `PeerUnavailable`
    when the peer cannot run here.
    """

    label = TRITON_KERNELS

    def __init__(self, weights, dtype: torch.dtype, alpha: float = GPT_OSS_SWIGLU_ALPHA,
                 limit: float = GPT_OSS_SWIGLU_LIMIT):
        device = weights.w13.device
        reason = unavailable_reason(device)
        if reason is not None:
            raise PeerUnavailable(reason)
        if dtype != torch.bfloat16:
            raise PeerUnavailable(f"triton_kernels is driven with bf16 activations only (as "
                                  f"vLLM does), got {str(dtype).replace('torch.', '')}")
        from triton_kernels.matmul_ogs import FnSpecs, FusedActivation, matmul_ogs
        from triton_kernels.routing import routing
        from triton_kernels.swiglu import swiglu_fn

        capability = torch.cuda.get_device_capability(device)
        _set_opt_flag_constraints(capability)
        w13, w2, b13 = pad_inter(weights.w13, weights.w2, weights.w13_bias)
        self.top_k = weights.model.top_k
        self.hidden = weights.model.hidden
        self.inter = w2.shape[-1]  # padded
        self.w13 = convert_weight(w13, b13, capability)
        self.w2 = convert_weight(w2, weights.w2_bias, capability)
        self.detail = (f"triton_kernels layouts {type(self.w13.value.storage.layout).__name__}"
                       f" / {type(self.w13.scale.storage.layout).__name__}"
                       + (f", I padded to {self.inter}" if self.inter != weights.model.inter
                          else ""))
        self._routing = routing
        self._matmul = matmul_ogs
        self._swiglu = FusedActivation(FnSpecs("swiglu", swiglu_fn, ("alpha", "limit")),
                                       (float(alpha), float(limit)), 2)

    def __call__(self, inputs) -> torch.Tensor:
        x = inputs.hidden_states  # [M, H] bf16
        m, k = x.shape[0], self.top_k
        routing_data, gather, scatter = self._routing(inputs.router_logits, k, sm_first=False)
        h = torch.empty((1, m * k, self.inter), dtype=x.dtype, device=x.device)
        self._matmul(x, self.w13.value, self.w13.bias, routing_data, gather_indx=gather,
                     precision_config=self.w13.precision, fused_activation=self._swiglu, y=h)
        out = torch.empty((1, m, self.hidden), dtype=x.dtype, device=x.device)
        self._matmul(h.view(m * k, self.inter), self.w2.value, self.w2.bias, routing_data,
                     scatter_indx=scatter, precision_config=self.w2.precision,
                     gammas=routing_data.gate_scal, y=out)
        return out.view(m, self.hidden)

"""The probe child: run one backend on a tiny seeded problem here and print one result line.

    python -m mxmoe.backends.probe --backend triton_dequant --device cuda:0
"""

from __future__ import annotations

import argparse
import math
import traceback

import torch

from .result import TOLERANCE, result_line_text

#: The probe problem: M, H, I, E, k. I = 96 is 3 scale blocks, not a multiple of 64, so the
#: masked K tail of the second GEMM runs; M = 5 leaves most of an M tile empty.
PROBE_SHAPE = (5, 64, 96, 3, 2)


def _probe_args(activation, device: torch.device, dtype: torch.dtype):
    """The tiny problem's `MoECall`, the same every run (seeded), with biases. Built here, not
    through `fused_experts`' validation (a layer above the backends): its shapes are fixed."""
    from ...activations import Activation
    from ...constants import GPT_OSS_SWIGLU_ALPHA, GPT_OSS_SWIGLU_LIMIT
    from ...format import quantize_mxfp4
    from ...problem import MoECall
    from ...routing import route_torch

    m, h, i, e, k = PROBE_SHAPE
    g = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    w13 = quantize_mxfp4(randn(e, 2 * i, h, scale=h**-0.5)).to(device)
    w2 = quantize_mxfp4(randn(e, h, i, scale=i**-0.5)).to(device)
    weights, ids = route_torch(randn(m, e), k)
    x = randn(m, h).to(dtype).to(device)
    return MoECall(
        hidden_states=x, w13=w13, w2=w2, topk_weights=weights.to(device),
        topk_ids=ids.to(device), w13_bias=randn(e, 2 * i, scale=0.1).to(dtype).to(device),
        w2_bias=randn(e, h, scale=0.1).to(dtype).to(device), expert_map=None,
        alpha=GPT_OSS_SWIGLU_ALPHA, limit=GPT_OSS_SWIGLU_LIMIT,
        apply_router_weight_on_input=False, backend="auto",
        problem=MoECall.sizes(x, w13, ids, None, Activation.parse(activation)),
    )


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max|out - ref| / max|ref|; inf when out holds NaN or Inf."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return math.inf
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def check_backend(name: str, device: torch.device, dtype: torch.dtype) -> dict:
    """Run backend ``name`` on the probe problem (both activations) here; the child's payload."""
    from ...activations import Activation
    from ...reference import reference_experts
    from .. import get_backend

    backend = get_backend(name)
    reason = backend.unavailable_reason(device)
    if reason is not None:
        return {"ok": False, "max_rel_err": None, "reason": reason}
    worst = 0.0
    for activation in Activation:
        args = _probe_args(activation, device, dtype)
        out = backend.run(args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # surface asynchronous kernel errors here
        expected_shape = tuple(args.hidden_states.shape)
        if tuple(out.shape) != expected_shape or out.dtype != dtype:
            return {"ok": False, "max_rel_err": None, "reason": (
                f"{activation.value}: output is {tuple(out.shape)} {out.dtype}, expected "
                f"{expected_shape} {dtype}")}
        ref = reference_experts(args)
        err = _relative_error(out, ref)
        if not math.isfinite(err):
            return {"ok": False, "max_rel_err": None,
                    "reason": f"{activation.value}: output holds NaN or Inf"}
        if err > TOLERANCE:
            return {"ok": False, "max_rel_err": err, "reason": (
                f"{activation.value}: max relative error {err:.3g} against the reference, "
                f"tolerance {TOLERANCE:g}")}
        worst = max(worst, err)
    return {"ok": True, "max_rel_err": worst, "reason": ""}


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def main(argv: list[str] | None = None) -> int:
    """The child: probe one backend, print one result line, flush. Exit 0 when usable."""
    parser = argparse.ArgumentParser(prog="python -m mxmoe.backends.probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--device", required=True, help="cuda:N, or cpu")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                        help="default: bfloat16 on CUDA, float16 on the CPU (the Triton "
                             "interpreter computes bfloat16 wrongly)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = _DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float16")]
    payload = {"backend": args.backend, "ok": False, "max_rel_err": None, "reason": ""}
    try:
        payload.update(check_backend(args.backend, device, dtype))
    except Exception as exc:  # the verdict, not a crash: report it through the result line
        traceback.print_exc()
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        payload["reason"] = f"{type(exc).__name__}: {first_line}"
    print(result_line_text(payload), flush=True)
    return 0 if payload["ok"] else 1

"""The gated activations as Triton epilogue functions, one per `mxmoe.Activation` member (named
by its ``epilogue``): ``(gate fp32, up fp32, alpha, limit) -> fp32``, the same math as the
member's torch forward."""

import triton
import triton.language as tl


@triton.jit
def swiglu_oai(gate, up, alpha, limit):
    """gpt-oss: gate clamped above at limit, up to +-limit, gate * sigmoid(alpha * gate) * (up + 1)."""
    # PropagateNan.ALL: the default min/max return the non-NaN operand, which would turn a NaN
    # (NaN scale byte, NaN input) into the clamp limit instead of passing it on.
    gate = tl.minimum(gate, limit, propagate_nan=tl.PropagateNan.ALL)
    up = tl.maximum(up, -limit, propagate_nan=tl.PropagateNan.ALL)
    up = tl.minimum(up, limit, propagate_nan=tl.PropagateNan.ALL)
    return gate * tl.sigmoid(alpha * gate) * (up + 1.0)


@triton.jit
def silu_and_mul(gate, up, alpha, limit):
    """vLLM's silu(gate) * up (alpha and limit unused)."""
    return gate * tl.sigmoid(gate) * up


def epilogue_of(activation):
    """The ``@triton.jit`` epilogue of an `mxmoe.Activation`."""
    return globals()[activation.epilogue]

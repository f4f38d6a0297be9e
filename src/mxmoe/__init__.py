"""mxmoe: fused Mixture-of-Experts on MXFP4 expert weights, in Triton and PyTorch."""

from .activations import Activation
from .api import fused_experts
from .backends import backends
from .format import MXFP4Tensor, ScaleRounding, dequantize_mxfp4, quantize_mxfp4
from .layer import MXFP4MoE
from .routing import route

__version__ = "0.1.0"

__all__ = [
    "Activation",
    "MXFP4MoE",
    "MXFP4Tensor",
    "ScaleRounding",
    "backends",
    "dequantize_mxfp4",
    "fused_experts",
    "quantize_mxfp4",
    "route",
]

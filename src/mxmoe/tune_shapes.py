"""The problems `mxmoe tune` knows by name: models' expert shapes and ``--shapes`` text.

Apart from `mxmoe.tune` (which imports the kernels' configs, and so torch) so that
``mxmoe tune --help`` can offer them without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TUNABLE_BACKENDS", "DEFAULT_TOKENS", "Shape", "MODELS", "MODEL_ALIASES",
           "parse_shape"]

#: Backends whose kernels take a `MoEConfig` (the ones a table holds configs for).
TUNABLE_BACKENDS = ("triton_dequant", "triton_scaled", "bf16")
DEFAULT_TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384)


@dataclass(frozen=True)
class Shape:
    """One MoE layer's expert problem (per rank when tensor-parallel)."""

    hidden: int
    intermediate: int
    num_experts: int
    top_k: int
    activation: str = "swigluoai"
    bias: bool = True
    label: str = ""

    @property
    def key(self) -> str:
        return f"H{self.hidden}_I{self.intermediate}_E{self.num_experts}_k{self.top_k}"


#: Models whose expert shapes people run through an MXFP4 MoE kernel: H, I, E, k, activation,
#: bias (gpt-oss: interleaved swiglu with biases; the others: silu halves, no bias).
MODELS = {
    "gpt-oss-20b": Shape(2880, 2880, 32, 4, "swigluoai", True, "gpt-oss-20b"),
    "gpt-oss-120b": Shape(2880, 2880, 128, 4, "swigluoai", True, "gpt-oss-120b"),
    "qwen3-30b-a3b": Shape(2048, 768, 128, 8, "silu", False, "qwen3-30b-a3b"),
    "qwen3-235b-a22b": Shape(4096, 1536, 128, 8, "silu", False, "qwen3-235b-a22b"),
    "mixtral-8x7b": Shape(4096, 14336, 8, 2, "silu", False, "mixtral-8x7b"),
    "deepseek-v3": Shape(7168, 2048, 256, 8, "silu", False, "deepseek-v3"),
}
#: The names of the first `mxmoe tune`.
MODEL_ALIASES = {"20b": "gpt-oss-20b", "120b": "gpt-oss-120b"}


def parse_shape(text: str) -> Shape:
    """``"H,I,E,k"`` (optionally ``",silu"`` or ``",swigluoai"``) -> `Shape`; ValueError else."""
    parts = [p.strip() for p in text.split(",")]
    activation = "swigluoai"
    if len(parts) == 5:
        activation = parts.pop()
    if len(parts) != 4 or activation not in ("swigluoai", "silu"):
        raise ValueError(f"--shapes takes H,I,E,k[,silu|swigluoai], got {text!r}")
    try:
        h, i, e, k = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--shapes takes four integers H,I,E,k, got {text!r}") from None
    if min(h, i, e, k) < 1 or k > e or h % 32 or i % 32:
        raise ValueError(f"--shapes {text!r}: need positive sizes, k <= E, and H and I "
                         "multiples of 32 (one MXFP4 scale per 32 along K)")
    return Shape(h, i, e, k, activation, activation == "swigluoai", text)

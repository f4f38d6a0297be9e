"""The plain-torch baseline: weights dequantized once to the activation dtype, grouped GEMMs.

What a user without mxmoe would write (and what the MXFP4 paths must beat): route in torch
(softmax, top-k, renormalize; not mxmoe's fused router), sort the (token, slot) pairs by expert
on the device (`torch.argsort`), gather their rows, one grouped GEMM for w13
(`torch._grouped_mm`), bias and swiglu, one grouped GEMM for w2, bias, routing weight, and the
weighted sum by scattering the pairs back (`index_copy_`) and summing each token's k rows.
Nothing reads data on the host, so it can be captured in a CUDA graph.

`torch._grouped_mm` (2D × 3D form: ``mat_a [T, K]``, ``mat_b [E, K, N]``, ``offs`` int32 ``[E]``
cumulative row ends) is private and needs sm90+ on CUDA. `DenseBaseline.select` tries it with
``mat_b`` as a transposed view of the contiguous ``[E, N, K]`` weights, then as a contiguous
``[E, K, N]`` copy, and falls back to a loop of `torch.mm` over the experts (which reads the
group ends on the host, so it cannot be captured); each try is checked against the loop.
"""

from __future__ import annotations

import torch

from ..activations import Activation, apply_activation
from ..testing import relative_error
from ..constants import GPT_OSS_SWIGLU_ALPHA, GPT_OSS_SWIGLU_LIMIT
from .problems import Inputs, Weights, torch_route

#: method -> the row label it is reported under.
LABELS = {
    "grouped_mm_view": "baseline_grouped_mm",
    "grouped_mm_contiguous": "baseline_grouped_mm",
    "mm_loop": "baseline_mm_loop",
}
# A grouped GEMM that disagrees with the torch.mm loop by more than this is not used.
_AGREEMENT = 1e-2


class DenseBaseline:
    """The baseline for one layer's weights, in ``dtype`` (made once, ~3.8× the packed bytes)."""

    def __init__(self, weights: Weights, dtype: torch.dtype,
                 alpha: float = GPT_OSS_SWIGLU_ALPHA, limit: float = GPT_OSS_SWIGLU_LIMIT):
        model = weights.model
        self.top_k = model.top_k
        self.experts = model.experts
        self.hidden = model.hidden
        self.alpha = alpha
        self.limit = limit
        device = weights.w13.device
        # One expert at a time: dequantizing all at once would hold several float32 copies.
        self.w13 = torch.empty(model.experts, 2 * model.inter, model.hidden, dtype=dtype,
                               device=device)  # [E, 2I, H]
        self.w2 = torch.empty(model.experts, model.hidden, model.inter, dtype=dtype,
                              device=device)  # [E, H, I]
        for e in range(model.experts):
            self.w13[e] = weights.w13[e].dequantize(dtype)
            self.w2[e] = weights.w2[e].dequantize(dtype)
        self.b13 = weights.w13_bias.to(dtype)  # [E, 2I]
        self.b2 = weights.w2_bias.to(dtype)  # [E, H]
        self._contiguous: tuple[torch.Tensor, torch.Tensor] | None = None
        self.method = "mm_loop"
        self.notes: list[str] = []

    @property
    def label(self) -> str:
        return LABELS[self.method]

    def _mat_b(self, method: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13, w2) as ``[E, K, N]`` for `torch._grouped_mm`."""
        if method == "grouped_mm_view":
            return self.w13.transpose(-2, -1), self.w2.transpose(-2, -1)
        if self._contiguous is None:
            self._contiguous = (self.w13.transpose(-2, -1).contiguous(),
                                self.w2.transpose(-2, -1).contiguous())
        return self._contiguous

    def _gemm(self, rows: torch.Tensor, which: int, offs: torch.Tensor, method: str
              ) -> torch.Tensor:
        """``rows [T, K]`` (sorted by expert) times each expert's weights: ``[T, N]``."""
        if method == "mm_loop":
            weight = self.w13 if which == 0 else self.w2  # [E, N, K]
            out = rows.new_empty(rows.shape[0], weight.shape[1])
            start = 0
            for e, end in enumerate(offs.tolist()):  # host sync: not capturable
                if end > start:
                    torch.mm(rows[start:end], weight[e].t(), out=out[start:end])
                start = end
            return out
        return torch._grouped_mm(rows, self._mat_b(method)[which], offs=offs)

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor, method: str | None = None
                ) -> torch.Tensor:
        """``[M, H]`` in ``x.dtype``: the whole layer from the router logits."""
        method = method or self.method
        m, k = x.shape[0], self.top_k
        topk_weights, topk_ids = torch_route(router_logits, k)
        flat = topk_ids.reshape(-1).to(torch.int64)  # [M*k] expert of each pair
        order = torch.argsort(flat, stable=True)  # pairs sorted by expert
        expert_of_row = flat[order]
        counts = torch.zeros(self.experts, dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        offs = torch.cumsum(counts, 0, dtype=torch.int32)  # [E] row ends

        rows = x.index_select(0, order // k)  # [M*k, H]
        h = self._gemm(rows, 0, offs, method) + self.b13.index_select(0, expert_of_row)
        a = apply_activation(h, Activation.SWIGLUOAI, self.alpha, self.limit).contiguous()
        y = self._gemm(a, 1, offs, method) + self.b2.index_select(0, expert_of_row)
        y = y * topk_weights.reshape(-1)[order].unsqueeze(1).to(y.dtype)
        pairs = torch.empty_like(y).index_copy_(0, order, y)  # back to (token, slot) order
        return pairs.view(m, k, self.hidden).sum(dim=1)

    def __call__(self, inputs: Inputs) -> torch.Tensor:
        return self.forward(inputs.hidden_states, inputs.router_logits)

    def select(self, inputs: Inputs) -> str:
        """Pick the fastest method that runs here and agrees with the `torch.mm` loop on
        ``inputs``; remember it (`method`, `label`) and why others were not used (`notes`)."""
        self.notes = []
        expected = self.forward(inputs.hidden_states, inputs.router_logits, "mm_loop")
        if not hasattr(torch, "_grouped_mm"):
            self.notes.append(f"torch {torch.__version__} has no torch._grouped_mm")
        else:
            for method in ("grouped_mm_view", "grouped_mm_contiguous"):
                try:
                    got = self.forward(inputs.hidden_states, inputs.router_logits, method)
                    err = relative_error(got, expected)
                except Exception as exc:  # private op: any failure means "not here"
                    first = (str(exc).strip().splitlines() or [""])[0][:160]
                    self.notes.append(f"{method}: {type(exc).__name__}: {first}")
                    continue
                if err <= _AGREEMENT:
                    self.method = method
                    return method
                self.notes.append(f"{method}: disagrees with the torch.mm loop (rel err {err:.2e})")
        self.method = "mm_loop"
        return self.method

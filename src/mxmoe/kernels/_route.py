"""The router's softmax -> top-k -> renormalize, fused into one Triton launch (GPU decode steps
otherwise spend ~10 us in five small torch kernels)."""

import triton
import triton.language as tl


@triton.jit
def route_kernel(
    logits_ptr,  # (M, E) float
    weights_ptr,  # (M, TOP_K) float32 out
    ids_ptr,  # (M, TOP_K) int32 out
    M,
    E,
    stride_lm, stride_le,
    TOP_K: tl.constexpr,
    K_PAD: tl.constexpr,  # next power of two >= TOP_K
    RENORMALIZE: tl.constexpr,
    BLOCK_E: tl.constexpr,
    ROWS: tl.constexpr,
):
    """Grid: (cdiv(M, ROWS),). Experts are picked by descending probability, ties to the lower
    index; weights are softmax probabilities (over all E), divided by their top-k sum when
    RENORMALIZE."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    mask_rows = rows < M
    cols = tl.arange(0, BLOCK_E)
    logits = tl.load(
        logits_ptr + rows.to(tl.int64)[:, None] * stride_lm + cols[None, :] * stride_le,
        mask=mask_rows[:, None] & (cols[None, :] < E), other=float("-inf"),
    ).to(tl.float32)
    row_max = tl.max(logits, 1)
    denominator = tl.sum(tl.exp(logits - row_max[:, None]), 1)

    slots = tl.arange(0, K_PAD)
    chosen_w = tl.zeros((ROWS, K_PAD), dtype=tl.float32)
    chosen_id = tl.zeros((ROWS, K_PAD), dtype=tl.int32)
    remaining = logits
    picked_sum = tl.zeros((ROWS,), dtype=tl.float32)
    for j in range(TOP_K):
        best = tl.max(remaining, 1)
        best_id = tl.min(tl.where(remaining == best[:, None], cols[None, :], BLOCK_E), 1)
        unnormalized = tl.exp(best - row_max)
        picked_sum += unnormalized
        chosen_w = tl.where(slots[None, :] == j, unnormalized[:, None], chosen_w)
        chosen_id = tl.where(slots[None, :] == j, best_id[:, None], chosen_id)
        remaining = tl.where(cols[None, :] == best_id[:, None], float("-inf"), remaining)
    if RENORMALIZE:
        chosen_w = chosen_w / picked_sum[:, None]
    else:
        chosen_w = chosen_w / denominator[:, None]
    out = rows.to(tl.int64)[:, None] * TOP_K + slots[None, :]
    mask_out = mask_rows[:, None] & (slots[None, :] < TOP_K)
    tl.store(weights_ptr + out, chosen_w, mask=mask_out)
    tl.store(ids_ptr + out, chosen_id, mask=mask_out)

"""Weight layouts: how the bytes of an `MXFP4Tensor` are arranged in memory.

The *plain* layout is the checkpoint's (OCP order: byte ``j`` of a row holds element ``2j`` in its
low nibble and ``2j + 1`` in its high nibble; one E8M0 scale per 32 elements). Kernels may want
the same codes in another order, so that each thread's load is exactly the operand it computes
with. A `Layout` names such an order and converts to and from the plain one, bit-exactly; the
conversion runs once (at load, `MXFP4Tensor.to_layout`, `MXFP4MoE.to_layout`), never per call.

Every layout keeps the 4.25 bits a weight: it only permutes codes within a row of K elements
(so indexing the leading dimensions, e.g. one expert, stays a view) and may reorder the scales
the same way. Adding a layout: a subclass here with `from_plain` / `to_plain`, an entry in
`LAYOUTS`, and the kernels that read it list its name (docs/architecture.md).
"""

from __future__ import annotations

import torch

from .constants import BYTES_PER_BLOCK

__all__ = ["Layout", "PlainLayout", "GroupHalvesLayout", "MmaLanesLayout", "PLAIN", "GROUP_HALVES",
           "MMA_LANES", "LAYOUTS", "get_layout"]


class Layout:
    """A byte order of MXFP4 weights. Subclasses set `name` and the two conversions."""

    #: What users and kernels call it.
    name: str = ""
    #: One line for `mxmoe info` and errors.
    description: str = ""

    def from_plain(self, blocks: torch.Tensor, scales: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain ``(blocks [..., K/2], scales [..., K/32])`` -> this layout's tensors."""
        raise NotImplementedError

    def to_plain(self, blocks: torch.Tensor, scales: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """This layout's tensors -> plain ``(blocks [..., K/2], scales [..., K/32])``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<layout {self.name}>"

    # Layouts are singletons: compare and hash by name (they travel as names through the
    # custom operator and back).
    def __eq__(self, other) -> bool:
        return isinstance(other, Layout) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)


class PlainLayout(Layout):
    """The checkpoint's order: byte ``j`` = element ``2j`` (low nibble), ``2j + 1`` (high)."""

    name = "plain"
    description = "checkpoint order: byte j holds elements 2j (low nibble) and 2j+1 (high)"

    def from_plain(self, blocks, scales):
        return blocks, scales

    def to_plain(self, blocks, scales):
        return blocks, scales


class GroupHalvesLayout(Layout):
    """Within every 32-element scale group, byte ``j`` (0..15) holds element ``j`` in its low
    nibble and element ``j + 16`` in its high nibble; the scales are unchanged.

    Why: a kernel that splits a byte into its two nibbles then holds two runs of 16 consecutive
    K elements, so the activations it multiplies them with are two contiguous vectors, not the
    even and odd elements of one (a stride-2 gather), and no re-interleave of the decoded
    values is needed before a dot.
    """

    name = "group_halves"
    description = ("in each 32-group byte j holds elements j (low nibble) and j+16 (high); "
                   "activations read as two contiguous halves")

    def from_plain(self, blocks, scales):
        groups = blocks.reshape(*blocks.shape[:-1], -1, BYTES_PER_BLOCK)  # [..., G, 16]
        low, high = groups & 0x0F, groups >> 4  # elements 2j, 2j+1 of each group
        codes = torch.stack([low, high], dim=-1).flatten(-2)  # [..., G, 32] in K order
        halves = codes[..., :BYTES_PER_BLOCK] | (codes[..., BYTES_PER_BLOCK:] << 4)
        return halves.reshape(blocks.shape), scales

    def to_plain(self, blocks, scales):
        groups = blocks.reshape(*blocks.shape[:-1], -1, BYTES_PER_BLOCK)
        codes = torch.cat([groups & 0x0F, groups >> 4], dim=-1)  # [..., G, 32] in K order
        plain = codes[..., 0::2] | (codes[..., 1::2] << 4)
        return plain.reshape(blocks.shape), scales


#: Byte ``4q + 2h + j`` of an MMA_LANES group is byte ``8h + 2q + j`` of its GROUP_HALVES
#: group (q = 0..3, h, j = 0..1), and the inverse order.
_MMA_LANES_ORDER = [8 * h + 2 * q + j for q in range(4) for h in range(2) for j in range(2)]
_MMA_LANES_INVERSE = [_MMA_LANES_ORDER.index(i) for i in range(BYTES_PER_BLOCK)]


class MmaLanesLayout(Layout):
    """Within every 32-element scale group, byte ``4q + 2h + j`` (q = 0..3, h, j = 0..1) holds
    element ``8h + 2q + j`` in its low nibble and element ``8h + 2q + j + 16`` in its high
    nibble: GROUP_HALVES with the 16 bytes of a group reordered. The scales keep their values
    and logical shape ``[..., N, K/32]`` but are stored K-major (a transposed view: stride 1
    along N), so that the scales of consecutive rows are contiguous bytes.

    Why: a 16-bit tensor-core operand fragment (mma.sync / wgmma, the register operand) gives
    lane ``l`` of a row the elements ``2(l % 4) + {0, 1}`` and ``+ 8`` of every 16 along K. Here
    the eight codes one lane needs from a group of a row are one aligned 32-bit word (word
    ``q = l % 4``), and each byte pair ``j = 0, 1`` decodes into one bf16x2 operand register:
    the prefill GEMM (`mxmoe.kernels._prefill_gemm`) loads words and upcasts them in place. Its
    tile's scales (a few groups of BLOCK_N rows) are then whole 16-byte runs, which it copies to
    shared memory asynchronously like the codes (row-major scales give 2-4 byte runs at odd
    addresses: synchronous byte loads).
    """

    name = "mma_lanes"
    description = ("in each 32-group byte 4q+2h+j holds elements 8h+2q+j (low nibble) and that "
                   "+16 (high): each MMA lane's codes are one 32-bit word; scales K-major")

    def from_plain(self, blocks, scales):
        halves, scales = GROUP_HALVES.from_plain(blocks, scales)
        groups = halves.reshape(*blocks.shape[:-1], -1, BYTES_PER_BLOCK)
        index = torch.tensor(_MMA_LANES_ORDER, device=blocks.device)
        k_major = scales.transpose(-1, -2).contiguous().transpose(-1, -2)
        return groups[..., index].reshape(blocks.shape), k_major

    def to_plain(self, blocks, scales):
        groups = blocks.reshape(*blocks.shape[:-1], -1, BYTES_PER_BLOCK)
        index = torch.tensor(_MMA_LANES_INVERSE, device=blocks.device)
        halves = groups[..., index].reshape(blocks.shape)
        return GROUP_HALVES.to_plain(halves, scales.contiguous())


PLAIN = PlainLayout()
GROUP_HALVES = GroupHalvesLayout()
MMA_LANES = MmaLanesLayout()
#: name -> layout; the order `mxmoe info` prints.
LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (PLAIN, GROUP_HALVES, MMA_LANES)}


def get_layout(layout: "Layout | str") -> Layout:
    """The layout object for a name (or the object itself); ValueError listing the names."""
    if isinstance(layout, Layout):
        return layout
    try:
        return LAYOUTS[layout]
    except (KeyError, TypeError):
        raise ValueError(f"unknown layout {layout!r}; known layouts: {list(LAYOUTS)}") from None


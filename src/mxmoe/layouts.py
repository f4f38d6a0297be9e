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
           "MMA_LANES", "MMA_LANES_ROTATIONS", "LAYOUTS", "get_layout", "FOLD_MAX_SCALE",
           "scales_fold"]


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


#: MMA_LANES: where each code bit of a lane's word sits. Word ``t`` (0..3) of a row's 32-group
#: holds the eight codes lane ``t`` of a 16-bit MMA operand fragment needs: elements
#: ``8i + 2t + j`` (i = 0..3, j = 0, 1), which are operand registers ``i`` (bf16 pairs, j = 0 the
#: low half). Register ``i`` is ``rotl(word, ROTATION[i]) & 0x81C081C0``: each code's sign at
#: bit 15 (j = 0) or 31 and its magnitude bits e1 e0 m at 8..6 or 24..22, the pair's values times
#: 2**-126 as bf16 bit patterns. Register 3 is two pieces: bits {6, 7, 15, 22, 23, 31} of
#: ``rotl(word, 6)`` and bits {8, 24} of ``rotl(word, 14)`` (no bit order makes all four single
#: rotations: scripts/search_word_layouts.py). The kernels' decoders hard-code these rotations.
MMA_LANES_ROTATIONS = (0, 4, 10, (6, 14))
#: Where code bit b (0: m, 1: e0, 2: e1, 3: sign) of element j of a pair lands in its register.
_REGISTER_BITS = (6, 7, 8, 15)


def _mma_lanes_word_bit(i: int, j: int, b: int) -> int:
    """The bit of a lane's word holding code bit ``b`` of element ``8i + 2t + j``."""
    target = _REGISTER_BITS[b] + 16 * j
    rotation = MMA_LANES_ROTATIONS[i]
    if isinstance(rotation, tuple):
        rotation = rotation[1] if b == 2 else rotation[0]
    return (target - rotation) % 32


#: [element e = 2i + j of the word][code bit b] -> the word bit (a permutation of 0..31).
_MMA_LANES_WORD_BITS = [[_mma_lanes_word_bit(e // 2, e % 2, b) for b in range(4)]
                        for e in range(8)]
#: Groups converted at a time (bounded temporaries for whole-model tensors).
_CHUNK_GROUPS = 1 << 20


class MmaLanesLayout(Layout):
    """Within every 32-element scale group, the 16 bytes are four little-endian 32-bit words,
    one per lane of a 16-bit tensor-core operand fragment (mma.sync / wgmma, the register
    operand: lane ``l`` of a row takes elements ``2(l % 4) + {0, 1}`` and ``+ 8`` of every 16
    along K). Word ``t`` holds elements ``8i + 2t + j`` (i = 0..3, j = 0, 1) with its 32 bits
    permuted (`MMA_LANES_ROTATIONS`) so that each of the lane's four bf16x2 operand registers
    is a rotation and a mask of the word. The scales keep their values and logical shape
    ``[..., N, K/32]`` but are stored K-major (a transposed view: stride 1 along N), so that the
    scales of consecutive rows are contiguous bytes.

    Why: the prefill GEMM (`mxmoe.kernels._prefill_gemm`) loads each lane's word and turns it
    into its operand registers in place, nine logic operations for eight codes (a nibble per
    byte takes eighteen: shifts and masks to move each nibble's bits apart); the decode GEMV
    gets each code's fp32 pattern from a register with one more operation. Its tile's scales (a
    few groups of BLOCK_N rows) are whole 16-byte runs, which it copies to shared memory
    asynchronously like the codes (row-major scales give 2-4 byte runs at odd addresses).
    """

    name = "mma_lanes"
    description = ("each 32-group is four 32-bit words, one per MMA lane (elements 8i+2t+j), "
                   "bits ordered so each bf16x2 operand register is a rotation of the word; "
                   "scales K-major")

    def from_plain(self, blocks, scales):
        groups = blocks.reshape(-1, BYTES_PER_BLOCK)
        out = torch.empty_like(groups)
        for start in range(0, groups.shape[0], _CHUNK_GROUPS):
            part = groups[start:start + _CHUNK_GROUPS]
            # K element 2p + c is the nibble c of byte p; as (n, i, t, j): element 8i + 2t + j.
            codes = torch.stack([part & 0x0F, part >> 4], dim=-1).reshape(-1, 4, 4, 2)
            codes = codes.permute(0, 2, 1, 3).reshape(-1, 4, 8)  # (n, t, e = 2i + j)
            words = torch.zeros(codes.shape[0], 4, 4, dtype=torch.uint8, device=blocks.device)
            for e, bits in enumerate(_MMA_LANES_WORD_BITS):
                for b, bit in enumerate(bits):
                    words[:, :, bit // 8] |= ((codes[:, :, e] >> b) & 1) << (bit % 8)
            out[start:start + _CHUNK_GROUPS] = words.reshape(-1, BYTES_PER_BLOCK)
        k_major = scales.transpose(-1, -2).contiguous().transpose(-1, -2)
        return out.reshape(blocks.shape), k_major

    def to_plain(self, blocks, scales):
        groups = blocks.reshape(-1, BYTES_PER_BLOCK)
        out = torch.empty_like(groups)
        for start in range(0, groups.shape[0], _CHUNK_GROUPS):
            words = groups[start:start + _CHUNK_GROUPS].reshape(-1, 4, 4)  # (n, t, byte)
            codes = torch.zeros(words.shape[0], 4, 8, dtype=torch.uint8, device=blocks.device)
            for e, bits in enumerate(_MMA_LANES_WORD_BITS):
                for b, bit in enumerate(bits):
                    codes[:, :, e] |= ((words[:, :, bit // 8] >> (bit % 8)) & 1) << b
            # (n, t, i, j) -> K order (n, i, t, j), then two codes a byte.
            codes = codes.reshape(-1, 4, 4, 2).permute(0, 2, 1, 3).reshape(-1, 16, 2)
            out[start:start + _CHUNK_GROUPS] = codes[..., 0] | (codes[..., 1] << 4)
        return out.reshape(blocks.shape), scales.contiguous()


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



#: E8M0 bytes up to this (scales up to 2) let a kernel fold the 2**126 of its bit-pattern
#: decode into the scale: 2**(s - 1) is a bf16 normal for every s <= 128, one product instead
#: of two (`mxmoe.kernels._moe_gemm._upcast_mma_lanes_words`). Real checkpoints' scales are far
#: below it (gpt-oss's, llm-compressor's: weights of magnitude < 12).
FOLD_MAX_SCALE = 128


def scales_fold(scales: torch.Tensor) -> bool:
    """Whether every E8M0 byte of ``scales`` is <= `FOLD_MAX_SCALE`: a fact about the data, so
    the plans key on it (`mxmoe.plans.signature`) and the prefill GEMM folds only when it holds.

    Remembered on the tensor object with its version counter (torch bumps it on every in-place
    write, so ``copy_`` / ``load_state_dict`` into it asks again); worked out with one host
    synchronisation, never during CUDA-graph capture or torch.compile tracing: there, a tensor
    not seen before answers False (the general conversion, always exact). Inference tensors
    have no version counter: theirs is remembered once (write them in place only before their
    first call).
    """
    try:
        version = scales._version
    except RuntimeError:  # an inference tensor
        version = None
    memo = getattr(scales, "_mxmoe_scales_fold", None)
    if memo is not None and memo[0] == version:
        return memo[1]
    if torch.compiler.is_compiling() or (
            scales.is_cuda and torch.cuda.is_current_stream_capturing()):
        return False
    fold = scales.numel() == 0 or bool(scales.max() <= FOLD_MAX_SCALE)
    try:
        scales._mxmoe_scales_fold = (version, fold)
    except (AttributeError, RuntimeError):  # a tensor subclass without attributes
        pass
    return fold

"""Search bit orders of a 32-bit word of 8 E2M1 codes for a cheap bf16x2 upcast (CPU, instant).

A bf16x2 operand register holds two codes as ``value * 2**-126`` patterns: sign at bits 15 / 31,
the three magnitude bits at 6..8 / 22..24 (mask 0x81C081C0). If a layout stores the codes so
that output ``j`` is ``rotl(word, r_j) & mask``, it costs one rotate and one LOP3 (one LOP3 for
r = 0). This prints every set of three whole-rotation outputs plus one output made of two pieces
(two rotations, two masks) that together use each bit of the word exactly once; it also checks
that no layout makes all four outputs single rotations (the mask's positions do not tile the
word by translation). benchmarks/NOTES.md section 18.

    python3 scripts/search_word_layouts.py
"""

import itertools

POSITIONS = [6, 7, 8, 15, 22, 23, 24, 31]  # where one bf16x2 output's 8 significant bits sit


def sources(positions, rotation):
    """The word bits that land on ``positions`` after a left rotation by ``rotation``."""
    return {(p - rotation) % 32 for p in positions}


def main():
    word = set(range(32))
    four_whole = [r for r in itertools.combinations(range(32), 4)
                  if len(set().union(*(sources(POSITIONS, x) for x in r))) == 32]
    print(f"layouts with four single-rotation outputs: {len(four_whole)}")
    found = []
    for r1, r2 in itertools.combinations(range(1, 32), 2):
        used = sources(POSITIONS, 0) | sources(POSITIONS, r1) | sources(POSITIONS, r2)
        if len(used) != 24:
            continue
        left = word - used
        for ra, rb in itertools.permutations(range(32), 2):
            piece_a = {p for p in POSITIONS if (p - ra) % 32 in left}
            piece_b = set(POSITIONS) - piece_a
            if piece_b and sources(piece_b, rb) <= left and \
                    len(sources(piece_a, ra) | sources(piece_b, rb)) == 8:
                found.append((r1, r2, ra, sorted(piece_a), rb, sorted(piece_b)))
    print(f"three whole outputs (rotations 0, r1, r2) + one two-piece output: {len(found)}")
    for r1, r2, ra, a, rb, b in found[:8]:
        print(f"  rotations 0, {r1}, {r2}; split: rot {ra} -> bits {a}, rot {rb} -> bits {b}")


if __name__ == "__main__":
    main()

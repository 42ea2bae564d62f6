"""Exhaustive search: how few integer ops can turn one 32-bit word of 8 E2M1 codes into the four
fp16x2 mma A registers, over every bit layout of the word? (bench/RESULTS.md, moe_experts.)

A register needs its two codes' magnitude bits at fp16 bits 9..11 / 25..27 and signs at 15 / 31.
Model: each register is (rot(w, m) & MAG) | (rot(w, s) & SIGN); a register with m == s costs one AND,
else an AND and a LOP3; each distinct nonzero rotation costs one op (shared between registers).
Also checks the cheaper form "one byte-permute (prmt) or rotation + one AND a register".
Runs on a CPU in a few seconds: python bench/experiments/fp4_layout_search.py
"""
import itertools

MAG = (9, 10, 11, 25, 26, 27)
SIGN = (15, 31)
ALL = MAG + SIGN


def pre(bits, s):
    """Bits of w that land on `bits` after rotating w left by s."""
    return frozenset((b - s) % 32 for b in bits)


def one_op_layouts():
    """Sets of four one-op transforms (rotation or prmt byte pick) whose pre-images tile the word."""
    cands = [pre(ALL, s) for s in range(32)]
    for a, b in itertools.permutations(range(4), 2):  # prmt: fp16 high bytes 1 and 3 from bytes a, b
        cands.append(frozenset([x + 8 * a for x in (1, 2, 3, 7)] + [x + 8 * b for x in (1, 2, 3, 7)]))
    found = 0
    for combo in itertools.combinations(cands, 4):
        u = frozenset().union(*combo)
        found += len(u) == 32
    return found


def min_ops():
    best = (99, None)

    def signs(k, free, ms, ss):
        nonlocal best
        if k == 4:
            cost = len({x for x in ms + ss if x}) + sum(1 if m == s else 2 for m, s in zip(ms, ss))
            if cost < best[0]:
                best = (cost, (tuple(ms), tuple(ss)))
            return
        for s in range(32):
            t = pre(SIGN, s)
            if t <= free:
                signs(k + 1, free - t, ms, ss + [s])

    def mags(used, ms):
        if len(ms) == 4:
            signs(0, frozenset(range(32)) - used, ms, [])
            return
        for m in range(ms[-1] + 1 if ms else 0, 32):
            t = pre(MAG, m)
            if not used & t:
                mags(used | t, ms + [m])

    mags(frozenset(), [])
    return best


if __name__ == "__main__":
    print("one op + one AND a register: layouts found =", one_op_layouts())
    cost, (ms, ss) = min_ops()
    print(f"minimum ops a word: {cost} (magnitude rotations {ms}, sign rotations {ss})")

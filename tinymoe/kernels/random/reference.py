"""Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"), in NumPy.

A counter-based generator: the random numbers are a fixed function of (counter, key),
    (w0, w1, w2, w3) = Philox(counter = (c0, c1, c2, c3), key = (k0, k1))     4 x uint32
so any element can be drawn on its own, in any order, by any thread: no state is updated,
and "the next numbers" just means "the next counter". Ten rounds of
    (c0, c1, c2, c3) <- (hi(M1 c2) ^ c1 ^ k0,  lo(M1 c2),  hi(M0 c0) ^ c3 ^ k1,  lo(M0 c0))
with the key bumped by the Weyl constants (W0, W1) between rounds. This file is the spec the
GPU kernel (philox.cu) is tested against; it matches the Random123 known-answer vectors.

tinymoe's draws (tinymoe/random.py): element i of draw number `draw` of step `step` uses
counter (i // 4 low word, i // 4 high word, draw, step) and word i % 4 of the result:
    uniform(i) = (w >> 8) * 2^-24                     in [0, 1), exact in float32
    normal(i)  = sqrt(-2 ln u1) * (cos | sin)(2 pi u2)    Box-Muller on the pair of words
                 (w0, w1) for lanes 0, 1 and (w2, w3) for lanes 2, 3 (cos on even lanes),
                 u1 = ((w_a >> 8) + 1) * 2^-24 in (0, 1], u2 = (w_b >> 8) * 2^-24, in float64
"""
from __future__ import annotations

import numpy as np

M0, M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
W0, W1 = 0x9E3779B9, 0xBB67AE85
MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32(counter, key, rounds: int = 10):
    """counter (n, 4) uint32, key (2,) uint32 -> (n, 4) uint32."""
    c = np.asarray(counter, dtype=np.uint64).reshape(-1, 4)
    c0, c1, c2, c3 = (c[:, j].copy() for j in range(4))
    k0, k1 = (int(k) & 0xFFFFFFFF for k in key)
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + W0) & 0xFFFFFFFF, (k1 + W1) & 0xFFFFFFFF
        p0, p1 = M0 * c0, M1 * c2                       # 32 x 32 -> 64 bits, exact in uint64
        hi0, lo0 = p0 >> np.uint64(32), p0 & MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ np.uint64(k0), lo1, hi0 ^ c3 ^ np.uint64(k1), lo0
    return np.stack([c0, c1, c2, c3], axis=1).astype(np.uint32)


def _words(n: int, key, draw: int, step: int):
    """The (ceil(n / 4), 4) words of a draw of n numbers."""
    blocks = np.arange(-(-n // 4), dtype=np.uint64)
    counter = np.stack([blocks & MASK32, blocks >> np.uint64(32),
                        np.full_like(blocks, draw & 0xFFFFFFFF), np.full_like(blocks, step & 0xFFFFFFFF)], 1)
    return philox4x32(counter, key)


def uniform(n: int, key, draw: int, step: int, dtype=np.float32):
    """n numbers in [0, 1): (w >> 8) 2^-24."""
    w = _words(n, key, draw, step).reshape(-1)[:n]
    return ((w >> 8).astype(np.float32) * np.float32(2.0**-24)).astype(dtype)


def normal(n: int, key, draw: int, step: int, dtype=np.float32):
    """n standard normal numbers (Box-Muller, in float64, rounded to dtype)."""
    w = _words(n, key, draw, step).astype(np.float64)                   # (blocks, 4)
    scale = 2.0**-24
    u1 = (np.floor(w[:, 0::2] / 256) + 1) * scale                        # (blocks, 2) in (0, 1]
    u2 = np.floor(w[:, 1::2] / 256) * scale
    r, theta = np.sqrt(-2.0 * np.log(u1)), 2.0 * np.pi * u2
    z = np.stack([r * np.cos(theta), r * np.sin(theta)], axis=2)         # (blocks, 2, 2): lanes
    return z.reshape(-1)[:n].astype(dtype)

"""A small random generator that gives the same numbers in Python and in JavaScript.

The torch-free runtime (:mod:`charrnn.runtime`) draws its samples from it, and so does the exported web
page (``charrnn/web/charrnn.js`` holds the same generator), so ``charrnn generate FILE.onnx --seed N``
and the page given seed N choose the same characters from the same probabilities.

The generator is xoshiro128** (Blackman and Vigna), seeded by SplitMix64: 32-bit integer arithmetic that
JavaScript does exactly (``Math.imul``, shifts), and a 64-bit seeding step it does with ``BigInt``.
A draw in [0, 1) is 53 bits of two outputs, as ``Math.random`` and NumPy's doubles are built.
"""

from __future__ import annotations

import os

import numpy as np

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF


def _rotl(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M32


def seed_words(seed: int) -> list[int]:
    """The generator's four 32-bit state words for ``seed`` (an integer; taken modulo 2**64): SplitMix64's
    outputs, low 32 bits each."""
    x, words = seed & _M64, []
    for _ in range(4):
        x = (x + 0x9E3779B97F4A7C15) & _M64
        z = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        words.append((z ^ (z >> 31)) & _M32)
    return words if any(words) else [1, 0, 0, 0]    # the one state xoshiro never leaves


class PortableRandom:
    """xoshiro128** from ``seed`` (``None``: a seed from the operating system)."""

    def __init__(self, seed: int | None = None):
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        self.s = seed_words(seed)

    def next_u32(self) -> int:
        s0, s1, s2, s3 = self.s
        result = (_rotl((s1 * 5) & _M32, 7) * 9) & _M32
        t = (s1 << 9) & _M32
        s2 ^= s0
        s3 ^= s1
        s1 ^= s2
        s0 ^= s3
        s2 ^= t
        self.s = [s0, s1, s2, _rotl(s3, 11)]
        return result

    def uniform(self) -> float:
        """A double in [0, 1): 27 bits of one output above 26 of the next."""
        a, b = self.next_u32() >> 5, self.next_u32() >> 6
        return (a * 67108864 + b) / 9007199254740992

    def random(self, shape) -> np.ndarray:
        """Doubles in [0, 1) of ``shape``, drawn in C order (NumPy ``Generator.random``'s signature)."""
        n = int(np.prod(shape))
        return np.array([self.uniform() for _ in range(n)], dtype=np.float64).reshape(shape)

"""Seeded random streams and the logistic link that the built-in generators share.

Every stream is a `numpy.random.SeedSequence` over the federation seed and a few names (what is
drawn, for whom), so any machine that knows the names draws the same values.
"""

from __future__ import annotations

import zlib

import numpy as np


def entropy(seed: int, *names: str) -> list[int]:
    """Seed-sequence entropy for the stream named by `names` under the federation `seed`."""
    return [seed % 2**64, *(zlib.crc32(name.encode("utf-8")) for name in names)]


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function, elementwise."""
    return 1.0 / (1.0 + np.exp(-x))

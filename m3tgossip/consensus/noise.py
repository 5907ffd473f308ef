"""Noise of neighbours' releases: the variance a node estimates from deltas and the one it uses.

This module owns how much differential-privacy noise a node attributes to a neighbour: the
variance that neighbour declares on the wire, checked against an estimate from the deltas it
sent, so that under-declaring gains it no weight (`weights.noise_aware_weights` uses the result).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: MAD of a standard normal: the median of |N(0, 1)|
_MAD_NORMAL = 0.6744897501960817


def check_noise_var(value: float, what: str) -> None:
    """ValueError naming `what` unless `value` is a non-negative finite number."""
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{what} must be a non-negative finite number, got {value}")


def estimate_noise_var(delta_history: Sequence[np.ndarray]) -> float:
    """Per-element noise variance of a neighbour, estimated from the deltas it sent.

    Each delta is (clipped signal + i.i.d. Gaussian noise). Per delta the estimate is the
    squared normalised median absolute deviation, `(median|d - median(d)| / 0.6745)^2`; over
    the history, the median of the per-delta estimates. It is consistent (tends to the true
    variance as the size grows) whenever the noise dominates the signal per element, which
    clipping guarantees for DP-sized noise (a clipped signal has RMS at most C / sqrt(n) per
    element); it ignores up to half the elements carrying a large sparse signal, so a clean
    node with a sparse update scores about 0. A dense unclipped signal reads as noise of its own
    RMS; and a CHOCO delta also carries the sender's mixing correction, with some of its
    neighbours' noise in it, so the estimate leans high next to noisy nodes. An empty history
    gives 0.0.
    """
    estimates = []
    for d in delta_history:
        flat = np.asarray(d, dtype=np.float64).reshape(-1)
        if not flat.size:
            continue
        if not np.all(np.isfinite(flat)):
            raise ValueError("a delta in the history has a non-finite value")
        mad = float(np.median(np.abs(flat - np.median(flat))))
        estimates.append((mad / _MAD_NORMAL) ** 2)
    return float(np.median(estimates)) if estimates else 0.0


def effective_noise_var(declared: float, estimated: float) -> float:
    """`max(declared, estimated)`: under-declaring one's noise gains a node no weight."""
    check_noise_var(declared, "declared noise variance")
    check_noise_var(estimated, "estimated noise variance")
    return max(declared, estimated)

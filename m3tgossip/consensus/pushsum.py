"""Asynchronous push-sum: a value and a weight whose ratio tends to the network average.

This module owns the mass-conserving state of one node under push-sum; the daemon decides when
to split, where the shares go and what comes back.
"""

from __future__ import annotations

import numpy as np


class PushSum:
    """Asynchronous push-sum (Kempe, Dobra, Gehrke 2003) for directed or lossy links.

    A node carries a value `x` and a scalar weight `w`; `x / w` tends to the network average as
    long as the total mass (sum of `x` and of `w`) is conserved: a share that is not delivered
    must be absorbed back by its sender.
    """

    def __init__(self, x: np.ndarray, w: float = 1.0) -> None:
        if not w > 0.0:
            raise ValueError(f"push-sum weight must be positive, got {w}")
        self.x = np.array(x, dtype=np.float64)
        self.w = float(w)

    def split(self, n_out: int) -> tuple[np.ndarray, float]:
        """Keep a `1/(n_out+1)` share; return the equal share to send to each out-neighbour."""
        if n_out < 0:
            raise ValueError(f"n_out must not be negative, got {n_out}")
        fraction = 1.0 / (n_out + 1)
        self.x *= fraction
        self.w *= fraction
        return self.x.copy(), self.w

    def absorb(self, x: np.ndarray, w: float) -> None:
        """Add a received (or undelivered, returned) share."""
        if np.shape(x) != self.x.shape:
            raise ValueError(f"push-sum share has shape {np.shape(x)}, expected {self.x.shape}")
        if w < 0.0:
            raise ValueError(f"push-sum share weight must not be negative, got {w}")
        self.x += x
        self.w += w

    def estimate(self) -> np.ndarray:
        """The current estimate of the average, `x / w`."""
        return self.x / self.w

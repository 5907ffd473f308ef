"""Renyi-DP accounting of Gaussian releases, and the noise that spends a budget exactly.

This module owns the privacy arithmetic of the Gaussian mechanism: it sees noise multipliers
(noise std over L2 sensitivity) and counts of releases, never the released values.

Accountant. Renyi DP (Mironov 2017) of the Gaussian mechanism at order `alpha` is
`alpha / (2 z^2)` for noise multiplier `z` = noise std / L2 sensitivity; releases compose by
adding RDP (adaptively chosen releases included). RDP is turned into (epsilon, delta)-DP with
the conversion of Canonne, Kamath, Steinke 2020 and Balle et al. 2020 (Theorem 21):
`eps = min_alpha rdp(alpha) + log((alpha - 1) / alpha) - (log(delta) + log(alpha)) / (alpha - 1)`,
over the fixed order grid `DEFAULT_ORDERS`, clamped at 0. It is never looser than the classic
`rdp(alpha) + log(1/delta) / (alpha - 1)`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

#: Renyi orders of the accountant: a fine grid near 1 (large epsilon) up to 1024 (small epsilon)
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    sorted(
        {round(1.0 + k / 20.0, 6) for k in range(1, 20)}  # 1.05 .. 1.95
        | {round(2.0 + k / 4.0, 6) for k in range(0, 33)}  # 2 .. 10
        | {float(a) for a in range(11, 64)}
        | {64.0, 80.0, 96.0, 128.0, 160.0, 192.0, 256.0, 384.0, 512.0, 768.0, 1024.0}
    )
)


def gaussian_rdp(noise_multiplier: float, orders: Iterable[float] = DEFAULT_ORDERS) -> np.ndarray:
    """RDP of one Gaussian release, `alpha / (2 z^2)` at every order (z = std / sensitivity)."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0.0):
        raise ValueError(f"noise_multiplier must be positive and finite, got {noise_multiplier}")
    a = np.asarray(tuple(orders), dtype=float)
    return a / (2.0 * noise_multiplier**2)


def rdp_to_epsilon(rdp: np.ndarray, orders: Iterable[float], delta: float) -> float:
    """(epsilon, delta)-DP from RDP by the Canonne-Kamath-Steinke / Balle et al. conversion.

    `min_alpha rdp + log((alpha-1)/alpha) - (log delta + log alpha)/(alpha-1)`, clamped at 0.
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    a = np.asarray(tuple(orders), dtype=float)
    r = np.asarray(rdp, dtype=float)
    if not np.any(r > 0.0):
        return 0.0
    eps = r + np.log1p(-1.0 / a) - (math.log(delta) + np.log(a)) / (a - 1.0)
    return max(0.0, float(np.min(eps)))


class RDPAccountant:
    """Renyi-DP accountant of a sequence of Gaussian releases (one per `step`)."""

    def __init__(self, orders: Iterable[float] = DEFAULT_ORDERS) -> None:
        self.orders = np.asarray(tuple(orders), dtype=float)
        if self.orders.ndim != 1 or not self.orders.size or np.any(self.orders <= 1.0):
            raise ValueError("Renyi orders must be a non-empty list of numbers > 1")
        self.rdp = np.zeros_like(self.orders)
        self.releases = 0

    def step(self, noise_multiplier: float, count: int = 1) -> None:
        """Record `count` Gaussian releases of multiplier `noise_multiplier` (std/sensitivity)."""
        if count < 0:
            raise ValueError(f"count must not be negative, got {count}")
        self.rdp += count * gaussian_rdp(noise_multiplier, self.orders)
        self.releases += count

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at `delta`."""
        return rdp_to_epsilon(self.rdp, self.orders, delta)

    def epsilon_after(self, noise_multiplier: float, delta: float, count: int = 1) -> float:
        """Epsilon that `count` more releases of `noise_multiplier` would bring the total to."""
        extra = count * gaussian_rdp(noise_multiplier, self.orders)
        return rdp_to_epsilon(self.rdp + extra, self.orders, delta)

    def state(self) -> dict[str, Any]:
        """JSON-able state, for checkpoints (a restarted node must not forget what it spent)."""
        return {"orders": self.orders.tolist(), "rdp": self.rdp.tolist(), "releases": self.releases}

    def load(self, state: Mapping[str, Any]) -> None:
        """Restore from `state()`; the order grid must be the same."""
        orders = np.asarray(state["orders"], dtype=float)
        if orders.shape != self.orders.shape or not np.allclose(orders, self.orders):
            raise ValueError("accountant state was written with another Renyi order grid")
        rdp = np.asarray(state["rdp"], dtype=float)
        if rdp.shape != self.rdp.shape or np.any(~np.isfinite(rdp)) or np.any(rdp < 0):
            raise ValueError("accountant state has a bad rdp vector")
        self.rdp = rdp.copy()
        self.releases = int(state["releases"])


def calibrate_noise_multiplier(
    epsilon: float, delta: float, releases: int, orders: Iterable[float] = DEFAULT_ORDERS
) -> float:
    """Smallest multiplier z (std / sensitivity) whose `releases` releases spend <= `epsilon`.

    Binary search on log z; the result spends `epsilon` to about 1e-9 relative. ValueError if
    `epsilon` is below what the order grid can certify at `delta`.
    """
    if releases < 1:
        raise ValueError(f"releases must be >= 1, got {releases}")
    if isinstance(epsilon, bool) or not (
        isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0.0
    ):
        raise ValueError(f"epsilon: must be a positive finite number, got {epsilon!r}")
    a = tuple(orders)

    def spent(z: float) -> float:
        return rdp_to_epsilon(releases * gaussian_rdp(z, a), a, delta)

    floor = rdp_to_epsilon(np.full(len(a), 1e-300), a, delta)
    if epsilon <= floor * (1.0 + 1e-6):
        raise ValueError(
            f"epsilon {epsilon} is too small to certify at delta {delta} with this order grid"
        )
    lo, hi = 1.0, 1.0
    while spent(hi) > epsilon:
        hi *= 2.0
    while spent(lo) <= epsilon:
        lo /= 2.0
    for _ in range(200):  # invariant: spent(lo) > epsilon >= spent(hi)
        mid = math.sqrt(lo * hi)
        if mid in (lo, hi):
            break
        if spent(mid) > epsilon:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1.0 + 1e-12:
            break
    return hi

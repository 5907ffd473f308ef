"""Renyi-DP accounting of Gaussian releases, and the noise that spends a budget exactly.

This module owns the privacy arithmetic of the Gaussian mechanism: it sees noise multipliers
(noise std over L2 sensitivity), sampling rates and counts of releases, never the released
values.

Accountant. Renyi DP (Mironov 2017) of the Gaussian mechanism at order `alpha` is
`alpha / (2 z^2)` for noise multiplier `z` = noise std / L2 sensitivity; releases compose by
adding RDP (adaptively chosen releases included). A DP-SGD step is the Poisson-subsampled
Gaussian mechanism (each protected unit enters the step independently with probability `q`,
add/remove neighbouring); its RDP is that of Mironov, Talwar and Zhang 2019 ("Renyi
Differential Privacy of the Sampled Gaussian Mechanism", Section 3.3: the binomial sum at
integer orders, the two erfc-weighted series at fractional ones), as computed by Google's
dp-accounting and Opacus, against which the tests check it.
RDP is turned into (epsilon, delta)-DP with the conversion of Canonne, Kamath, Steinke 2020
and Balle et al. 2020 (Theorem 21):
`eps = min_alpha rdp(alpha) + log((alpha - 1) / alpha) - (log(delta) + log(alpha)) / (alpha - 1)`,
over the fixed order grid `DEFAULT_ORDERS`, clamped at 0. It is never looser than the classic
`rdp(alpha) + log(1/delta) / (alpha - 1)`.
"""

from __future__ import annotations

import functools
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


#: terms of the fractional-order series before an order is given up (RDP infinity there), as
#: dp-accounting does
_MAX_SERIES_TERMS = 1000


def _log_erfc(x: float) -> float:
    """log(erfc(x)), with the asymptotic series where erfc underflows."""
    r = math.erfc(x)
    if r > 1e-300:
        return math.log(r)
    return (
        -math.log(math.pi) / 2
        - math.log(x)
        - x * x
        - 0.5 * x**-2
        + 0.625 * x**-4
        - 37.0 / 24.0 * x**-6
        + 353.0 / 64.0 * x**-8
    )


def _log_a_int(q: float, z: float, alpha: int) -> float:
    """log A_alpha of the sampled Gaussian at an integer order (binomial sum, in log space)."""
    i = np.arange(alpha + 1, dtype=float)
    log_fact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, alpha + 1, dtype=float)))])
    log_binom = log_fact[alpha] - log_fact - log_fact[::-1]
    terms = log_binom + i * math.log(q) + (alpha - i) * math.log1p(-q) + (i * i - i) / (2 * z * z)
    top = float(np.max(terms))
    return top + math.log(float(np.sum(np.exp(terms - top))))


def _log_erfc_array(x: np.ndarray) -> np.ndarray:
    return np.array([_log_erfc(float(v)) for v in x])


def _log_a_frac(q: float, z: float, alpha: float) -> float:
    """log A_alpha of the sampled Gaussian at a fractional order: the two series of Mironov et
    al. 2019 (Section 3.3) with the binomial coefficients' absolute values (an upper bound),
    summed until both terms fall and are 30 nats below the total, as dp-accounting does;
    infinity (the order certifies nothing) if that takes more than `_MAX_SERIES_TERMS`."""
    z0 = z * z * math.log(1.0 / q - 1.0) + 0.5
    lq, l1q = math.log(q), math.log1p(-q)
    root = math.sqrt(2.0) * z
    lg = math.lgamma(alpha + 1)
    n = 32
    while True:  # terms in growing chunks: most orders converge within a few dozen
        i = np.arange(n, dtype=float)
        j = alpha - i
        log_coef = lg - np.array([math.lgamma(k + 1) + math.lgamma(alpha - k + 1) for k in i])
        log_s0 = log_coef + i * lq + j * l1q + (i * i - i) / (2.0 * z * z)
        log_s0 += math.log(0.5) + _log_erfc_array((i - z0) / root)
        log_s1 = log_coef + j * lq + i * l1q + (j * j - j) / (2.0 * z * z)
        log_s1 += math.log(0.5) + _log_erfc_array((z0 - j) / root)
        total = np.logaddexp(np.logaddexp.accumulate(log_s0), np.logaddexp.accumulate(log_s1))
        falling = np.r_[False, (log_s0[1:] < log_s0[:-1]) & (log_s1[1:] < log_s1[:-1])]
        done = np.flatnonzero(falling & (np.maximum(log_s0, log_s1) < total - 30))
        if done.size:
            return float(total[done[0]])
        if n >= _MAX_SERIES_TERMS:
            return math.inf
        n = min(4 * n, _MAX_SERIES_TERMS)


@functools.lru_cache(maxsize=4096)
def _sampled_rdp(q: float, z: float, orders: tuple[float, ...]) -> tuple[float, ...]:
    out = []
    for a in orders:
        if float(a).is_integer():
            log_a = _log_a_int(q, z, int(a))
        else:
            log_a = _log_a_frac(q, z, a)
        out.append(max(0.0, log_a / (a - 1.0)))
    return tuple(out)


def sampled_gaussian_rdp(
    sampling_rate: float, noise_multiplier: float, orders: Iterable[float] = DEFAULT_ORDERS
) -> np.ndarray:
    """RDP of one step of the Poisson-subsampled Gaussian mechanism at every order.

    Each protected unit is in the step with probability `sampling_rate` (q); the clipped sum
    gets Gaussian noise of std `noise_multiplier` (z) times the sensitivity. q = 1 is the
    plain Gaussian, `alpha / (2 z^2)`, which also bounds every q; q = 0 costs nothing.
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0.0):
        raise ValueError(f"noise_multiplier must be positive and finite, got {noise_multiplier}")
    if not 0.0 <= sampling_rate <= 1.0:
        raise ValueError(f"sampling_rate must be in [0, 1], got {sampling_rate}")
    a = tuple(float(x) for x in orders)
    if sampling_rate == 1.0:
        return gaussian_rdp(noise_multiplier, a)
    if sampling_rate == 0.0:
        return np.zeros(len(a))
    sampled = np.asarray(_sampled_rdp(float(sampling_rate), float(noise_multiplier), a))
    # subsampling never costs more than the plain Gaussian (Renyi divergence is quasi-convex),
    # which also bounds the orders whose series certify nothing or only loosely
    return np.minimum(sampled, gaussian_rdp(noise_multiplier, a))


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

    def step(self, noise_multiplier: float, count: int = 1, sampling_rate: float = 1.0) -> None:
        """Record `count` Gaussian releases of multiplier `noise_multiplier` (std/sensitivity),
        each on a Poisson sample of rate `sampling_rate` (1: no subsampling)."""
        if count < 0:
            raise ValueError(f"count must not be negative, got {count}")
        self.rdp += count * sampled_gaussian_rdp(sampling_rate, noise_multiplier, self.orders)
        self.releases += count

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at `delta`."""
        return rdp_to_epsilon(self.rdp, self.orders, delta)

    def epsilon_after(
        self, noise_multiplier: float, delta: float, count: int = 1, sampling_rate: float = 1.0
    ) -> float:
        """Epsilon that `count` more releases of `noise_multiplier` (at `sampling_rate`) would
        bring the total to."""
        extra = count * sampled_gaussian_rdp(sampling_rate, noise_multiplier, self.orders)
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
        if rdp.shape != self.rdp.shape or np.any(np.isnan(rdp)) or np.any(rdp < 0):
            raise ValueError("accountant state has a bad rdp vector")
        self.rdp = rdp.copy()
        self.releases = int(state["releases"])


def calibrate_noise_multiplier(
    epsilon: float,
    delta: float,
    releases: int,
    orders: Iterable[float] = DEFAULT_ORDERS,
    sampling_rate: float = 1.0,
) -> float:
    """Smallest multiplier z (std / sensitivity) whose `releases` releases (each on a Poisson
    sample of rate `sampling_rate`) spend <= `epsilon`.

    Root finding on log z (bracketing, then the Illinois method); the result spends
    `epsilon` to about 1e-10 relative (1e-7 for a subsampled release). ValueError if
    `epsilon` is below what the order grid can certify at `delta`.
    """
    if releases < 1:
        raise ValueError(f"releases must be >= 1, got {releases}")
    if isinstance(epsilon, bool) or not (
        isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0.0
    ):
        raise ValueError(f"epsilon: must be a positive finite number, got {epsilon!r}")
    a = tuple(orders)
    floor = rdp_to_epsilon(np.full(len(a), 1e-300), a, delta)
    if epsilon <= floor * (1.0 + 1e-6):
        raise ValueError(
            f"epsilon {epsilon} is too small to certify at delta {delta} with this order grid"
        )
    # orders whose conversion alone (at RDP 0) exceeds epsilon never decide `spent(z) <= eps`:
    # leaving them out changes no comparison below and saves their (slow) series
    a = tuple(
        x for x in a if math.log1p(-1.0 / x) - (math.log(delta) + math.log(x)) / (x - 1) < epsilon
    )

    def spent(z: float) -> float:
        return rdp_to_epsilon(releases * sampled_gaussian_rdp(sampling_rate, z, a), a, delta)

    def gap(log_z: float) -> float:  # log(spent / epsilon): > 0 overspends
        return math.log(max(spent(math.exp(log_z)), 1e-300)) - math.log(epsilon)

    lo, hi = 0.0, 0.0  # log z; invariant below: gap(lo) > 0 >= gap(hi)
    g_hi = gap(hi)
    while g_hi > 0:
        lo, hi = hi, hi + math.log(2.0)
        g_hi = gap(hi)
    g_lo = gap(lo) if lo < hi else g_hi
    while g_lo <= 0:
        hi, g_hi = lo, g_lo
        lo -= math.log(2.0)
        g_lo = gap(lo)
    # Illinois (regula falsi that halves a stale end): few evaluations of the slow series
    tol = 1e-10 if sampling_rate == 1.0 else 1e-7
    side = 0
    for _ in range(200):
        if hi - lo < tol or -g_hi < tol:
            break
        mid = (lo * g_hi - hi * g_lo) / (g_hi - g_lo)
        if not lo < mid < hi:
            mid = 0.5 * (lo + hi)
        g_mid = gap(mid)
        if g_mid > 0:
            lo, g_lo = mid, g_mid
            if side == -1:
                g_hi /= 2.0
            side = -1
        else:
            hi, g_hi = mid, g_mid
            if side == 1:
                g_lo /= 2.0
            side = 1
    return math.exp(hi)

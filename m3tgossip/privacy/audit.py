"""An empirical lower bound on epsilon from one training run with canaries.

This module owns the statistics of the audit of Steinke, Nasr and Jagielski 2023 ("Privacy
Auditing with One (1) Training Run"); it sees guesses and counts, never models. `m` canaries
(records no one else has) are each put into the training data independently with probability
1/2; after training, the auditor guesses for the `r` canaries it is surest about whether they
were in (lowest loss) or out (highest loss). If training is epsilon-DP, every guess is right
with probability at most `p = e^eps / (1 + e^eps)` given the others, so the number of right
guesses is stochastically dominated by Binomial(r, p). The lower bound is the largest epsilon
at which so many right guesses would have had probability at most `beta` (default 0.05): a
training procedure with a smaller epsilon is rejected at confidence 1 - beta.

For an (epsilon, delta)-DP procedure the probability grows by a term of the order of
`m * delta` (Steinke et al. bound it); `lower_bound` takes `m * delta` off `beta`, which is
below 1e-3 for the profiles' delta and a few hundred canaries.
"""

from __future__ import annotations

import math

import numpy as np


def binomial_tail(r: int, p: float, v: int) -> float:
    """P[Binomial(r, p) >= v]."""
    if v <= 0:
        return 1.0
    if v > r:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    k = np.arange(v, r + 1, dtype=float)
    logs = (
        math.lgamma(r + 1)
        - np.array([math.lgamma(x + 1) + math.lgamma(r - x + 1) for x in k])
        + k * math.log(p)
        + (r - k) * math.log1p(-p)
    )
    top = float(np.max(logs))
    return min(1.0, math.exp(top) * float(np.sum(np.exp(logs - top))))


def lower_bound(
    correct: int, guesses: int, beta: float = 0.05, canaries: int = 0, delta: float = 0.0
) -> float:
    """The largest epsilon at which `correct` right guesses out of `guesses` have probability
    at most `beta` (less `canaries * delta`, the delta slack); 0 if none."""
    if not 0 <= correct <= guesses:
        raise ValueError(f"correct must be in [0, guesses], got {correct} of {guesses}")
    level = beta - canaries * delta
    if level <= 0:
        raise ValueError(f"canaries * delta {canaries * delta:g} leaves no confidence at {beta}")

    def tail(eps: float) -> float:
        return binomial_tail(guesses, 1.0 / (1.0 + math.exp(-eps)), correct)

    if tail(0.0) > level:
        return 0.0
    lo, hi = 0.0, 1.0
    while tail(hi) <= level and hi < 100.0:
        lo, hi = hi, 2.0 * hi
    for _ in range(60):  # tail grows with eps: tail(lo) <= level < tail(hi)
        mid = 0.5 * (lo + hi)
        if tail(mid) <= level:
            lo = mid
        else:
            hi = mid
    return lo


def guess(scores: np.ndarray, included: np.ndarray, k_in: int, k_out: int) -> tuple[int, int]:
    """Guess "in" for the `k_in` highest scores and "out" for the `k_out` lowest; returns
    (right guesses, guesses). `included[i]` is whether canary i was trained on."""
    s = np.asarray(scores, dtype=float)
    inc = np.asarray(included, dtype=bool)
    if s.shape != inc.shape or k_in + k_out > s.size:
        raise ValueError("scores and included must match and hold k_in + k_out canaries")
    order = np.argsort(-s, kind="stable")
    right = int(inc[order[:k_in]].sum()) + int((~inc[order[s.size - k_out :]]).sum())
    return right, k_in + k_out

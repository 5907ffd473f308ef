"""Robust mixing against Byzantine neighbours: self-centred clipping and trimmed mean.

Both replace the plain weighted average of `mixing.choco_mix_into` for one component of one
node, given its own value and the replicas of the neighbours heard this round. numpy only.

- Self-centred clipping (He, Karimireddy and Jaggi, 2022): every neighbour's pull
  `x_j - x_i` is clipped to norm `tau` before the weighted sum, so one neighbour can move a
  node by at most `w_ij * tau` per round. `tau` adapts: by default the median of the pull
  norms, so honest neighbours (a majority) pass unclipped while outliers are cut down.
- Coordinate-wise trimmed mean: for each coordinate, drop the `trim` largest and smallest of
  {own, neighbours'} values and average the rest.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

AGGREGATORS = ("mean", "clip", "trimmed")


def clip_tau(own: np.ndarray, replicas: Mapping[str, np.ndarray]) -> float:
    """The clipping radius: median distance from `own` to the neighbours' values."""
    if not replicas:
        return 0.0
    return float(np.median([np.linalg.norm(r - own) for r in replicas.values()]))


def clipped_mix_into(
    own: np.ndarray,
    self_id: str,
    replicas: Mapping[str, np.ndarray],
    weights: Mapping[str, float],
    tau: float | None = None,
) -> float:
    """`own += sum_j w_ij * clip(replicas[j] - own, tau)`, in place; returns tau used."""
    if tau is None:
        tau = clip_tau(own, replicas)
    total = np.zeros(own.shape, dtype=np.float64)
    for j, r in replicas.items():
        pull = r.astype(np.float64) - own
        norm = float(np.linalg.norm(pull))
        if norm > tau > 0.0:
            pull *= tau / norm
        elif tau == 0.0:
            continue
        total += weights[j] * pull
    own += total.astype(own.dtype, copy=False)
    return tau


def trimmed_mean_into(own: np.ndarray, replicas: Mapping[str, np.ndarray], trim: int = 1) -> None:
    """Replace `own` by the coordinate-wise trimmed mean of own and neighbours' values.

    With fewer than `2 * trim + 1` values the trim shrinks so that at least one value is left.
    """
    stack = np.stack([own.astype(np.float64), *(r.astype(np.float64) for r in replicas.values())])
    n = stack.shape[0]
    k = max(0, min(trim, (n - 1) // 2))
    if k:
        stack.sort(axis=0)
        stack = stack[k : n - k]
    own[...] = stack.mean(axis=0)

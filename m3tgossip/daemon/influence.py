"""Per-neighbour influence: how much each neighbour's term in a round's mix moved this node's
held-out loss, from the states and replicas the mix already reads.

The `mean` mix moves a shared component by `sum_j gamma * w_ij * (x_j - published)`. On a
round of `gossip.influence_every`, for every neighbour j this module records

- `per_neighbour[j]`: the change of the node's held-out loss if the mix had taken j's term
  alone, `L(x + t_j) - L(x)` with `t_j = gamma * w_ij * (x_j - published)` over every component
  j shares (one evaluation of the loss per neighbour);
- `first_order[j]`: `g . t_j`, with `g` the gradient of the loss before the mix (the
  workload's `loss_gradient()`); the first-order terms add up to the first-order change of the
  whole mix, and they are free where the loss is cheap to differentiate but costly to
  evaluate;
- the loss before and after the whole mix, so the figures can be judged round by round.

Negative values mean j's values lowered the node's loss (they helped), positive that they
raised it. Loss and gradient are computed on the node from records that never leave it, and
the figures go into its own metrics; nothing is sent. The terms are kept until the round's
record, one array per neighbour and component: on measured rounds the node holds what a
replica per neighbour would, which the streaming mix otherwise spares it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


class NeighbourInfluence:
    """Each neighbour's effect on the node's held-out loss in one round."""

    def __init__(self) -> None:
        #: per component, the gradient of the held-out loss; None: not measured this round
        self.grad: dict[str, np.ndarray] | None = None
        #: the held-out loss at the parameters the gradient was taken at
        self.loss: float | None = None
        #: the shared values the gradient was taken at (before the mix)
        self.before: dict[str, np.ndarray] = {}
        #: per neighbour and component, its term in the mix
        self.terms: dict[str, dict[str, np.ndarray]] = {}

    def begin(
        self,
        measured: tuple[float, dict[str, np.ndarray]] | None,
        shared: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Start a round: `measured` is (loss, gradient per component) at the values `shared`,
        or None (no figures this round)."""
        self.terms = {}
        if measured is None:
            self.grad, self.loss, self.before = None, None, {}
            return
        self.loss, self.grad = float(measured[0]), measured[1]
        self.before = {c: x.copy() for c, x in (shared or {}).items()}

    def add(
        self, peer: str, comp: str, coefficient: float, value: np.ndarray, published: np.ndarray
    ) -> None:
        """The term `coefficient * (value - published)` of `peer` in the mix of `comp`."""
        if self.grad is None or comp not in self.before:
            return
        term = np.subtract(value, published, dtype=np.float64)
        term *= coefficient
        self.terms.setdefault(peer, {})[comp] = term

    def first_order(self) -> dict[str, float]:
        """Per neighbour, `g . t_j` over the components it shares."""
        grad = self.grad or {}
        out = {}
        for peer in sorted(self.terms):
            total = 0.0
            for comp, term in self.terms[peer].items():
                g = grad.get(comp)
                if g is not None and g.shape == term.shape:
                    total += float(np.dot(g.astype(np.float64, copy=False), term))
            out[peer] = total
        return out

    def record(
        self, shared: dict[str, np.ndarray], loss: Callable[[], float | None]
    ) -> dict[str, object] | None:
        """The round's figures for the metrics, or None if the round was not measured.

        `shared` holds the mixed values and `loss` evaluates the held-out loss at whatever
        `shared` holds: each neighbour's term is put on the values from before the mix in
        turn, evaluated, and the mixed values are put back."""
        if self.grad is None or self.loss is None:
            return None
        after = loss()
        first = self.first_order()
        mixed = {c: x.copy() for c, x in shared.items() if c in self.before}
        alone: dict[str, float] = {}
        try:
            for peer in sorted(self.terms):
                for comp in mixed:
                    term = self.terms[peer].get(comp)
                    value = self.before[comp] if term is None else self.before[comp] + term
                    np.copyto(shared[comp], value, casting="same_kind")
                moved = loss()
                if moved is not None:
                    alone[peer] = moved - self.loss
        finally:
            for comp, x in mixed.items():
                np.copyto(shared[comp], x)
        out: dict[str, object] = {
            "loss_before": self.loss,
            "per_neighbour": alone,
            "first_order": first,
            "predicted_change": float(sum(first.values())),
        }
        if after is not None:
            out["loss_after"] = float(after)
            out["actual_change"] = float(after) - self.loss
        self.terms = {}
        return out


def summarize(records: list[dict]) -> dict[str, object] | None:
    """Per neighbour over a node's metrics records (`train.influence` of measured rounds): the
    rounds measured, the mean and total change of the held-out loss its term alone made, the
    rounds it lowered the loss in, and the mean first-order figure; with the rounds' losses.
    None if no round was measured."""
    rounds = [
        (r["round"], r["train"]["influence"])
        for r in records
        if isinstance(r.get("train"), dict) and isinstance(r["train"].get("influence"), dict)
    ]
    if not rounds:
        return None
    peers = sorted({p for _, inf in rounds for p in inf.get("per_neighbour", {})})
    out: dict[str, dict[str, object]] = {}
    for p in peers:
        alone = [inf["per_neighbour"][p] for _, inf in rounds if p in inf["per_neighbour"]]
        first = [inf["first_order"][p] for _, inf in rounds if p in inf.get("first_order", {})]
        out[p] = {
            "rounds": len(alone),
            "mean_change": float(np.mean(alone)),
            "total_change": float(np.sum(alone)),
            "helped_rounds": int(sum(v < 0 for v in alone)),
            "mean_first_order": float(np.mean(first)) if first else None,
        }
    return {
        "rounds_measured": [r for r, _ in rounds],
        "neighbours": out,
        "actual_change": [inf.get("actual_change") for _, inf in rounds],
        "predicted_change": [inf.get("predicted_change") for _, inf in rounds],
    }

"""The held-out loss of an edu node and its gradient over the shared components, for the
daemon's per-neighbour influence (`m3tgossip.daemon.influence`, `gossip.influence_every`).

The loss is the tasks' weighted mean cross-entropy on a seeded sample of at most `max_rows`
of the node's held-out records (the same sample every round, as `explain.round_attribution`
takes), with the model in eval mode. The gradient is over every shared component's flat
vector, followed components included (their parameters get a gradient for this pass only), in
the layout the daemon mixes. Both stay on the node: they are computed from its own records and
go into its own metrics.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

#: held-out rows the loss is taken on (a bound on the per-round cost)
INFLUENCE_ROWS = 128


class HeldoutLoss:
    """The weighted held-out loss of a `train.Trainer`'s model on a fixed sample."""

    def __init__(self, trainer: Any, max_rows: int = INFLUENCE_ROWS, seed: int = 0) -> None:
        self.trainer = trainer
        held = trainer.test_set
        batch, labels = held.batch, held.labels
        if len(batch) > max_rows:
            idx = np.sort(np.random.default_rng(seed).choice(len(batch), max_rows, replace=False))
            batch = batch.take(torch.from_numpy(idx))
            labels = {t: y[idx] for t, y in labels.items()}
        self.batch = batch
        self.labels = {
            t: torch.as_tensor(np.asarray(y), dtype=torch.long) for t, y in labels.items()
        }

    def _loss(self) -> torch.Tensor | None:
        model = self.trainer.model
        logits = model(self.batch)
        total: torch.Tensor | None = None
        for t, out in logits.items():
            w = float(self.trainer.weights.get(t, 1.0))
            y = self.labels.get(t)
            if not w or y is None:
                continue
            known = y >= 0
            if not bool(known.any()):
                continue
            term = w * F.cross_entropy(out[known], y[known])
            total = term if total is None else total + term
        return total

    def value(self) -> float | None:
        """The loss at the model's current parameters; None without labelled held-out rows."""
        if not len(self.batch):
            return None
        model = self.trainer.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                loss = self._loss()
        finally:
            model.train(was_training)
        return None if loss is None else float(loss)

    def gradient(self) -> tuple[float, dict[str, np.ndarray]] | None:
        """(loss, gradient per shared component as a flat float32 array), or None."""
        if not len(self.batch):
            return None
        model = self.trainer.model
        shared = set(model.shared_vectors())
        flats = {c: f for c, f in model.flat.items() if c in shared}
        params = [p for f in flats.values() for p in f.params]
        wanted = [p.requires_grad for p in params]
        was_training = model.training
        model.eval()
        try:
            for p in params:
                p.requires_grad_(True)
            loss = self._loss()
            if loss is None:
                return None
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            for p, w in zip(params, wanted, strict=True):
                p.requires_grad_(w)
            model.train(was_training)
        out: dict[str, np.ndarray] = {}
        k = 0
        for comp, f in flats.items():
            parts = [
                torch.zeros_like(p) if g is None else g
                for p, g in zip(f.params, grads[k : k + len(f.params)], strict=True)
            ]
            k += len(f.params)
            out[comp] = f.flatten(parts)
        return float(loss.detach()), out

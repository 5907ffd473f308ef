"""Erasure of learners from a node's model, and the figures that verify it.

This module owns the arithmetic of forgetting on one node: which records belong to the learners
to forget, the approximate erasure step (bounded gradient ascent on the forget set followed by
a repair on the retained records), and the verification figures an erasure report carries
(accuracy on the forget, retain and test records, membership-inference AUC of the forget set
against held-out non-members, and the distance to a reference model). It sees a `Trainer`
and `EduData`; no sockets, no daemon. The daemon's protocol step is `m3tgossip.daemon.forget`,
the federation-wide replay the exact mode needs is `m3tgossip.edu.replay`.

Approximate erasure (`ascend`) follows the negative-gradient family of unlearning methods:
at most `ascent_steps` steps that raise the loss of the forget records, stopping once their
mean loss reaches the model's loss on its held-out records (what a model that never saw them
would have, and what a membership attack compares them with), the step's loss clamped to
that bound; then `repair_steps` ordinary steps on the retained records. It is not exact: the
figures it reports are measured, not guaranteed. Its training reads private records outside
the planned DP-SGD budget, so it is refused on a node that trains with DP-SGD.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from m3tgossip.edu import mia
from m3tgossip.edu.data.records import EduData
from m3tgossip.edu.model.m3t import Batch
from m3tgossip.edu.model.node_model import NodeModel
from m3tgossip.edu.train import Trainer

#: approximate erasure's defaults: ascent steps, their bound on a record's loss, repair steps
ASCENT_STEPS = 5
MAX_LOSS = 2.0
REPAIR_STEPS = 10


def learner_mask(ids: np.ndarray, learners: Iterable[object]) -> np.ndarray:
    """Boolean mask of the records (learner id per record: `ids`) of `learners`, compared as
    strings, the way a command line names them."""
    wanted = {str(x) for x in learners}
    return np.array([str(x) in wanted for x in np.asarray(ids)], dtype=bool)


def drop_records(trainer: Trainer, mask: np.ndarray) -> int:
    """Take the records under `mask` out of `trainer`'s pool for good (non-private training
    samples from `pool`); returns how many were in it."""
    if trainer.private is not None:
        raise ValueError("records cannot be dropped from a trainer running DP-SGD")
    before = len(trainer.pool)
    trainer.pool = trainer.pool[~mask[trainer.pool]]
    return before - len(trainer.pool)


def _loss(trainer: Trainer, idx: torch.Tensor) -> torch.Tensor | None:
    """Mean over records of each record's mean cross-entropy over its labelled tasks (the
    loss `mia.record_losses` scores), with gradients; None if no record has a label."""
    logits = trainer.model(trainer.train_batch.take(idx))
    total = torch.zeros(len(idx))
    count = torch.zeros(len(idx))
    for t in trainer.model.tasks:
        y = trainer.train_labels[t][idx]
        known = y >= 0
        if not bool(known.any()) or not trainer.weights[t]:
            continue
        ce = F.cross_entropy(logits[t][known], y[known], reduction="none")
        total = total.index_add(0, torch.nonzero(known).reshape(-1), ce)
        count = count + known.float()
    labelled = count > 0
    if not bool(labelled.any()):
        return None
    return (total[labelled] / count[labelled]).mean()


def ascend(
    trainer: Trainer,
    forget: np.ndarray,
    *,
    ascent_steps: int = ASCENT_STEPS,
    max_loss: float | None = None,
    repair_steps: int = REPAIR_STEPS,
) -> dict[str, Any]:
    """Approximate erasure of the records at positions `forget` of the trainer's train set:
    bounded ascent on them, then `repair_steps` steps on the pool (which must no longer hold
    them, see `drop_records`). The ascent stops once the forget records' mean loss reaches
    `max_loss`, by default the model's mean loss on its held-out records (what a model that
    never saw them would have, and what a membership attack compares them with; `MAX_LOSS`
    if there are none). Returns the steps taken, the bound and the forget loss before and
    after."""
    if trainer.private is not None:
        raise ValueError(
            "approximate erasure trains outside the DP-SGD budget: refused under a private profile"
        )
    idx = torch.from_numpy(np.asarray(forget, dtype=np.int64))
    if not len(idx) or not trainer.params:
        return {"ascent_steps": 0, "repair_steps": 0, "forget_loss": [None, None]}
    if max_loss is None:
        test = trainer.test_set
        held = mia.record_losses(trainer.model, test.batch, test.labels) if len(test.batch) else []
        held = np.asarray(held, dtype=np.float64)
        max_loss = float(np.nanmean(held)) if np.isfinite(held).any() else MAX_LOSS
    trainer.model.train()
    first = last = None
    taken = 0
    for _ in range(ascent_steps):
        loss = _loss(trainer, idx)
        if loss is None:
            break
        value = float(loss.detach())
        first = value if first is None else first
        last = value
        if value >= max_loss:
            break
        trainer.optimizer.zero_grad(set_to_none=True)
        (-torch.clamp(loss, max=max_loss)).backward()
        trainer.optimizer.step()
        taken += 1
    with torch.no_grad():
        end = _loss(trainer, idx)
    if end is not None:
        last = float(end)
    trainer.train_steps(repair_steps)
    return {
        "ascent_steps": taken,
        "max_loss": max_loss,
        "repair_steps": repair_steps,
        "forget_loss": [first, last],
    }


# ----------------------------------------------------------------------------- verification


@dataclass
class Probe:
    """Records to score a model on: the model's inputs and the labels of every task."""

    batch: Batch
    labels: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(next(iter(self.labels.values()))) if self.labels else 0

    @classmethod
    def of(cls, model: NodeModel, data: EduData) -> Probe:
        return cls(model.prepare(data), {t: np.asarray(y) for t, y in data.labels.items()})

    @classmethod
    def train_records(cls, trainer: Trainer, idx: np.ndarray) -> Probe:
        """Records of the trainer's own train set, at positions `idx` (no re-encoding)."""
        pos = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        labels = {t: y[pos].numpy() for t, y in trainer.train_labels.items()}
        return cls(trainer.train_batch.take(pos), labels)


@torch.no_grad()
def accuracy(model: NodeModel, probe: Probe) -> float | None:
    """Mean over the model's tasks of its accuracy on the labelled records of `probe`."""
    if not len(probe):
        return None
    model.eval()
    logits = model(probe.batch)
    accs = []
    for t in model.tasks:
        y = probe.labels.get(t)
        if y is None:
            continue
        known = y >= 0
        if known.any():
            accs.append(float((logits[t].argmax(dim=1).numpy()[known] == y[known]).mean()))
    return float(np.mean(accs)) if accs else None


def mia_auc(model: NodeModel, members: Probe, nonmembers: Probe) -> dict[str, Any] | None:
    """Loss-threshold membership inference (`m3tgossip.edu.mia`) of the forget records against
    held-out non-members: {"auc", "auc_stderr", "members", "nonmembers"}, or None if either
    side has no record labelled for the model's tasks."""
    try:
        m = mia.record_losses(model, members.batch, members.labels)
        n = mia.record_losses(model, nonmembers.batch, nonmembers.labels)
        if not np.isfinite(m).any() or not np.isfinite(n).any():
            return None
        out = mia.loss_threshold_attack(m, n)
    except ValueError:
        return None
    return {k: out[k] for k in ("auc", "auc_stderr", "members", "nonmembers")}


def distance(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float | None:
    """Relative L2 distance of two models' trained vectors over the components both hold:
    ||a - b|| / ||b||."""
    common = sorted(set(a) & set(b))
    if not common:
        return None
    num = sum(float(np.sum((np.asarray(a[c]) - np.asarray(b[c])) ** 2)) for c in common)
    den = sum(float(np.sum(np.asarray(b[c]) ** 2)) for c in common)
    return float(np.sqrt(num / den)) if den > 0 else None


def verify(
    model: NodeModel,
    *,
    forget: Probe | None,
    retain: Probe,
    test: Probe,
    nonmembers: Probe | None = None,
    reference: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """The verification figures of one node's model after an erasure (accuracies in [0, 1]);
    the membership attack scores `forget` against `nonmembers` (default `test`), records
    held out of all training and drawn like the forget records."""
    has_forget = forget is not None and len(forget) > 0
    against = test if nonmembers is None else nonmembers
    attack = mia_auc(model, forget, against) if has_forget and len(against) else None  # type: ignore[arg-type]
    return {
        "forget_acc": accuracy(model, forget) if has_forget else None,  # type: ignore[arg-type]
        "retain_acc": accuracy(model, retain),
        "test_acc": accuracy(model, test),
        "mia": attack,
        "mia_auc": attack["auc"] if attack else None,
        "distance_to_reference": (
            distance(model.vectors(), reference) if reference is not None else None
        ),
    }

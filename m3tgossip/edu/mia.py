"""Membership inference by loss threshold (Yeom et al. 2018): does a model leak who trained it?

This module owns the attack's arithmetic and one model helper, nothing else: it sees numpy
arrays and, in `record_losses`, a node model and a prepared batch; no sockets, no daemon.

The attacker holds the node's final model, a set of records known to be in its training data
(members) and a set known not to be (non-members, the node's held-out records). It scores each
record by minus its loss: a model fits what it was trained on better, so members tend to have
lower loss. The attack's quality is the area under the ROC curve of that score (0.5: no
better than a coin; 1: every member scores above every non-member), computed by the
Mann-Whitney rank formula with ties counted as half, and the membership advantage
`max_t TPR(t) - FPR(t)` (Yeom et al.'s measure, bounded by `exp(epsilon) - 1 + delta` for an
(epsilon, delta)-DP training procedure, a bound that is vacuous at the budgets used here).

A record's loss is the mean, over the node's tasks it has a label for, of the cross-entropy of
that label under the model; records with no label for any of the node's tasks are left out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of `x`, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    # boundaries of runs of equal values
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = 0.5 * (s + 1 + e)  # mean of ranks s+1 .. e
    return ranks


def _scores(members: np.ndarray, nonmembers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(members, dtype=np.float64).reshape(-1)
    n = np.asarray(nonmembers, dtype=np.float64).reshape(-1)
    if not m.size or not n.size:
        raise ValueError("membership inference needs at least one member and one non-member")
    if not (np.all(np.isfinite(m)) and np.all(np.isfinite(n))):
        raise ValueError("attack scores must be finite")
    return m, n


def auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """P(score of a random member > score of a random non-member), ties counted as 1/2."""
    m, n = _scores(members, nonmembers)
    ranks = _average_ranks(np.concatenate([m, n]))
    u = ranks[: m.size].sum() - m.size * (m.size + 1) / 2.0
    return float(u / (m.size * n.size))


def auc_stderr(value: float, n_members: int, n_nonmembers: int) -> float:
    """Standard error of an AUC estimate (Hanley and McNeil 1982)."""
    a = min(max(value, 1e-12), 1.0 - 1e-12)
    q1 = a / (2.0 - a)
    q2 = 2.0 * a * a / (1.0 + a)
    var = (a * (1.0 - a) + (n_members - 1) * (q1 - a * a) + (n_nonmembers - 1) * (q2 - a * a)) / (
        n_members * n_nonmembers
    )
    return math.sqrt(max(var, 0.0))


def roc_curve(members: np.ndarray, nonmembers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of the rule "member if score >= t" over every threshold t.

    Both arrays run from (0, 0) to (1, 1), thresholds from the highest score down.
    """
    m, n = _scores(members, nonmembers)
    thresholds = np.unique(np.concatenate([m, n]))[::-1]
    m_sorted = np.sort(m)
    n_sorted = np.sort(n)
    tpr = 1.0 - np.searchsorted(m_sorted, thresholds, side="left") / m.size
    fpr = 1.0 - np.searchsorted(n_sorted, thresholds, side="left") / n.size
    return np.r_[0.0, fpr], np.r_[0.0, tpr]


def advantage(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """Membership advantage of the best threshold: `max_t TPR(t) - FPR(t)` (>= 0)."""
    fpr, tpr = roc_curve(members, nonmembers)
    return float(max(0.0, np.max(tpr - fpr)))


def record_losses(model: Any, batch: Any, labels: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per-record loss of `model` on a prepared `batch`; NaN for a record without any label.

    `labels[task]` holds -1 where the record has no label for the task; only the model's tasks
    count. The model is put in eval mode and run without gradients.
    """
    import torch
    import torch.nn.functional as F

    model.eval()
    with torch.no_grad():
        logits = model(batch)
    n = None
    total = None
    count = None
    for task, out in logits.items():
        if task not in labels:
            continue
        y = torch.as_tensor(np.asarray(labels[task]), dtype=torch.long)
        if n is None:
            n = len(y)
            total = torch.zeros(n, dtype=torch.float64)
            count = torch.zeros(n, dtype=torch.float64)
        known = y >= 0
        if not bool(known.any()):
            continue
        ce = F.cross_entropy(out[known].double(), y[known], reduction="none")
        total[known] += ce
        count[known] += 1.0
    if n is None:
        raise ValueError("the model has no task the labels cover")
    loss = torch.where(count > 0, total / count.clamp(min=1.0), torch.full_like(total, math.nan))
    return loss.numpy()


def loss_threshold_attack(
    member_losses: np.ndarray, nonmember_losses: np.ndarray
) -> dict[str, Any]:
    """The attack on per-record losses (NaN entries, unlabelled records, are dropped).

    Returns {"auc", "auc_stderr", "advantage", "members", "nonmembers", "member_loss",
    "nonmember_loss", "fpr", "tpr"} (the last two: the ROC curve, thinned to <= 201 points).
    """
    m = np.asarray(member_losses, dtype=np.float64)
    n = np.asarray(nonmember_losses, dtype=np.float64)
    m = m[np.isfinite(m)]
    n = n[np.isfinite(n)]
    value = auc(-m, -n)
    fpr, tpr = roc_curve(-m, -n)
    if fpr.size > 201:
        keep = np.unique(np.linspace(0, fpr.size - 1, 201).round().astype(int))
        fpr, tpr = fpr[keep], tpr[keep]
    return {
        "auc": value,
        "auc_stderr": auc_stderr(value, m.size, n.size),
        "advantage": advantage(-m, -n),
        "members": int(m.size),
        "nonmembers": int(n.size),
        "member_loss": float(m.mean()),
        "nonmember_loss": float(n.mean()),
        "fpr": fpr.tolist(),
        "tpr": tpr.tolist(),
    }

"""Membership inference by loss threshold: AUC, ROC, advantage, per-record losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m3tgossip.edu.mia import (
    advantage,
    auc,
    auc_stderr,
    loss_threshold_attack,
    record_losses,
    roc_curve,
)


def _auc_pairs(m: np.ndarray, n: np.ndarray) -> float:
    """Brute force: mean over all (member, non-member) pairs of [m > n] + [m == n] / 2."""
    d = m[:, None] - n[None, :]
    return float(np.mean((d > 0) + 0.5 * (d == 0)))


def test_auc_extremes_and_symmetry() -> None:
    assert auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert auc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0
    assert auc(np.ones(5), np.ones(7)) == 0.5
    rng = np.random.default_rng(0)
    m, n = rng.normal(size=40), rng.normal(size=30)
    assert auc(m, n) == pytest.approx(1.0 - auc(n, m))


def test_auc_matches_pairwise_count_with_ties() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        m = rng.integers(0, 6, size=rng.integers(1, 40)).astype(float)
        n = rng.integers(0, 6, size=rng.integers(1, 40)).astype(float)
        assert auc(m, n) == pytest.approx(_auc_pairs(m, n), abs=1e-12)


def test_auc_rejects_empty_and_nonfinite() -> None:
    with pytest.raises(ValueError):
        auc(np.array([]), np.array([1.0]))
    with pytest.raises(ValueError):
        auc(np.array([np.nan]), np.array([1.0]))


def test_roc_area_equals_auc_and_advantage() -> None:
    rng = np.random.default_rng(2)
    m = rng.normal(0.7, 1.0, size=300).round(1)  # rounding makes ties
    n = rng.normal(0.0, 1.0, size=200).round(1)
    fpr, tpr = roc_curve(m, n)
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    # trapezoids over the ROC curve count ties as half, like the rank formula
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))
    assert area == pytest.approx(auc(m, n), abs=1e-12)
    adv = advantage(m, n)
    best = max(np.mean(m >= t) - np.mean(n >= t) for t in np.unique(np.r_[m, n]))
    assert adv == pytest.approx(max(0.0, best))


def test_auc_stderr_shrinks_with_size() -> None:
    assert auc_stderr(0.5, 400, 400) < auc_stderr(0.5, 40, 40)
    assert auc_stderr(0.5, 100, 100) == pytest.approx(0.0409, abs=0.001)


def test_loss_threshold_attack_scores_low_loss_as_member() -> None:
    rng = np.random.default_rng(3)
    members = rng.exponential(0.2, size=500)
    nonmembers = rng.exponential(1.0, size=500)
    out = loss_threshold_attack(np.r_[members, np.nan], nonmembers)
    assert out["members"] == 500 and out["nonmembers"] == 500
    assert out["auc"] > 0.75
    same = loss_threshold_attack(rng.exponential(1.0, 2000), rng.exponential(1.0, 2000))
    assert abs(same["auc"] - 0.5) < 3 * same["auc_stderr"] + 0.01
    assert len(out["fpr"]) <= 201 and out["fpr"][0] == 0.0 and out["fpr"][-1] == 1.0


class _TwoTasks(torch.nn.Module):
    def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"a": batch, "b": batch.flip(1)}


def test_record_losses_average_the_labelled_tasks() -> None:
    x = torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, -1.0]])
    labels = {"a": np.array([0, -1, -1]), "b": np.array([1, -1, 0]), "other": np.array([0, 0, 0])}
    loss = record_losses(_TwoTasks(), x, labels)

    def ce(logits: list[float], y: int) -> float:
        return float(torch.nn.functional.cross_entropy(torch.tensor([logits]), torch.tensor([y])))

    assert loss[0] == pytest.approx((ce([2.0, 0.0], 0) + ce([0.0, 2.0], 1)) / 2)
    assert np.isnan(loss[1])
    assert loss[2] == pytest.approx(ce([-1.0, 1.0], 0))

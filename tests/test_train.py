"""Local multi-task training: loss goes down, labels -1 are ignored, weights count, metrics."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny import TINY

from m3tgossip.edu.data import GROUP_ATTRIBUTES, MODALITIES, DataConfig, node_data
from m3tgossip.edu.model import build_node_model
from m3tgossip.edu.train import GroupWeights, Trainer, macro_f1, masked_cross_entropy
from m3tgossip.edu.workload import workload_options


@dataclass(frozen=True)
class Spec:
    id: str = "n0"
    role: str = "institution"
    institution: str | None = "uni-a"
    modalities: tuple[str, ...] = ("tabular", "clickstream", "image")
    tasks: tuple[str, ...] = ("at_risk", "engagement", "handwriting")
    compute: str = "full"
    local: tuple[str, ...] = ()


def make(spec: Spec = Spec(), records: int = 60, **kwargs) -> Trainer:
    train, test = node_data(spec, DataConfig(records=records))
    model = build_node_model(spec, checkpoint=None, config=TINY)
    return Trainer(model, train, test, **kwargs)


def test_masked_cross_entropy_ignores_unlabelled_records():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]])
    labels = torch.tensor([0, -1, 1])
    expected = F.cross_entropy(logits[[0, 2]], labels[[0, 2]])
    assert torch.allclose(masked_cross_entropy(logits, labels), expected)
    assert masked_cross_entropy(logits, torch.full((3,), -1)) is None


def test_macro_f1():
    y = np.array([0, 0, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 0])
    # class 0: tp 1 fp 1 fn 1 -> 0.5; class 1: tp 2 fp 1 fn 0 -> 0.8; class 2: tp 0 -> 0
    assert macro_f1(y, pred) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert macro_f1(y, y) == 1.0


def test_training_reduces_the_loss_of_every_task():
    trainer = make(lr=1e-2)
    first = trainer.train_steps(5)
    for _ in range(10):
        last = trainer.train_steps(5)
    assert set(first) == set(Spec().tasks)
    for t in first:
        assert last[t] < first[t]


def test_a_zero_loss_weight_leaves_the_task_untrained():
    trainer = make(loss_weights={"engagement": 0.0}, lr=1e-2)
    before = {c: v.copy() for c, v in trainer.model.vectors().items()}
    losses = trainer.train_steps(3)
    assert "engagement" in losses  # still reported
    after = trainer.model.vectors()
    assert np.array_equal(after["head.engagement"], before["head.engagement"])
    # the prompt sits in the shared sequence: a zero gradient, so only weight decay moves it
    assert np.allclose(after["prompt.engagement"], before["prompt.engagement"], rtol=1e-3, atol=0)
    assert not np.array_equal(after["head.at_risk"], before["head.at_risk"])
    with pytest.raises(ValueError):
        make(loss_weights={"stress": 1.0})


def test_evaluate_reports_tasks_groups_and_gaps():
    trainer = make(lr=1e-2)
    trainer.train_steps(5)
    report = trainer.evaluate()
    json.dumps(report)  # JSON-able as it is
    assert set(report["tasks"]) == set(Spec().tasks)
    for metrics in report["tasks"].values():
        assert 0.0 <= metrics["acc"] <= 1.0 and 0.0 <= metrics["f1"] <= 1.0 and metrics["n"] > 0
    assert set(report["groups"]) == set(GROUP_ATTRIBUTES)
    test = node_data(Spec(), DataConfig(records=60))[1]
    for g in GROUP_ATTRIBUTES:
        assert set(report["groups"][g]) == set(np.unique(test.groups[g]))
    gaps = [v for per_task in report["gaps"].values() for v in per_task.values()]
    assert report["worst_group_gap"] == (max(gaps) if gaps else None)
    assert report["mean_acc"] == pytest.approx(
        np.mean([m["acc"] for m in report["tasks"].values()])
    )


def test_tasks_without_labels_are_left_out():
    spec = Spec(modalities=MODALITIES, tasks=("at_risk", "stress"))
    train, test = node_data(spec, DataConfig(records=40))
    test.labels["stress"][:] = -1
    model = build_node_model(spec, checkpoint=None, config=TINY)
    report = Trainer(model, train, test).evaluate()
    assert set(report["tasks"]) == {"at_risk"}


def test_restored_trainer_continues_identically():
    a = make(lr=1e-2, seed=4)
    a.train_steps(4)
    b = make(lr=1e-2, seed=4)
    for c, x in a.model.vectors().items():
        b.model.vectors()[c][...] = x
    b.load_state(a.state())
    a.train_steps(3)
    b.train_steps(3)
    for c, x in a.model.vectors().items():
        assert np.array_equal(b.model.vectors()[c], x), c


def test_balanced_fairness_gives_every_group_of_an_attribute_the_same_total_weight():
    groups = {
        "disability": np.array(["no"] * 90 + ["yes"] * 10),
        "language": np.array(["en"] * 100),  # one value: takes no part
    }
    fair = GroupWeights(groups, "balanced", 0.1)
    w = fair.weights(np.arange(100))
    assert set(fair.index) == {"disability"}
    assert w[:90].sum() == pytest.approx(w[90:].sum())
    assert w.mean() == pytest.approx(1.0)


def test_group_dro_raises_the_weight_of_the_group_with_the_higher_loss():
    groups = {"gender": np.array(["female"] * 50 + ["male"] * 50)}
    fair = GroupWeights(groups, "dro", 0.5)
    idx = np.arange(100)
    assert np.allclose(fair.weights(idx), 1.0)
    fair.update(idx, np.r_[np.full(50, 2.0), np.full(50, 0.5)])
    w = fair.weights(idx)
    assert w[0] > 1.0 > w[-1]
    assert w.mean() == pytest.approx(1.0)
    restored = GroupWeights(groups, "dro", 0.5)
    restored.load_state(fair.state())
    assert np.array_equal(restored.weights(idx), w)


def test_a_fairness_option_trains_and_is_refused_under_differential_privacy():
    plain = make(lr=1e-2, seed=3)
    fair = make(lr=1e-2, seed=3, fairness="balanced")
    plain.train_steps(3)
    fair.train_steps(3)
    differs = [
        c
        for c, x in fair.model.vectors().items()
        if not np.array_equal(x, plain.model.vectors()[c])
    ]
    assert differs  # the weights changed the updates
    with pytest.raises(ValueError, match="cannot run under differential privacy"):
        fair.use_private(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fairness: one of"):
        make(fairness="equal")


def test_the_workload_checks_its_fairness_options():
    assert workload_options({"fairness": "dro"})["fairness"] == "dro"
    with pytest.raises(ValueError, match="workload option fairness"):
        workload_options({"fairness": "fair"})
    with pytest.raises(ValueError, match="fairness_eta"):
        workload_options({"fairness_eta": 0})

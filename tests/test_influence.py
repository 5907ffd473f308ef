"""Per-neighbour influence on the held-out loss (`gossip.influence_every`): the first-order
terms, the edu node's held-out gradient, and daemons that credit each neighbour."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import TINY

from m3tgossip.daemon.config import GossipConfig
from m3tgossip.daemon.influence import NeighbourInfluence, summarize
from m3tgossip.daemon.metrics import read_metrics
from m3tgossip.edu.data.records import EduData
from m3tgossip.edu.influence import HeldoutLoss
from m3tgossip.edu.model import build_node_model
from m3tgossip.edu.train import Trainer
from m3tgossip.harness import testbed


def test_each_neighbour_is_measured_alone_and_to_first_order() -> None:
    """A quadratic loss, L(x) = |x - m|^2 / 2: each neighbour's term t is evaluated alone on
    the values from before the mix (L(x + t) - L(x)), its first-order figure is g . t, and the
    mixed values are back in place afterwards."""
    rng = np.random.default_rng(0)
    m = {"a": rng.normal(size=5), "b": rng.normal(size=3)}
    shared = {c: rng.normal(size=x.shape) for c, x in m.items()}

    def loss() -> float:
        return 0.5 * sum(float((shared[c] - m[c]) @ (shared[c] - m[c])) for c in m)

    before = {c: x.copy() for c, x in shared.items()}
    grad = {c: shared[c] - m[c] for c in m}
    theirs = {c: rng.normal(size=x.shape) for c, x in shared.items()}
    inf = NeighbourInfluence()
    inf.begin((loss(), grad), shared)
    for c in ("a", "b"):
        inf.add("p", c, 0.25, theirs[c], before[c])
    inf.add("q", "a", 0.5, before["a"], before["a"])  # the node's own values: no effect
    inf.add("q", "zzz", 0.5, theirs["a"], before["a"])  # not a shared component: ignored
    for c in shared:  # the mix moves the values
        shared[c] += 0.25 * (theirs[c] - before[c])
    mixed = {c: x.copy() for c, x in shared.items()}
    rec = inf.record(shared, loss)
    assert rec is not None
    t = {c: 0.25 * (theirs[c] - before[c]) for c in m}
    first = sum(float(grad[c] @ t[c]) for c in m)
    alone = sum(float(grad[c] @ t[c]) + 0.5 * float(t[c] @ t[c]) for c in m)
    assert rec["first_order"] == {"p": pytest.approx(first), "q": 0.0}
    assert rec["per_neighbour"] == {"p": pytest.approx(alone), "q": pytest.approx(0.0)}
    assert rec["predicted_change"] == pytest.approx(first)
    assert rec["actual_change"] == pytest.approx(alone)  # p was the only one that moved it
    assert all(np.array_equal(shared[c], mixed[c]) for c in shared)


def test_a_round_without_a_gradient_records_nothing() -> None:
    inf = NeighbourInfluence()
    inf.begin(None)
    inf.add("p", "a", 0.5, np.ones(2), np.zeros(2))
    assert inf.record({"a": np.zeros(2)}, lambda: 1.0) is None and inf.terms == {}


@pytest.mark.parametrize(
    "settings, words",
    [
        ({"influence_every": -1}, "integer >= 0"),
        ({"influence_every": True}, "integer >= 0"),
        ({"influence_every": 1, "aggregator": "clip"}, 'aggregator = "mean"'),
        ({"influence_every": 1, "overlap": True}, "overlap = false"),
        ({"influence_every": 1, "mode": "push-sum"}, 'mode = "sync"'),
    ],
)
def test_bad_influence_settings_are_refused(settings: dict, words: str) -> None:
    with pytest.raises(ValueError, match="influence_every") as err:
        GossipConfig(**settings)
    assert words in str(err.value)


@dataclass(frozen=True)
class Spec:
    id: str = "n0"
    role: str = "institution"
    institution: str | None = "uni-a"
    modalities: tuple[str, ...] = ("tabular", "clickstream")
    tasks: tuple[str, ...] = ("at_risk",)
    compute: str = "full"
    local: tuple[str, ...] = ()


def records(n: int, seed: int) -> EduData:
    rng = np.random.default_rng(seed)
    data = EduData.empty(n)
    data.tabular[:] = rng.normal(size=data.tabular.shape)
    data.clickstream[:] = rng.integers(1, 64, size=data.clickstream.shape)
    data.present["image"][:] = False
    data.labels["at_risk"] = (data.tabular[:, 0] > 0).astype(np.int64)
    data.learner = np.arange(n) // 2
    return data


def test_the_held_out_gradient_predicts_a_small_step_of_the_loss() -> None:
    """The gradient over the shared flat vectors is the loss's directional derivative: a small
    step along a random direction changes the loss by g . d to second order."""
    torch.manual_seed(0)
    model = build_node_model(Spec(), checkpoint=None, config=TINY)
    trainer = Trainer(model, records(64, 0), records(200, 1), lr=1e-2, seed=0)
    trainer.train_steps(5)
    held = HeldoutLoss(trainer, max_rows=128)
    assert len(held.batch) == 128  # a seeded sample bounds the work
    measured = held.gradient()
    assert measured is not None
    loss, grad = measured
    shared = model.shared_vectors()
    assert set(grad) == set(shared) and all(grad[c].shape == shared[c].shape for c in grad)
    assert loss == pytest.approx(held.value(), rel=1e-6)
    rng = np.random.default_rng(1)
    d = {c: rng.normal(size=x.shape).astype(np.float32) for c, x in shared.items()}
    eps = 1e-3
    before = {c: x.copy() for c, x in shared.items()}
    for c, x in shared.items():
        x += eps * d[c]
    moved = held.value()
    for c, x in shared.items():
        x[...] = before[c]
    assert moved is not None
    predicted = eps * sum(float(grad[c].astype(np.float64) @ d[c]) for c in grad)
    assert moved - loss == pytest.approx(predicted, rel=0.05, abs=1e-6)
    # the parameters' own gradient flags are as they were
    assert held.value() == pytest.approx(loss, rel=1e-6)


def test_daemons_credit_each_neighbour_and_an_attacker_raises_the_loss(tmp_path: Path) -> None:
    """A ring of eight consensus daemons with influence every round, n2 sending huge values.
    The loss is half the squared distance to the exact mean, so the actual change of a round is
    the predicted (first-order) change plus half the squared step: never below it. The
    attacker's neighbours credit it with raising their loss; n0, away from it, is pulled
    towards the mean by its honest neighbours in the first round."""
    out = tmp_path / "bed"
    code = testbed.main(
        [
            *("--topology", "topology/ring-8.toml", "--rounds", "6", "-o", "size=32"),
            *("--set", "gossip.influence_every=1", "--node-set", "n2:faults.attack=huge"),
            *("--out", str(out), "--quiet", "--deadline", "2", "--timeout", "120"),
        ]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["crashed"] and not summary["hung"], code
    recs = {n: read_metrics(out / "nodes" / n / "metrics.jsonl") for n in ("n0", "n1", "n3")}
    for n, rs in recs.items():
        assert rs, n
        for r in rs:
            inf = r["train"]["influence"]
            assert set(inf["per_neighbour"]) == set(inf["first_order"]) <= set(r["heard"])
            tol = 1e-9 * (1 + abs(inf["loss_before"]))
            assert inf["actual_change"] >= inf["predicted_change"] - tol, (n, r["round"])
            for p, v in inf["per_neighbour"].items():  # alone: first order + |t|^2 / 2
                assert v >= inf["first_order"][p] - tol, (n, p)
    for n in ("n1", "n3"):
        first = recs[n][0]["train"]["influence"]["per_neighbour"]
        assert first["n2"] > 0, (n, first)
        assert first["n2"] > max(v for p, v in first.items() if p != "n2"), (n, first)
    first = recs["n0"][0]["train"]["influence"]
    assert set(first["per_neighbour"]) == {"n1", "n7"}
    assert first["actual_change"] < 0 and all(v < 0 for v in first["per_neighbour"].values())


def test_the_summary_credits_each_neighbour_over_the_measured_rounds() -> None:
    recs = [
        {
            "round": 0,
            "train": {
                "influence": {
                    "per_neighbour": {"a": -0.2, "b": 0.1},
                    "first_order": {"a": -0.3, "b": 0.0},
                    "actual_change": -0.1,
                    "predicted_change": -0.3,
                }
            },
        },
        {"round": 1, "train": {"loss": {}}},
        {
            "round": 2,
            "train": {
                "influence": {
                    "per_neighbour": {"a": 0.1},
                    "first_order": {"a": 0.1},
                    "actual_change": 0.1,
                    "predicted_change": 0.1,
                }
            },
        },
    ]
    s = summarize(recs)
    assert s is not None and s["rounds_measured"] == [0, 2]
    assert s["neighbours"]["a"] == {
        "rounds": 2,
        "mean_change": pytest.approx(-0.05),
        "total_change": pytest.approx(-0.1),
        "helped_rounds": 1,
        "mean_first_order": pytest.approx(-0.1),
    }
    assert s["neighbours"]["b"]["rounds"] == 1 and s["neighbours"]["b"]["helped_rounds"] == 0
    assert summarize([{"round": 0}]) is None

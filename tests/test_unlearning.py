"""Erasure on the `edu` workload: records dropped for good, bounded ascent, rollback to the
stage checkpoint, the verification figures, and exact replay in a staged federation that
gives bit for bit the model retrained without the learners."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from m3tgossip.edu.replay import Federation, learner_mask_of, slices
from m3tgossip.edu.unlearning import Probe, ascend, distance, drop_records, verify
from m3tgossip.edu.workload import EduWorkload
from m3tgossip.topology import Topology, load_topology

OPTIONS = {"records": 40, "local_steps": 2, "batch_size": 8, "eval_every": 100}


@pytest.fixture(scope="module")
def topo(tmp_path_factory: pytest.TempPathFactory) -> Topology:
    spec = Path(tmp_path_factory.mktemp("spec")) / "pair.toml"
    spec.write_text(
        'name = "pair"\nedges = [["a", "b"]]\n'
        '[[nodes]]\nid = "a"\nrole = "instructor"\ninstitution = "uni-a"\n'
        '[[nodes]]\nid = "b"\nrole = "instructor"\ninstitution = "uni-a"\n'
    )
    return load_topology(spec)


def learners_of(w: EduWorkload, k: int) -> list[str]:
    return [str(x) for x in np.asarray(w.trainer.learners)[w.trainer.pool[:k]]]


def test_approximate_erasure_drops_the_records_and_verifies(topo: Topology) -> None:
    w = EduWorkload(topo, "a", seed=0, options=OPTIONS)
    w.trainer.train_steps(6)
    gone = learners_of(w, 3)
    with pytest.raises(ValueError, match="no records of learner nobody"):
        w.forget("learner", ["nobody"], "approximate", own=True)
    pool = len(w.trainer.pool)
    report = w.forget("learner", gone, "approximate", own=True)
    assert report["approximate"] and report["removed_records"] == 3
    assert len(w.trainer.pool) == pool - 3
    assert not learner_mask_of(w, gone)[w.trainer.pool].any()
    ascent = report["ascent"]
    assert 0 <= ascent["ascent_steps"] <= 5 and ascent["max_loss"] > 0
    fig = report["verification"]
    for key in ("forget_acc", "retain_acc", "test_acc"):
        assert 0.0 <= fig[key] <= 1.0
    assert fig["mia"]["members"] == 3 and 0.0 <= fig["mia_auc"] <= 1.0

    # the erased ids survive a checkpoint: a restarted node does not train on them again
    again = EduWorkload(topo, "a", seed=0, options=OPTIONS)
    again.load_state(w.state())
    assert again.erased == sorted(gone)
    assert not learner_mask_of(again, gone)[again.trainer.pool].any()


def test_exact_erasure_returns_to_the_stage_checkpoint(topo: Topology) -> None:
    w = EduWorkload(topo, "b", seed=0, options=OPTIONS)
    start = {c: x.copy() for c, x in w.model.vectors().items()}
    w.trainer.train_steps(4)
    assert distance(w.model.vectors(), start) > 0
    report = w.forget("learner", learners_of(w, 1), "exact", own=True)
    assert not report["approximate"] and report["removed_records"] == 1
    assert distance(w.model.vectors(), start) == 0.0
    assert not w.trainer.optimizer.state
    # a node that follows another node's exact erasure rolls back too, and removes nothing
    w.trainer.train_steps(2)
    followed = w.forget("learner", ["x"], "exact", own=False)
    assert "removed_records" not in followed
    assert followed["verification"]["forget_acc"] is None
    assert 0.0 <= followed["verification"]["test_acc"] <= 1.0
    assert distance(w.model.vectors(), start) == 0.0


def test_erasure_refuses_to_train_outside_the_dp_budget(topo: Topology) -> None:
    from m3tgossip.privacy import TrainingNoise

    w = EduWorkload(topo, "a", seed=0, options=OPTIONS)
    w.use_private_training(
        TrainingNoise(clip=1.0, noise_multiplier=1.0, sampling_rate=0.5, steps_per_round=1)
    )
    with pytest.raises(ValueError, match="DP-SGD"):
        w.forget("learner", learners_of(w, 1), "approximate", own=True)
    with pytest.raises(ValueError, match="DP-SGD"):
        drop_records(w.trainer, np.zeros(len(w.trainer.learners), dtype=bool))
    with pytest.raises(ValueError, match="DP-SGD"):
        ascend(w.trainer, np.array([0]))


def test_slices_cut_a_pool_into_near_equal_seeded_parts() -> None:
    s = slices(10, 3, "a", 0)
    assert sorted(np.bincount(s).tolist()) == [3, 3, 4]
    assert (s == slices(10, 3, "a", 0)).all() and not (s == slices(10, 3, "a", 1)).all()


def test_exact_replay_from_a_stage_checkpoint_is_the_retrained_model(topo: Topology) -> None:
    fed = Federation(topo, rounds=4, seed=0, options=OPTIONS, stages=2)
    ckpts: dict = {}
    fed.run(checkpoints=ckpts)
    assert sorted(ckpts) == [0, 2]
    a = fed.nodes["a"]
    late = fed.full_pool["a"][fed.slice_of["a"] == 1][:2]
    gone = [str(a.trainer.learners[i]) for i in late]
    assert fed.first_stage("a", gone) == 1
    trained = fed.vectors()

    fed.reset()
    fed.exclude(learners={"a": gone})
    fed.run()
    retrained = fed.vectors()

    fed.reset(ckpts[fed.bounds[1]])
    fed.exclude(learners={"a": gone})
    fed.run(start=fed.bounds[1])
    for nid in fed.nodes:
        assert distance(fed.vectors()[nid], retrained[nid]) == 0.0
        assert distance(trained[nid], retrained[nid]) > 0  # the learners did change it
    # the two nodes mixed: the erased learners of a also moved b's model
    assert distance(trained["b"], retrained["b"]) > 0

    t = a.trainer
    fig = verify(
        a.model,
        forget=Probe.train_records(t, late),
        retain=Probe.train_records(t, t.pool),
        test=Probe(t.test_set.batch, dict(t.test_set.labels)),
        reference=retrained["a"],
    )
    assert fig["distance_to_reference"] == 0.0 and fig["mia"]["members"] == 2

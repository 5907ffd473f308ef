"""The edu workload: model id, shared arrays, rounds of training, evaluation, state round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from m3tgossip.edu.data import UNSEEN_RECORDS
from m3tgossip.edu.workload import EduWorkload
from m3tgossip.privacy import TrainingNoise
from m3tgossip.topology import parse_topology

SPEC = {
    "name": "edu-three",
    "edges": [["uni", "teacher"], ["teacher", "student"]],
    "nodes": [
        {
            "id": "uni",
            "role": "institution",
            "institution": "uni-a",
            "modalities": ["text", "image", "signal", "clickstream", "tabular"],
            "tasks": ["at_risk", "engagement", "stress", "handwriting", "next_response"],
        },
        {
            "id": "teacher",
            "role": "instructor",
            "institution": "uni-a",
            "modalities": ["clickstream", "tabular"],
            "tasks": ["at_risk", "engagement"],
            "local": ["head.engagement"],
        },
        {
            "id": "student",
            "role": "student",
            "institution": "uni-a",
            "modalities": ["clickstream"],
            "tasks": ["next_response"],
        },
    ],
}
FAST = {"records": 60, "local_steps": 2, "eval_every": 2}


@pytest.fixture(scope="module")
def topology():
    return parse_topology(SPEC, "test")


def outputs(w: EduWorkload) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return w.model(w.trainer.test_set.batch)


def test_shared_arrays_follow_the_topology(topology):
    w = EduWorkload(topology, "teacher", seed=1, options=FAST)
    shared = w.shared()
    assert shared is w.shared()
    assert set(shared) == set(topology.node("teacher").shared_components)
    assert "head.engagement" not in shared
    assert all(x.dtype == np.float32 and x.ndim == 1 for x in shared.values())


def test_model_id_is_shared_by_a_federation_and_separates_others(topology):
    student = EduWorkload(topology, "student", seed=1, options=FAST)
    teacher = EduWorkload(topology, "teacher", seed=1, options=FAST)
    assert student.model_id() == teacher.model_id()
    assert EduWorkload(topology, "student", seed=2, options=FAST).model_id() != student.model_id()
    separate = EduWorkload(topology, "student", seed=1, options={**FAST, "lora_mode": "separate"})
    assert separate.model_id() != student.model_id()
    assert (
        EduWorkload(topology, "student", seed=1, options={**FAST, "lora_rank": 8}).model_id()
        != student.model_id()
    )


def test_rounds_train_and_evaluate_on_schedule(topology):
    w = EduWorkload(topology, "uni", seed=0, options=FAST)
    before = {c: x.copy() for c, x in w.shared().items()}
    local = w.local_step(0)
    assert local["steps"] == 2 and set(local["loss"]) == set(topology.node("uni").tasks)
    assert all(not np.array_equal(before[c], x) for c, x in w.shared().items())
    assert w.evaluate(2) == {}  # eval_every 2: after the first round, then rounds 1, 3, ...
    for round_ in (0, 1):
        report = w.evaluate(round_)
        json.dumps(report)
        assert set(report["tasks"]) == set(topology.node("uni").tasks)
        assert 0.0 <= report["mean_acc"] <= 1.0
        assert set(report["groups"]) == {"gender", "first_generation", "language", "disability"}
        # the institution's unseen learners, scored on the node's tasks as well
        unseen = report["unseen"]
        assert set(unseen["tasks"]) == set(topology.node("uni").tasks)
        assert all(m["n"] == UNSEEN_RECORDS for m in unseen["tasks"].values())
        assert 0.0 <= unseen["mean_acc"] <= 1.0
        # group gaps of the binary tasks on the unseen learners (m3tgossip.edu.equity)
        for task, per_attribute in unseen["equity"].items():
            assert task in topology.node("uni").tasks and task != "engagement"
            for gaps in per_attribute.values():
                assert 0.0 <= gaps["abroca"] <= 1.0 and 0.0 < gaps["p_value"] <= 1.0


def test_mixing_in_place_is_the_model_update(topology):
    w = EduWorkload(topology, "student", seed=0, options=FAST)
    before = outputs(w)["next_response"].clone()
    w.shared()["head.next_response"] *= 0.5  # what the daemon's mixing does
    w.after_mix(0)
    assert not torch.allclose(outputs(w)["next_response"], before)


def test_state_round_trip_restores_outputs_and_training(topology):
    a = EduWorkload(topology, "teacher", seed=3, options=FAST)
    a.local_step(0)
    a.local_step(1)
    state = a.state()
    assert {"param/head.engagement", "param/backbone", "trainer/step"} <= set(state)
    b = EduWorkload(topology, "teacher", seed=3, options=FAST)
    b.load_state(state)
    for t, x in outputs(a).items():
        assert torch.equal(outputs(b)[t], x)
    a.local_step(2)
    b.local_step(2)
    for c, x in a.model.vectors().items():
        assert np.array_equal(b.model.vectors()[c], x), c
    with pytest.raises(ValueError):
        b.load_state({k: v for k, v in state.items() if k != "param/backbone"})


def test_bad_options_are_rejected(topology):
    with pytest.raises(ValueError, match="unknown"):
        EduWorkload(topology, "student", options={"local_step": 3})
    with pytest.raises(ValueError, match="local_steps"):
        EduWorkload(topology, "student", options={"local_steps": 0})
    with pytest.raises(ValueError, match="lora mode"):
        EduWorkload(topology, "student", options={"lora_mode": "average"})
    with pytest.raises(ValueError, match="dp_lr"):
        EduWorkload(topology, "student", options={"dp_lr": 0})


def test_private_training_steps_at_dp_lr(topology):
    from m3tgossip.privacy import TrainingNoise

    w = EduWorkload(topology, "student", seed=1, options={"records": 60, "dp_lr": 0.02})
    assert {g["lr"] for g in w.trainer.optimizer.param_groups} == {3e-3}
    w.use_private_training(
        TrainingNoise(clip=1.0, noise_multiplier=1.0, sampling_rate=0.5, steps_per_round=1)
    )
    assert {g["lr"] for g in w.trainer.optimizer.param_groups} == {0.02}
    assert w.trainer.private is not None


def test_records_weighting_scales_each_shared_component_by_its_holders(topology):
    from m3tgossip.edu.workload import lr_scales, record_counts, workload_options

    o = workload_options({"records": 60, "weighting": "records"})
    counts = record_counts(topology, o, 1)
    assert counts == {"uni": 120, "teacher": 60, "student": 6}
    w = EduWorkload(topology, "teacher", seed=1, options={"records": 60, "weighting": "records"})
    scale = w.trainer.lr_scale
    assert scale == lr_scales(topology, "teacher", o, 1)
    # clickstream: all three hold it; tabular: uni and teacher; engagement's head stays local
    assert scale["encoder.clickstream"] == pytest.approx(60 / np.mean([120, 60, 6]))
    assert scale["encoder.tabular"] == pytest.approx(60 / 90)
    assert "head.engagement" not in scale
    by_group = {id(g["params"][0]): g for g in w.trainer.optimizer.param_groups}
    for c, flat in w.model.trained_flat().items():
        group = by_group[id(flat.params[0])]
        assert group["lr"] == pytest.approx(3e-3 * scale.get(c, 1.0))
    w.use_private_training(
        TrainingNoise(clip=1.0, noise_multiplier=1.0, sampling_rate=0.5, steps_per_round=1)
    )
    assert {round(g["lr"] / g["scale"], 12) for g in w.trainer.optimizer.param_groups} == {1e-2}
    uniform = EduWorkload(topology, "teacher", seed=1, options={"records": 60})
    assert {g["lr"] for g in uniform.trainer.optimizer.param_groups} == {3e-3}
    with pytest.raises(ValueError, match="weighting: one of"):
        EduWorkload(topology, "teacher", options={"weighting": "size"})


def test_records_weighting_with_data_folders_needs_declared_counts(topology):
    from m3tgossip.edu.workload import record_counts, workload_options

    o = workload_options({"weighting": "records", "data": "somewhere"})
    with pytest.raises(ValueError, match='node "uni" declares no `records = N`'):
        record_counts(topology, o, 0)
    spec = {
        **SPEC,
        "nodes": [{**n, "records": r} for n, r in zip(SPEC["nodes"], (500, 90, 7), strict=True)],
    }
    declared = record_counts(parse_topology(spec, "test"), o, 0)
    assert declared == {"uni": 500, "teacher": 90, "student": 7}


@pytest.mark.parametrize(("speed", "steps"), [(1.0, 5), (0.5, 2), (0.3, 2), (0.1, 1), (0.01, 1)])
def test_a_slow_node_trains_fewer_steps_a_round(speed: float, steps: int) -> None:
    spec = {**SPEC, "nodes": [dict(n) for n in SPEC["nodes"]]}
    spec["nodes"][2]["speed"] = speed
    w = EduWorkload(parse_topology(spec, "test"), "student", seed=1, options={"records": 60})
    assert w.steps == steps
    assert w.local_step(0)["steps"] == steps
    plan = w.private_training_plan()
    assert plan is not None and plan.steps_per_round == steps

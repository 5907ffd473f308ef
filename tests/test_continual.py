"""A semester as stages: the `[[stages]]` of a spec, each stage's version of it, the edu
workload carrying its state from one stage into the next, and nodes that run stage by stage
with one privacy budget over the whole run."""

from __future__ import annotations

import copy
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fakes import FakeNetwork, FakeTransport, node_config, run_nodes

from m3tgossip.daemon import checkpoint
from m3tgossip.daemon.config import NodeConfig
from m3tgossip.daemon.metrics import read_metrics
from m3tgossip.daemon.node import Node, StageRunner
from m3tgossip.edu.workload import EduWorkload
from m3tgossip.errors import ConfigError
from m3tgossip.topology import (
    Topology,
    check_report,
    format_report,
    load_topology,
    parse_topology,
)

ROOT = Path(__file__).resolve().parent.parent

SPEC: dict[str, Any] = {
    "name": "two-stages",
    "edges": [["a", "b"], ["b", "c"], ["a", "c"]],
    "defaults": {"modalities": ["tabular"], "tasks": ["at_risk"], "role": "instructor"},
    "nodes": [
        {"id": "a", "institution": "uni-a"},
        {"id": "b", "institution": "uni-a"},
        {"id": "c", "institution": "uni-b"},
    ],
    "stages": [
        {"name": "clicks", "round": 2, "tasks": ["next_response"], "modalities": ["clickstream"]},
        {"name": "stress", "round": 3, "nodes": ["a", "b"], "tasks": ["stress"]},
    ],
}


def spec(**stage0: Any) -> dict[str, Any]:
    data = copy.deepcopy(SPEC)
    data["stages"][0].update(stage0)
    return data


def test_each_stage_is_a_version_of_the_spec_with_its_components_and_holders() -> None:
    topo = parse_topology(SPEC, "x.toml")
    assert [s.name for s in topo.stages] == ["clicks", "stress"]
    assert [topo.stage_at(r) for r in range(5)] == [0, 0, 1, 2, 2]
    assert topo.stage == 0 and topo.next_stage_round() == 2
    assert topo.holders("head.next_response") == []
    one = topo.version(1)
    assert one.stage == 1 and one.next_stage_round() == 3
    assert one.node("c").modalities == ("clickstream", "tabular")
    assert one.holders("encoder.clickstream") == ["a", "b", "c"]
    two = one.version(2)
    assert two.next_stage_round() is None
    assert two.node("c").tasks == ("at_risk", "next_response")
    assert two.holders("head.stress") == ["a", "b"]
    assert two.component_neighbours("a", "head.stress") == ["b"]
    assert two.version(0) == topo
    # a later version writes the spec it came from: the same stages, loading back as stage 0
    assert parse_topology(tomllib.loads(two.to_toml()), "x.toml") == topo


@pytest.mark.parametrize(
    ("stage", "entry", "message"),
    [
        ({"round": 0}, 'stages[0] ("clicks").round', "an integer >= 1, got 0"),
        ({"round": 3}, 'stages[1] ("stress").round', "not after the previous stage's round 3"),
        ({"name": "stress"}, 'stages[1] ("stress").name', "duplicate stage (also stages[0])"),
        ({"nodes": ["a", "x"]}, 'stages[0] ("clicks").nodes', 'unknown node id "x"'),
        ({"tasks": ["at_risk"]}, 'stages[0] ("clicks").tasks', 'node "a" already holds at_risk'),
        ({"modalities": ["smell"]}, 'stages[0] ("clicks").modalities', 'unknown modality "smell"'),
        ({"tasks": [], "modalities": []}, 'stages[0] ("clicks")', "adds at least one task"),
        ({"tasks": ["Bad"]}, 'stages[0] ("clicks").tasks', "not an identifier"),
        ({"rounds": 2}, 'stages[0] ("clicks").rounds', 'did you mean "round"'),
        ({"name": ""}, "stages[0].name", "a stage needs a name"),
        ({"nodes": "a"}, 'stages[0] ("clicks").nodes', "must be an array of strings"),
    ],
)
def test_a_bad_stage_names_the_file_stage_and_key(
    stage: dict[str, Any], entry: str, message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        parse_topology(spec(**stage), "semester.toml")
    assert err.value.source == "semester.toml"
    assert err.value.entry == entry
    assert message in err.value.problem


def test_stages_with_dynamics_or_a_single_learner_node_are_refused() -> None:
    data = spec()
    data["dynamics"] = {"kind": "s-out"}
    with pytest.raises(ConfigError, match=r"x.toml: stages: a time-varying topology"):
        parse_topology(data, "x.toml")
    data = spec()
    data["nodes"][2]["single_learner"] = "local"
    with pytest.raises(ConfigError, match=r'stages: node "c" has single_learner set'):
        parse_topology(data, "x.toml")


def test_the_shipped_semester_has_four_stages() -> None:
    topo = load_topology(ROOT / "topology" / "semester.toml")
    assert [s.name for s in topo.stages] == ["essays", "clickstream", "prosody"]
    last = topo.version(3)
    assert all(n.tasks == ("at_risk", "engagement", "next_response", "stress") for n in last.nodes)


# ----------------------------------------------------------------------------- the workload

OPTIONS = {"records": 60, "local_steps": 2, "replay": 8, "anchor": 50.0}


def test_a_stage_hides_earlier_labels_but_its_replay_buffer() -> None:
    topo = parse_topology(SPEC, "x.toml")
    first = EduWorkload(topo, "a", 0, OPTIONS)
    replay = EduWorkload(topo.version(1), "a", 0, OPTIONS)
    naive = EduWorkload(topo.version(1), "a", 0, {**OPTIONS, "continual": "naive"})
    full = first.trainer.train_labels["at_risk"].numpy()
    kept = replay.trainer.train_labels["at_risk"].numpy()
    assert (full >= 0).sum() > 8
    assert (kept >= 0).sum() == 8 and np.array_equal(kept[kept >= 0], full[kept >= 0])
    assert (naive.trainer.train_labels["at_risk"].numpy() < 0).all()
    assert (replay.trainer.train_labels["next_response"].numpy() >= 0).any()
    # the same buffer in every stage, and the same plan for DP-SGD (every learner, one rate)
    later = EduWorkload(topo.version(2), "a", 0, OPTIONS)
    assert np.array_equal(later.trainer.train_labels["at_risk"].numpy(), kept)
    assert first.private_training_plan() == replay.private_training_plan()
    assert replay.private_training_plan() == later.private_training_plan()


def test_the_next_stage_keeps_every_component_and_its_optimiser_and_pulls_back() -> None:
    topo = parse_topology(SPEC, "x.toml")
    first = EduWorkload(topo, "a", 0, OPTIONS)
    first.local_step(0)
    state = first.state()
    second = EduWorkload(topo.version(1), "a", 0, OPTIONS)
    fresh = {c: x.copy() for c, x in second.model.vectors().items()}
    second.load_state(state)
    for c, x in second.model.vectors().items():
        if c in first.model.vectors():
            assert np.array_equal(x, state[f"param/{c}"]), c
        else:  # what the stage brings starts from its seed, as on every other holder
            assert c in second.new_components and np.array_equal(x, fresh[c]), c
    assert second.trainer.step == first.trainer.step
    assert second.anchor is not None and "backbone" in second.anchor.anchored
    assert "head.next_response" not in second.anchor.anchored
    backbone = second.model.vectors()["backbone"]
    start = backbone.copy()
    backbone += 1.0
    second.anchor.pull()
    assert np.allclose(backbone - start, 1.0 - OPTIONS["anchor"] * 3e-3)
    backbone[...] = start
    second.local_step(1)
    # a resume inside the stage keeps the stage's anchor, not the values it resumes from
    third = EduWorkload(topo.version(1), "a", 0, OPTIONS)
    third.load_state(second.state())
    assert third.anchor is not None
    assert np.array_equal(third.anchor.values["backbone"], start)
    with pytest.raises(ValueError, match="no matching state for component encoder.clickstream"):
        EduWorkload(topo.version(2), "a", 0, OPTIONS).load_state(state)


# ----------------------------------------------------------------------------- nodes


class Rejoining(FakeNetwork):
    """In-process links whose inboxes outlive a node: the next stage's node of an id gets the
    messages its neighbours sent while it was being built."""

    def transport(self, node_id: str) -> FakeTransport:
        inbox = self.inboxes.get(node_id)
        transport = super().transport(node_id)
        if inbox is not None:
            self.inboxes[node_id] = inbox
        return transport


def run_semester(topo: Topology, tmp_path: Path, rounds: int) -> dict[str, list[Node]]:
    """Every node of `topo` run through its stages as `m3tgossip node` runs them
    (`StageRunner`), each in a thread, over in-process links; the nodes of every stage."""
    options = {"records": 40, "local_steps": 2, "eval_every": 1}
    net = Rejoining()
    built: dict[str, list[Node]] = {n: [] for n in topo.ids()}

    def build(cfg: NodeConfig) -> Node:
        node = Node(cfg, topology=topo, transport=net.transport(cfg.id))
        built[cfg.id].append(node)
        return node

    runners = []
    for nid in topo.ids():
        cfg = node_config(topo, nid, tmp_path, rounds=rounds)
        cfg = replace(cfg, workload="edu", workload_options=options)
        runners.append(StageRunner(cfg, build))
    run_nodes(runners)  # type: ignore[arg-type]
    return built


def test_nodes_run_stage_by_stage_under_one_privacy_budget(tmp_path: Path) -> None:
    data = spec()
    del data["stages"][1]
    data["defaults"]["privacy"] = "gdpr"
    topo = parse_topology(data, str(tmp_path / "x.toml"))
    stages = run_semester(topo, tmp_path, rounds=4)
    for nid, (first, second) in stages.items():
        assert first.topology.stage == 0 and first.round == 2 and first.at_stage_end
        assert second.topology.stage == 1 and second.round == 4 and not second.at_stage_end
        assert "head.next_response" in second.shared and "head.next_response" not in first.shared
        # the same DP-SGD plan and noise in both stages, and the ledger carried over
        a, b = first.gate, second.gate
        assert a is not None and b is not None and a.training is not None
        assert b.training is not None
        assert a.training.noise_multiplier == b.training.noise_multiplier
        assert a.node_epsilon() < b.node_epsilon()
        assert b.node_epsilon() == pytest.approx(b.profile.epsilon, rel=1e-3)
        assert b.node_epsilon() <= b.profile.epsilon * (1 + 1e-9)
        rows = read_metrics(second.config.metrics_path)
        assert [r["round"] for r in rows] == [0, 1, 2, 3], nid
        assert [sorted(r["tasks"]) for r in rows][1:3] == [
            ["at_risk"],
            ["at_risk", "next_response"],
        ]
        assert rows[1]["privacy"]["node_epsilon"] < rows[3]["privacy"]["node_epsilon"]
        # the checkpoint each stage ended with is kept
        kept = checkpoint.load_file(second.config.state_path / "stage-0.npz")
        assert kept[1]["round"] == 2 and "param/head.next_response" not in kept[0]
        assert (second.config.state_path / "stage-1.npz").exists()


def test_topology_check_reports_each_stage_and_its_warnings() -> None:
    topo = parse_topology(SPEC, "x.toml")
    report = check_report(topo)
    assert [s["name"] for s in report["stages"]] == ["clicks", "stress"]
    assert set(report["stages"][0]["components"]) == {
        "encoder.clickstream",
        "head.next_response",
        "prompt.next_response",
    }
    assert report["stages"][1]["components"]["head.stress"]["holders"] == ["a", "b"]
    # stress without signal data, from the stage that brings it
    assert (
        "stage stress: node a: task stress needs signal data, which it lacks" in report["warnings"]
    )
    text = format_report(report)
    assert "clicks from round 2: +next_response, +clickstream on 3 nodes" in text


def test_the_benchmark_figures_follow_their_definitions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from continual import node_figures  # benchmarks/continual.py

    # tasks a (stage 0), b (stage 1), c (stage 2); R[k][t] after stage k, b[t] untrained
    stages = [
        {"a": 0.80, "b": 0.50, "c": 0.40},
        {"a": 0.90, "b": 0.70, "c": 0.45},
        {"a": 0.85, "b": 0.75, "c": 0.60},
    ]
    base = {"a": 0.50, "b": 0.50, "c": 0.50}
    joint = {"a": 0.90, "b": 0.80, "c": 0.70}
    fig = node_figures(stages, base, {"a": 0, "b": 1, "c": 2}, joint)
    assert fig["acc"] == pytest.approx((0.85 + 0.75 + 0.60) / 3)
    assert fig["joint_acc"] == pytest.approx(0.80)
    # a: best 0.90, final 0.85; b: best is its final
    assert fig["forgetting_pts"] == pytest.approx((5.0 + 0.0) / 2)
    # a: 0.85 - 0.80; b: 0.75 - 0.70
    assert fig["bwt_pts"] == pytest.approx(5.0)
    # b before its stage 0.50 vs 0.50 untrained; c before its stage 0.45 vs 0.50
    assert fig["fwt_pts"] == pytest.approx((0.0 - 5.0) / 2)

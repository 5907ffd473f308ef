"""A stage that adds nodes (`add_nodes`): each version's graph and weights, the joining node
started at its stage's round from its neighbours' values, neighbours that never wait for it
before, the testbed running such a spec, exact erasure back to the stage that brought the
erased records, and malformed stages refused naming the file, the stage and the field."""

from __future__ import annotations

import copy
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fakes import FakeNetwork, FakeTransport, node_config, run_nodes

from m3tgossip import protocol
from m3tgossip.daemon import checkpoint
from m3tgossip.daemon.config import GossipConfig, NodeConfig
from m3tgossip.daemon.metrics import read_metrics
from m3tgossip.daemon.node import Node, StageRunner
from m3tgossip.errors import ConfigError
from m3tgossip.harness import Testbed, TestbedSpec
from m3tgossip.topology import load_topology, node_weights, parse_topology
from m3tgossip.workloads.consensus import ConsensusWorkload

ROOT = Path(__file__).resolve().parent.parent
MsgType = protocol.MsgType

#: a triangle a-b-c; d joins at round 3 with edges to a and c, after a stage that adds a task
SPEC: dict[str, Any] = {
    "name": "join",
    "edges": [["a", "b"], ["b", "c"], ["a", "c"], ["c", "d"], ["a", "d"]],
    "defaults": {"modalities": ["tabular"], "tasks": ["at_risk"], "role": "instructor"},
    "nodes": [{"id": "a"}, {"id": "b"}, {"id": "c"}, {"id": "d"}],
    "stages": [
        {"name": "clicks", "round": 2, "tasks": ["next_response"]},
        {"name": "course", "round": 3, "add_nodes": ["d"]},
    ],
}


#: the daemons' spec: only the stage that adds d (the consensus workload has no stage tasks)
JOINS: dict[str, Any] = {**SPEC, "stages": [{"name": "course", "round": 3, "add_nodes": ["d"]}]}


def spec(**stage1: Any) -> dict[str, Any]:
    data = copy.deepcopy(SPEC)
    data["stages"][1].update(stage1)
    return data


def test_a_node_a_stage_adds_is_absent_before_it_with_its_edges() -> None:
    topo = parse_topology(SPEC, "x.toml")
    assert topo.joins_at("d") == 2 and topo.joins_at("a") == 0
    for k in (0, 1):
        v = topo.version(k)
        assert v.present() == ["a", "b", "c"]
        assert v.neighbours("a") == ["b", "c"] and v.neighbours("d") == []
        assert all("d" not in v.holders(c) for c in v.components())
        assert "d" not in v.graph()
    two = topo.version(2)
    assert two.neighbours("a") == ["b", "c", "d"] and two.neighbours("d") == ["a", "c"]
    # the default `nodes` of a stage is the nodes present then: d joins with its own tasks
    assert two.node("d").tasks == ("at_risk",) and "next_response" in two.node("a").tasks
    # written out and loaded back: the same spec, the join included
    assert parse_topology(tomllib.loads(two.to_toml()), "x.toml") == topo


def test_mixing_weights_are_symmetric_and_doubly_stochastic_in_every_round() -> None:
    topo = parse_topology(SPEC, "x.toml")
    for round_ in range(6):
        v = topo.version(topo.stage_at(round_))
        for comp in v.components():
            ids = v.holders(comp)
            w = np.array([[node_weights(v, i, comp).get(j, 0.0) for j in ids] for i in ids])
            assert np.allclose(w, w.T), (round_, comp)
            assert np.allclose(w.sum(axis=0), 1.0) and np.allclose(w.sum(axis=1), 1.0)
            assert (w >= 0).all()


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"add_nodes": ["e"]}, 'stages[1] ("course").add_nodes', 'unknown node id "e"'),
        (
            {"add_nodes": ["d"], "nodes": ["d"], "tasks": ["stress"]},
            'stages[1] ("course").add_nodes',
            "",
        ),
    ],
)
def test_a_stage_adding_an_unknown_node_is_refused(
    change: dict[str, Any], field: str, message: str
) -> None:
    data = spec(**change)
    if not message:  # a node added twice
        data["stages"].append({"name": "again", "round": 5, "add_nodes": ["d"]})
        field, message = 'stages[2] ("again").add_nodes', "already added by stages[1]"
    with pytest.raises(ConfigError) as err:
        parse_topology(data, "spec.toml")
    assert err.value.source == "spec.toml" and err.value.entry == field
    assert message in str(err.value) and "spec.toml" in str(err.value)


def test_a_stage_naming_a_node_before_it_joins_is_refused() -> None:
    data = spec()
    data["stages"][0]["nodes"] = ["a", "d"]
    with pytest.raises(ConfigError) as err:
        parse_topology(data, "spec.toml")
    assert err.value.entry == 'stages[0] ("clicks").nodes'
    assert 'node "d" joins at a later stage ("course")' in str(err.value)


def test_an_edge_to_a_node_that_never_exists_is_refused() -> None:
    data = spec()
    data["edges"].append(["d", "zz"])
    with pytest.raises(ConfigError) as err:
        parse_topology(data, "spec.toml")
    assert "spec.toml" in str(err.value) and "edges" in err.value.entry
    assert '"zz"' in str(err.value)


def test_a_joining_node_without_an_edge_to_the_nodes_present_is_refused() -> None:
    data = spec()
    data["nodes"].append({"id": "e"})
    data["edges"].append(["d", "e"])
    data["stages"].append({"name": "late", "round": 5, "add_nodes": ["d"]})
    data["stages"][1]["add_nodes"] = ["e"]  # e joins first, its only edge is to d
    with pytest.raises(ConfigError) as err:
        parse_topology(data, "spec.toml")
    assert err.value.entry == 'stages[1] ("course").add_nodes'
    assert "disconnected" in str(err.value) and "spec.toml" in str(err.value)


def test_a_joining_node_linked_only_to_nodes_joining_with_it_is_refused() -> None:
    data = spec(add_nodes=["d", "e"])
    data["nodes"].append({"id": "e"})
    data["edges"].append(["d", "e"])
    data["edges"] = [e for e in data["edges"] if e != ["a", "d"] and e != ["c", "d"]]
    data["edges"].append(["c", "e"])
    with pytest.raises(ConfigError) as err:
        parse_topology(data, "spec.toml")
    assert err.value.entry == 'stages[1] ("course").add_nodes'
    assert 'node "d" has no edge to a node present before round 3' in str(err.value)


def test_a_join_round_beyond_the_run_is_refused_by_node_and_testbed(tmp_path: Path) -> None:
    path = tmp_path / "spec.toml"
    path.write_text(toml_of(SPEC))
    topo = load_topology(path)
    config = node_config(topo, "a", tmp_path, rounds=3)
    with pytest.raises(ConfigError) as err:
        Node(config, topo, transport=FakeNetwork().transport("a"))
    assert err.value.entry == 'stages[1] ("course").round' and str(path) in str(err.value)
    assert "beyond the run's last round 2 (3 rounds)" in str(err.value)
    with pytest.raises(ConfigError) as err:
        Testbed(TestbedSpec(topology=str(path), out=tmp_path / "tb", rounds=3))
    assert err.value.entry == 'stages[1] ("course").round'


def toml_of(data: dict[str, Any]) -> str:
    return parse_topology(data, "x.toml").to_toml()


# ----------------------------------------------------------------------------- daemons


class Rejoining(FakeNetwork):
    """In-process links whose inboxes outlive a node (the next stage's node of an id gets what
    its neighbours sent while it was being built)."""

    def transport(self, node_id: str) -> FakeTransport:
        inbox = self.inboxes.get(node_id)
        transport = super().transport(node_id)
        if inbox is not None:
            self.inboxes[node_id] = inbox
        return transport


class Recording(ConsensusWorkload):
    """The consensus workload, keeping its shared values after every mix."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.mixed: dict[int, dict[str, np.ndarray]] = {}

    def after_mix(self, round_: int) -> None:
        super().after_mix(round_)
        self.mixed[round_] = {c: x.copy() for c, x in self.shared().items()}


def test_a_joining_node_takes_its_neighbours_state_and_nobody_waits_for_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "spec.toml"
    path.write_text(toml_of(JOINS))
    topo = load_topology(path)
    net = Rejoining()
    built: dict[str, list[Node]] = {n: [] for n in topo.ids()}

    def build(cfg: NodeConfig) -> Node:
        found = None if cfg.fresh else checkpoint.load(cfg.state_path)
        k = topo.stage_at(int(found[1]["round"]) if found else 0)
        version = topo.version(max(k, topo.joins_at(cfg.id)))
        work = Recording(version, cfg.id, seed=0, options={"size": 6})
        node = Node(cfg, topology=topo, workload=work, transport=net.transport(cfg.id))
        built[cfg.id].append(node)
        return node

    runners = [StageRunner(node_config(topo, nid, tmp_path, rounds=6), build) for nid in topo.ids()]
    run_nodes(runners)  # type: ignore[arg-type]
    (joiner,) = built["d"]
    assert joiner.topology.stage == 1 and joiner.resumed_from is None
    assert [r["round"] for r in read_metrics(joiner.config.metrics_path)] == [3, 4, 5]
    for nid in "abc":
        stages = built[nid]
        assert [n.topology.stage for n in stages] == [0, 1]
        # before the stage, d is nobody's neighbour: no round of theirs waited for it
        assert all("d" not in n.peers for n in stages[:1])
        rows = read_metrics(stages[-1].config.metrics_path)
        assert [r["round"] for r in rows] == list(range(6)), nid
        assert all(r["missed"] == [] for r in rows if "missed" in r), nid
        # the weights each node mixed with are its rows of that stage's matrix
        for n in stages:
            for comp, row in n.mixstep.weights.items():
                assert row == node_weights(n.topology, nid, comp)
    # nothing of a, b, c went to d before round 3, and d's first values were not mixed
    sent = [
        (s, r, m) for s, r, m in net.log if r == "d" and m.type in (MsgType.STATE, MsgType.DELTA)
    ]
    assert sent and min(m.round for _, _, m in sent) == 3
    # d's first mix is the weighted mean of what a and c sent it for round 3
    three = {s: m for s, _, m in sent if m.round == 3}
    assert set(three) == {"a", "c"}
    row = node_weights(joiner.topology, "d", "backbone")
    want = sum(row[j] * np.asarray(three[j].tensors["backbone"]) for j in "ac") / (
        row["a"] + row["c"]
    )
    got = joiner.workload.mixed[3]["backbone"]  # type: ignore[attr-defined]
    assert np.allclose(got, want)
    start = Recording(joiner.topology, "d", seed=0, options={"size": 6}).shared()["backbone"]
    assert not np.allclose(got, start)
    # a's mix of round 3 left d out: it moved towards b and c only, d's weight stayed with a
    a_last = built["a"][-1]
    a_row = node_weights(a_last.topology, "a", "backbone")
    assert a_row["d"] > 0
    to_a = {
        s: np.asarray(m.tensors["backbone"])
        for s, r, m in net.log
        if r == "a" and m.type is MsgType.STATE and m.round == 3
    }
    assert set(to_a) == {"b", "c", "d"}
    (own,) = [
        np.asarray(m.tensors["backbone"])
        for s, r, m in net.log
        if s == "a" and r == "b" and m.type is MsgType.STATE and m.round == 3
    ]
    want_a = own + sum(a_row[j] * (to_a[j] - own) for j in "bc")
    assert np.allclose(a_last.workload.mixed[3]["backbone"], want_a)  # type: ignore[attr-defined]
    # and in the end every node holds (nearly) the same shared state, d included
    final = {nid: built[nid][-1].workload.shared()["backbone"] for nid in topo.ids()}
    spread = max(float(np.abs(final[n] - final["a"]).max()) for n in final)
    assert spread < 0.5 * float(np.abs(start - final["a"]).max())


def test_a_joining_node_that_no_neighbour_answers_stops_with_an_error(tmp_path: Path) -> None:
    from m3tgossip.daemon.startup import JoinTimeout

    path = tmp_path / "spec.toml"
    path.write_text(toml_of(JOINS))
    topo = load_topology(path)
    config = node_config(topo, "d", tmp_path, rounds=6, join_wait_s=0.3)
    work = ConsensusWorkload(topo.version(1), "d", seed=0, options={"size": 4})
    node = Node(config, topo, work, transport=FakeNetwork().transport("d"))
    assert node.round == 3 and node.topology.stage == 1
    with pytest.raises(JoinTimeout, match="joins at round 3, but no neighbour"):
        node.run()


def test_the_testbed_runs_a_spec_whose_stage_adds_a_node(tmp_path: Path) -> None:
    path = tmp_path / "spec.toml"
    path.write_text(toml_of(JOINS))
    spec_ = TestbedSpec(
        topology=str(path),
        out=tmp_path / "tb",
        rounds=6,
        workload="consensus",
        quiet=True,
        timeout=240.0,
    )
    summary = Testbed(spec_).run()
    assert summary.exit_code == 0, summary
    rows = read_metrics(tmp_path / "tb" / "nodes" / "d" / "metrics.jsonl")
    assert [r["round"] for r in rows] == [3, 4, 5]


def test_a_joining_edu_node_starts_from_the_mixed_model_and_trains(tmp_path: Path) -> None:
    from m3tgossip.edu.workload import EduWorkload

    data: dict[str, Any] = {
        **JOINS,
        "edges": [["a", "b"], ["b", "c"], ["a", "c"], ["c", "d"], ["a", "d"]],
        "stages": [{"name": "course", "round": 2, "add_nodes": ["d"]}],
    }
    path = tmp_path / "spec.toml"
    path.write_text(toml_of(data))
    topo = load_topology(path)
    options = {"records": 40, "local_steps": 2, "eval_every": 1}
    net = Rejoining()
    built: dict[str, list[Node]] = {n: [] for n in topo.ids()}
    after: dict[str, dict[int, dict[str, np.ndarray]]] = {n: {} for n in topo.ids()}

    def build(cfg: NodeConfig) -> Node:
        cfg = NodeConfig(**{**cfg.__dict__, "workload": "edu", "workload_options": options})
        node = Node(cfg, topology=topo, transport=net.transport(cfg.id))
        work = node.workload

        def record(round_: int, nid: str = cfg.id, work: Any = work) -> None:
            after[nid][round_] = {c: x.copy() for c, x in work.shared().items()}

        work.after_mix = record  # type: ignore[method-assign]
        built[cfg.id].append(node)
        return node

    runners = [StageRunner(node_config(topo, nid, tmp_path, rounds=4), build) for nid in topo.ids()]
    run_nodes(runners)  # type: ignore[arg-type]
    (joiner,) = built["d"]
    rows = read_metrics(joiner.config.metrics_path)
    assert [r["round"] for r in rows] == [2, 3]
    assert all(r["train"]["steps"] == 2 and r["train"]["loss"]["at_risk"] > 0 for r in rows)
    assert (joiner.config.state_path / "stage-1.npz").exists()
    start = EduWorkload(joiner.topology, "d", 0, options).shared()
    states = {
        s: m
        for s, r, m in net.log
        if r == "d" and m.type is MsgType.STATE and m.round == 2 and s in ("a", "c")
    }
    assert set(states) == {"a", "c"}
    for comp in ("backbone", "fusion"):
        row = node_weights(joiner.topology, "d", comp)
        want = sum(row[j] * np.asarray(states[j].tensors[comp]) for j in "ac")
        want = want / (row["a"] + row["c"])
        assert np.allclose(after["d"][2][comp], want, atol=1e-6), comp
        assert not np.allclose(after["d"][2][comp], start[comp])
    # after one more round of its own training and mixing, it is still near the federation
    gap = float(np.abs(after["d"][3]["backbone"] - after["a"][3]["backbone"]).max())
    assert gap < float(np.abs(start["backbone"] - after["a"][3]["backbone"]).max())


def test_edu_rollback_to_a_stage_checkpoint_keeps_its_components_and_seeds_the_rest() -> None:
    from m3tgossip.edu.workload import EduWorkload

    data = copy.deepcopy(SPEC)
    topo = parse_topology(data, "x.toml").version(2)
    work = EduWorkload(topo, "a", 0, {"records": 40, "local_steps": 1})
    seed = {c: x.copy() for c, x in work.model.vectors().items()}
    start = {"param/backbone": seed["backbone"] + 1.0}  # a stage without head.next_response
    work.local_step(0)
    work.rollback(start)
    vectors = work.model.vectors()
    assert np.array_equal(vectors["backbone"], seed["backbone"] + 1.0)
    for c, x in vectors.items():
        if c != "backbone":
            assert np.array_equal(x, seed[c]), c
    assert not work.trainer.optimizer.state


# ----------------------------------------------------------------------------- erasure


class Forgetful(ConsensusWorkload):
    """The consensus workload with a `forget` that records where it was told to roll back."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.starts: list[dict[str, np.ndarray] | None] = []

    def forget(
        self,
        target: str,
        ids: list[str],
        mode: str,
        own: bool,
        start: dict[str, np.ndarray] | None = None,
    ) -> dict[str, Any]:
        if own and not set(ids) <= {"s1"}:
            raise ValueError(f"no records of learner {ids} on this node")
        self.starts.append(start)
        return {"removed_records": len(ids) if own else 0}


class Wire:
    """A transport that keeps what is sent and replied, delivered by the test."""

    endpoint = "tcp://127.0.0.1:1"

    def __init__(self) -> None:
        self.outbox: list[tuple[str, list[bytes]]] = []
        self.replies: list[protocol.Message] = []

    def send(self, peer: str, frames: list) -> bool:
        self.outbox.append((peer, [bytes(f) for f in frames]))
        return True

    def reply(self, routing_id: bytes, frames: list) -> bool:
        self.replies.append(protocol.decode([bytes(f) for f in frames]))
        return True

    def poll(self, timeout_ms: int) -> list:
        return []

    def close(self, linger_ms: int | None = None) -> None:
        pass


def test_exact_erasure_of_a_late_learner_rolls_back_only_to_its_stage(tmp_path: Path) -> None:
    path = tmp_path / "spec.toml"
    path.write_text(toml_of(SPEC))
    topo = load_topology(path)
    nodes: dict[str, Node] = {}
    kept: dict[str, dict[str, np.ndarray]] = {}
    for nid in topo.ids():
        config = NodeConfig(
            id=nid,
            topology=str(path),
            state_dir=str(tmp_path / nid),
            rounds=8,
            fresh=nid == "d",
            insecure=True,
            gossip=GossipConfig(round_deadline_s=5.0, startup_grace_s=5.0),
        )
        work = Forgetful(topo.version(2), nid, seed=0, options={"size": 4})
        if nid != "d":  # a, b, c are in stage 2 at round 5; stage 1 ended at round 3
            kept[nid] = {"param/backbone": np.full(4, 7.0)}
            checkpoint.save(config.state_path, kept[nid], {"round": 3, "model_id": "m"})
            checkpoint.keep_stage(config.state_path, 1)
            meta = {"round": 5, "model_id": work.model_id()}
            checkpoint.save(config.state_path, work.state(), meta)
        nodes[nid] = Node(config, topo, work, transport=Wire())  # type: ignore[arg-type]
    assert nodes["d"].round == 3 and nodes["a"].round == 5
    nodes["d"].round = 5
    body = {"target": "learner", "ids": ["s1"], "mode": "exact"}
    msg = protocol.Message(MsgType.FORGET_REQUEST, "cli", protocol.new_session(), 1, 0, body)
    nodes["d"].handlers.handle(b"\x00\x01cli", protocol.encode(msg), None)
    assert nodes["d"].link.transport.replies.pop().body["accepted"]  # type: ignore[attr-defined]
    for _ in range(20):  # deliver until nothing is left
        pending = [(s, p, f) for s, n in nodes.items() for p, f in n.link.transport.outbox]  # type: ignore[attr-defined]
        for n in nodes.values():
            n.link.transport.outbox.clear()  # type: ignore[attr-defined]
        if not pending:
            break
        for sender, peer, frames in pending:
            nodes[peer].handlers.handle(sender.encode(), frames, None)
    for nid, node in nodes.items():
        (path_,) = sorted((tmp_path / nid).glob("erasure-*.json"))
        report = json.loads(path_.read_text())
        assert report["rolled_back_to_stage"] == 2, nid
        assert report["rolled_back_to_stage_name"] == "course"
        assert report["rolled_back_to_round"] == 3 and report["rounds_to_replay"] == 2
        (start,) = node.workload.starts  # type: ignore[attr-defined]
        if nid == "d":  # it joined at that stage: back to its values before any training
            assert start is None
        else:  # back to the checkpoint the previous stage ended with
            assert start is not None and np.array_equal(
                start["param/backbone"], kept[nid]["param/backbone"]
            )


def test_the_shipped_semester_with_a_new_course_ends_with_it() -> None:
    topo = load_topology(ROOT / "topology" / "semester-course.toml")
    last = topo.stages[-1]
    assert last.add_nodes and all(topo.joins_at(n) == len(topo.stages) for n in last.add_nodes)
    assert all(n not in topo.version(len(topo.stages) - 1).present() for n in last.add_nodes)


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip("daemons on loopback: Linux only")

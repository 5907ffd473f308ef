"""What goes on the wire: only shared components both ends hold, never `local` ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fakes import CapturingTransport, PrivateVectors, WireTransport

from m3tgossip import protocol
from m3tgossip.daemon.config import GossipConfig, NodeConfig
from m3tgossip.daemon.node import Node
from m3tgossip.errors import ProtocolError
from m3tgossip.harness import Testbed, TestbedSpec
from m3tgossip.topology import load_topology

ROOT = Path(__file__).resolve().parent.parent


def test_only_components_held_by_both_ends_are_sent(tmp_path: Path) -> None:
    topo = load_topology(ROOT / "topology/campus.toml")
    local_somewhere = {c for n in topo.nodes for c in n.local}
    assert local_somewhere, "campus should keep some components local"
    for spec in topo.nodes:
        cfg = NodeConfig(
            id=spec.id,
            topology=str(topo.source),
            state_dir=str(tmp_path / spec.id),
            workload_options={"size": 8},
        )
        sent = CapturingTransport()
        node = Node(cfg, topology=topo, transport=sent)
        for round_ in range(2):  # round 0 sends full state, round 1 deltas
            node.round = round_
            node.exchange.send_round()
        assert sent.sent
        for peer, msg, _ in sent.sent:
            both = set(spec.shared_components) & set(topo.node(peer).shared_components)
            assert set(msg.tensors) <= both, (spec.id, peer, set(msg.tensors) - both)
            assert not set(msg.tensors) & set(spec.local)
        heard = {peer for peer, _, _ in sent.sent}
        silent = {
            p
            for p in topo.neighbours(spec.id)
            if not set(spec.shared_components) & set(topo.node(p).shared_components)
        }
        assert not heard & silent  # zero bytes to a neighbour with no component in common


@pytest.mark.multiprocess
def test_edu_daemons_train_exchange_and_report(tmp_path: Path) -> None:
    spec = tmp_path / "pair.toml"
    spec.write_text(
        'name = "pair"\nedges = [["a", "b"]]\n'
        '[[nodes]]\nid = "a"\nrole = "instructor"\nmodalities = ["clickstream", "tabular"]\n'
        'tasks = ["at_risk"]\n'
        '[[nodes]]\nid = "b"\nrole = "student"\nmodalities = ["clickstream"]\n'
        'tasks = ["at_risk", "next_response"]\n'
        'local = ["head.next_response"]\n'
    )
    out = tmp_path / "bed"
    options = {"eval_every": 1, "local_steps": 2, "records": 60}
    bed = TestbedSpec(spec, out, workload="edu", rounds=3, quiet=True, timeout=300, options=options)
    code = Testbed(bed).run().exit_code
    s = json.loads((out / "summary.json").read_text())
    assert code == 0 and not s["crashed"] and not s["hung"]
    assert s["per_node"]["a"]["rounds"] == [0, 1, 2]
    assert set(s["per_node"]["b"]["final"]) == {"at_risk", "next_response"}
    assert 0.0 <= s["per_node"]["b"]["final"]["at_risk"]["acc"] <= 1.0
    assert s["per_node"]["a"]["groups"]
    assert all(v > 0 for v in s["bytes_sent"].values())


def test_dp_noise_is_declared_and_spent_budget_stops_sharing(tmp_path: Path) -> None:
    import numpy as np

    spec = tmp_path / "pair.toml"
    spec.write_text(
        'name = "pair"\nedges = [["a", "b"]]\n'
        '[[nodes]]\nid = "a"\nprivacy = "custom"\nmodalities = ["tabular"]\ntasks = ["at_risk"]\n'
        '[[nodes]]\nid = "b"\nmodalities = ["tabular"]\ntasks = ["at_risk"]\n'
    )
    topo = load_topology(spec)
    comps = {c: 50 for c in topo.node("a").shared_components}
    cfg = NodeConfig(
        id="a",
        topology=str(spec),
        state_dir=str(tmp_path / "a"),
        rounds=0,
        privacy={"epsilon": 2.0, "delta": 1e-5, "clip": 0.1, "noise_multiplier": 8.0},
    )
    capture = CapturingTransport()
    node = Node(cfg, topology=topo, workload=PrivateVectors(comps), transport=capture)
    assert node.gate is not None

    def one_round() -> None:
        before = node.engine.snapshot()
        node.workload.local_step(node.round)
        node.engine.release(before)
        node.exchange.send_round()
        node.round += 1

    while len(node.retired) < len(comps) and node.round < 500:
        one_round()
    assert node.retired == set(comps), "budgets never ran out"
    sent = capture.sent
    updates = [m for _, m, _ in sent if m.type in (protocol.MsgType.DELTA, protocol.MsgType.STATE)]
    assert updates and all(t.noise > 0 for m in updates for t in m.meta.values())
    retires = [m for _, m, _ in sent if m.type is protocol.MsgType.RETIRE]
    assert {c for m in retires for c in m.body["components"]} == set(comps)
    last_retire = max(i for i, (_, m, _) in enumerate(sent) if m.type is protocol.MsgType.RETIRE)
    count = len(sent)
    one_round()
    assert len(capture.sent) == count  # nothing more leaves the node
    report = node.gate.report()
    assert all(r["exhausted"] and r["epsilon_spent"] <= 2.0 * 1.01 for r in report.values())
    # what the node keeps is exactly what it released (no private remainder)
    for c, x in node.shared.items():
        assert np.array_equal(x, node.exchange.published[c]) or c in node.retired
    assert last_retire < count


def test_privacy_profile_override(tmp_path: Path) -> None:
    import pytest

    from m3tgossip.errors import ConfigError

    topo = load_topology(ROOT / "topology/campus.toml")
    assert topo.node("uni-a").privacy == "gdpr"
    comps = {c: 8 for c in topo.node("uni-a").shared_components}

    def build(privacy: dict) -> Node:
        cfg = NodeConfig(
            id="uni-a", topology=str(topo.source), state_dir=str(tmp_path / "a"), privacy=privacy
        )
        return Node(
            cfg, topology=topo, workload=PrivateVectors(comps), transport=CapturingTransport()
        )

    assert build({}).gate is not None
    assert build({"profile": "open"}).gate is None
    with pytest.raises(ConfigError, match="privacy"):
        build({"profile": "lax"})


def _pair(tmp_path: Path, same_start: bool, **gossip: object) -> dict[str, Node]:
    from m3tgossip.workloads.consensus import ConsensusWorkload

    spec = tmp_path / "pair.toml"
    spec.write_text(
        'name = "pair"\nedges = [["a", "b"]]\n[[nodes]]\nid = "a"\n[[nodes]]\nid = "b"\n'
    )
    topo = load_topology(spec)
    workloads = {
        n: ConsensusWorkload(topology=topo, node_id=n, seed=0, options={"size": 16})
        for n in ("a", "b")
    }
    if same_start:
        for comp, x in workloads["b"].shared().items():
            x[...] = workloads["a"].shared()[comp]
    nodes = {}
    for n, w in workloads.items():
        cfg = NodeConfig(
            id=n,
            topology=str(spec),
            state_dir=str(tmp_path / n),
            fresh=True,
            gossip=GossipConfig(**gossip),
        )
        nodes[n] = Node(cfg, topology=topo, workload=w, transport=WireTransport())
    return nodes


def _handshake(nodes: dict[str, Node]) -> None:
    nodes["a"].exchange.hello(nodes["a"].peers["b"])
    nodes["a"].link.transport.deliver("a", nodes)  # b answers
    nodes["b"].link.transport.deliver("b", nodes)


def test_nodes_starting_from_the_same_values_send_deltas_from_the_first_round(
    tmp_path: Path,
) -> None:
    nodes = _pair(tmp_path, same_start=True, noise_strength=1.0)  # a node that sends deltas
    _handshake(nodes)
    for n in nodes.values():
        n.shared[next(iter(n.shared))][:4] += 1.0  # some local progress
        n.exchange.send_round()
    for sender, node in nodes.items():
        sent = node.link.transport.deliver(sender, nodes)
        assert [m.type for m in sent] == [protocol.MsgType.DELTA]
    for me, other in (("a", "b"), ("b", "a")):
        for comp in nodes[me].shared:
            np.testing.assert_array_equal(
                nodes[other].peers[me].replicas[comp], nodes[me].exchange.published[comp]
            )
            assert nodes[other].peers[me].versions[comp] == nodes[me].exchange.version[comp] == 1
    assert all(n.link.rejected == 0 for n in nodes.values())


def test_different_starting_values_are_sent_as_state(tmp_path: Path) -> None:
    nodes = _pair(tmp_path, same_start=False, noise_strength=1.0)  # a node that sends deltas
    _handshake(nodes)
    for n in nodes.values():
        n.exchange.send_round()
    for sender, node in nodes.items():
        sent = node.link.transport.deliver(sender, nodes)
        assert protocol.MsgType.STATE in [m.type for m in sent]
    for me, other in (("a", "b"), ("b", "a")):
        for comp in nodes[me].shared:
            np.testing.assert_array_equal(
                nodes[other].peers[me].replicas[comp], nodes[me].exchange.published[comp]
            )


def test_a_hello_origin_digest_must_be_32_hex_digits() -> None:
    body = {
        "model": "m",
        "components": ["c"],
        "listen": "tcp://127.0.0.1:5000",
        "round": 0,
        "origin": {"c": "xyz"},
    }
    with pytest.raises(ProtocolError, match="origin"):
        protocol.encode(
            protocol.Message(protocol.MsgType.HELLO, "a", protocol.new_session(), 1, 0, body)
        )
    body["origin"] = {"c": "0" * 32}
    frames = protocol.encode(
        protocol.Message(protocol.MsgType.HELLO, "a", protocol.new_session(), 1, 0, body)
    )
    assert protocol.decode([bytes(f) for f in frames]).body["origin"] == {"c": "0" * 32}

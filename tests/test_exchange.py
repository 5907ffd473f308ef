"""What goes on the wire: only shared components both ends hold, never `local` ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from m3tgossip import protocol
from m3tgossip.daemon.config import GossipConfig, NodeConfig
from m3tgossip.daemon.node import Node
from m3tgossip.errors import ProtocolError
from m3tgossip.harness import Testbed, TestbedSpec
from m3tgossip.topology import load_topology

ROOT = Path(__file__).resolve().parent.parent


class CapturingTransport:
    endpoint = "tcp://127.0.0.1:1"

    def __init__(self) -> None:
        self.sent: list[tuple[str, protocol.Message, int]] = []

    def send(self, peer: str, frames: list) -> bool:
        self.sent.append(
            (peer, protocol.decode([bytes(f) for f in frames]), protocol.frames_nbytes(frames))
        )
        return True


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
        node = Node(cfg, topology=topo)
        node.transport = CapturingTransport()
        for round_ in range(2):  # round 0 sends full state, round 1 deltas
            node.round = round_
            node._send_round()
        assert node.transport.sent
        for peer, msg, _ in node.transport.sent:
            both = set(spec.shared_components) & set(topo.node(peer).shared_components)
            assert set(msg.tensors) <= both, (spec.id, peer, set(msg.tensors) - both)
            assert not set(msg.tensors) & set(spec.local)
        heard = {peer for peer, _, _ in node.transport.sent}
        silent = {
            p
            for p in topo.neighbours(spec.id)
            if not set(spec.shared_components) & set(topo.node(p).shared_components)
        }
        assert not heard & silent  # zero bytes to a neighbour with no component in common


def test_edu_daemons_train_exchange_and_report(tmp_path: Path) -> None:
    spec = tmp_path / "pair.toml"
    spec.write_text(
        'name = "pair"\nedges = [["a", "b"]]\n'
        '[[nodes]]\nid = "a"\nrole = "instructor"\nmodalities = ["clickstream", "tabular"]\ntasks = ["at_risk"]\n'
        '[[nodes]]\nid = "b"\nrole = "student"\nmodalities = ["clickstream"]\ntasks = ["at_risk", "next_response"]\n'
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


class PrivateVectors:
    """A numpy workload whose vectors count as learned from private records."""

    name = "private-vectors"
    private_data = True

    def __init__(self, comps: dict[str, int]) -> None:
        import numpy as np

        self._shared = {c: np.zeros(n) for c, n in comps.items()}

    def model_id(self) -> str:
        return "private-vectors"

    def shared(self):
        return self._shared

    def local_step(self, round_: int) -> dict:
        for x in self._shared.values():
            x += 0.01
        return {}

    def after_mix(self, round_: int) -> None:
        pass

    def evaluate(self, round_: int) -> dict:
        return {}

    def state(self):
        return dict(self._shared)

    def load_state(self, arrays) -> None:
        pass


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
    node = Node(cfg, topology=topo, workload=PrivateVectors(comps))
    node.transport = CapturingTransport()
    assert node.privatizer is not None
    rounds = 0
    while len(node.retired) < len(comps) and rounds < 500:
        before = {c: x.copy() for c, x in node.shared.items() if c not in node.retired}
        node.workload.local_step(rounds)
        node._send_round(before)
        node.round += 1
        rounds += 1
    assert node.retired == set(comps), "budgets never ran out"
    sent = node.transport.sent
    updates = [m for _, m, _ in sent if m.type in (protocol.MsgType.DELTA, protocol.MsgType.STATE)]
    assert updates and all(t.noise > 0 for m in updates for t in m.meta.values())
    retires = [m for _, m, _ in sent if m.type is protocol.MsgType.RETIRE]
    assert {c for m in retires for c in m.body["components"]} == set(comps)
    last_retire = max(i for i, (_, m, _) in enumerate(sent) if m.type is protocol.MsgType.RETIRE)
    count = len(sent)
    node.workload.local_step(rounds)
    node._send_round({c: x.copy() for c, x in node.shared.items()})
    assert len(node.transport.sent) == count  # nothing more leaves the node
    report = node.privatizer.report()
    assert all(r["exhausted"] and r["epsilon_spent"] <= 2.0 * 1.01 for r in report.values())
    # what the node keeps is exactly what it released (no private remainder)
    for c, x in node.shared.items():
        assert np.array_equal(x, node.out_replica[c]) or c in node.retired
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
        return Node(cfg, topology=topo, workload=PrivateVectors(comps))

    assert build({}).privatizer is not None
    assert build({"profile": "open"}).privatizer is None
    with pytest.raises(ConfigError, match="privacy"):
        build({"profile": "lax"})


class WireTransport:
    """Keeps what a node sends, as frames, for delivery to another in-process node."""

    endpoint = "tcp://127.0.0.1:1"

    def __init__(self) -> None:
        self.outbox: list[tuple[str, list[bytes]]] = []

    def send(self, peer: str, frames: list) -> bool:
        self.outbox.append((peer, [bytes(f) for f in frames]))
        return True

    def deliver(self, sender: str, nodes: dict[str, Node]) -> list[protocol.Message]:
        out = []
        for peer, frames in self.outbox:
            out.append(protocol.decode(frames))
            nodes[peer]._handle(sender.encode(), frames, None)
        self.outbox.clear()
        return out


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
        node = Node(cfg, topology=topo, workload=w)
        node.transport = WireTransport()
        nodes[n] = node
    return nodes


def _handshake(nodes: dict[str, Node]) -> None:
    nodes["a"]._hello(nodes["a"].peers["b"])
    nodes["a"].transport.deliver("a", nodes)  # b answers
    nodes["b"].transport.deliver("b", nodes)


def test_nodes_starting_from_the_same_values_send_deltas_from_the_first_round(
    tmp_path: Path,
) -> None:
    nodes = _pair(tmp_path, same_start=True)
    _handshake(nodes)
    for n in nodes.values():
        n.shared[next(iter(n.shared))][:4] += 1.0  # some local progress
        n._send_round()
    for sender, node in nodes.items():
        sent = node.transport.deliver(sender, nodes)
        assert [m.type for m in sent] == [protocol.MsgType.DELTA]
    for me, other in (("a", "b"), ("b", "a")):
        for comp in nodes[me].shared:
            np.testing.assert_array_equal(
                nodes[other].peers[me].replicas[comp], nodes[me].out_replica[comp]
            )
            assert nodes[other].peers[me].versions[comp] == nodes[me].out_version[comp] == 1
    assert all(n.rejected == 0 for n in nodes.values())


def test_different_starting_values_are_sent_as_state(tmp_path: Path) -> None:
    nodes = _pair(tmp_path, same_start=False)
    _handshake(nodes)
    for n in nodes.values():
        n._send_round()
    for sender, node in nodes.items():
        sent = node.transport.deliver(sender, nodes)
        assert protocol.MsgType.STATE in [m.type for m in sent]
    for me, other in (("a", "b"), ("b", "a")):
        for comp in nodes[me].shared:
            np.testing.assert_array_equal(
                nodes[other].peers[me].replicas[comp], nodes[me].out_replica[comp]
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


def test_overlapped_mix_keeps_the_local_update_apart_for_privacy(tmp_path: Path) -> None:
    """With overlap the mix happens between training and sending; what the privacy mechanism
    sees as the local update (`x - before`) must not include the mix."""
    nodes = _pair(tmp_path, same_start=False, overlap=True)
    a = nodes["a"]
    assert a.lag == 1
    _handshake(nodes)
    for n in nodes.values():
        n._send_round()
        n.round += 1
    nodes["b"].transport.deliver("b", nodes)
    comp = next(iter(a.shared))
    before = {c: x.copy() for c, x in a.shared.items()}
    a.shared[comp][:3] += 0.5  # this round's training
    update = a.shared[comp] - before[comp]
    trained = a.shared[comp].copy()
    heard, _ = a._mix_overlapped(before)
    assert heard == ["b"]
    assert not np.allclose(a.shared[comp], trained)  # the mix moved x
    np.testing.assert_allclose(a.shared[comp] - before[comp], update, atol=1e-12)

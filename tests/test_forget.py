"""Erasure requests in the daemon, in one process: who may ask, the flood to every node, the
origin tags that a forwarder cannot forge, the exact mode's barrier, reports, bad messages."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from fakes import WAIT_S, FakeNetwork, node_config, run_nodes
from zmq.utils import z85

from m3tgossip import protocol
from m3tgossip.daemon.config import GossipConfig, NodeConfig
from m3tgossip.daemon.node import Node
from m3tgossip.errors import ProtocolError
from m3tgossip.net import generate_keys, load_keypair
from m3tgossip.protocol import erasure
from m3tgossip.topology import load_topology
from m3tgossip.workloads.consensus import ConsensusWorkload

MsgType = protocol.MsgType

SPEC = """name = "path3"
edges = [["n0", "n1"], ["n1", "n2"]]
[[nodes]]
id = "n0"
[[nodes]]
id = "n1"
[[nodes]]
id = "n2"
"""


class Forgetful(ConsensusWorkload):
    """The consensus workload with a `forget` that records its calls; n0 holds learners a, b."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.calls: list[tuple[str, list[str], str, bool]] = []

    def forget(self, target: str, ids: list[str], mode: str, own: bool) -> dict[str, Any]:
        if own and target == "learner" and not set(ids) <= {"a", "b"}:
            raise ValueError(f"no records of learner {ids} on this node")
        self.calls.append((target, list(ids), mode, own))
        return {"removed_records": len(ids) if own else 0}


class Wire:
    """A transport that keeps what is sent and what is replied, for delivery by the test."""

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


def federation(tmp_path: Path, insecure: bool = False) -> dict[str, Node]:
    raw = tmp_path / "spec.toml"
    raw.write_text(SPEC)
    topo = load_topology(raw)
    keys = {nid: generate_keys(tmp_path / "keys", nid).public for nid in topo.ids()}
    resolved = tmp_path / "resolved.toml"
    resolved.write_text(topo.with_keys(keys).to_toml())
    topo = load_topology(resolved)
    nodes = {}
    for nid in topo.ids():
        config = NodeConfig(
            id=nid,
            topology=str(resolved),
            state_dir=str(tmp_path / nid),
            rounds=4,
            fresh=True,
            key_dir="" if insecure else str(tmp_path / "keys"),
            insecure=insecure,
            gossip=GossipConfig(round_deadline_s=5.0, startup_grace_s=5.0),
        )
        work = Forgetful(topo, nid, seed=0, options={"size": 4})
        nodes[nid] = Node(config, topo, work, transport=Wire())  # type: ignore[arg-type]
    return nodes


def deliver(nodes: dict[str, Node], insecure: bool = False) -> list[tuple[str, str, str]]:
    """Deliver everything sent until nothing is left (bounded): (sender, receiver, type)."""
    seen = []
    for _ in range(50):
        batch = [(nid, n.link.transport.outbox) for nid, n in nodes.items()]
        pending = [(s, p, f) for s, box in batch for p, f in box]
        for _, box in batch:
            box.clear()
        if not pending:
            return seen
        for sender, peer, frames in pending:
            seen.append((sender, peer, protocol.decode(frames).type.value))
            nodes[peer].handlers.handle(sender.encode(), frames, None if insecure else sender)
    raise AssertionError("messages still flowing after 50 deliveries")


def ask(node: Node, body: dict[str, Any], user: str | None = "operator:ops") -> dict[str, Any]:
    msg = protocol.Message(MsgType.FORGET_REQUEST, "cli", protocol.new_session(), 1, 0, body)
    node.handlers.handle(b"\x00\x01cli", protocol.encode(msg), user)
    reply = node.link.transport.replies.pop()
    assert reply.type is MsgType.FORGET_REPLY
    return dict(reply.body)


def reports(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("erasure-*.json"))]


def forged(nodes: dict[str, Node], tmp_path: Path, signer: str, **body: Any) -> list[bytes]:
    """A `forget` that n1 sends, tagged with the key of `signer`."""
    base = {"request": "ab" * 16, "origin": "n0", "target": "learner", "ids": ["a"]}
    full = {**base, "mode": "approximate", **body}
    secret = load_keypair(tmp_path / "keys" / signer).secret
    publics = {n.id: n.public_key for n in nodes["n1"].topology.nodes if n.id != signer}
    full["tags"] = erasure.tags_for(secret, publics, full)
    return protocol.encode(nodes["n1"].link.message(MsgType.FORGET, full))


def test_x25519_matches_rfc7748_and_curve_keys() -> None:
    k = bytes.fromhex("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4")
    u = bytes.fromhex("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c")
    want = "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"
    assert erasure.x25519(k, u).hex() == want
    pa, sa = zmq.curve_keypair()
    pb, sb = zmq.curve_keypair()
    assert erasure.x25519(z85.decode(sa), (9).to_bytes(32, "little")) == z85.decode(pa)
    assert erasure.pair_key(sa.decode(), pb.decode()) == erasure.pair_key(sb.decode(), pa.decode())
    body = {"request": "0" * 32, "origin": "a", "target": "node", "ids": ["a"], "mode": "exact"}
    body["tags"] = erasure.tags_for(sa.decode(), {"b": pb.decode()}, body)
    assert erasure.verify_tag("b", sb.decode(), pa.decode(), body)
    assert not erasure.verify_tag("b", sb.decode(), pb.decode(), body)  # another origin
    assert not erasure.verify_tag("b", sb.decode(), pa.decode(), {**body, "mode": "approximate"})


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"mode": "fast"}, "forget body 'mode'"),
        ({"target": "course"}, "forget body 'target'"),
        ({"ids": []}, "forget body 'ids'"),
        ({"ids": ["a", "a"]}, "listed twice"),
        ({"tags": {"n1": "xyz"}}, "forget body 'tags' 'n1'"),
        ({"request": "R"}, "forget body 'request'"),
    ],
)
def test_malformed_forget_is_rejected_naming_the_field(change: dict, reason: str) -> None:
    body = {"request": "0" * 32, "origin": "n0", "target": "learner", "ids": ["a"]}
    body.update({"mode": "exact", "tags": {}})
    good = protocol.Message(MsgType.FORGET, "n0", "1" * 32, 3, 0, body)
    assert protocol.decode(protocol.encode(good)).body == body
    raw = msgpack.unpackb(bytes(protocol.encode(good)[0]), raw=False)
    raw["body"] = {**body, **change}
    with pytest.raises(ProtocolError, match=reason):
        protocol.decode([msgpack.packb(raw, use_bin_type=True)])


def test_a_learner_erasure_reaches_every_node_with_a_report(tmp_path: Path) -> None:
    nodes = federation(tmp_path)
    answer = ask(nodes["n0"], {"target": "learner", "ids": ["a"], "mode": "approximate"})
    assert answer["accepted"], answer
    flow = deliver(nodes)
    assert ("n1", "n2", "forget") in flow  # n2 is not n0's neighbour: n1 forwarded it
    for nid, own in (("n0", True), ("n1", False), ("n2", False)):
        assert nodes[nid].workload.calls == [("learner", ["a"], "approximate", own)]
        (report,) = reports(tmp_path / nid)
        assert report["request"] == answer["request"]
        assert report["origin"] == "n0" and report["ids"] == ["a"]
        assert report["approximate"] is True and report["time_s"] >= 0
    assert reports(tmp_path / "n0")[0]["removed_records"] == 1
    assert nodes["n2"].status()["erasures"]["accepted"] == [answer["request"]]


def test_requests_from_keys_that_may_not_ask_are_refused_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    nodes = federation(tmp_path)
    caplog.set_level(logging.WARNING)
    body = {"target": "learner", "ids": ["a"], "mode": "exact"}
    answer = ask(nodes["n0"], body, user="n1")  # a neighbour's key, not an operator's
    assert not answer["accepted"] and "operator key" in answer["reason"]
    answer = ask(nodes["n0"], {**body, "ids": ["zz"]})  # not a learner of this node
    assert not answer["accepted"] and "no records of learner" in answer["reason"]
    answer = ask(nodes["n1"], {"target": "node", "ids": ["n0"], "mode": "exact"})
    assert not answer["accepted"] and "erases only itself" in answer["reason"]
    assert not any(n.workload.calls for n in nodes.values())
    assert not deliver(nodes)
    assert sum("refused forget_request" in r.getMessage() for r in caplog.records) == 3

    # n1 forwards a forget it says comes from n0, but signs it with its own key
    rejected = nodes["n2"].link.rejected
    nodes["n2"].handlers.handle(b"n1", forged(nodes, tmp_path, "n1"), "n1")
    assert nodes["n2"].link.rejected == rejected + 1
    assert "not sent by the learner's node" in caplog.records[-1].getMessage()
    # n1 properly signs an erasure of n0 the node: only n0 may erase itself
    bad = forged(nodes, tmp_path, "n1", origin="n1", target="node", ids=["n0"])
    nodes["n2"].handlers.handle(b"n1", bad, "n1")
    assert "comes from the node itself" in caplog.records[-1].getMessage()
    # bytes that are no message at all: dropped, and the node goes on
    nodes["n2"].handlers.handle(b"n1", [b"\xc1garbage"], "n1")
    assert not any(n.workload.calls for n in nodes.values())
    assert not reports(tmp_path / "n2")
    # the genuine article, from n0's key, is accepted by the same node
    nodes["n2"].handlers.handle(b"n1", forged(nodes, tmp_path, "n0"), "n1")
    assert nodes["n2"].workload.calls == [("learner", ["a"], "approximate", False)]


def test_exact_mode_holds_neighbours_back_until_their_own_forget(tmp_path: Path) -> None:
    nodes = federation(tmp_path)
    answer = ask(nodes["n0"], {"target": "learner", "ids": ["a", "b"], "mode": "exact"})
    assert answer["accepted"]
    assert set(nodes["n0"].handlers.erasures.barrier) == {"n1"}
    exchange = nodes["n0"].exchange
    assert all((exchange.published[c] == x).all() for c, x in nodes["n0"].shared.items())
    assert nodes["n0"].peers["n1"].need_state == set(nodes["n0"].peers["n1"].components)
    # n1's values from before its own rollback are not mixed at n0
    stale = protocol.encode(nodes["n1"].link.message(MsgType.HEARTBEAT, {"round": 0}))
    nodes["n0"].handlers.handle(b"n1", stale, "n1")
    state = nodes["n1"].link.message(
        MsgType.STATE,
        {"reason": "replica reset"},
        tensors={"backbone": nodes["n1"].shared["backbone"]},
    )
    assert nodes["n0"].handlers.erasures.blocks(nodes["n0"].peers["n1"], state)
    deliver(nodes)
    assert all(not n.handlers.erasures.barrier for n in nodes.values())
    for nid in nodes:
        (report,) = reports(tmp_path / nid)
        assert report["mode"] == "exact" and report["rolled_back_to_round"] == 0


def test_a_node_that_leaves_is_never_mixed_again(tmp_path: Path) -> None:
    nodes = federation(tmp_path)
    answer = ask(nodes["n2"], {"target": "node", "ids": ["n2"], "mode": "approximate"})
    assert answer["accepted"]
    assert nodes["n2"].stop_reason == "erased from the federation"
    deliver(nodes)
    gone = nodes["n1"].peers["n2"]
    assert gone.left and not gone.components and not gone.live
    assert nodes["n0"].workload.calls == [("node", ["n2"], "approximate", False)]


def test_plaintext_federation_floods_without_tags(tmp_path: Path) -> None:
    nodes = federation(tmp_path, insecure=True)
    answer = ask(nodes["n0"], {"target": "learner", "ids": ["b"], "mode": "approximate"}, None)
    assert answer["accepted"]
    deliver(nodes, insecure=True)
    assert [len(reports(tmp_path / nid)) for nid in nodes] == [1, 1, 1]


def test_daemons_go_on_gossiping_through_an_exact_erasure(tmp_path: Path) -> None:
    """Three nodes in threads over the in-process network; an operator's exact erasure at n0
    in round 3: every node rolls back its links, clears its barriers and finishes its rounds,
    and the nodes still agree."""
    raw = tmp_path / "spec.toml"
    raw.write_text(SPEC)
    topo = load_topology(raw)
    net = FakeNetwork()
    nodes = {
        nid: Node(
            node_config(topo, nid, tmp_path, rounds=40, round_deadline_s=2.0),
            topology=topo,
            workload=Forgetful(topo, nid, seed=0, options={"size": 4}),
            transport=net.transport(nid),
        )
        for nid in topo.ids()
    }
    start = {nid: n.shared["backbone"].copy() for nid, n in nodes.items()}

    def inject() -> None:
        deadline = time.monotonic() + WAIT_S
        while nodes["n0"].round < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        body = {"target": "learner", "ids": ["a"], "mode": "exact"}
        msg = protocol.Message(MsgType.FORGET_REQUEST, "cli", protocol.new_session(), 1, 0, body)
        net.inboxes["n0"].put((b"\x00cli", protocol.encode(msg), "operator:ops"))

    helper = threading.Thread(target=inject, daemon=True)
    helper.start()
    run_nodes(nodes.values())
    helper.join(WAIT_S)
    assert all(n.round == 40 for n in nodes.values())
    assert all(n.workload.calls for n in nodes.values())
    assert all(not n.handlers.erasures.barrier for n in nodes.values())
    final = [n.shared["backbone"] for n in nodes.values()]
    spread = max(float(np.abs(x - final[0]).max()) for x in final)
    before = max(float(np.abs(x - start["n0"]).max()) for x in start.values())
    assert spread < 0.01 * before

"""Stragglers: the slowdown measurement aid, loose links (no waiting on a node declared slow,
the newest value mixed once, stale queued rounds skipped), sending in every k-th round, and the
release gate still in front of everything a straggler sends."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fakes import CapturingTransport, FakeNetwork, PrivateVectors, node_config, run_nodes

from m3tgossip import protocol
from m3tgossip.daemon import engine
from m3tgossip.daemon.config import GossipConfig
from m3tgossip.daemon.metrics import read_metrics
from m3tgossip.daemon.node import Node
from m3tgossip.harness import testbed
from m3tgossip.net import FaultConfig
from m3tgossip.topology import Topology, load_topology
from m3tgossip.workloads.consensus import ConsensusWorkload

# --------------------------------------------------------------------------- slowdown


@pytest.mark.parametrize(
    ("faults", "step_s", "pause_s"),
    [({}, 0.5, 0.0), ({"slowdown": 10}, 0.5, 4.5), ({"slowdown_s": 0.25}, 0.5, 0.25)],
)
def test_slowdown_pauses_after_each_step(faults: dict, step_s: float, pause_s: float) -> None:
    config = FaultConfig(**faults)
    assert config.slowed == bool(faults) and not config.active
    assert config.pause_after(step_s) == pytest.approx(pause_s)


BAD_SLOWDOWNS = [
    {"slowdown": 0.5},
    {"slowdown": True},
    {"slowdown": float("inf")},
    {"slowdown_s": -1},
]


@pytest.mark.parametrize("faults", BAD_SLOWDOWNS)
def test_a_bad_slowdown_is_refused(faults: dict) -> None:
    with pytest.raises(ValueError, match="slowdown"):
        FaultConfig(**faults)


class Clock:
    """A virtual clock for `engine.time`: sleeping moves it on, nothing waits."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_the_engine_sleeps_the_slowdown_after_the_local_step(monkeypatch) -> None:
    clock = Clock()
    monkeypatch.setattr(engine, "time", clock)

    class Workload:
        def local_step(self, round_: int) -> dict[str, Any]:
            clock.now += 0.3  # the step itself
            return {"steps": 1}

    class State:
        config = type("C", (), {"faults": FaultConfig(slowdown=10, slowdown_s=0.1)})()
        workload = Workload()
        round = 0
        stop_reason = None

    parts: Any = type("P", (), {"state": State()})()
    beats: list[int] = []
    eng = engine.RoundEngine.__new__(engine.RoundEngine)
    eng.parts, eng.beat = parts, lambda: beats.append(1)
    assert eng.local_step() == {"steps": 1}
    assert sum(clock.slept) == pytest.approx(9 * 0.3 + 0.1)
    assert max(clock.slept) <= engine.SLOWDOWN_SLICE_S + 1e-12
    assert len(beats) == len(clock.slept)  # the watchdog hears from a slowed loop


@pytest.mark.parametrize("value", [-1, 1.5, True, "2"])
def test_a_bad_straggler_after_is_refused(value: Any) -> None:
    with pytest.raises(ValueError, match="straggler_after"):
        GossipConfig(straggler_after=value)


# --------------------------------------------------------------------------- loose links


#: what a node of the default attributes shares
COMPONENTS = (
    "backbone",
    "encoder.clickstream",
    "encoder.tabular",
    "fusion",
    "head.at_risk",
    "prompt.at_risk",
)


def pair(tmp_path: Path, slow: str = "a", extra: str = "speed = 0.5") -> Topology:
    """Two nodes, `a` and `b`, one link; `slow` declares `extra`."""
    nodes = "".join(f'[[nodes]]\nid = "{n}"\n' + (f"{extra}\n" if n == slow else "") for n in "ab")
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "pair.toml"
    path.write_text(f'name = "pair"\nedges = [["a", "b"]]\n{nodes}')
    return load_topology(path)


def consensus_node(topo: Topology, nid: str, tmp_path: Path, **gossip: Any) -> Node:
    return Node(
        node_config(topo, nid, tmp_path, **gossip),
        topology=topo,
        workload=ConsensusWorkload(topo, nid, seed=3, options={"size": 8}),
        transport=CapturingTransport(),
    )


def message(
    sender: str, kind: protocol.MsgType, values: np.ndarray, base: int, seq: int, round_: int
) -> protocol.Message:
    """A `state` or `delta` of every shared component (of the default node attributes) from
    `sender`, all with `values`, as a receiver decodes it."""
    meta = {c: protocol.TensorMeta(c, "float64", values.shape, base=base) for c in COMPONENTS}
    msg = protocol.Message(
        type=kind,
        sender=sender,
        session="b" * 32,
        seq=seq,
        round=round_,
        body={"reason": "replica reset"} if kind is protocol.MsgType.STATE else {},
        tensors=dict.fromkeys(COMPONENTS, values),
        meta=meta,
    )
    return protocol.decode([bytes(f) for f in protocol.encode(msg)])


def rounds_of(sender: str, start: np.ndarray, rounds: int) -> list[protocol.Message]:
    """A neighbour's messages of rounds 0 .. rounds-1: its state, then a delta of ones each."""
    msgs = [message(sender, protocol.MsgType.STATE, start, base=-1, seq=1, round_=0)]
    for r in range(1, rounds):
        ones = np.ones_like(start)
        msgs.append(message(sender, protocol.MsgType.DELTA, ones, base=r - 1, seq=r + 1, round_=r))
    return msgs


def test_links_to_a_declared_straggler_are_loose_at_both_ends(tmp_path: Path) -> None:
    topo = pair(tmp_path)
    a, b = (consensus_node(topo, n, tmp_path) for n in "ab")
    assert a.peers["b"].loose and b.peers["a"].loose
    assert a.rounds.loose(a.peers["b"]) and b.rounds.loose(b.peers["a"])
    # nobody waits for the straggler; it waits for a new value of each neighbour (there
    # already when they are faster)
    assert a.rounds.expected() == [a.peers["b"]] and b.rounds.expected() == []
    # two stragglers side by side wait for neither
    both = pair(tmp_path / "both", slow="")
    both = dataclasses.replace(
        both, nodes=tuple(dataclasses.replace(n, speed=0.5) for n in both.nodes)
    )
    c = consensus_node(both, "a", tmp_path / "both")
    assert c.rounds.loose(c.peers["b"]) and c.rounds.expected() == []
    plain = consensus_node(pair(tmp_path / "p", slow=""), "a", tmp_path / "p")
    assert not plain.rounds.loose(plain.peers["b"])
    assert plain.rounds.expected() == [plain.peers["b"]]


def test_a_straggler_mixes_the_newest_of_its_queued_rounds_once(tmp_path: Path) -> None:
    """Six rounds of a neighbour came while the straggler trained: its replica takes them all,
    in order, and the mix takes the newest value once, not one round after another."""
    topo = pair(tmp_path)
    a = consensus_node(topo, "a", tmp_path, round_deadline_s=0.05)
    peer, x = a.peers["b"], a.shared["backbone"]
    start = np.arange(8, dtype=np.float64)
    msgs = rounds_of("b", start, 6)
    peer.session, peer.round = "b" * 32, 5
    for msg in msgs[:4]:  # these came while a trained ...
        a.rounds.receive(peer, msg)
    peer.pending = msgs[4:]  # ... and these (as a queue of an observed straggler would hold)
    newest = start + 5
    mine = x.copy()
    assert a.rounds.collect()
    assert peer.pending == []
    np.testing.assert_array_equal(peer.replicas["backbone"], newest)
    heard, _ = a.mixstep.mix()
    assert heard == ["b"] and a.mixstep.loose == {"b": 5}
    # Metropolis-Hastings on one link: weight 1/2 to the neighbour's newest value
    np.testing.assert_allclose(x, mine + 0.5 * (newest - a.exchange.published["backbone"]))
    # nothing new came (the straggler waited its deadline for it): nothing is mixed again
    after = x.copy()
    assert a.rounds.collect()
    heard, _ = a.mixstep.mix()
    assert heard == [] and a.mixstep.loose == {"b": None}
    np.testing.assert_array_equal(x, after)
    assert peer.missed == 1


class TrickleTransport(CapturingTransport):
    """Delivers what is in its inbox one message per poll (a busy socket gives a poll a few)."""

    def __init__(self) -> None:
        super().__init__()
        self.inbox: list[tuple[bytes, list[bytes], str | None]] = []

    def poll(self, timeout_ms: int) -> list:
        return [self.inbox.pop(0)] if self.inbox else []


def test_a_straggler_handles_everything_queued_before_it_mixes(tmp_path: Path) -> None:
    topo = pair(tmp_path)
    transport = TrickleTransport()
    a = Node(
        node_config(topo, "a", tmp_path),
        topology=topo,
        workload=ConsensusWorkload(topo, "a", seed=3, options={"size": 8}),
        transport=transport,
    )
    start = np.zeros(8)
    for msg in rounds_of("b", start, 12):
        transport.inbox.append((b"b", [bytes(f) for f in protocol.encode(msg)], None))
    assert a.rounds.collect()
    assert transport.inbox == []
    np.testing.assert_array_equal(a.peers["b"].replicas["backbone"], start + 11)
    assert a.mixstep.mix()[0] == ["b"] and a.mixstep.loose == {"b": 11}


def test_a_late_value_of_a_declared_straggler_is_mixed_when_it_comes(tmp_path: Path) -> None:
    """A neighbour far behind: not waited for, and its value, of a round long past here, is
    mixed in the first mix after it arrived (lockstep would keep it and never mix it)."""
    topo = pair(tmp_path)
    b = consensus_node(topo, "b", tmp_path)
    peer, x = b.peers["a"], b.shared["backbone"]
    b.round = 7
    assert b.rounds.collect()  # no wait: nobody to wait for
    assert b.mixstep.mix()[0] == [] and b.mixstep.loose == {"a": None}
    peer.session = "b" * 32
    b.rounds.receive(peer, message("a", protocol.MsgType.STATE, np.full(8, 2.0), -1, 1, 0))
    mine = x.copy()
    assert b.rounds.collect()
    assert b.mixstep.mix()[0] == ["a"] and b.mixstep.loose == {"a": 0}
    np.testing.assert_allclose(x, mine + 0.5 * (2.0 - b.exchange.published["backbone"]))
    assert b.peers["a"].missed == 0  # not waited for: nothing missed


def test_an_observed_straggler_is_not_waited_for_after_it_missed_deadlines(
    tmp_path: Path,
) -> None:
    topo = pair(tmp_path, slow="")
    b = consensus_node(topo, "b", tmp_path, straggler_after=2, round_deadline_s=0.05)
    peer = b.peers["a"]
    for r in range(2):
        assert b.rounds.expected() == [peer]
        b.round = r
        assert b.rounds.collect()  # waits the deadline: a is silent
    assert peer.straggler and peer.session_misses == 2 and b.rounds.expected() == []
    peer.reset("c" * 32)  # a new session of it is waited for again
    assert not peer.straggler and b.rounds.expected() == [peer]


def test_a_neighbour_far_ahead_is_loose_and_its_queue_skipped(tmp_path: Path) -> None:
    """`gossip.straggler_after`: more than that many rounds apart, this node is the straggler
    of a full-speed neighbour and mixes its newest value instead of its queued rounds."""
    topo = pair(tmp_path, slow="")
    a = consensus_node(topo, "a", tmp_path, straggler_after=2, round_deadline_s=0.05)
    peer = a.peers["b"]
    peer.session = "b" * 32
    start = np.zeros(8)
    msgs = rounds_of("b", start, 4)
    for msg in msgs[:2]:  # b in round 1: in step, its round-1 delta waits for a's round 1
        a.handlers.on_update(peer, msg)
    assert not a.rounds.loose(peer) and len(peer.pending) == 1
    for msg in msgs[2:]:  # b in round 3: more than two rounds ahead
        a.handlers.on_update(peer, msg)
    assert a.rounds.loose(peer) and peer.pending == []
    np.testing.assert_array_equal(peer.replicas["backbone"], start + 3)
    assert a.rounds.collect() and a.mixstep.mix()[0] == ["b"] and a.mixstep.loose == {"b": 3}


@pytest.mark.parametrize(
    "gossip",
    [{}, {"overlap": True}, {"mode": "push-sum", "push_interval_s": 0.01}],
    ids=["lockstep", "overlapped", "push-sum"],
)
def test_a_node_of_low_bandwidth_sends_in_every_kth_round(tmp_path: Path, gossip: dict) -> None:
    topo = pair(tmp_path, extra="bandwidth = 0.34")
    assert topo.node("a").send_every == 3
    net = FakeNetwork()
    nodes = [
        Node(
            node_config(topo, nid, tmp_path, rounds=7, **gossip),
            topology=topo,
            workload=ConsensusWorkload(topo, nid, seed=3, options={"size": 8}),
            transport=net.transport(nid),
        )
        for nid in topo.ids()
    ]
    run_nodes(nodes)
    assert [n.round for n in nodes] == [7, 7]
    sent = {nid: sorted(m.round for m in net.sent_by(nid) if m.tensors) for nid in "ab"}
    assert sent["a"] == [0, 3, 6] and sent["b"] == list(range(7))


@pytest.mark.parametrize("gossip", [{}, {"overlap": True}], ids=["lockstep", "overlapped"])
def test_what_a_private_straggler_sends_passed_its_gate(tmp_path: Path, gossip: dict) -> None:
    """A straggler of low bandwidth under gdpr: every round is charged at its gate, and what
    it sends (every second round) is released values only."""
    secret, rounds = 1e6, 6
    spec = tmp_path / "ring4.toml"
    spec.write_text(
        'name = "ring4"\n[generator]\nkind = "cycle"\nn = 4\n'
        '[defaults]\nprivacy = "gdpr"\nmodalities = ["tabular"]\ntasks = ["at_risk"]\n'
        '[[nodes]]\nid = "n0"\nspeed = 0.5\nbandwidth = 0.5\n'
    )
    topo = load_topology(spec)
    net = FakeNetwork()
    nodes = [
        Node(
            node_config(topo, nid, tmp_path, rounds=rounds, **gossip),
            topology=topo,
            workload=PrivateVectors({c: 6 for c in topo.node(nid).shared_components}, secret),
            transport=net.transport(nid),
        )
        for nid in topo.ids()
    ]
    run_nodes(nodes)
    for node in nodes:
        assert node.round == rounds and node.gate is not None
        assert all(node.gate.charged(c) == rounds for c in node.shared)
        updates = [m for m in net.sent_by(node.id) if m.tensors]
        assert updates
        for msg in updates:
            for tensor in msg.tensors.values():
                assert np.abs(tensor).max() < secret / 100, (node.id, msg.round)
    sent = sorted({m.round for m in net.sent_by("n0") if m.tensors})
    assert sent == [0, 2, 4]


# --------------------------------------------------------------------------- daemons


@pytest.mark.multiprocess
def test_daemons_do_not_wait_for_a_slowed_straggler_and_it_mixes_their_newest(
    tmp_path: Path,
) -> None:
    """A ring of four daemons, each local step slowed to 0.05 s; n0 is declared slow and made
    ten times slower. Its neighbours run their rounds in step with n2 alone and mix n0's
    values as they come; n0 mixes their newest values."""
    rounds = 20
    spec = tmp_path / "ring.toml"
    spec.write_text(
        'name = "r4"\n[generator]\nkind = "cycle"\nn = 4\n[[nodes]]\nid = "n0"\nspeed = 0.1\n'
    )
    out = tmp_path / "bed"
    code = testbed.main(
        [
            *("--topology", str(spec), "--rounds", str(rounds), "-o", "size=64"),
            *("--set", "faults.slowdown_s=0.05", "--node-set", "n0:faults.slowdown_s=0.5"),
            *("--out", str(out), "--quiet", "--deadline", "2", "--timeout", "120"),
        ]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert code == 0 and not summary["crashed"] and not summary["hung"]
    done = summary["rounds_done"]
    assert {done[n] for n in ("n1", "n2", "n3")} == {rounds}
    # the straggler finishes when both its neighbours have: it would train alone after that
    assert done["n0"] < rounds
    assert (
        "every neighbour finished its rounds" in (out / "nodes" / "n0" / "stderr.log").read_text()
    )
    recs = {n: read_metrics(out / "nodes" / n / "metrics.jsonl") for n in ("n0", "n1", "n2", "n3")}
    # the straggler's neighbours never wait for it: it is on a loose link in every round
    for n in ("n1", "n3"):
        assert all(set(r["loose"]) == {"n0"} for r in recs[n]), n
    assert all("loose" not in r for r in recs["n2"])
    # ... so they finish their rounds long before it does (counted in rounds, not seconds)
    fast_done = max(recs[n][-1]["time"] for n in ("n1", "n2", "n3"))
    slow_by_then = sum(r["time"] <= fast_done for r in recs["n0"])
    assert slow_by_then <= rounds // 2, slow_by_then
    # ... and mix each of its values once, when it comes (from a round not after theirs)
    for n in ("n1", "n3"):
        mixed = [(r["round"], r["loose"]["n0"]) for r in recs[n] if r["loose"]["n0"] is not None]
        assert mixed, n
        assert all(theirs <= mine for mine, theirs in mixed), mixed
        assert len(mixed) == len({theirs for _, theirs in mixed}) <= slow_by_then
    # the straggler mixes its neighbours' newest values: rounds ahead of its own, the last one
    for n in ("n1", "n3"):
        mixed = [(r["round"], r["loose"][n]) for r in recs["n0"] if r["loose"][n] is not None]
        assert any(theirs > mine + 1 for mine, theirs in mixed), mixed
        assert max(theirs for _, theirs in mixed) == rounds - 1

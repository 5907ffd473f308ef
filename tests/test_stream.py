"""The streaming mix: full states summed as they arrive give the mix of the buffered replicas
(up to float rounding), with no neighbour's replica held at the mix, for every schedule that
mixes, with a neighbour missing from a round, one arriving late and one already in the next
round; the mixers that need every replica at once keep the buffered path."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import pytest
from fakes import FakeNetwork, QuietTransport, node_config, run_nodes

from m3tgossip.consensus import choco_mix_into, choco_sum_into, renormalise
from m3tgossip.daemon.node import Node
from m3tgossip.topology import Topology, load_topology
from m3tgossip.workloads.consensus import ConsensusWorkload

#: bound on the difference float rounding makes between summing in arrival order and in order
#: of neighbour id (values of order 1, float64)
ATOL = 1e-12


def complete(tmp_path: Path, n: int = 4, dynamics: bool = False) -> Topology:
    spec = tmp_path / f"complete{n}.toml"
    text = f'name = "complete{n}"\n[generator]\nkind = "complete"\nn = {n}\n'
    if dynamics:
        text += '[dynamics]\nkind = "one-peer-exponential"\n'
    spec.write_text(text)
    return load_topology(spec)


def held_at_mix(node: Node) -> list[int]:
    """Record, at every mix of `node`, how many neighbour replicas it holds."""
    counts: list[int] = []
    mix = node.mixstep.mix

    def counting() -> tuple[list[str], float]:
        counts.append(sum(len(p.replicas) for p in node.peers.values()))
        return mix()

    node.mixstep.mix = counting  # type: ignore[method-assign]
    return counts


# --------------------------------------------------------------------------- the kernel


@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_the_choco_step_from_a_sum_is_the_step_over_the_replicas(gamma: float) -> None:
    rng = np.random.default_rng(3)
    own = rng.standard_normal(1000)
    published = own + 0.1 * rng.standard_normal(1000)
    replicas = {j: rng.standard_normal(1000) for j in ("b", "c", "d")}
    weights = renormalise({"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25}, "a", ["b", "d"])
    heard = {j: replicas[j] for j in ("b", "d")}
    expected = own.copy()
    choco_mix_into(expected, published, heard, weights, gamma=gamma)
    total = np.zeros_like(own)
    for j in ("d", "b"):  # another order than the kernel's
        total += gamma * weights[j] * heard[j]
    got = own.copy()
    choco_sum_into(got, published, total, weights["b"] + weights["d"], gamma=gamma)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="total"):
        choco_sum_into(got, published, total[:-1], 0.5)


# --------------------------------------------------------------------------- whole runs


SCHEDULES = {
    "lockstep": ({}, False),
    "overlapped": ({"overlap": True}, False),
    "time-varying": ({}, True),
    "lockstep-gamma": ({"gamma": 0.5}, False),
}


def run(tmp_path: Path, schedule: str, streaming: bool) -> tuple[list[Node], list[list[int]]]:
    gossip, dynamics = SCHEDULES[schedule]
    topo = complete(tmp_path, dynamics=dynamics)
    net = FakeNetwork()
    nodes = [
        Node(
            node_config(topo, nid, tmp_path / str(streaming), rounds=5, **gossip),
            topology=topo,
            workload=ConsensusWorkload(topo, nid, seed=1, options={"size": 64}),
            transport=net.transport(nid),
        )
        for nid in topo.ids()
    ]
    for node in nodes:
        assert node.rounds.sums.enabled  # the default mixer streams
        node.rounds.sums.enabled = streaming
    counts = [held_at_mix(n) for n in nodes]
    run_nodes(nodes)
    return nodes, counts


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_summing_states_as_they_arrive_mixes_what_the_buffered_replicas_mix(
    tmp_path: Path, schedule: str
) -> None:
    streamed, held_streaming = run(tmp_path, schedule, streaming=True)
    buffered, held_buffered = run(tmp_path, schedule, streaming=False)
    for s, b in zip(streamed, buffered, strict=True):
        assert s.round == b.round == 5
        for comp, x in s.shared.items():
            np.testing.assert_allclose(x, b.shared[comp], rtol=0, atol=ATOL)
            if schedule == "time-varying":  # one state a round, mixed as before: bit for bit
                np.testing.assert_array_equal(x, b.shared[comp])
    # every neighbour was heard in every round, and none of their replicas was held for it
    neighbours = len(streamed[0].peers) * len(streamed[0].shared)
    assert all(c == 0 for counts in held_streaming for c in counts)
    if schedule != "time-varying":  # one in-peer per round there
        assert any(c == neighbours for counts in held_buffered for c in counts)
    assert all(not n.rounds.sums.terms for n in streamed)  # closed after the last mix
    # one in-peer per time-varying round: its state is mixed as it arrived, no sum is made
    made = {bool(n.rounds.sums.totals) for n in streamed}
    assert made == {schedule != "time-varying"}


@pytest.mark.parametrize(
    "gossip",
    [{"aggregator": "trimmed"}, {"aggregator": "clip"}, {"noise_strength": 1.0}],
)
def test_mixers_that_need_every_replica_keep_the_buffered_path(tmp_path: Path, gossip) -> None:
    topo = complete(tmp_path)
    net = FakeNetwork()
    nodes = [
        Node(
            node_config(topo, nid, tmp_path, rounds=3, **gossip),
            topology=topo,
            workload=ConsensusWorkload(topo, nid, seed=1, options={"size": 16}),
            transport=net.transport(nid),
        )
        for nid in topo.ids()
    ]
    assert not any(n.rounds.sums.enabled for n in nodes)
    counts = [held_at_mix(n) for n in nodes]
    run_nodes(nodes)
    assert all(n.round == 3 for n in nodes)
    assert all(not n.rounds.sums.totals for n in nodes)  # nothing was ever summed
    assert any(c > 0 for cs in counts for c in cs)


# --------------------------------------------------------------------------- one message at a time


class Outbox(QuietTransport):
    """Keeps what a node sends, per receiver, until the test delivers it."""

    endpoint = "tcp://127.0.0.1:1"

    def __init__(self) -> None:
        self.queues: dict[str, deque[list[bytes]]] = {}

    def send(self, peer: str, frames: list) -> bool:
        self.queues.setdefault(peer, deque()).append([bytes(f) for f in frames])
        return True


class Scripted:
    """Nodes of a complete graph stepped by hand: the test says which message arrives when.
    A round waits at most DEADLINE_S for a neighbour not heard."""

    DEADLINE_S = 0.05

    def __init__(self, tmp_path: Path, streaming: bool, **gossip: object) -> None:
        topo = complete(tmp_path)
        settings = {
            "round_deadline_s": self.DEADLINE_S,
            "deadline_min_s": self.DEADLINE_S,
            "max_wait_factor": 1.0,
            **gossip,
        }
        self.nodes: dict[str, Node] = {}
        self.outboxes: dict[str, Outbox] = {}
        for nid in topo.ids():
            self.outboxes[nid] = Outbox()
            node = Node(
                node_config(topo, nid, tmp_path / str(streaming), **settings),
                topology=topo,
                workload=ConsensusWorkload(topo, nid, seed=2, options={"size": 32}),
                transport=self.outboxes[nid],
            )
            node.rounds.sums.enabled = streaming
            self.nodes[nid] = node
        self.streaming = streaming
        #: (node, round) -> neighbour replicas it held at the mix, and the neighbours it heard
        self.held: dict[tuple[str, int], int] = {}
        self.heard: dict[tuple[str, int], list[str]] = {}
        for node in self.nodes.values():
            for peer in node.peers.values():
                node.exchange.hello(peer)
        self.deliver_all()  # hellos, then their answers
        self.deliver_all()

    def deliver(self, sender: str, receiver: str, count: int | None = None) -> None:
        """The first `count` messages queued from `sender` to `receiver` (None: all)."""
        queue = self.outboxes[sender].queues.get(receiver, deque())
        for _ in range(len(queue) if count is None else count):
            self.nodes[receiver].handlers.handle(sender.encode(), queue.popleft(), None)

    def deliver_all(self) -> None:
        for sender in self.nodes:
            for receiver in self.nodes:
                self.deliver(sender, receiver)

    def send(self, nid: str) -> None:
        self.nodes[nid].exchange.send()

    def mix(self, nid: str) -> None:
        """Collect, mix and end the round as `Lockstep` does."""
        node = self.nodes[nid]
        assert node.rounds.collect()
        self.held[nid, node.round] = sum(len(p.replicas) for p in node.peers.values())
        heard, _ = node.mixstep.mix()
        self.heard[nid, node.round] = heard
        node.exchange.drop_replicas()
        node.round += 1


def script(s: Scripted) -> None:
    """Round 0: n0 hears n1 and n2 in time; n1's round-1 state arrives before n0 mixed round
    0 (early); n3's round-0 state only after n0 gave up waiting and mixed (late). Round 1: n2's
    state reaches n0 before n0 sent its own (it waits like an early one), n3's after. Round 2:
    everyone hears everyone."""
    ids = list(s.nodes)
    others = ids[1:]
    for nid in ids:
        s.send(nid)
    for receiver in others:
        for sender in ids:
            s.deliver(sender, receiver)
    for nid in others:
        s.mix(nid)
    s.deliver("n1", "n0")
    s.deliver("n2", "n0")
    for nid in others:
        s.send(nid)  # round 1
    for receiver in others:
        for sender in others:
            s.deliver(sender, receiver)
    n0 = s.nodes["n0"]
    s.deliver("n1", "n0")  # round 1: early for n0
    assert [m.round for m in n0.peers["n1"].pending] == [1]
    s.mix("n0")  # round 0 without n3
    s.deliver("n3", "n0", 1)  # round 0: late
    assert bool(n0.peers["n3"].replicas) != s.streaming  # streamed: dropped at once
    s.deliver("n2", "n0")  # round 1, before n0 sent it
    assert len(n0.peers["n2"].pending) == s.streaming
    s.send("n0")
    s.deliver("n3", "n0")
    for receiver in others:
        s.deliver("n0", receiver)
    for nid in ids:
        s.mix(nid)  # round 1
    for nid in ids:
        s.send(nid)
    s.deliver_all()
    for nid in ids:
        s.mix(nid)  # round 2


@pytest.mark.parametrize("gossip", [{}, {"gamma": 0.5}])
def test_a_missing_a_late_and_an_early_state_mix_as_the_buffered_ones(
    tmp_path: Path, gossip: dict
) -> None:
    streamed = Scripted(tmp_path, streaming=True, **gossip)
    buffered = Scripted(tmp_path, streaming=False, **gossip)
    script(streamed)
    script(buffered)
    assert streamed.heard == buffered.heard
    assert streamed.heard["n0", 0] == ["n1", "n2"]
    assert all(
        streamed.heard[n, r] == [p for p in streamed.nodes if p != n]
        for n, r in streamed.heard
        if (n, r) != ("n0", 0)
    )
    for nid, node in streamed.nodes.items():
        assert node.round == 3
        other = buffered.nodes[nid]
        assert node.mixstep.distances.keys() == other.mixstep.distances.keys()
        for comp, d in node.mixstep.distances.items():
            assert d == pytest.approx(other.mixstep.distances[comp], rel=1e-9)
        for comp, x in node.shared.items():
            np.testing.assert_allclose(x, other.shared[comp], rtol=0, atol=ATOL)
    comps = len(streamed.nodes["n0"].shared)
    # buffered, every neighbour heard is held as a replica until the mix (n0 also holds n3's
    # late round-0 state at its round-1 mix, until n3's round-1 state replaces it); streamed,
    # none is
    assert buffered.held == {key: len(heard) * comps for key, heard in buffered.heard.items()}
    assert streamed.held == {key: 0 for key in streamed.heard}
    # what came late was dropped, not kept as a replica: every replica is gone after the mix
    assert all(not p.replicas for n in streamed.nodes.values() for p in n.peers.values())

"""What a round and a start-up cost: evaluation and checkpoint cadence, the consensus digest and
its memory, replicas that are the received values, hellos retried at once when refused, a
neighbour dialled again when heard, and a daemon path without torch or networkx."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from fakes import WAIT_S, FakeNetwork, FakeTransport, node_config, run_nodes

from m3tgossip import protocol
from m3tgossip.consensus import NUMPY_BLOCK, metropolis_hastings, squared_distance
from m3tgossip.daemon import checkpoint
from m3tgossip.daemon.metrics import read_metrics
from m3tgossip.daemon.node import Node
from m3tgossip.net import Transport
from m3tgossip.topology import Topology, load_topology, node_weights
from m3tgossip.workloads.consensus import DIGEST_BLOCK, DIGEST_DIMS, ConsensusWorkload

ROOT = Path(__file__).resolve().parent.parent


def ring(tmp_path: Path, n: int = 4, dynamics: bool = False) -> Topology:
    spec = tmp_path / f"ring{n}.toml"
    text = (
        f'name = "ring{n}"\n[generator]\nkind = "cycle"\nn = {n}\n'
        '[defaults]\nmodalities = ["tabular"]\ntasks = ["at_risk"]\n'
    )
    if dynamics:
        text += '[dynamics]\nkind = "one-peer-exponential"\n'
    spec.write_text(text)
    return load_topology(spec)


def consensus_nodes(
    topo: Topology, tmp_path: Path, rounds: int, size: int = 16, **gossip: object
) -> list[Node]:
    net = FakeNetwork()
    return [
        Node(
            node_config(topo, nid, tmp_path, rounds=rounds, **gossip),
            topology=topo,
            workload=ConsensusWorkload(topo, nid, seed=0, options={"size": size}),
            transport=net.transport(nid),
        )
        for nid in topo.ids()
    ]


# --------------------------------------------------------------------------- the digest


def test_the_digest_is_linear_the_same_on_every_node_and_keeps_norms() -> None:
    topo = load_topology(ROOT / "topology/ring-8.toml")
    size = 3 * DIGEST_BLOCK + 123  # a partial last block
    a = ConsensusWorkload(topo, "n0", seed=5, options={"size": size})
    b = ConsensusWorkload(topo, "n3", seed=5, options={"size": size})
    comp = next(iter(a.shared()))
    rng = np.random.default_rng(1)
    u, v = rng.standard_normal(size), rng.standard_normal(size)
    assert a.project(comp, u) == b.project(comp, u)
    assert len(a.project(comp, u)) == DIGEST_DIMS
    np.testing.assert_allclose(
        a.project(comp, 2.0 * u - 3.0 * v),
        2.0 * np.array(a.project(comp, u)) - 3.0 * np.array(a.project(comp, v)),
        rtol=1e-10,
        atol=1e-9,
    )
    # a random projection: the digest's norm is the vector's, up to a modest factor
    ratios = [
        np.linalg.norm(a.project(comp, rng.standard_normal(size))) / np.sqrt(size)
        for _ in range(20)
    ]
    assert 0.4 < min(ratios) and max(ratios) < 1.6, ratios
    # float32 values give the digest of the same values in float64
    x32 = rng.standard_normal(size).astype(np.float32)
    np.testing.assert_allclose(
        a.project(comp, x32), a.project(comp, x32.astype(np.float64)), rtol=1e-12, atol=1e-9
    )


def test_the_consensus_workload_holds_its_vectors_one_mean_and_a_fixed_digest_matrix() -> None:
    topo = load_topology(ROOT / "topology/ring-8.toml")
    size = 200_000
    w = ConsensusWorkload(topo, "n0", seed=0, options={"size": size, "dtype": "float32"})
    w.evaluate(0)  # waits for the exact mean
    state = sum(x.nbytes for x in w.shared().values())
    held = 0
    for value in vars(w).values():
        arrays = value.values() if isinstance(value, dict) else [value]
        held += sum(a.nbytes for a in arrays if isinstance(a, np.ndarray))
    signs = sum(s.nbytes for s in w._signs.values())
    assert held == 2 * state + DIGEST_DIMS * DIGEST_BLOCK * 8 + signs
    assert signs < state / 100


def test_the_error_to_the_mean_is_measured_against_every_holders_start() -> None:
    topo = load_topology(ROOT / "topology/ring-8.toml")
    loads = [ConsensusWorkload(topo, n, seed=2, options={"size": 300}) for n in topo.ids()]
    comp = next(iter(loads[0].shared()))
    start = {w.node_id: w.shared()[comp].copy() for w in loads}
    mean = np.mean(list(start.values()), axis=0)
    np.testing.assert_allclose(loads[0].exact_mean()[comp], mean, rtol=1e-12)
    before = loads[0].error_to_mean()
    assert loads[0].initial_error == pytest.approx(before, rel=1e-12)
    for x in loads[0].shared().values():
        x[...] = loads[0].exact_mean()[comp] if x.size == mean.size else x
    assert loads[0].error_to_mean() < before
    assert loads[0].initial_error == pytest.approx(before, rel=1e-12)  # fixed at the start


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [1, 1000, NUMPY_BLOCK, 2 * NUMPY_BLOCK + 7])
def test_squared_distance_matches_numpy(size: int, dtype: type) -> None:
    rng = np.random.default_rng(size)
    a, b = rng.standard_normal(size).astype(dtype), rng.standard_normal(size).astype(dtype)
    d = a.astype(np.float64) - b
    assert squared_distance(a, b) == pytest.approx(float(d @ d), rel=1e-5)
    with pytest.raises(ValueError, match="shapes"):
        squared_distance(a, b[:-1] if size > 1 else np.zeros(2))


# --------------------------------------------------------------------------- cadence


def test_evaluation_and_checkpoints_follow_their_cadence(tmp_path: Path) -> None:
    topo = ring(tmp_path)
    nodes = consensus_nodes(
        topo,
        tmp_path,
        rounds=7,
        eval_every=3,
        checkpoint_every=2,
        checkpoint_interval_s=0.0,
    )
    written: dict[str, list[int]] = {n.id: [] for n in nodes}
    for node in nodes:
        inner = node.engine.checkpoint

        def counting(node: Node = node, inner=inner) -> None:
            written[node.id].append(node.round)
            inner()

        node.engine.checkpoint = counting
    run_nodes(nodes)
    for node in nodes:
        recs = read_metrics(node.config.metrics_path)
        evaluated = [r["round"] for r in recs if "error_to_mean" in r]
        assert evaluated == [2, 5, 6]  # every third round, and the last
        assert written[node.id] == [2, 4, 6]  # the last round is the shutdown's
        _, meta = checkpoint.load(node.config.state_path)
        assert meta["round"] == 7


def test_a_checkpoint_interval_leaves_the_last_round_to_the_shutdown(tmp_path: Path) -> None:
    topo = ring(tmp_path)
    nodes = consensus_nodes(topo, tmp_path, rounds=5, checkpoint_interval_s=3600.0)
    written: list[int] = []
    for node in nodes:
        inner = node.engine.checkpoint
        node.engine.checkpoint = lambda inner=inner: (written.append(1), inner())
    run_nodes(nodes)
    assert written == []
    for node in nodes:
        recs = read_metrics(node.config.metrics_path)
        assert all("error_to_mean" in r for r in recs) and len(recs) == 5
        assert checkpoint.load(node.config.state_path)[1]["round"] == 5


def test_cadence_settings_are_checked() -> None:
    from m3tgossip.daemon.config import GossipConfig

    for bad in ({"eval_every": 0}, {"checkpoint_every": 0}, {"checkpoint_interval_s": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GossipConfig(**bad)


# --------------------------------------------------------------------------- replicas


def test_a_time_varying_round_keeps_no_replica_and_nodes_drop_their_start(tmp_path: Path) -> None:
    topo = ring(tmp_path, dynamics=True)
    nodes = consensus_nodes(topo, tmp_path, rounds=2)
    run_nodes(nodes)
    for node in nodes:
        assert all(not p.replicas for p in node.peers.values())
        assert not node.exchange.origin  # every neighbour answered: the start copy is gone
        assert node.workload.error_to_mean() < 1e-12  # 4 nodes, 2 rounds: exact


def test_lockstep_rounds_of_full_states_keep_no_replica(tmp_path: Path) -> None:
    topo = ring(tmp_path)
    nodes = consensus_nodes(topo, tmp_path, rounds=6)
    start = {n.id: {c: x.copy() for c, x in n.shared.items()} for n in nodes}
    run_nodes(nodes)
    assert all(n.exchange.full_states for n in nodes)
    assert all(not p.replicas for n in nodes for p in n.peers.values())
    for comp in nodes[0].shared:
        mean = np.mean([start[n.id][comp] for n in nodes], axis=0)
        now = np.mean([n.shared[comp] for n in nodes], axis=0)
        np.testing.assert_allclose(now, mean, rtol=1e-9, atol=1e-12)


def test_the_replicas_of_a_neighbour_that_sends_deltas_are_kept(tmp_path: Path) -> None:
    topo = ring(tmp_path)
    net = FakeNetwork()
    nodes = [
        Node(
            node_config(
                topo, nid, tmp_path, rounds=6, **({"compression": "int8"} if nid == "n0" else {})
            ),
            topology=topo,
            workload=ConsensusWorkload(topo, nid, seed=0, options={"size": 16}),
            transport=net.transport(nid),
        )
        for nid in topo.ids()
    ]
    start = {n.id: {c: x.copy() for c, x in n.shared.items()} for n in nodes}
    run_nodes(nodes)
    assert [n.exchange.full_states for n in nodes] == [False, True, True, True]
    for node in nodes[1:]:
        for peer in node.peers.values():
            assert peer.sends_states == (peer.id != "n0")
            assert bool(peer.replicas) == (peer.id == "n0")  # only n0's are kept
    for comp in nodes[0].shared:
        mean = np.mean([start[n.id][comp] for n in nodes], axis=0)
        now = np.mean([n.shared[comp] for n in nodes], axis=0)
        np.testing.assert_allclose(now, mean, rtol=1e-6, atol=1e-9)


def test_a_replica_is_the_received_state_until_a_delta_changes_it(tmp_path: Path) -> None:
    topo = ring(tmp_path)
    node = consensus_nodes(topo, tmp_path, rounds=1)[0]
    peer = next(iter(node.peers.values()))
    comp = peer.components[0]
    size = node.shared[comp].size
    sent = np.arange(size, dtype=np.float64)

    def message(kind: protocol.MsgType, values: np.ndarray, base: int, seq: int):
        meta = {comp: protocol.TensorMeta(comp, "float64", values.shape, base=base)}
        msg = protocol.Message(
            type=kind,
            sender=peer.id,
            session="a" * 32,
            seq=seq,
            round=0,
            body={"reason": "replica reset"} if kind is protocol.MsgType.STATE else {},
            tensors={comp: values},
            meta=meta,
        )
        return protocol.decode([bytes(f) for f in protocol.encode(msg)])

    state = message(protocol.MsgType.STATE, sent, base=-1, seq=1)
    node.exchange.apply(peer, state)
    replica = peer.replicas[comp]
    assert np.shares_memory(replica, state.tensors[comp]) and not replica.flags.writeable
    node.exchange.apply(peer, message(protocol.MsgType.DELTA, np.ones(size), base=0, seq=2))
    assert peer.replicas[comp].flags.writeable
    np.testing.assert_array_equal(peer.replicas[comp], sent + 1)
    np.testing.assert_array_equal(state.tensors[comp], sent)  # the received values untouched


# --------------------------------------------------------------------------- start-up


class RefusingTransport(FakeTransport):
    """Refuses the first `refuse` sends to `peer` (a link whose connection is not up yet), and
    records redials."""

    def __init__(self, inner: FakeTransport, peer: str, refuse: int) -> None:
        super().__init__(inner.net, inner.node_id, inner.endpoint)
        self.peer, self.refuse = peer, refuse
        self.refused = 0
        self.redials: list[str] = []

    def send(self, peer: str, frames: list) -> bool:
        if peer == self.peer and self.refused < self.refuse:
            self.refused += 1
            return False
        return super().send(peer, frames)

    def redial(self, peer: str) -> bool:
        self.redials.append(peer)
        return True


def test_refused_hellos_are_tried_again_until_the_link_is_up(tmp_path: Path) -> None:
    topo = ring(tmp_path)
    net = FakeNetwork()
    transports = {nid: net.transport(nid) for nid in topo.ids()}
    slow = RefusingTransport(transports["n0"], "n1", refuse=20)
    transports["n0"] = slow
    nodes = [
        Node(
            node_config(topo, nid, tmp_path, rounds=2),
            topology=topo,
            workload=ConsensusWorkload(topo, nid, seed=0, options={"size": 8}),
            transport=transports[nid],
        )
        for nid in topo.ids()
    ]
    run_nodes(nodes)
    assert slow.refused == 20  # every refused hello was tried again, and then went through
    assert "n1" in slow.redials  # n1's hellos arrived while n0's link to it was down
    assert all(p.answered for n in nodes for p in n.peers.values())
    assert all(n.workload.error_to_mean() < 0.5 for n in nodes)


def poll_until(transports: list[Transport], done) -> None:
    deadline = time.monotonic() + WAIT_S
    while not done():
        assert time.monotonic() < deadline, "the links never got there"
        for t in transports:
            t.poll(20)


def test_redial_only_a_link_that_waits_to_retry() -> None:
    with zmq.Context() as ctx:
        closed = ctx.socket(zmq.ROUTER)
        port = closed.bind_to_random_port("tcp://127.0.0.1")
        closed.close(linger=0)  # nothing listens there any more
    a = Transport("a", "tcp://127.0.0.1:0", {"b": f"tcp://127.0.0.1:{port}"})
    try:
        poll_until([a], lambda: a.link_state["b"] == "waiting")  # refused, retrying later
        assert a.redial("b")
        assert not a.redial("b")  # dialling again: not until it waits once more
        assert not a.redial("nobody")
        assert not a.send("b", [b"x"])  # still refused: no connection
    finally:
        a.close(0)
    b = Transport("b", "tcp://127.0.0.1:0", {})
    a = Transport("a", "tcp://127.0.0.1:0", {"b": b.endpoint})
    try:
        poll_until([a, b], lambda: a.link_state["b"] == "up")
        assert not a.redial("b")  # a link that is up is left alone
        assert a.send("b", [b"x"])
    finally:
        a.close(0)
        b.close(0)


def test_adjacency_from_the_edges_matches_the_graph() -> None:
    for spec in sorted((ROOT / "topology").glob("*.toml")):
        topo = load_topology(spec)
        graph = topo.graph()
        for nid in topo.present():
            assert topo.neighbours(nid) == sorted(graph.neighbors(nid)), (spec.name, nid)
        for comp in topo.components():
            sub = topo.component_graph(comp)
            order = list(sub.nodes)
            W = metropolis_hastings(sub, order)
            for i, nid in enumerate(order):
                assert topo.component_neighbours(nid, comp) == sorted(sub.neighbors(nid))
                row = node_weights(topo, nid, comp)
                for j, other in enumerate(order):
                    assert row.get(other, 0.0) == pytest.approx(W[i, j], abs=1e-15)


def test_a_disconnected_spec_is_refused_with_its_parts(tmp_path: Path) -> None:
    from m3tgossip.errors import ConfigError

    spec = tmp_path / "split.toml"
    spec.write_text(
        'name = "split"\nedges = [["a", "b"], ["c", "d"]]\n'
        + "".join(f'[[nodes]]\nid = "{n}"\n' for n in "abcd")
    )
    with pytest.raises(ConfigError, match=r"disconnected: 2 parts: a, b \| c, d"):
        load_topology(spec)


@pytest.mark.multiprocess
def test_a_consensus_daemon_path_loads_neither_torch_nor_networkx(tmp_path: Path) -> None:
    spec = tmp_path / "explicit.toml"
    spec.write_text(load_topology(ROOT / "topology/ring-8.toml").to_toml())
    code = (
        "import sys\n"
        "import numpy as np\n"
        "from m3tgossip.daemon.node import Node\n"
        "from m3tgossip.consensus import FUSED_MIN_SIZE, make_mixer\n"
        "from m3tgossip.topology import load_topology, node_weights\n"
        "from m3tgossip.workloads import make_workload\n"
        f"topo = load_topology({str(spec)!r})\n"
        "w = make_workload('consensus', topology=topo, node_id='n0', seed=0,\n"
        "                  options={'size': FUSED_MIN_SIZE + 1})\n"
        "w.evaluate(0)\n"
        "comp = next(iter(w.shared()))\n"
        "row = node_weights(topo, 'n0', comp)\n"
        "x = w.shared()[comp]\n"
        "reps = {j: x.copy() for j in row if j != 'n0'}\n"
        "make_mixer('mean').mix_into(x, x.copy(), reps, row, 'n0')\n"
        "loaded = {'torch', 'networkx'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )


@pytest.mark.multiprocess
def test_a_daemon_without_a_metrics_endpoint_loads_neither_asyncio_nor_prometheus() -> None:
    code = (
        "import sys\n"
        "from m3tgossip.daemon.node import Node\n"
        "from m3tgossip.net import Transport\n"
        "t = Transport('n0', 'tcp://127.0.0.1:*', {'n1': 'tcp://127.0.0.1:1'})\n"
        "t.poll(50)\n"
        "assert t.link_state['n1'] in ('dialling', 'waiting'), t.link_state\n"
        "t.close(0)\n"
        "loaded = {'asyncio', 'prometheus_client', 'http.server'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )

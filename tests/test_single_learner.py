"""Single-learner nodes: cancelling noise masks every message and leaves the network mean as it
is; "local" keeps every component on the node; settings where the noise would not cancel are
refused at start."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fakes import FakeNetwork, node_config, run_nodes

from m3tgossip.daemon.config import FaultConfig, NodeConfig
from m3tgossip.daemon.node import Node
from m3tgossip.errors import ConfigError
from m3tgossip.privacy import CancellingNoise, PrivacyBudgetExhausted
from m3tgossip.topology import Topology, load_topology, node_weights
from m3tgossip.workloads.consensus import ConsensusWorkload

ROUNDS = 5
SIZE = 4000
STD = 0.05
#: a ring of six with two chords: degrees 2 to 4, so the edges' weights differ
EDGES = [
    ["n0", "n1"],
    ["n1", "n2"],
    ["n2", "n3"],
    ["n3", "n4"],
    ["n4", "n5"],
    ["n5", "n0"],
    ["n0", "n3"],
    ["n1", "n4"],
]


def spec(tmp_path: Path, modes: dict[str, str], name: str = "six", extra: str = "") -> Topology:
    lines = [f'name = "{name}"', f"edges = {json.dumps(EDGES)}", extra]
    for i in range(6):
        nid = f"n{i}"
        lines += ["[[nodes]]", f'id = "{nid}"', 'privacy = "gdpr"']
        if nid in modes:
            lines.append(f'single_learner = "{modes[nid]}"')
    path = tmp_path / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return load_topology(path)


def nodes_of(
    topo: Topology, tmp_path: Path, net: FakeNetwork, std: float = STD, **gossip
) -> list[Node]:
    nodes = []
    for nid in topo.ids():
        config = node_config(topo, nid, tmp_path / topo.name, rounds=ROUNDS, **gossip)
        if topo.node(nid).single_learner == "cancel":
            config = _with_privacy(config, {"cancel_noise": std})
        workload = ConsensusWorkload(topo, nid, seed=3, options={"size": SIZE})
        nodes.append(Node(config, topology=topo, workload=workload, transport=net.transport(nid)))
    return nodes


def _with_privacy(config: NodeConfig, table: dict) -> NodeConfig:
    import dataclasses

    return dataclasses.replace(config, privacy=table)


def test_cancelling_noise_leaves_the_network_mean_as_it_is(tmp_path: Path) -> None:
    plain = spec(tmp_path, {}, "plain")
    masked = spec(tmp_path, {"n0": "cancel", "n4": "cancel"}, "masked")
    means = {}
    states = {}
    for topo in (plain, masked):
        net = FakeNetwork()
        nodes = nodes_of(topo, tmp_path, net)
        run_nodes(nodes)
        assert all(n.round == ROUNDS for n in nodes)
        states[topo.name] = {n.id: n.shared["backbone"].copy() for n in nodes}
        means[topo.name] = np.mean(list(states[topo.name].values()), axis=0)
    # the mean is the one without masks, up to float rounding ...
    np.testing.assert_allclose(means["masked"], means["plain"], rtol=0, atol=1e-12)
    # ... though the masks did reach the nodes' states
    moved = max(float(np.std(states["masked"][n] - states["plain"][n])) for n in states["plain"])
    assert moved > STD / 20


def test_each_neighbour_gets_its_own_mask_of_the_declared_scale(tmp_path: Path) -> None:
    topo = spec(tmp_path, {"n0": "cancel"})
    net = FakeNetwork()
    nodes = {n.id: n for n in nodes_of(topo, tmp_path, net)}
    run_nodes(nodes.values())
    me = nodes["n0"]
    cancel = me.gate.cancel
    assert cancel is not None and me.gate.node_epsilon() == float("inf")
    published = me.exchange.published["backbone"]
    row = {j: w for j, w in node_weights(topo, "n0", "backbone").items() if j != "n0"}
    assert sorted(row) == ["n1", "n3", "n5"]
    noises = {}
    for j in row:
        replica = nodes[j].peers["n0"].replicas["backbone"]
        noises[j] = replica - published
        # noise of the edge's declared std (every edge at least the configured one)
        declared = cancel.edge_std["backbone"][j]
        assert declared >= STD * (1 - 1e-12)
        assert float(np.std(noises[j])) == pytest.approx(declared, rel=0.06)
    assert min(cancel.edge_std["backbone"].values()) == pytest.approx(STD)
    # the masks differ per edge and sum to zero with the edges' weights
    assert not np.allclose(noises["n1"], noises["n3"])
    total = sum(row[j] * noises[j] for j in row)
    assert float(np.abs(total).max()) < 1e-12
    # every update message n0 sent carries its edge's std, and none is the raw value
    sent = [m for s, _, m in net.log if s == "n0" and m.tensors]
    assert sent
    receivers = {r for s, r, m in net.log if s == "n0" and m.tensors}
    assert receivers == set(row)
    for sender, receiver, msg in net.log:
        if sender == "n0" and msg.tensors:
            assert msg.meta["backbone"].noise == pytest.approx(
                cancel.edge_std["backbone"][receiver]
            )
    # its metrics claim no epsilon and name the mechanism
    last = json.loads(me.config.metrics_path.read_text().splitlines()[-1])
    priv = last["privacy"]
    assert priv["mechanism"] == "cancelling-noise" and priv["dp"] is False
    assert priv["node_epsilon"] is None and priv["budget"] is None
    assert "colluding" in priv["protects"]


def test_edge_seeds_differ_per_edge_and_per_start() -> None:
    rows = {"backbone": {"a": 0.25, "b": 0.25, "c": 0.2}, "fusion": {"a": 0.3, "b": 0.3}}
    one = CancellingNoise("n0", rows, 0.1)
    two = CancellingNoise("n0", rows, 0.1)  # the same node, spec and settings, started again
    assert len(set(one.seeds.values())) == len(one.seeds) == 5
    assert not set(one.seeds.values()) & set(two.seeds.values())
    a = one.draw("backbone", 100, np.dtype("float64"))
    b = two.draw("backbone", 100, np.dtype("float64"))
    assert not np.allclose(a["a"], b["a"])
    # a given secret (tests only) reproduces them
    fixed = [CancellingNoise("n0", rows, 0.1, secret=b"k" * 32).seeds for _ in range(2)]
    assert fixed[0] == fixed[1]
    with pytest.raises(ValueError, match="at least two"):
        CancellingNoise("n0", {"backbone": {"a": 0.5}}, 0.1)


def test_nothing_is_sent_without_the_rounds_masks(tmp_path: Path) -> None:
    topo = spec(tmp_path, {"n0": "cancel"})
    node = nodes_of(topo, tmp_path, FakeNetwork())[0]
    with pytest.raises(PrivacyBudgetExhausted, match="no cancelling masks"):
        node.exchange.send_round()
    for comp, x in node.shared.items():
        node.gate.privatize(comp, x.copy())
    node.exchange.send_round()
    with pytest.raises(PrivacyBudgetExhausted):
        node.exchange.send_round()  # the masks are used once


def test_local_single_learner_shares_nothing(tmp_path: Path) -> None:
    topo = spec(tmp_path, {"n0": "local"})
    assert topo.node("n0").shared_components == ()
    assert "n0" not in topo.holders("backbone")
    net = FakeNetwork()
    nodes = nodes_of(topo, tmp_path, net)
    run_nodes(nodes)
    assert all(n.round == ROUNDS for n in nodes)
    assert not [m for s, _, m in net.log if s == "n0" and m.tensors]
    assert nodes[0].gate is None
    last = json.loads(nodes[0].config.metrics_path.read_text().splitlines()[-1])
    assert last["privacy"] == {"mechanism": "local", "dp": False, "node_epsilon": None}
    assert "single_learner" in topo.to_toml()


REFUSED = {
    "overlap": ({"overlap": True}, "gossip.overlap"),
    "push-sum": ({"mode": "push-sum"}, "push-sum"),
    "trimmed": ({"aggregator": "trimmed"}, "trimmed"),
    "clip": ({"aggregator": "clip"}, '"clip"'),
    "lossy codec": ({"compression": "fp16"}, "lossy codec"),
    "noise-aware": ({"noise_strength": 1.0}, "noise_strength"),
    "stragglers": ({"straggler_after": 2}, "gossip.straggler_after"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_settings_where_the_noise_would_not_cancel_are_refused(tmp_path: Path, case: str) -> None:
    gossip, words = REFUSED[case]
    topo = spec(tmp_path, {"n0": "cancel"})
    config = node_config(topo, "n0", tmp_path, **gossip)
    workload = ConsensusWorkload(topo, "n0", options={"size": 8})
    with pytest.raises(ConfigError, match=r'node "n0" single_learner = "cancel".*') as exc:
        Node(config, topology=topo, workload=workload, transport=FakeNetwork().transport("n0"))
    assert words in str(exc.value)


def test_an_attack_and_a_time_varying_topology_are_refused(tmp_path: Path) -> None:
    topo = spec(tmp_path, {"n0": "cancel"})
    config = node_config(topo, "n0", tmp_path)
    import dataclasses

    config = dataclasses.replace(config, faults=FaultConfig(attack="alie"))
    workload = ConsensusWorkload(topo, "n0", options={"size": 8})
    with pytest.raises(ConfigError, match="faults.attack"):
        Node(config, topology=topo, workload=workload, transport=FakeNetwork().transport("n0"))
    tv = spec(tmp_path, {"n0": "cancel"}, "tv", '[dynamics]\nkind = "s-out"\nsample = 2')
    workload = ConsensusWorkload(tv, "n0", options={"size": 8})
    with pytest.raises(ConfigError, match=r'"n0" single_learner = "cancel".*\[dynamics\]'):
        Node(
            node_config(tv, "n0", tmp_path),
            topology=tv,
            workload=workload,
            transport=FakeNetwork().transport("n0"),
        )


@pytest.mark.parametrize(
    "gossip",
    [{"aggregator": "trimmed"}, {"gamma": 0.5}, {"noise_strength": 2.0}, {"straggler_after": 3}],
)
def test_a_neighbour_that_would_not_cancel_the_masks_is_refused(
    tmp_path: Path, gossip: dict
) -> None:
    topo = spec(tmp_path, {"n0": "cancel"})
    config = node_config(topo, "n1", tmp_path, **gossip)
    workload = ConsensusWorkload(topo, "n1", options={"size": 8})
    with pytest.raises(ConfigError, match=r'node "n1" gossip\..*neighbour n0 has single_learner'):
        Node(config, topology=topo, workload=workload, transport=FakeNetwork().transport("n1"))
    # a node with no cancelling neighbour may mix as it likes
    Node(
        node_config(topo, "n2", tmp_path, **gossip),
        topology=topo,
        workload=ConsensusWorkload(topo, "n2", options={"size": 8}),
        transport=FakeNetwork().transport("n2"),
    )


def test_a_component_with_fewer_than_two_neighbours_holding_it_stays_local(
    tmp_path: Path,
) -> None:
    path = tmp_path / "chain.toml"
    image = 'modalities = ["image", "tabular"]\ntasks = ["at_risk", "handwriting"]\n'
    path.write_text(
        'name = "chain"\nedges = [["a", "b"], ["a", "c"], ["b", "d"], ["c", "d"]]\n'
        f'[[nodes]]\nid = "a"\nsingle_learner = "cancel"\n{image}'
        f'[[nodes]]\nid = "b"\nsingle_learner = "cancel"\n{image}'
        f'[[nodes]]\nid = "c"\n{image}'
        '[[nodes]]\nid = "d"\nmodalities = ["tabular"]\n'
    )
    topo = load_topology(path)
    # b has one neighbour with an image encoder (a), so it keeps it; then a has one (c) too
    for nid in ("a", "b"):
        node = topo.node(nid)
        assert "encoder.image" in node.local and "head.handwriting" in node.local
        assert "encoder.tabular" in node.shared_components
    assert topo.holders("encoder.image") == ["c"]
    assert load_topology_text(tmp_path, topo.to_toml()).nodes == topo.nodes
    # a mask set for one neighbour is refused outright
    with pytest.raises(ValueError, match="at least two"):
        CancellingNoise("a", {"encoder.image": {"c": 0.5}})


def load_topology_text(tmp_path: Path, text: str) -> Topology:
    path = tmp_path / "again.toml"
    path.write_text(text)
    return load_topology(path)


def test_bad_values_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="single_learner"):
        spec(tmp_path, {"n0": "mask"})
    topo = spec(tmp_path, {})
    config = _with_privacy(node_config(topo, "n1", tmp_path), {"cancel_noise": 0.1})
    with pytest.raises(ConfigError, match=r'node "n1" privacy.cancel_noise'):
        Node(
            config,
            topology=topo,
            workload=ConsensusWorkload(topo, "n1", options={"size": 8}),
            transport=FakeNetwork().transport("n1"),
        )

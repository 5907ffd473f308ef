"""Every schedule, in one process over a fake network: what leaves a private node went through
its release gate and was charged; settings no schedule can honour are refused at start."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fakes import FakeNetwork, PrivatelyTrainedVectors, PrivateVectors, node_config, run_nodes

from m3tgossip import protocol
from m3tgossip.daemon import ledger
from m3tgossip.daemon.node import Node
from m3tgossip.errors import ConfigError
from m3tgossip.privacy import ReleaseGate
from m3tgossip.topology import Topology, load_topology
from m3tgossip.workloads.consensus import ConsensusWorkload

#: what one round of local training adds to every element: far above anything the gate lets out
SECRET = 1e6
ROUNDS = 4

SCHEDULES = {
    "lockstep": ({}, False),
    "overlapped": ({"overlap": True}, False),
    "time-varying": ({}, True),
    "push-sum": ({"mode": "push-sum", "push_interval_s": 0.05}, False),
    "local-only": ({"mode": "local"}, False),
}


def ring(tmp_path: Path, privacy: str = "gdpr", dynamics: bool = False) -> Topology:
    spec = tmp_path / "ring4.toml"
    text = (
        'name = "ring4"\n[generator]\nkind = "cycle"\nn = 4\n'
        f'[defaults]\nprivacy = "{privacy}"\nmodalities = ["tabular"]\ntasks = ["at_risk"]\n'
    )
    if dynamics:
        text += '[dynamics]\nkind = "one-peer-exponential"\n'
    spec.write_text(text)
    return load_topology(spec)


def private_nodes(
    tmp_path: Path, schedule: str, trained: bool = False
) -> tuple[FakeNetwork, list[Node], dict]:
    gossip, dynamics = SCHEDULES[schedule]
    topo = ring(tmp_path, dynamics=dynamics)
    net = FakeNetwork()
    nodes = []
    released: dict[str, list[tuple[str, int, np.ndarray]]] = {}
    for nid in topo.ids():
        comps = {c: 6 for c in topo.node(nid).shared_components}
        node = Node(
            node_config(topo, nid, tmp_path, rounds=ROUNDS, **gossip),
            topology=topo,
            workload=(PrivatelyTrainedVectors(comps) if trained else PrivateVectors(comps, SECRET)),
            transport=net.transport(nid),
        )
        assert node.gate is not None and node.schedule.name == schedule
        released[nid] = spy_on_gate(node)
        nodes.append(node)
    return net, nodes, released


def spy_on_gate(node: Node) -> list[tuple[str, int, np.ndarray]]:
    """Record (component, round, local update) of every release through the node's gate."""
    calls: list[tuple[str, int, np.ndarray]] = []
    privatize = node.gate.privatize

    def spy(comp: str, update: np.ndarray):
        calls.append((comp, node.round, update.copy()))
        return privatize(comp, update)

    node.gate.privatize = spy  # type: ignore[method-assign]
    return calls


@pytest.mark.parametrize("schedule", ["lockstep", "overlapped", "time-varying", "push-sum"])
def test_every_value_a_private_node_sends_passed_its_gate(tmp_path: Path, schedule: str) -> None:
    net, nodes, released = private_nodes(tmp_path, schedule)
    run_nodes(nodes)
    for node in nodes:
        assert node.round == ROUNDS
        calls = released[node.id]
        # one release per component and round, each of the local update alone (not the mix)
        assert sorted((c, r) for c, r, _ in calls) == sorted(
            (c, r) for c in node.shared for r in range(ROUNDS)
        )
        for _, _, update in calls:
            np.testing.assert_array_equal(update, np.full_like(update, SECRET))
        for comp in node.shared:
            assert node.gate.charged(comp) == ROUNDS
        assert node.gate.released == ROUNDS * len(node.shared)
        updates = [m for m in net.sent_by(node.id) if m.tensors]
        assert updates, f"{node.id} sent nothing under {schedule}"
        charged = {(c, r) for c, r, _ in calls}
        for msg in updates:
            for comp, tensor in msg.tensors.items():
                assert (comp, msg.round) in charged, (node.id, comp, msg.round)
                # raw values would be multiples of SECRET; released ones are clipped and noised
                assert np.abs(tensor).max() < SECRET / 100, (node.id, msg.type, comp)


@pytest.mark.parametrize("schedule", ["lockstep", "overlapped", "time-varying", "push-sum"])
def test_with_private_training_every_release_is_charged_post_processing(
    tmp_path: Path, schedule: str
) -> None:
    net, nodes, released = private_nodes(tmp_path, schedule, trained=True)
    run_nodes(nodes)
    for node in nodes:
        gate = node.gate
        assert node.round == ROUNDS and gate.training is not None
        assert node.workload.noise is gate.training  # the trainer got the calibrated noise
        calls = released[node.id]
        assert sorted((c, r) for c, r, _ in calls) == sorted(
            (c, r) for c in node.shared for r in range(ROUNDS)
        )
        # released as trained: the DP-SGD output itself, nothing clipped or added
        for _, _, update in calls:
            np.testing.assert_allclose(update, 0.01, rtol=1e-6)
        assert gate.released == ROUNDS * len(node.shared)
        # the planned rounds spend the node's one budget, and no more
        budget = gate.profile.epsilon
        assert gate.node_epsilon() == pytest.approx(budget, rel=1e-3)
        assert gate.node_epsilon() <= budget * (1 + 1e-9)
        charged = {(c, r) for c, r, _ in calls}
        updates = [m for m in net.sent_by(node.id) if m.tensors]
        assert updates, f"{node.id} sent nothing under {schedule}"
        for msg in updates:
            for comp in msg.tensors:
                assert (comp, msg.round) in charged, (node.id, comp, msg.round)
        # the ledger on disk holds what the gate charged
        on_disk = ledger.load(node.config.state_path)
        assert ReleaseGate.spend(on_disk) == ReleaseGate.spend(gate.state())


def test_a_local_only_private_node_sends_nothing_and_spends_nothing(tmp_path: Path) -> None:
    net, nodes, released = private_nodes(tmp_path, "local-only")
    run_nodes(nodes)
    for node in nodes:
        assert node.round == ROUNDS
        assert not released[node.id] and node.gate.released == 0
        sent = net.sent_by(node.id)
        assert all(not m.tensors for m in sent)
        assert {m.type for m in sent} <= {protocol.MsgType.LEAVE}


@pytest.mark.parametrize(
    ("gossip", "dynamics", "words"),
    [
        (
            {"mode": "push-sum", "overlap": True},
            False,
            "overlap = true has no meaning with the push-sum",
        ),
        ({"overlap": True}, True, "time-varying schedule"),
        ({"mode": "push-sum"}, True, "push-sum schedule runs on the static graph"),
        ({"mode": "local", "overlap": True}, False, "local-only"),
    ],
)
def test_settings_a_schedule_cannot_honour_are_refused(
    tmp_path: Path, gossip: dict, dynamics: bool, words: str
) -> None:
    topo = ring(tmp_path, privacy="open", dynamics=dynamics)
    cfg = node_config(topo, "n0", tmp_path, **gossip)
    with pytest.raises(ConfigError, match=words) as err:
        Node(cfg, topology=topo, transport=FakeNetwork().transport("n0"))
    assert 'node "n0"' in str(err.value)


@pytest.mark.parametrize("schedule", ["lockstep", "overlapped", "time-varying", "push-sum"])
def test_every_schedule_keeps_the_exact_mean(tmp_path: Path, schedule: str) -> None:
    gossip, dynamics = SCHEDULES[schedule]
    topo = ring(tmp_path, privacy="open", dynamics=dynamics)
    net = FakeNetwork()
    rounds = 40 if schedule == "push-sum" else 2 if dynamics else 12
    nodes = [
        Node(
            node_config(topo, nid, tmp_path, rounds=rounds, **gossip),
            topology=topo,
            workload=ConsensusWorkload(topology=topo, node_id=nid, seed=0, options={"size": 16}),
            transport=net.transport(nid),
        )
        for nid in topo.ids()
    ]
    start = {n.id: {c: x.copy() for c, x in n.shared.items()} for n in nodes}
    run_nodes(nodes)
    for comp in nodes[0].shared:
        mean = np.mean([start[n.id][comp] for n in nodes], axis=0)
        now = np.mean([n.shared[comp] for n in nodes], axis=0)
        if schedule != "push-sum":  # push-sum keeps the mean in (value, weight) pairs
            np.testing.assert_allclose(now, mean, rtol=1e-9, atol=1e-12)
        spread = max(np.abs(n.shared[comp] - mean).max() for n in nodes)
        assert spread < 0.2 * np.abs(mean).max() + 1e-6, (schedule, comp, spread)


@pytest.mark.parametrize(
    ("gossip", "words"),
    [
        ({"aggregator": "clip", "compression": "topk:0.1"}, "clip"),
        ({"aggregator": "trimmed", "gamma": 0.5}, "gamma"),
        ({"aggregator": "trimmed", "noise_strength": 1.0}, "noise_strength"),
    ],
)
def test_mixing_settings_with_no_meaning_together_are_refused(
    tmp_path: Path, gossip: dict, words: str
) -> None:
    topo = ring(tmp_path, privacy="open")
    cfg = node_config(topo, "n0", tmp_path, **gossip)
    with pytest.raises(ConfigError, match=words) as err:
        Node(cfg, topology=topo, transport=FakeNetwork().transport("n0"))
    assert 'node "n0" [gossip]' in str(err.value)

"""The release ledger: a release is charged on disk before it can leave, so a node killed
between sending and checkpointing resumes with everything it sent charged."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fakes import CapturingTransport, FakeNetwork, PrivatelyTrainedVectors, node_config, run_nodes

from m3tgossip import protocol
from m3tgossip.daemon import checkpoint, ledger
from m3tgossip.daemon.metrics import read_metrics
from m3tgossip.daemon.node import Node
from m3tgossip.privacy import RDPAccountant
from m3tgossip.topology import load_topology

ROOT = Path(__file__).resolve().parent.parent
COMPS = {"head.at_risk": 6, "encoder.tabular": 6}

SPEC = """name = "ring4"
[generator]
kind = "cycle"
n = 4
[defaults]
privacy = "gdpr"
modalities = ["tabular"]
tasks = ["at_risk"]
"""

#: four private nodes in threads over an in-process network; prints a line for every update
#: n0 sends, and never checkpoints before the end of its 200 rounds
CHILD = """
import sys, threading
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from fakes import FakeNetwork, FakeTransport, PrivatelyTrainedVectors, node_config, run_nodes
from m3tgossip.daemon.node import Node
from m3tgossip.topology import load_topology
tmp = Path(sys.argv[1])
topo = load_topology(tmp / "ring4.toml")
comps = {"head.at_risk": 6, "encoder.tabular": 6}
net = FakeNetwork()
send = FakeTransport.send
lock = threading.Lock()
def spy(self, peer, frames):
    ok = send(self, peer, frames)
    if self.node_id == "n0":
        msg = self.net.log[-1][2]
        if msg.tensors:
            with lock:
                print("sent", msg.round, flush=True)
    return ok
FakeTransport.send = spy
nodes = [
    Node(
        node_config(topo, nid, tmp, rounds=200, checkpoint_every=1000),
        topology=topo,
        workload=PrivatelyTrainedVectors(comps, pause_s=0.02),
        transport=net.transport(nid),
    )
    for nid in topo.ids()
]
run_nodes(nodes, wait_s=120)
"""


@pytest.mark.multiprocess
def test_sigkill_after_sending_cannot_unspend_a_release(tmp_path: Path) -> None:
    (tmp_path / "ring4.toml").write_text(SPEC)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), str(ROOT / "tests")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    sent = -1
    try:
        for line in proc.stdout:  # bounded: the child's rounds end and it exits
            if line.startswith("sent "):
                sent = max(sent, int(line.split()[1]))
            if sent >= 3:
                proc.send_signal(signal.SIGKILL)  # between a send and any checkpoint
                break
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
        proc.stdout.close()
    assert sent >= 3, "the child sent no updates"
    state_dir = tmp_path / "n0"
    assert checkpoint.load(state_dir) is None  # killed before it ever checkpointed
    assert ledger.load(state_dir) is not None
    topo = load_topology(tmp_path / "ring4.toml")
    config = dataclasses.replace(
        node_config(topo, "n0", tmp_path, rounds=200, checkpoint_every=1000), fresh=False
    )
    node = Node(
        config,
        topology=topo,
        workload=PrivatelyTrainedVectors(COMPS),
        transport=CapturingTransport(),
    )
    gate = node.gate
    assert gate is not None and gate.training is not None
    # every round whose update left the node is charged, all of its DP-SGD steps
    for comp in COMPS:
        assert gate.releases(comp) >= sent + 1
    t = gate.training
    spent = RDPAccountant()
    spent.step(t.noise_multiplier, (sent + 1) * t.steps_per_round, t.sampling_rate)
    assert gate.node_epsilon() >= spent.epsilon(gate.profile.delta) * (1 - 1e-9)
    # a fresh start keeps the ledger: the learners have spent what they spent
    fresh = Node(
        dataclasses.replace(config, fresh=True),
        topology=topo,
        workload=PrivatelyTrainedVectors(COMPS),
        transport=CapturingTransport(),
    )
    assert fresh.gate.node_epsilon() == pytest.approx(gate.node_epsilon())
    assert fresh.round == 0


def test_resume_takes_the_later_of_ledger_and_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "ring4.toml").write_text(SPEC)
    topo = load_topology(tmp_path / "ring4.toml")
    config = node_config(topo, "n0", tmp_path, rounds=50)
    node = Node(
        config,
        topology=topo,
        workload=PrivatelyTrainedVectors(COMPS),
        transport=CapturingTransport(),
    )
    gate = node.gate
    for _ in range(3):
        assert gate.begin_round()
        for comp in COMPS:
            gate.privatize(comp, np.zeros(6))
    early = gate.state()
    node.checkpoint(wait=True)  # the checkpoint holds 3 rounds
    for _ in range(2):
        assert gate.begin_round()
        for comp in COMPS:
            gate.privatize(comp, np.zeros(6))
    ledger.save(config.state_path, gate.state())  # the ledger 5
    again = Node(
        dataclasses.replace(config, fresh=False),
        topology=topo,
        workload=PrivatelyTrainedVectors(COMPS),
        transport=CapturingTransport(),
    )
    assert again.gate.releases("head.at_risk") == 5
    # and a checkpoint later than the ledger wins
    ledger.save(config.state_path, early)
    node.checkpoint(wait=True)
    third = Node(
        dataclasses.replace(config, fresh=False),
        topology=topo,
        workload=PrivatelyTrainedVectors(COMPS),
        transport=CapturingTransport(),
    )
    assert third.gate.releases("head.at_risk") == 5
    # a ledger of another profile is named in the error
    bad = dict(early, profile="ferpa")
    ledger.save(config.state_path, bad)
    with pytest.raises(ledger.LedgerError, match="privacy-ledger.json"):
        Node(
            dataclasses.replace(config, fresh=False),
            topology=topo,
            workload=PrivatelyTrainedVectors(COMPS),
            transport=CapturingTransport(),
        )


def test_a_node_whose_budget_is_spent_stops_releasing_and_says_so(tmp_path: Path) -> None:
    (tmp_path / "ring4.toml").write_text(SPEC)
    topo = load_topology(tmp_path / "ring4.toml")
    # n0's learners already spent its budget in an earlier run: its ledger says so
    spent = Node(
        node_config(topo, "n0", tmp_path / "before", rounds=4),
        topology=topo,
        workload=PrivatelyTrainedVectors(COMPS),
        transport=CapturingTransport(),
    ).gate
    while spent.begin_round():
        for comp in COMPS:
            spent.privatize(comp, np.zeros(6))
    ledger.save(tmp_path / "n0", spent.state())
    net = FakeNetwork()
    nodes = [
        Node(
            node_config(topo, nid, tmp_path, rounds=4),
            topology=topo,
            workload=PrivatelyTrainedVectors(COMPS),
            transport=net.transport(nid),
        )
        for nid in topo.ids()
    ]
    run_nodes(nodes)
    n0 = nodes[0]
    assert n0.id == "n0" and n0.round == 4
    assert n0.retired == set(COMPS) and n0.gate.released == 0
    sent = net.sent_by("n0")
    assert not any(m.tensors for m in sent)
    assert any(m.type == protocol.MsgType.RETIRE for m in sent)
    last = read_metrics(n0.config.metrics_path)[-1]["privacy"]
    assert last["retired"] == sorted(COMPS)
    assert last["node_epsilon"] <= last["budget"] * (1 + 1e-9)
    # the others went on releasing, charged
    for node in nodes[1:]:
        assert node.gate.released == 4 * len(COMPS)

"""Shared fakes for in-process tests: transports that keep what a node sends, a network that
delivers it between nodes in one process, test workloads, and a bounded runner for nodes in
threads."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from m3tgossip import protocol
from m3tgossip.daemon.config import GossipConfig, NodeConfig
from m3tgossip.daemon.node import Node
from m3tgossip.privacy import TrainingPlan
from m3tgossip.topology import Topology

#: bound on any wait for in-process nodes
WAIT_S = 60.0


class QuietTransport:
    """A transport that receives nothing: the base of the fakes that only keep what is sent."""

    def reply(self, routing_id: bytes, frames: list) -> bool:
        return True

    def poll(self, timeout_ms: int) -> list:
        return []

    def close(self, linger_ms: int | None = None) -> None:
        pass


class CapturingTransport(QuietTransport):
    """Keeps every message a node sends, decoded, with its size; delivers nothing."""

    endpoint = "tcp://127.0.0.1:1"

    def __init__(self) -> None:
        self.sent: list[tuple[str, protocol.Message, int]] = []

    def send(self, peer: str, frames: list) -> bool:
        msg = protocol.decode([bytes(f) for f in frames])
        self.sent.append((peer, msg, protocol.frames_nbytes(frames)))
        return True


class WireTransport(QuietTransport):
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
            nodes[peer].handlers.handle(sender.encode(), frames, None)
        self.outbox.clear()
        return out


class FakeNetwork:
    """In-process links: what a node sends to a neighbour arrives at that neighbour's `poll`,
    in order, as (routing id, frames, authenticated id) like the ZeroMQ transport gives."""

    def __init__(self) -> None:
        self.inboxes: dict[str, queue.Queue] = {}
        self.lock = threading.Lock()
        #: (sender, receiver, decoded message) of everything sent, in order
        self.log: list[tuple[str, str, protocol.Message]] = []

    def transport(self, node_id: str) -> FakeTransport:
        self.inboxes[node_id] = queue.Queue()
        return FakeTransport(self, node_id, f"tcp://127.0.0.1:{20000 + len(self.inboxes)}")

    def sent_by(self, node_id: str) -> list[protocol.Message]:
        with self.lock:
            return [m for s, _, m in self.log if s == node_id]


class FakeTransport:
    def __init__(self, net: FakeNetwork, node_id: str, endpoint: str) -> None:
        self.net = net
        self.node_id = node_id
        #: what the node announces in its hellos; nothing listens there
        self.endpoint = endpoint
        self.closed = False

    def send(self, peer: str, frames: list) -> bool:
        data = [bytes(f) for f in frames]
        with self.net.lock:
            self.net.log.append((self.node_id, peer, protocol.decode(data)))
        inbox = self.net.inboxes.get(peer)
        if inbox is not None:
            inbox.put((self.node_id.encode(), data, self.node_id))
        return True

    def reply(self, routing_id: bytes, frames: list) -> bool:
        return True

    def poll(self, timeout_ms: int) -> list:
        inbox = self.net.inboxes[self.node_id]
        out = []
        try:
            out.append(inbox.get(timeout=max(0, timeout_ms) / 1000))
            while True:
                out.append(inbox.get_nowait())
        except queue.Empty:
            pass
        return out

    def close(self, linger_ms: int | None = None) -> None:
        self.closed = True


class PrivateVectors:
    """A numpy workload whose vectors count as learned from private records: each round's
    training adds `step` to every element (a value that must never leave the node raw)."""

    name = "private-vectors"
    private_data = True

    def __init__(self, comps: dict[str, int], step: float = 0.01) -> None:
        self._shared = {c: np.zeros(n) for c, n in comps.items()}
        self.step = step

    def model_id(self) -> str:
        return "private-vectors"

    def shared(self) -> dict[str, np.ndarray]:
        return self._shared

    def local_step(self, round_: int) -> dict:
        for x in self._shared.values():
            x += self.step
        return {}

    def after_mix(self, round_: int) -> None:
        pass

    def evaluate(self, round_: int) -> dict:
        return {}

    def state(self) -> dict[str, np.ndarray]:
        return dict(self._shared)

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        pass


class PrivatelyTrainedVectors(PrivateVectors):
    """PrivateVectors whose training counts as per-learner DP-SGD: the daemon calibrates its
    noise (`use_private_training`) and charges its steps; releases get no noise of their own.
    `pause_s` slows each round down (for crash tests)."""

    name = "privately-trained-vectors"

    def __init__(
        self, comps: dict[str, int], step: float = 0.01, q: float = 0.25, pause_s: float = 0.0
    ) -> None:
        super().__init__(comps, step)
        self.q = q
        self.pause_s = pause_s
        self.noise: Any = None

    def private_training_plan(self) -> TrainingPlan:
        return TrainingPlan(self.q, 3)

    def trained_components(self) -> list[str]:
        return sorted(self._shared)

    def use_private_training(self, noise: Any) -> None:
        self.noise = noise

    def local_step(self, round_: int) -> dict:
        if self.pause_s:
            time.sleep(self.pause_s)
        return super().local_step(round_)


def node_config(
    topology: Topology, node_id: str, tmp_path: Path, rounds: int = 4, **gossip: Any
) -> NodeConfig:
    """A fresh node config for in-process tests, with short deadlines."""
    settings: dict[str, Any] = {"round_deadline_s": 5.0, "startup_grace_s": 10.0, **gossip}
    return NodeConfig(
        id=node_id,
        topology=str(topology.source),
        state_dir=str(tmp_path / node_id),
        rounds=rounds,
        fresh=True,
        gossip=GossipConfig(**settings),
    )


def run_nodes(nodes: Iterable[Node], wait_s: float = WAIT_S) -> None:
    """Run nodes in threads until each finishes; stop them all if one takes longer than
    `wait_s`, and fail if any raised or did not stop."""
    nodes = list(nodes)
    errors: list[BaseException] = []

    def run(node: Node) -> None:
        try:
            node.run()
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(wait_s)
    late = [n.id for n, t in zip(nodes, threads, strict=True) if t.is_alive()]
    for node in nodes:
        node.stop("test over")
    for t in threads:
        t.join(wait_s)
    if errors:
        raise errors[0]
    assert not late, f"nodes still running after {wait_s} s: {late}"

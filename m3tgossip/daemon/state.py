"""What every part of a node reads: its settings, its place in the topology, its workload's
shared arrays, its neighbours, the release gate and the round counters."""

from __future__ import annotations

import time

import numpy as np

from m3tgossip.daemon.config import NodeConfig
from m3tgossip.daemon.peers import Peer
from m3tgossip.privacy import ReleaseGate
from m3tgossip.topology import NodeSpec, Topology
from m3tgossip.workloads import Workload


class NodeState:
    """The state a node's parts share. `round` is the round this node is in; the round it
    collects and mixes is `mixing_round` (one earlier with overlapped rounds)."""

    def __init__(
        self,
        config: NodeConfig,
        topology: Topology,
        workload: Workload,
        peers: dict[str, Peer],
        gate: ReleaseGate | None,
        lag: int,
    ) -> None:
        self.config = config
        self.topology = topology
        self.id = config.id
        self.spec: NodeSpec = topology.node(config.id)
        self.workload = workload
        self.model_id = workload.model_id()
        self.shared: dict[str, np.ndarray] = workload.shared()
        self.peers = peers
        #: the release gate of a private workload (None: open profile or nothing private)
        self.gate = gate
        self.lag = lag
        self.round = 0
        #: rounds this session has completed
        self.rounds_done = 0
        self.resumed_from: int | None = None
        #: components whose privacy budget is spent: trained on, never sent again
        self.retired: set[str] = set()
        self.stop_reason: str | None = None
        #: the round the spec's next stage begins at: the node checkpoints and stops there, to
        #: be restarted under that stage's version of the spec (None: no later stage)
        self.stop_at: int | None = topology.next_stage_round()
        #: the round this node joins at, if a stage adds it (`add_nodes`): a fresh node starts
        #: there, and its first mix takes its neighbours' values instead of its own
        joins = topology.joins_at(config.id)
        self.join_round: int | None = topology.stages[joins - 1].round if joins else None
        #: a slow node whose neighbours all finished ends after this round
        self.finish_after: int | None = None
        self.started = time.time()

    @property
    def mixing_round(self) -> int:
        """The round whose messages this node collects and mixes now."""
        return self.round - self.lag

    @property
    def sends_this_round(self) -> bool:
        """This node sends its values in this round: in every round, or in one of every
        `send_every` if its topology entry declares a `bandwidth` below 1 (what it does not
        send waits in the gap to its published copy and goes with the next send)."""
        return self.round % self.spec.send_every == 0

    def done(self) -> bool:
        if self.stop_at is not None and self.round >= self.stop_at:
            return True
        if self.finish_after is not None and self.round >= self.finish_after:
            return True
        return self.stop_reason is not None or (0 < self.config.rounds <= self.round)

    @property
    def at_stage_end(self) -> bool:
        """This node stopped where the spec's next stage begins."""
        return self.stop_at is not None and self.round >= self.stop_at

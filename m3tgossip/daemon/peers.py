"""What a node knows about each of its neighbours: session, sequence, replicas, round, counters."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from m3tgossip.protocol import Message
    from m3tgossip.topology import Topology


@dataclass
class Peer:
    """One neighbour, as this node sees it."""

    id: str
    endpoint: str
    components: tuple[str, ...]
    session: str | None = None
    #: it answered one of our hellos: our link to it works (and its link to us)
    answered: bool = False
    last_seq: int = -1
    model_ok: bool = True
    left: bool = False
    #: it left because it finished its rounds (not stopped, restarting or erased)
    finished: bool = False
    missed: int = 0
    #: rounds whose deadline passed without this neighbour's messages (never reset)
    deadline_misses: int = 0
    last_heard: float = 0.0
    round: int = -1
    replicas: dict[str, np.ndarray] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    heard: dict[str, int] = field(default_factory=dict)
    pending: list[Message] = field(default_factory=list)
    need_state: set[str] = field(default_factory=set)
    #: its hello said it sends full states every round: its replicas need not outlive a mix
    sends_states: bool = False
    resync_asked: int = -1
    bytes_in: int = 0
    bytes_out: int = 0
    dropped_out: int = 0
    #: per component: declared DP noise std of its last delta, recent estimates of its variance
    noise: dict[str, float] = field(default_factory=dict)
    noise_estimates: dict[str, deque[float]] = field(default_factory=dict)
    #: push-sum running sums: everything ever sent to it, and the last totals received from
    #: it (whose value parts live in `replicas`); a lost push is made good by the next one
    push_sent: dict[str, np.ndarray] = field(default_factory=dict)
    push_sent_w: dict[str, float] = field(default_factory=dict)
    push_recv_w: dict[str, float] = field(default_factory=dict)
    #: the topology declares it or this node a straggler (speed or bandwidth below 1): rounds
    #: with it are not kept in step (`m3tgossip.daemon.rounds`, loose links)
    loose: bool = False
    #: the topology declares it a straggler (speed or bandwidth below 1)
    slow: bool = False
    #: observed to be a straggler in this session (`gossip.straggler_after` deadlines missed)
    straggler: bool = False
    #: rounds of this node whose deadline passed without its messages, in its session
    session_misses: int = 0
    #: components whose replica took a new value since this node last mixed it
    fresh: set[str] = field(default_factory=set)
    #: the round it joins at if a stage of the spec adds it (None: there from the start): what
    #: it sends for that round, its starting values, is heard but not mixed
    joins_round: int | None = None

    def reset(self, session: str | None) -> None:
        """A new incarnation of the neighbour: forget its replicas, send it full state."""
        self.session = session
        self.last_seq = -1
        self.replicas.clear()
        self.versions.clear()
        self.heard.clear()
        self.pending.clear()
        self.need_state = set(self.components)
        self.sends_states = False
        self.left = False
        self.finished = False
        self.missed = 0
        self.push_sent.clear()
        self.push_sent_w.clear()
        self.push_recv_w.clear()
        self.straggler = False
        self.session_misses = 0
        self.fresh.clear()

    @property
    def live(self) -> bool:
        """Shares something with this node, runs the same model and has not left."""
        return bool(self.components) and self.model_ok and not self.left

    def heard_round(self, round_: int) -> bool:
        """Every component this neighbour shares with us arrived for `round_`."""
        return all(self.heard.get(c) == round_ for c in self.components)


def make_peers(topology: Topology, node_id: str, held: set[str]) -> dict[str, Peer]:
    """One `Peer` per topology neighbour, with the components both ends hold shared; the link
    is loose if either end is declared a straggler."""
    peers = {}
    slow = topology.node(node_id).straggler
    for nid in topology.neighbours(node_id):
        spec = topology.node(nid)
        common = tuple(sorted(held & set(spec.shared_components)))
        peers[nid] = Peer(nid, spec.endpoint if spec.port else "", common)
        peers[nid].need_state = set(common)
        peers[nid].loose = slow or spec.straggler
        peers[nid].slow = spec.straggler
        joins = topology.joins_at(nid)
        peers[nid].joins_round = topology.stages[joins - 1].round if joins else None
    return peers

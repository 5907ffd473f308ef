"""Collecting a round: neighbours' messages held until this node reaches their round, an
adaptive deadline from observed arrival delays, and a wait that never lasts forever.

Messages that arrive early (a neighbour already in the next round) wait in a bounded queue and
are applied when this node reaches that round, so both ends of an edge always mix the same pair
of replica versions and the network mean is preserved exactly. A full state that needs no
replica is added to the round's sums as it arrives (`m3tgossip.daemon.stream`); everything
else is applied to the neighbour's replicas.

A link to or from a straggler is **loose** (`loose`): a node declared slow in the topology
(`speed` or `bandwidth` below 1) at either end, or, with `gossip.straggler_after`, a
neighbour observed to be one. Rounds on a loose link are not kept in step: no node waits for
a straggler (a declared straggler waits, up to the deadline, for a new value of each
full-speed neighbour, which a faster one has sent already), whatever arrives is applied to
the replica as it comes, whatever its round (so queued rounds of a neighbour far ahead are
skipped over: the replica holds its newest value), and the mix takes that replica once, in
the first mix after it changed (`Peer.fresh`). See `m3tgossip/docs/protocol.md`
(stragglers) for what this does to the mean.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable

from m3tgossip import protocol
from m3tgossip.daemon.exchange import Exchange
from m3tgossip.daemon.link import Link
from m3tgossip.daemon.peers import Peer
from m3tgossip.daemon.state import NodeState
from m3tgossip.daemon.stream import RoundSums
from m3tgossip.log import get_logger

log = get_logger(__name__)

#: early messages buffered per neighbour before the oldest are dropped (and a resync asked)
MAX_PENDING = 64
#: longest single poll, so signals and heartbeats are noticed promptly
POLL_SLICE_MS = 50
#: longest a node with loose links spends at the end of a round handling what already
#: arrived (a straggler finds several rounds of its neighbours' messages queued, more than one
#: poll takes), so that it mixes their newest values
DRAIN_MAX_S = 2.0


def _median(values: Iterable[float]) -> float:
    """The median of a few floats (numpy's median would import numpy.ma on first use)."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


class RoundCollector:
    """Waits for the messages of the round being mixed (`Node.mixing_round`)."""

    def __init__(
        self,
        state: NodeState,
        link: Link,
        exchange: Exchange,
        poll: Callable[[int], None],
        sums: RoundSums,
    ) -> None:
        self.state = state
        self.link = link
        self.exchange = exchange
        #: the round's sums of the full states that need no replica
        self.sums = sums
        #: handles whatever arrives within the given milliseconds (the node's handlers)
        self.poll = poll
        #: arrival delays (s) of neighbours' round messages after this node's round started
        self.latencies: deque[float] = deque(maxlen=64)
        #: when this node sent its current round (arrival delays count from here)
        self.started = time.monotonic()
        self.collecting = False
        #: time-varying topology: this round's mixing row (self and in-peers); None if static
        self.row: dict[str, float] | None = None
        self.isolated: set[str] = set()

    def loose(self, peer: Peer) -> bool:
        """Rounds with `peer` are not kept in step: it or this node is declared a straggler in
        the topology, or (`gossip.straggler_after` = N > 0) it missed N deadlines of this
        node's rounds in its session, or the two are more than N rounds apart. Never on a
        time-varying topology, whose rounds are the plan's."""
        if self.row is not None:
            return False
        if peer.loose or peer.straggler:
            return True
        after = self.state.config.gossip.straggler_after
        return after > 0 and peer.round >= 0 and abs(peer.round - self.state.round) > after

    def receive(self, peer: Peer, msg: protocol.Message) -> None:
        """A `delta` or `state`: apply it if its round is due, else hold it (also a state to
        sum that came before this node sent its round: `RoundSums.early`). On a loose link,
        apply it at once, whatever its round."""
        node = self.state
        if self.loose(peer):
            peer.pending.append(msg)  # after what it queued before the link turned loose
            self.take_latest(peer)
            return
        early = not self.collecting and self.sums.early(peer, msg, self.row is not None)
        if msg.round > node.mixing_round or early:
            if len(peer.pending) >= MAX_PENDING:
                peer.pending.pop(0)
                peer.replicas.clear()
                peer.versions.clear()
                self.exchange.ask_resync(peer, "early-message queue overflow")
            peer.pending.append(msg)
            return
        self._apply(peer, msg)

    def _apply(self, peer: Peer, msg: protocol.Message) -> None:
        # one arrival delay per neighbour and round, none from this session's first round: its
        # arrivals measure how far apart the daemons came up, not the network
        node = self.state
        timed = (
            node.rounds_done > 0
            and msg.round == node.mixing_round
            and not any(peer.heard.get(c) == msg.round for c in peer.components)
        )
        if self.sums.takes(peer, msg, self.row is not None):
            changed = self.sums.add(peer, msg, self.row)
        else:
            changed = self.exchange.apply(peer, msg)
        if changed and timed:
            self.latencies.append(time.monotonic() - self.started)

    def deadline(self) -> float:
        """This round's deadline: median + k * MAD of recent arrival delays, within bounds."""
        g = self.state.config.gossip
        if len(self.latencies) < 8:
            return g.round_deadline_s
        med = _median(self.latencies)
        mad = _median(abs(v - med) for v in self.latencies)
        return min(g.round_deadline_s, max(g.deadline_min_s, med + g.deadline_k * mad))

    def in_round(self, peer: Peer) -> bool:
        """The neighbour takes part in this round (always, on a static topology)."""
        return self.row is None or peer.id in self.row

    def expected(self) -> list[Peer]:
        """The neighbours this round waits for: the live ones in step with this node that
        are not suspected, and, if this node is declared a straggler, its full-speed ones (for
        a new value, which a faster neighbour has sent already). Nobody waits for a node
        declared or observed a straggler."""
        suspect_after = self.state.config.gossip.suspect_after
        return [
            p
            for p in self.state.peers.values()
            if p.live and p.missed < suspect_after and self.in_round(p) and self.waits_for(p)
        ]

    def waits_for(self, peer: Peer) -> bool:
        """This node waits for `peer` in its rounds: a link in step, or a declared straggler's
        link to a full-speed neighbour."""
        if not self.loose(peer):
            return True
        return self.state.spec.straggler and not peer.slow and not peer.straggler

    def owed(self, peer: Peer, mixing: int) -> bool:
        """What this round waits for has not come from `peer`: its messages of the round being
        mixed (a neighbour already past that round will not send it any more: a message of a
        link arrives in order, and a node at round R has sent every round before R, so what
        is missing from it was lost), or, on a loose link, a new value of every component this
        node still shares."""
        if self.loose(peer):
            retired = self.state.retired
            return not all(c in peer.fresh for c in peer.components if c not in retired)
        return not peer.heard_round(mixing) and peer.round <= mixing

    def collect(self) -> bool:
        """Wait for this round's messages. False if a stop signal arrived meanwhile."""
        node = self.state
        g = node.config.gossip
        mixing = node.mixing_round
        for peer in node.peers.values():
            if self.loose(peer):
                self.take_latest(peer)
                continue
            due = [m for m in peer.pending if m.round <= mixing]
            if due:
                peer.pending = [m for m in peer.pending if m.round > mixing]
                for msg in due:
                    self._apply(peer, msg)
        start = time.monotonic()
        deadline_s = self.deadline()
        soft = start + deadline_s
        hard = start + deadline_s * g.max_wait_factor
        next_beat = start
        self.collecting = True
        try:
            while True:
                if node.stop_reason is not None:
                    return False
                expected = self.expected()
                waiting = [p for p in expected if self.owed(p, mixing)]
                if not waiting:
                    break
                now = time.monotonic()
                if now >= hard:
                    break
                if now >= soft:
                    heard_fraction = 1.0 - len(waiting) / max(1, len(expected))
                    alive = [p for p in waiting if now - p.last_heard < g.silence_s]
                    if not alive and heard_fraction >= g.quorum:
                        break
                if now >= next_beat:
                    self.link.heartbeat(list(node.peers.values()))
                    next_beat = now + g.heartbeat_s
                self.poll(min(POLL_SLICE_MS, max(1, int((hard - now) * 1000))))
        finally:
            self.collecting = False
        self._count_misses(mixing)
        self._check_isolation()
        if any(self.loose(p) for p in node.peers.values()):
            self.drain()
        else:
            self.poll(0)
        return True

    def drain(self) -> None:
        """Handle what has already arrived, poll after poll, until a poll brings nothing (at
        most DRAIN_MAX_S): a loose link's replica then holds the neighbour's newest value."""
        end = time.monotonic() + DRAIN_MAX_S
        while True:
            seen = (self.link.bytes_in, self.link.rejected)
            self.poll(0)
            if (self.link.bytes_in, self.link.rejected) == seen or time.monotonic() >= end:
                return

    def take_latest(self, peer: Peer) -> None:
        """A loose link: apply every message queued from `peer`, whatever its round, in the
        order it came (deltas build on one another; a state replaces what came before). The
        replica then holds the neighbour's newest value, and the mix takes that one once,
        instead of one queued round after another."""
        queued, peer.pending = peer.pending, []
        for msg in queued:
            self.exchange.apply(peer, msg)

    def _count_misses(self, mixing: int) -> None:
        g = self.state.config.gossip
        for peer in self.state.peers.values():
            if not self.in_round(peer) or not peer.components or not self.owed(peer, mixing):
                continue
            loose = self.loose(peer)
            if loose and not (self.waits_for(peer) and peer.live):
                continue  # not waited for: nothing missed
            peer.missed += 1
            peer.deadline_misses += 1
            if not loose:
                peer.session_misses += 1
            if not loose and 0 < g.straggler_after <= peer.session_misses and not peer.left:
                peer.straggler = True
                log.warning(
                    "%s: %s missed %d deadlines: a straggler, no longer waited for; its newest "
                    "values are mixed as they come",
                    self.state.id,
                    peer.id,
                    peer.session_misses,
                )
            if peer.missed == g.suspect_after and not peer.left:
                log.warning(
                    "%s: %s missed %d rounds; not waiting for it until it is heard again",
                    self.state.id,
                    peer.id,
                    peer.missed,
                )

    def _check_isolation(self) -> None:
        """Warn when no live neighbour is left for a component: its consensus is cut off here."""
        if self.row is not None:
            return  # a time-varying topology links other peers every round
        node = self.state
        alive = {p.id for p in self.expected()}
        alive |= {p.id for p in node.peers.values() if p.live and self.loose(p)}
        for comp in node.shared:
            holders = [p.id for p in node.peers.values() if comp in p.components]
            cut = bool(holders) and not (alive & set(holders))
            if cut and comp not in self.isolated:
                log.warning(
                    "%s: no live neighbour holds %s: this node's part of its holder graph is "
                    "disconnected",
                    node.id,
                    comp,
                )
                self.isolated.add(comp)
            elif not cut:
                self.isolated.discard(comp)

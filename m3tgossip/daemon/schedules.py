"""Round schedules: each orders the exchange phases (send, collect, mix) of a round.

- `Lockstep`: send this round, collect it, mix it.
- `Overlapped` (`gossip.overlap`): collect the previous round (its messages arrived while this
  node trained), mix it, send this round; the last round sent is mixed at the end.
- `LocalOnly` (`gossip.mode = "local"`): no exchange at all.
- `TimeVarying` (a `[dynamics]` spec): this round's out-peers and mixing row from the spec,
  full states to the out-peers, collect, mix with the round's row.
- `PushSumTicks` (`gossip.mode = "push-sum"`): keep a share, push running sums, absorb.

Every schedule runs after the engine's release phase, so none of them sees a private value
that did not pass the node's release gate. A node whose topology entry declares a `bandwidth`
below 1 sends (pushes) in one round of every `NodeSpec.send_every` only; its links are loose
(`m3tgossip.daemon.rounds`), so no neighbour waits for the rounds it does not send.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from m3tgossip import protocol
from m3tgossip.consensus import PushSum
from m3tgossip.daemon.exchange import Exchange
from m3tgossip.daemon.link import Link
from m3tgossip.daemon.mix import MixStep
from m3tgossip.daemon.peers import Peer
from m3tgossip.daemon.rounds import RoundCollector
from m3tgossip.daemon.state import NodeState
from m3tgossip.daemon.timings import Timings
from m3tgossip.topology import round_plan

#: what `exchange` returns: (neighbours heard, consensus distance), or None when stopping
Outcome = tuple[list[str], float] | None
Values = dict[str, np.ndarray]


@dataclass(frozen=True)
class RoundParts:
    """The parts of a node a schedule orders."""

    state: NodeState
    link: Link
    exchange: Exchange
    rounds: RoundCollector
    mixstep: MixStep
    #: handle whatever arrives within the given milliseconds
    poll: Callable[[int], None]


class Schedule:
    """Base schedule: the defaults of a round that exchanges once and mixes what it hears."""

    name = "schedule"
    #: values leave the node (so a private workload's updates go through the release gate)
    exchanges = True
    #: the engine keeps the values from before training for the schedule
    needs_before = False
    #: rounds between sending a round and mixing it
    lag = 0

    def start(self, n: RoundParts) -> None:
        """Called once before the start-up handshake."""

    def exchange(self, n: RoundParts, before: Values | None, t: Timings) -> Outcome:
        raise NotImplementedError

    def finish(self, n: RoundParts) -> None:
        """Called once after the last round (not when a stop abandoned a round)."""

    def on_push(self, n: RoundParts, peer: Peer, msg: protocol.Message) -> None:
        """A push-sum message; only the push-sum schedule uses them."""


class Lockstep(Schedule):
    name = "lockstep"

    def exchange(self, n: RoundParts, before: Values | None, t: Timings) -> Outcome:
        n.rounds.started = time.monotonic()
        if n.state.sends_this_round:
            n.exchange.send()
        t.lap("send")
        if not n.rounds.collect():
            return None
        t.lap("wait")
        outcome = n.mixstep.mix()
        n.exchange.drop_replicas()
        return outcome


class Overlapped(Schedule):
    name = "overlapped"
    lag = 1

    def exchange(self, n: RoundParts, before: Values | None, t: Timings) -> Outcome:
        collected = n.rounds.collect() if n.state.mixing_round >= 0 else n.state.stop_reason is None
        t.lap("wait")
        if not collected:
            return None
        outcome = n.mixstep.mix()
        n.exchange.drop_replicas()
        t.lap("mix")
        n.rounds.started = time.monotonic()
        if n.state.sends_this_round:
            n.exchange.send()
        t.lap("send")
        return outcome

    def finish(self, n: RoundParts) -> None:
        # the last round sent is mixed too, so a finished run ends as a lockstep run does
        if n.state.stop_reason is None and n.state.mixing_round >= 0 and n.rounds.collect():
            n.mixstep.mix()
            n.state.workload.after_mix(n.state.round)


class LocalOnly(Schedule):
    name = "local-only"
    exchanges = False

    def exchange(self, n: RoundParts, before: Values | None, t: Timings) -> Outcome:
        if n.state.stop_reason is not None:
            return None
        return [], float("nan")


class TimeVarying(Schedule):
    name = "time-varying"

    def start(self, n: RoundParts) -> None:
        n.rounds.row = {}

    def exchange(self, n: RoundParts, before: Values | None, t: Timings) -> Outcome:
        out, n.rounds.row = round_plan(
            n.state.topology, n.state.id, n.state.round, n.state.config.seed
        )
        n.rounds.started = time.monotonic()
        if n.state.config.faults.attack:
            n.exchange.send_attack()
        else:
            n.exchange.send_states(out)
        t.lap("send")
        if not n.rounds.collect():
            return None
        t.lap("wait")
        outcome = n.mixstep.mix()
        if not n.state.config.faults.attack:
            n.exchange.drop_replicas(every=True)  # every round brings full states
        return outcome


class PushSumTicks(Schedule):
    """Asynchronous push-sum ticks: keep a share, push equal shares, absorb what came in.

    What goes on the wire is the running sum of all shares ever pushed to that neighbour
    (Hadjicostis-Vaidya robust push-sum), so a lost or refused push loses no mass: the next
    one carries it, and the estimates converge to the exact mean over lossy links.
    """

    name = "push-sum"
    needs_before = True

    def __init__(self) -> None:
        self.ps: dict[str, PushSum] = {}

    def start(self, n: RoundParts) -> None:
        # ready before the first hello: a neighbour may push while this node starts up
        self.ps = {c: PushSum(x.astype(np.float64)) for c, x in n.state.shared.items()}

    def exchange(self, n: RoundParts, before: Values | None, t: Timings) -> Outcome:
        assert before is not None
        for comp, x in n.state.shared.items():
            ps = self.ps[comp]
            ps.absorb((x - before[comp]) * ps.w, 0.0)  # local progress moves the estimate
        if n.state.sends_this_round:
            self._push(n)
        t.lap("send")
        end = time.monotonic() + n.state.config.gossip.push_interval_s
        while n.state.stop_reason is None and time.monotonic() < end:
            n.poll(max(1, int((end - time.monotonic()) * 1000)))
        t.lap("wait")
        for comp, x in n.state.shared.items():
            x[...] = self.ps[comp].estimate()
        heard = sorted(p.id for p in n.state.peers.values() if n.state.round in p.heard.values())
        return heard, float("nan")

    def _push(self, n: RoundParts) -> None:
        live = [p for p in n.state.peers.values() if p.live]
        outgoing: dict[str, tuple[np.ndarray, float]] = {}
        for comp, ps in self.ps.items():
            if comp not in n.state.retired:
                outgoing[comp] = ps.split(sum(comp in p.components for p in live))
        for peer in live:
            comps = [c for c in peer.components if c in outgoing]
            if not comps:
                continue
            for c in comps:
                share, share_w = outgoing[c]
                if c in peer.push_sent:
                    peer.push_sent[c] += share
                else:
                    peer.push_sent[c] = share.copy()
                peer.push_sent_w[c] = peer.push_sent_w.get(c, 0.0) + share_w
            tensors = {c: peer.push_sent[c].copy() for c in comps}
            body = {"weights": {c: peer.push_sent_w[c] for c in comps}}
            n.link.send(peer, protocol.MsgType.PUSH, body, tensors=tensors)

    def on_push(self, n: RoundParts, peer: Peer, msg: protocol.Message) -> None:
        """Push-sum running sums: absorb what they grew by since the last one from this peer."""
        weights = msg.body.get("weights", {})
        for name, total in msg.tensors.items():
            if (
                name not in self.ps
                or name not in peer.components
                or total.shape != n.state.shared[name].shape
            ):
                continue
            total_w = float(weights.get(name, 0.0))
            seen = peer.replicas.get(name)
            seen_w = peer.push_recv_w.get(name, 0.0)
            if total_w < seen_w:
                continue  # an older total (cannot happen on one link; ignore it if it does)
            self.ps[name].absorb(total - seen if seen is not None else total, total_w - seen_w)
            peer.replicas[name] = np.array(total, dtype=np.float64)
            peer.push_recv_w[name] = total_w
            peer.heard[name] = msg.round


def make_schedule(node_id: str, gossip_mode: str, overlap: bool, time_varying: bool) -> Schedule:
    """The schedule a node's settings ask for. Settings that cannot be honoured together are
    refused with an error naming the node, the settings and the schedule."""
    if gossip_mode == "local":
        if overlap:
            raise ValueError(
                f'node "{node_id}": gossip.overlap = true has no meaning with the local-only '
                'schedule (gossip.mode = "local"), which exchanges nothing'
            )
        return LocalOnly()
    if gossip_mode == "push-sum":
        if overlap:
            raise ValueError(
                f'node "{node_id}": gossip.overlap = true has no meaning with the push-sum '
                'schedule (gossip.mode = "push-sum"), whose ticks never wait for a round'
            )
        if time_varying:
            raise ValueError(
                f'node "{node_id}": the push-sum schedule runs on the static graph; this '
                "topology has a [dynamics] table (drop one of them)"
            )
        return PushSumTicks()
    if time_varying:
        if overlap:
            raise ValueError(
                f'node "{node_id}": gossip.overlap = true has no meaning with the time-varying '
                "schedule of this topology's [dynamics] table (links change every round)"
            )
        return TimeVarying()
    return Overlapped() if overlap else Lockstep()

"""Inbound messages: decode, authenticate against the link, check session and sequence, and one
handler per message type. Nothing a peer sends can raise out of here: a malformed or unexpected
message is logged with its reason and dropped."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from m3tgossip import protocol
from m3tgossip.daemon.exchange import Exchange
from m3tgossip.daemon.forget import Erasures
from m3tgossip.daemon.link import Link
from m3tgossip.daemon.peers import Peer
from m3tgossip.daemon.rounds import RoundCollector
from m3tgossip.daemon.state import NodeState
from m3tgossip.errors import ProtocolError
from m3tgossip.log import get_logger

log = get_logger(__name__)

MsgType = protocol.MsgType


class Handlers:
    """Dispatches what the transport delivers to the node's state."""

    def __init__(
        self,
        state: NodeState,
        link: Link,
        exchange: Exchange,
        rounds: RoundCollector,
        on_push: Callable[[Peer, protocol.Message], None],
        status: Callable[[], dict[str, Any]],
        erasures: Erasures,
    ) -> None:
        self.state = state
        self.link = link
        self.exchange = exchange
        self.rounds = rounds
        self.status = status
        self.erasures = erasures
        #: neighbours whose hello this node could not answer: its link to them was down
        self.owed: set[str] = set()
        self._by_type: dict[MsgType, Callable[[Peer, protocol.Message], None]] = {
            MsgType.HELLO: self.on_hello,
            MsgType.DELTA: self.on_update,
            MsgType.STATE: self.on_update,
            MsgType.RESYNC: self.on_resync,
            MsgType.HEARTBEAT: self.on_heartbeat,
            MsgType.LEAVE: self.on_leave,
            MsgType.PUSH: on_push,
            MsgType.RETIRE: self.on_retire,
            MsgType.FORGET: erasures.on_forget,
        }

    def poll(self, timeout_ms: int) -> None:
        for routing_id, frames, user in self.link.transport.poll(timeout_ms):
            self.handle(routing_id, frames, user)
        if self.owed:
            # answer once the link is up (every poll where the transport does not tell)
            links = getattr(self.link.transport, "link_state", None)
            for pid in sorted(self.owed):
                peer = self.state.peers[pid]
                if links is not None and links.get(pid) != "up" and not peer.left:
                    continue
                if peer.left or self.exchange.hello(peer, answer=True):
                    self.owed.discard(pid)

    def _drop(self, why: str, *args: Any) -> None:
        self.link.rejected += 1
        log.warning("%s: dropped " + why, self.state.id, *args)

    def handle(self, routing_id: bytes, frames: list[Any], user: str | None = None) -> None:
        """Decode, authenticate against the routing id and the link's key (`user`, the node id
        ZAP gave the connection; None on plaintext), check session and sequence, dispatch."""
        node = self.state
        who = routing_id.decode("utf-8", "replace")
        try:
            msg = protocol.decode(frames)
        except ProtocolError as exc:
            self._drop("message from routing id %s: %s", routing_id[:64].hex(), exc)
            return
        if msg.type is MsgType.STATUS_REQUEST:
            self.link.reply(routing_id, MsgType.STATUS, {"state": self.status()})
            return
        if msg.type is MsgType.FORGET_REQUEST:
            self.erasures.on_request(routing_id, msg, user)
            return
        if msg.sender != who:
            self._drop(
                "%s: header says sender %r, link is routing id %s",
                msg.type.value,
                msg.sender,
                routing_id[:64].hex(),
            )
            return
        if user is not None and msg.sender != user:
            self._drop(
                "%s: header says sender %r, link authenticated the key of %r",
                msg.type.value,
                msg.sender,
                user,
            )
            return
        peer = node.peers.get(msg.sender)
        if peer is None:
            self._drop("%s from %r: not a neighbour in the topology", msg.type.value, msg.sender)
            return
        if self.erasures.blocks(peer, msg):
            log.debug("%s: %s from %s: erased or behind its erasure", node.id, msg.type, peer.id)
            return
        size = protocol.frames_nbytes(frames)
        peer.bytes_in += size
        self.link.bytes_in += size
        if msg.session != peer.session:
            if peer.session is not None:
                log.info("%s: %s restarted (new session %s)", node.id, peer.id, msg.session[:8])
            peer.reset(msg.session)
            # A new incarnation needs our session and round; a hello gets its answer below.
            if msg.type is not MsgType.HELLO:
                self.exchange.hello(peer)
        elif msg.seq <= peer.last_seq:
            self._drop(
                "%s from %s: sequence %d not after %d (replay or duplicate)",
                msg.type.value,
                peer.id,
                msg.seq,
                peer.last_seq,
            )
            return
        peer.last_seq = msg.seq
        peer.last_heard = time.monotonic()
        peer.missed = 0
        handler = self._by_type.get(msg.type)
        if handler is None:
            log.warning(
                "%s: dropped %s from %s: not expected by a node", node.id, msg.type.value, peer.id
            )
            return
        handler(peer, msg)

    def on_hello(self, peer: Peer, msg: protocol.Message) -> None:
        """A neighbour (re)started or answers ours: check its model, note its round, answer."""
        node = self.state
        answer = bool(msg.body.get("answer", False))
        if msg.body["model"] != node.model_id:
            if peer.model_ok:
                log.error(
                    "%s: rejecting neighbour %s: it runs model %r, this node runs %r",
                    node.id,
                    peer.id,
                    msg.body["model"],
                    node.model_id,
                )
            peer.model_ok = False
            if not answer:
                # the neighbour learns this node's model from the answer and stops too, even
                # if its own hellos to this node were lost
                self.exchange.hello(peer, answer=True)
            return
        peer.model_ok = True
        peer.round = max(peer.round, msg.round)
        peer.sends_states = bool(msg.body.get("states", False))
        self.exchange.match_origin(peer, msg.body.get("origin", {}))
        if answer:
            peer.answered = True
        elif self.exchange.hello(peer, answer=True):
            self.owed.discard(peer.id)
        else:
            # the neighbour is up but our link to it is not (yet): dial it now rather than at
            # the link's next reconnect, and answer as soon as the link takes it (`poll`)
            self.owed.add(peer.id)
            redial = getattr(self.link.transport, "redial", None)
            if redial is not None:
                redial(peer.id)

    def on_update(self, peer: Peer, msg: protocol.Message) -> None:
        """`delta` or `state` for round `msg.round`: apply now, or hold until we get there."""
        peer.round = max(peer.round, msg.round)
        if peer.model_ok:
            self.rounds.receive(peer, msg)

    def on_resync(self, peer: Peer, msg: protocol.Message) -> None:
        """The neighbour lost our replica of some components: send them as full state, at once
        while this node is collecting a round (its replica is then this round's), else next."""
        peer.need_state |= set(msg.body["components"]) & set(peer.components)
        if self.rounds.collecting and peer.need_state:
            self.exchange.send_state(peer, sorted(peer.need_state))

    def on_heartbeat(self, peer: Peer, msg: protocol.Message) -> None:
        peer.round = max(peer.round, msg.round)

    def on_leave(self, peer: Peer, msg: protocol.Message) -> None:
        """The neighbour stops: stop waiting for it. What it sent for the round being mixed
        stays and is mixed, as the neighbour mixed this node's; a new session of it starts
        over from full state."""
        log.info("%s: neighbour %s left (%s)", self.state.id, peer.id, msg.body["reason"])
        peer.left = True
        peer.finished = msg.body["reason"] == "finished"
        peer.pending.clear()
        self._end_with_neighbours()

    def _end_with_neighbours(self) -> None:
        """A node declared slow (`speed` below 1) in a run with a fixed number of rounds
        finishes once every neighbour it shares with has finished its rounds: it runs behind
        them by design, and its remaining rounds would train on its own records alone, drifting
        from the federation's model it has now. (A node of low bandwidth alone trains at full
        speed and keeps its pace.)"""
        node = self.state
        spec = node.spec
        if node.stop_reason is not None or node.finish_after is not None or node.config.rounds <= 0:
            return
        if spec.speed >= 1.0:
            return
        sharing = [p for p in node.peers.values() if p.components]
        if sharing and all(p.left and p.finished for p in sharing):
            # one more round mixes the values they sent last
            node.finish_after = min(node.round + 2, node.config.rounds)
            log.info(
                "%s: every neighbour finished its rounds; finishing after round %d of %d",
                node.id,
                node.finish_after,
                node.config.rounds,
            )

    def on_retire(self, peer: Peer, msg: protocol.Message) -> None:
        """The neighbour stops sharing some components (privacy budget spent): stop expecting
        them from it and mix them without it from now on."""
        gone = set(msg.body["components"])
        log.info(
            "%s: %s no longer shares %s (%s)",
            self.state.id,
            peer.id,
            ", ".join(sorted(gone)),
            msg.body["reason"],
        )
        peer.components = tuple(c for c in peer.components if c not in gone)
        for comp in gone:
            peer.replicas.pop(comp, None)
            peer.versions.pop(comp, None)

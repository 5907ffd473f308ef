"""The node's side of its links: one session, increasing sequence numbers, byte counters, and
the transport it was given (ZeroMQ in a daemon, an in-process fake in tests)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from m3tgossip import protocol
from m3tgossip.daemon.peers import Peer


class TransportLike(Protocol):
    """What a node needs of a transport (`m3tgossip.net.Transport` and the test fakes)."""

    endpoint: str

    def send(self, peer: str, frames: Sequence[bytes | memoryview]) -> bool: ...

    def reply(self, routing_id: bytes, frames: Sequence[bytes | memoryview]) -> bool: ...

    def poll(self, timeout_ms: int) -> list[Any]: ...

    def close(self, linger_ms: int | None = None) -> None: ...


class Link:
    """Builds and sends this node's messages; every message carries the node's current round."""

    def __init__(self, node_id: str, transport: TransportLike, round_of: Callable[[], int]):
        self.node_id = node_id
        self.transport = transport
        self.session = protocol.new_session()
        self.seq = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.rejected = 0
        self._round_of = round_of

    def message(self, type_: protocol.MsgType, body: dict[str, Any], **kw: Any) -> protocol.Message:
        self.seq += 1
        return protocol.Message(
            type=type_,
            sender=self.node_id,
            session=self.session,
            seq=self.seq,
            round=self._round_of(),
            body=body,
            **kw,
        )

    def send(self, peer: Peer, type_: protocol.MsgType, body: dict[str, Any], **kw: Any) -> bool:
        """Encode and send one message to `peer`; False (and counted) if the transport refused."""
        frames = protocol.encode(self.message(type_, body, **kw))
        ok = self.transport.send(peer.id, frames)
        if ok:
            n = protocol.frames_nbytes(frames)
            peer.bytes_out += n
            self.bytes_out += n
        else:
            peer.dropped_out += 1
        return ok

    def heartbeat(self, peers: Sequence[Peer]) -> None:
        for peer in peers:
            self.send(peer, protocol.MsgType.HEARTBEAT, {"round": self._round_of()})

    def reply(self, routing_id: bytes, type_: protocol.MsgType, body: dict[str, Any]) -> None:
        self.transport.reply(routing_id, protocol.encode(self.message(type_, body)))

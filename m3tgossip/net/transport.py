"""ZeroMQ sockets of one node: a ROUTER it binds, one DEALER per neighbour it connects.

The transport knows frames and peers, nothing about models or message meaning. Every socket
option (linger, high-water marks, maximum message size, reconnect intervals, ZMTP heartbeats)
is set here, by `router_options` and `dealer_options`, from the named fields of
`TransportConfig`. Sends never block: a full queue or an unreachable peer makes `send` return
False and the caller counts a drop. Exactly one thread (the daemon loop) may call into a
`Transport`.

Security is a seam: `Security.server(socket)` and `Security.client(socket, peer)` configure
sockets before bind/connect. `Plaintext` lives here; CURVE with a ZAP allow-list is
`security.Curve`. When the policy authenticates (`uses_zap`), this transport binds the ZAP
handler socket (`inproc://zeromq.zap.01`, in its own context) and answers ZAP requests in
`poll`, from the same loop that owns the other sockets: no background thread. The policy
decides (`Security.zap(request) -> reply`); the transport only moves the frames. Each received
message carries the user id that ZAP gave its connection, so the daemon can check that a
header's `sender` is the peer whose key the link authenticated.
"""

from __future__ import annotations

import ipaddress
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol
from urllib.parse import urlsplit

import zmq

from m3tgossip.log import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class TransportConfig:
    """Socket options. Times are milliseconds unless the name says otherwise."""

    #: messages queued per outgoing DEALER before sends are refused (drop, never block)
    send_hwm: int = 64
    #: messages queued on the ROUTER before ZeroMQ stops reading from peers
    recv_hwm: int = 4096
    #: how long close() may flush queued messages (LEAVE, last deltas) before giving up
    linger_ms: int = 2000
    #: largest message accepted from a peer; larger ones close that connection
    max_message_bytes: int = 1 << 30
    #: first and largest interval between reconnect attempts to a neighbour (short: a daemon
    #: whose neighbours come up after it reaches them within this of their bind)
    reconnect_ms: int = 20
    reconnect_max_ms: int = 200
    #: ZMTP heartbeat: ping interval and time without traffic before a connection is dropped
    zmtp_heartbeat_ms: int = 1000
    zmtp_timeout_ms: int = 5000
    #: time allowed for a connection's handshake
    handshake_ms: int = 5000

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"transport.{name}: must be a non-negative integer, got {value!r}")


#: where libzmq sends ZAP requests (RFC 27); one handler per context
ZAP_ENDPOINT = "inproc://zeromq.zap.01"


class Security(Protocol):
    """Configures sockets before bind/connect (plaintext, CURVE, ...)."""

    #: True if the server socket asks ZAP about every connection (then `zap` answers)
    uses_zap: bool

    def server(self, socket: zmq.Socket) -> None: ...

    def client(self, socket: zmq.Socket, peer: str) -> None: ...

    def zap(self, request: Sequence[bytes]) -> list[bytes]: ...

    def close(self) -> None: ...


class Incoming(NamedTuple):
    """One received message: who sent it and how the link authenticated them."""

    routing_id: bytes
    frames: list[zmq.Frame]
    #: user id ZAP gave the connection (the node id of its CURVE key); None on plaintext
    user_id: str | None


class Plaintext:
    """No encryption or authentication. Safe only on loopback or an isolated test network."""

    uses_zap = False

    def zap(self, request: Sequence[bytes]) -> list[bytes]:
        return [b"1.0", request[1] if len(request) > 1 else b"", b"400", b"no ZAP policy", b"", b""]

    def server(self, socket: zmq.Socket) -> None:
        pass

    def client(self, socket: zmq.Socket, peer: str) -> None:
        pass

    def close(self) -> None:
        pass


def is_loopback(endpoint: str) -> bool:
    """True for tcp endpoints on 127.0.0.0/8, ::1 or localhost, and for ipc/inproc."""
    parts = urlsplit(endpoint)
    if parts.scheme in ("ipc", "inproc"):
        return True
    host = parts.hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: frame bytes after which `Transport.poll` stops collecting messages
POLL_MAX_BYTES = 1 << 20
#: a DEALER's connection as its monitor tells it: dialling (connect in progress), connecting
#: (TCP up, ZMTP/CURVE handshake under way), up, or waiting (to retry after a refusal or a
#: disconnect)
LINK_STATES = {
    zmq.EVENT_CONNECT_DELAYED: "dialling",
    zmq.EVENT_CONNECTED: "connecting",
    zmq.EVENT_HANDSHAKE_SUCCEEDED: "up",
    zmq.EVENT_CONNECT_RETRIED: "waiting",
    zmq.EVENT_DISCONNECTED: "waiting",
}
#: the monitor events a DEALER reports
MONITORED = sum(LINK_STATES)


def monitor_event(frames: Sequence[bytes]) -> int:
    """The event of a ZeroMQ monitor message: a 16-bit event id and a 32-bit value in the first
    frame, the endpoint in the second (pyzmq's `zmq.utils.monitor` reads the same, but imports
    asyncio, whose memory a daemon would hold for nothing)."""
    if len(frames) != 2 or len(frames[0]) != 6:
        raise ValueError(f"not a monitor event message: {len(frames)} frames")
    event, _value = struct.unpack("=HI", frames[0])
    return int(event)


def _common_options(sock: zmq.Socket, cfg: TransportConfig) -> None:
    sock.setsockopt(zmq.LINGER, cfg.linger_ms)
    sock.setsockopt(zmq.MAXMSGSIZE, cfg.max_message_bytes)
    sock.setsockopt(zmq.RECONNECT_IVL, cfg.reconnect_ms)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, cfg.reconnect_max_ms)
    sock.setsockopt(zmq.HEARTBEAT_IVL, cfg.zmtp_heartbeat_ms)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, cfg.zmtp_timeout_ms)
    sock.setsockopt(zmq.HANDSHAKE_IVL, cfg.handshake_ms)


def router_options(sock: zmq.Socket, cfg: TransportConfig) -> None:
    """Every option of a node's ROUTER (security aside), before it binds."""
    _common_options(sock, cfg)
    # Unroutable replies raise EHOSTUNREACH instead of vanishing.
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.RCVHWM, cfg.recv_hwm)
    sock.setsockopt(zmq.SNDHWM, cfg.send_hwm)


def dealer_options(sock: zmq.Socket, cfg: TransportConfig, node_id: str) -> None:
    """Every option of a DEALER towards a neighbour (security aside), before it connects."""
    _common_options(sock, cfg)
    sock.setsockopt(zmq.SNDHWM, cfg.send_hwm)
    sock.setsockopt(zmq.RCVHWM, 16)
    # Queue only on completed connections: a dead neighbour refuses sends at once
    # instead of stacking stale deltas that would arrive rounds later.
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.ROUTING_ID, node_id.encode())


class Transport:
    """One node's sockets. Not thread-safe: the daemon loop owns it."""

    def __init__(
        self,
        node_id: str,
        bind: str,
        neighbours: dict[str, str],
        config: TransportConfig | None = None,
        security: Security | None = None,
    ) -> None:
        self.node_id = node_id
        self.config = config or TransportConfig()
        self.security: Security = security or Plaintext()
        self.context = zmq.Context(io_threads=1)
        self.context.setsockopt(zmq.MAX_SOCKETS, 4096)
        self.zap: zmq.Socket | None = None
        if self.security.uses_zap:
            # Bound before the ROUTER exists, so no handshake ever finds no handler.
            self.zap = self.context.socket(zmq.REP)
            self.zap.setsockopt(zmq.LINGER, 0)
            self.zap.bind(ZAP_ENDPOINT)
        self.router = self.context.socket(zmq.ROUTER)
        router_options(self.router, self.config)
        self.security.server(self.router)
        try:
            self.router.bind(bind)
        except zmq.ZMQError as exc:
            self.context.destroy(linger=0)
            raise OSError(f"node {node_id}: cannot bind {bind}: {exc}") from exc
        self.endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.dealers: dict[str, zmq.Socket] = {}
        self.endpoints = dict(neighbours)
        #: per neighbour, the DEALER's monitor and what it last said about the connection
        self._monitors: dict[zmq.Socket, str] = {}
        self.link_state: dict[str, str] = {}
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        if self.zap is not None:
            self.poller.register(self.zap, zmq.POLLIN)
        for peer, endpoint in neighbours.items():
            self.connect(peer, endpoint)

    def connect(self, peer: str, endpoint: str) -> None:
        """Open the DEALER towards `peer`; its routing id is this node's id."""
        sock = self.context.socket(zmq.DEALER)
        dealer_options(sock, self.config, self.node_id)
        self.security.client(sock, peer)
        monitor = sock.get_monitor_socket(MONITORED)
        self._monitors[monitor] = peer
        self.poller.register(monitor, zmq.POLLIN)
        self.link_state[peer] = "dialling"
        sock.connect(endpoint)
        self.dealers[peer] = sock

    def redial(self, peer: str) -> bool:
        """Connect the DEALER towards `peer` now if it is waiting to retry (its neighbour was
        not listening at the last try): for a neighbour just heard from, instead of at the
        link's next reconnect interval. A link that is up, or connecting, is left alone (a
        redial would abort its handshake). True if it redialled."""
        sock, endpoint = self.dealers.get(peer), self.endpoints.get(peer)
        if sock is None or endpoint is None or self.link_state.get(peer) != "waiting":
            return False
        self.link_state[peer] = "dialling"
        try:
            sock.disconnect(endpoint)
        except zmq.ZMQError:
            pass  # no connection to drop: connect all the same
        sock.connect(endpoint)
        return True

    def _read_monitor(self, monitor: zmq.Socket) -> bool:
        """Note what the monitor of a DEALER says about its connection (`link_state`); True
        if the link came up."""
        peer = self._monitors[monitor]
        came_up = False
        while True:
            try:
                event = monitor_event(monitor.recv_multipart(flags=zmq.NOBLOCK))
            except zmq.Again:
                return came_up
            self.link_state[peer] = LINK_STATES.get(event, self.link_state[peer])
            came_up |= event == zmq.EVENT_HANDSHAKE_SUCCEEDED

    def send(self, peer: str, frames: Sequence[bytes | memoryview]) -> bool:
        """Queue a message to a neighbour without blocking. False if it was refused.

        Frames are sent without copying: the caller must not modify their buffers afterwards.
        """
        sock = self.dealers.get(peer)
        if sock is None:
            return False
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            log.warning("send to %s failed: %s", peer, exc)
            return False
        return True

    def reply(self, routing_id: bytes, frames: Sequence[bytes | memoryview]) -> bool:
        """Answer whoever sent `routing_id` over the ROUTER (status queries)."""
        try:
            self.router.send_multipart([routing_id, *frames], flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:  # EHOSTUNREACH under ROUTER_MANDATORY
            log.warning("reply to %r failed: %s", routing_id[:64], exc)
            return False
        return True

    def poll(
        self, timeout_ms: int, max_messages: int = 256, max_bytes: int = POLL_MAX_BYTES
    ) -> list[Incoming]:
        """Wait up to `timeout_ms` for messages, answering ZAP requests meanwhile.

        Returns early when one of the DEALERs' links comes up (see `link_state`).
        Returns (routing id, frames, authenticated user id) triples; frames are not copied.
        Collects at most `max_messages` messages and stops once their frames hold `max_bytes`
        (one message however large): every returned frame keeps its libzmq buffer alive until
        the caller drops it, so the rest stay queued in libzmq for the next call.
        """
        out: list[Incoming] = []
        deadline = time.monotonic() + max(0, timeout_ms) / 1000
        while True:
            remaining = max(0, int((deadline - time.monotonic()) * 1000))
            events = dict(self.poller.poll(remaining))
            if self.zap is not None and self.zap in events:
                self._answer_zap()
            came_up = False
            for sock in events:
                if sock in self._monitors:
                    came_up |= self._read_monitor(sock)
            # a link that came up ends the wait too: the caller may have a message for it
            if self.router in events or remaining == 0 or came_up:
                break
        authenticated = self.zap is not None
        collected = 0
        while len(out) < max_messages and collected < max_bytes:
            try:
                parts = self.router.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            collected += sum(len(frame) for frame in parts)
            user = None
            if authenticated and len(parts) > 1:
                try:
                    value = parts[1].get("User-Id")
                except zmq.ZMQError:
                    value = None
                # an authenticated link always has one; "" matches no sender
                user = value if isinstance(value, str) else ""
            out.append(Incoming(parts[0].bytes, parts[1:], user))
        return out

    def _answer_zap(self) -> None:
        """Answer every queued ZAP request (REP: one reply per request, in order)."""
        assert self.zap is not None
        while True:
            try:
                request = self.zap.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = self.security.zap(request)
            except Exception as exc:  # noqa: BLE001 - a policy bug must refuse, not kill the loop
                log.error("ZAP policy failed, refusing the connection: %s", exc)
                reply = [
                    b"1.0",
                    request[1] if len(request) > 1 else b"",
                    b"500",
                    b"policy error",
                    b"",
                    b"",
                ]
            self.zap.send_multipart(reply)

    def peers(self) -> Iterable[str]:
        return self.dealers.keys()

    def close(self, linger_ms: int | None = None) -> None:
        """Close every socket, flushing queued messages for up to `linger_ms`."""
        linger = self.config.linger_ms if linger_ms is None else linger_ms
        for sock in self.dealers.values():
            sock.disable_monitor()
        for monitor in self._monitors:
            monitor.close(linger=0)
        for sock in self.dealers.values():
            sock.close(linger=linger)
        self.router.close(linger=0)
        if self.zap is not None:
            self.zap.close(linger=0)
        self.security.close()
        self.context.term()

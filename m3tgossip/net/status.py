"""`m3tgossip status ENDPOINT`: ask a running node for its state over its ROUTER socket.

A node on CURVE (the default) answers only a client whose key it allows: an operator keypair
whose public key is listed in the node's `status_keys` file. The client must know the node's
public key (from the topology spec or given explicitly).
"""

from __future__ import annotations

from typing import Any, cast

import zmq

from m3tgossip import protocol
from m3tgossip.errors import ProtocolError
from m3tgossip.net.security import Keypair

STATUS_CLIENT_ID = "status"


def query_status(
    endpoint: str,
    timeout_s: float = 3.0,
    key: Keypair | None = None,
    server_key: str | None = None,
) -> dict[str, Any]:
    """Send one `status_request` and return the node's `status` document.

    With `key` (the operator's keypair) and `server_key` (the node's public key, Z85) the query
    runs over CURVE; without them in plaintext, which only an `insecure` node answers.
    Raises TimeoutError if the node does not answer within `timeout_s`.
    """
    reply = ask(
        endpoint,
        protocol.MsgType.STATUS_REQUEST,
        {},
        protocol.MsgType.STATUS,
        timeout_s=timeout_s,
        key=key,
        server_key=server_key,
    )
    return dict(cast(protocol.StatusBody, reply.body)["state"])


def request_forget(
    endpoint: str,
    target: str,
    ids: list[str],
    mode: str,
    timeout_s: float = 30.0,
    key: Keypair | None = None,
    server_key: str | None = None,
) -> dict[str, Any]:
    """Send one `forget_request` (`m3tgossip forget`) and return the node's `forget_reply`
    body: {"accepted", "request", "reason"}."""
    reply = ask(
        endpoint,
        protocol.MsgType.FORGET_REQUEST,
        {"target": target, "ids": list(ids), "mode": mode},
        protocol.MsgType.FORGET_REPLY,
        timeout_s=timeout_s,
        key=key,
        server_key=server_key,
    )
    return dict(reply.body)


def ask(
    endpoint: str,
    kind: protocol.MsgType,
    body: dict[str, Any],
    expect: protocol.MsgType,
    timeout_s: float = 3.0,
    key: Keypair | None = None,
    server_key: str | None = None,
) -> protocol.Message:
    """One request of an operator client on an anonymous DEALER, and the node's answer."""
    if (key is None) != (server_key is None):
        raise ValueError(
            "a CURVE status query needs both the operator key and the node's public key"
        )
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if key is not None and server_key is not None:
        sock.curve_serverkey = server_key.encode("ascii")
        sock.curve_publickey = key.public.encode("ascii")
        sock.curve_secretkey = key.secret.encode("ascii")
    sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
    sock.setsockopt(zmq.MAXMSGSIZE, 16 << 20)
    try:
        sock.connect(endpoint)
        request = protocol.Message(
            type=kind,
            sender=STATUS_CLIENT_ID,
            session=protocol.new_session(),
            seq=1,
            round=0,
            body=cast(protocol.Body, body),
        )
        sock.send_multipart(protocol.encode(request))
        try:
            frames = sock.recv_multipart()
        except zmq.Again:
            hint = (
                " (is the operator key listed in the node's status keys, and the node key right?)"
                if key is not None
                else " (a node on CURVE does not answer a plaintext query; pass its keys)"
            )
            raise TimeoutError(f"no answer from {endpoint} within {timeout_s:g} s{hint}") from None
        try:
            reply = protocol.decode(frames)
        except ProtocolError as exc:
            raise RuntimeError(f"bad answer from {endpoint}: {exc}") from exc
        if reply.type is not expect:
            raise RuntimeError(
                f"bad answer from {endpoint}: {reply.type.value} instead of {expect.value}"
            )
        return reply
    finally:
        sock.close()

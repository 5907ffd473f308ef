"""`m3tgossip status ENDPOINT`: ask a running node for its state over its ROUTER socket."""

from __future__ import annotations

from typing import Any

import zmq

from m3tgossip import wire
from m3tgossip.errors import ProtocolError

STATUS_CLIENT_ID = "status"


def query_status(endpoint: str, timeout_s: float = 3.0) -> dict[str, Any]:
    """Send one `status_request` and return the node's `status` document.

    Raises TimeoutError if the node does not answer within `timeout_s`.
    """
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
    sock.setsockopt(zmq.MAXMSGSIZE, 16 << 20)
    try:
        sock.connect(endpoint)
        request = wire.Message(
            type=wire.MsgType.STATUS_REQUEST,
            sender=STATUS_CLIENT_ID,
            session=wire.new_session(),
            seq=1,
            round=0,
            body={},
        )
        sock.send_multipart(wire.encode(request))
        try:
            frames = sock.recv_multipart()
        except zmq.Again:
            raise TimeoutError(f"no answer from {endpoint} within {timeout_s:g} s") from None
        try:
            reply = wire.decode(frames)
        except ProtocolError as exc:
            raise RuntimeError(f"bad answer from {endpoint}: {exc}") from exc
        if reply.type is not wire.MsgType.STATUS:
            raise RuntimeError(f"bad answer from {endpoint}: {reply.type.value} instead of status")
        return dict(reply.body["state"])
    finally:
        sock.close()

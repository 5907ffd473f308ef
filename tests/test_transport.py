"""Transport batching: `poll` bounds what it hands out by message count and by frame bytes."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import zmq

from m3tgossip.net import (
    POLL_MAX_BYTES,
    Transport,
    TransportConfig,
    dealer_options,
    router_options,
)


@pytest.fixture
def pair() -> Iterator[tuple[Transport, Transport]]:
    server = Transport("srv", "tcp://127.0.0.1:0", {}, TransportConfig(linger_ms=0))
    client = Transport(
        "cli", "tcp://127.0.0.1:0", {"srv": server.endpoint}, TransportConfig(linger_ms=0)
    )
    try:
        yield server, client
    finally:
        client.close(0)
        server.close(0)


def _send_all(client: Transport, messages: list[list[bytes]]) -> None:
    deadline = time.monotonic() + 10
    for frames in messages:
        while not client.send("srv", frames):  # refused until the connection is up
            assert time.monotonic() < deadline, "the client never connected"
            time.sleep(0.005)


def _batches(server: Transport, count: int, **limits: int) -> list[list[int]]:
    """Frame bytes of each message, per `poll` call, until `count` messages arrived."""
    batches: list[list[int]] = []
    deadline = time.monotonic() + 10
    while sum(map(len, batches)) < count:
        assert time.monotonic() < deadline, "messages did not arrive"
        got = server.poll(50, **limits)
        if got:
            assert all(item.routing_id == b"cli" and item.user_id is None for item in got)
            batches.append(
                [len(item.routing_id) + sum(len(f) for f in item.frames) for item in got]
            )
    return batches


def test_poll_stops_at_max_bytes_but_returns_one_large_message(
    pair: tuple[Transport, Transport],
) -> None:
    server, client = pair
    big = [b"h", bytes(POLL_MAX_BYTES // 3)]
    _send_all(client, [big] * 7)
    time.sleep(0.3)  # let every message reach the server's queue
    batches = _batches(server, 7)
    for sizes in batches:
        assert sum(sizes[:-1]) < POLL_MAX_BYTES  # stopped as soon as the bound was reached
    assert max(map(len, batches)) == 3  # three thirds reach the bound
    _send_all(client, [[b"h", bytes(3 * POLL_MAX_BYTES)]] * 2)
    assert _batches(server, 2) == [[3 * POLL_MAX_BYTES + 4]] * 2


def test_poll_batches_small_messages_up_to_max_messages(pair: tuple[Transport, Transport]) -> None:
    server, client = pair
    _send_all(client, [[b"h", b"x" * 100]] * 50)
    time.sleep(0.3)
    batches = _batches(server, 50, max_messages=20)
    assert max(map(len, batches)) == 20
    _send_all(client, [[b"h", b"x" * 100]] * 5)
    time.sleep(0.3)
    assert _batches(server, 5, max_bytes=1) == [[104]] * 5


def test_socket_options_are_shared_with_other_sockets() -> None:
    cfg = TransportConfig(send_hwm=7, recv_hwm=9)
    ctx = zmq.Context()
    try:
        router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        router_options(router, cfg)
        dealer_options(dealer, cfg, "me")
        assert (router.getsockopt(zmq.RCVHWM), router.getsockopt(zmq.SNDHWM)) == (9, 7)
        assert dealer.getsockopt(zmq.SNDHWM) == 7 and dealer.getsockopt(zmq.IMMEDIATE) == 1
        assert dealer.getsockopt(zmq.ROUTING_ID) == b"me"
        assert (
            router.getsockopt(zmq.MAXMSGSIZE)
            == dealer.getsockopt(zmq.MAXMSGSIZE)
            == cfg.max_message_bytes
        )
        router.close(0)
        dealer.close(0)
    finally:
        ctx.term()

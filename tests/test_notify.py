"""The service manager's notify protocol: READY=1, WATCHDOG=1 and STOPPING=1 datagrams on a
socket of the test's own, from the notifier alone and from real daemons."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import WAIT_S, read_ready

from m3tgossip.daemon.notify import Notifier, socket_address
from m3tgossip.harness.testbed import free_ports
from m3tgossip.net import generate_keys
from m3tgossip.topology import load_topology

PAIR = 'name = "pair"\nedges = [["a", "b"]]\n[[nodes]]\nid = "a"\n[[nodes]]\nid = "b"\n'


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A unix datagram socket bound to a path, and the NOTIFY_SOCKET value naming it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(WAIT_S)
    try:
        yield sock, str(path)
    finally:
        sock.close()


def receive(sock: socket.socket, want: str, timeout: float = WAIT_S) -> list[str]:
    """Messages received (in order) until one has the field `want`; bounded."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            message = sock.recv(4096).decode()
        except TimeoutError:
            break
        seen.append(message)
        if want in message.split("\n"):
            return seen
    raise AssertionError(f"no {want} within {timeout} s; received {seen}")


def test_addresses_of_notify_socket_values() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@abstract/name") == "\0abstract/name"
    assert socket_address("vsock:2:1234") is None


def test_nothing_is_sent_without_a_socket() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.active and not notifier.send("READY=1")


def test_ready_watchdog_and_stopping_reach_the_socket(listener) -> None:
    sock, path = listener
    now = [100.0]
    notifier = Notifier(socket_address(path), watchdog_s=4.0, clock=lambda: now[0])
    notifier.ready("listening")
    assert sock.recv(4096) == b"READY=1\nSTATUS=listening"
    notifier.watchdog()  # just after READY: too soon
    now[0] += 0.9
    notifier.watchdog()  # still inside a quarter of the timeout
    now[0] += 0.2
    notifier.watchdog("round 3")
    assert sock.recv(4096) == b"WATCHDOG=1\nSTATUS=round 3"
    now[0] += 0.5
    notifier.watchdog()
    notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1"  # the ping between was rate-limited away
    notifier.close()


def test_abstract_socket_names_work() -> None:
    name = f"m3tgossip-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(WAIT_S)
    try:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": f"@{name}", "WATCHDOG_USEC": "2000000"})
        assert notifier.interval == pytest.approx(0.5)
        notifier.ready()
        notifier.clock = lambda: float("inf")
        notifier.watchdog()
        assert [sock.recv(4096), sock.recv(4096)] == [b"READY=1", b"WATCHDOG=1"]
    finally:
        sock.close()


def test_watchdog_is_for_the_process_systemd_names() -> None:
    other = {"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    assert Notifier.from_env(other).interval is None
    mine = dict(other, WATCHDOG_PID=str(os.getpid()))
    assert Notifier.from_env(mine).interval == pytest.approx(0.25)
    assert Notifier.from_env({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "soon"}).interval is None


def test_a_vanished_socket_is_logged_once_and_ignored(tmp_path: Path) -> None:
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    handler = Keep(level=logging.WARNING)
    logging.getLogger("m3tgossip").addHandler(handler)  # m3tgossip loggers do not propagate
    try:
        notifier = Notifier(str(tmp_path / "gone.sock"), watchdog_s=1.0)
        notifier.ready()
        notifier.stopping()
    finally:
        logging.getLogger("m3tgossip").removeHandler(handler)
    assert not notifier.active
    assert len([r for r in seen if "not notifying any more" in r.getMessage()]) == 1


def two_node_spec(tmp_path: Path) -> Path:
    spec = tmp_path / "spec.toml"
    spec.write_text(PAIR)
    topo = load_topology(spec)
    keys = {n: generate_keys(tmp_path / "keys", n).public for n in topo.ids()}
    resolved = tmp_path / "resolved.toml"
    ports = dict(zip(topo.ids(), free_ports(2), strict=True))
    resolved.write_text(topo.with_ports(ports).with_keys(keys).to_toml())
    return resolved


@pytest.mark.multiprocess
def test_a_daemon_notifies_ready_watchdog_and_stopping(
    tmp_path: Path, children, listener, monkeypatch
) -> None:
    sock, path = listener
    spec = two_node_spec(tmp_path)
    common = ["--topology", str(spec), "--workload", "consensus", "--rounds", "0", "-o", "size=64"]
    common += ["--key-dir", str(tmp_path / "keys"), "--deadline", "1", "--startup-grace", "10"]
    # node a under a service manager with a 2 s watchdog; node b without one
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    a = children.node(*common, "--id", "a", "--state-dir", str(tmp_path / "a"))
    monkeypatch.delenv("NOTIFY_SOCKET")
    monkeypatch.delenv("WATCHDOG_USEC")
    ready = read_ready(a)
    first = receive(sock, "READY=1")
    assert first[-1].startswith("READY=1\nSTATUS=listening on " + ready["endpoint"])
    # waiting for b at start-up, a keeps pinging
    assert receive(sock, "WATCHDOG=1")[-1].startswith("WATCHDOG=1\nSTATUS=round 0")
    b = children.node(*common, "--id", "b", "--state-dir", str(tmp_path / "b"))
    read_ready(b)
    # ... and in its rounds
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        message = receive(sock, "WATCHDOG=1")[-1]
        if int(message.rsplit(" ", 1)[1]) >= 3:
            break
    else:
        raise AssertionError("no watchdog ping from round 3 on")
    a.send_signal(signal.SIGTERM)
    assert receive(sock, "STOPPING=1")[-1].startswith("STOPPING=1\nSTATUS=stopping at round")
    assert a.wait(timeout=WAIT_S) == 0
    b.send_signal(signal.SIGTERM)
    assert b.wait(timeout=WAIT_S) == 0

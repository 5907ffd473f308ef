"""Link security: key files, the ZAP allow-list policy, and CURVE links through the Transport.

Policy tests need no sockets. Socket tests run on 127.0.0.1 only; every wait is bounded, and a
message that must not arrive is awaited for a fixed window, never forever.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from m3tgossip import cli, protocol
from m3tgossip.daemon import startup
from m3tgossip.daemon.config import NodeConfig
from m3tgossip.daemon.node import Node
from m3tgossip.errors import ConfigError
from m3tgossip.net import (
    OPERATOR_PREFIX,
    AllowList,
    Curve,
    Keypair,
    Plaintext,
    Transport,
    TransportConfig,
    for_node,
    generate_keys,
    load_public,
    load_public_keys,
    load_secret,
    zap_reply,
)
from m3tgossip.topology import load_topology

#: bound on waiting for a message that should arrive
ARRIVE_S = 20.0
#: how long a message that must not arrive is given to show up anyway
ABSENT_S = 1.5
MARKER = b"EAVESDROP-MARKER-6b1f"

FAST = TransportConfig(linger_ms=0, reconnect_ms=50, reconnect_max_ms=100, handshake_ms=2000)


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    """Log records of the `m3tgossip` loggers (they do not propagate to pytest's caplog)."""
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    handler = Keep(level=logging.INFO)
    logger = logging.getLogger("m3tgossip")
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)


def messages(records: list[logging.LogRecord]) -> str:
    return "\n".join(r.getMessage() for r in records)


# ----------------------------------------------------------------------------- key files


def test_generate_keys_writes_secret_mode_600_and_refuses_overwrite(tmp_path: Path) -> None:
    pair = generate_keys(tmp_path / "k", "n0")
    secret, public = tmp_path / "k/n0.key_secret", tmp_path / "k/n0.key"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert load_public(public) == pair.public
    assert load_secret(secret) == pair
    assert pair.secret.encode() not in public.read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        generate_keys(tmp_path / "k", "n0")
    assert load_secret(secret) == pair  # untouched by the refusal
    again = generate_keys(tmp_path / "k", "n0", force=True)
    assert again != pair and load_secret(secret) == again
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def test_keys_generate_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "keys")
    assert cli.main(["keys", "generate", "--out", out, "--id", "uni-a", "--id", "ops"]) == 0
    printed = capsys.readouterr().out
    assert load_public(tmp_path / "keys/uni-a.key") in printed
    assert cli.main(["keys", "generate", "--out", out, "--id", "uni-a"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert cli.main(["keys", "generate", "--out", out, "--id", "uni-a", "--force"]) == 0


def test_secret_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    generate_keys(tmp_path, "n0")
    os.chmod(tmp_path / "n0.key_secret", 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_secret(tmp_path / "n0.key_secret")


def test_status_key_file_names_and_keys_starting_with_hash(tmp_path: Path) -> None:
    hashed = "#" + load_public(_public_file(tmp_path))[1:]  # Z85 has '#': still a key
    plain = generate_keys(tmp_path, "other").public
    listing = tmp_path / "operators.keys"
    listing.write_text(f"# operators\n{hashed} alice\n\n{plain}   # no name\n")
    assert load_public_keys(listing) == {hashed: "alice", plain: "operators.keys"}
    assert load_public_keys(tmp_path / "other.key") == {plain: "other"}
    listing.write_text("not-a-key bob\n")
    with pytest.raises(ConfigError, match="line 1"):
        load_public_keys(listing)


def _public_file(tmp_path: Path) -> Path:
    generate_keys(tmp_path, "tmp")
    return tmp_path / "tmp.key"


# ----------------------------------------------------------------------------- policy

A = zmq.curve_keypair()[0].decode()
B = zmq.curve_keypair()[0].decode()
OPS = zmq.curve_keypair()[0].decode()
STRANGER = zmq.curve_keypair()[0].decode()
ALLOW = AllowList.build({"a": A, "b": B}, {OPS: "alice"})


@pytest.mark.parametrize(
    "mechanism, key, ok, user",
    [
        ("CURVE", A, True, "a"),
        ("CURVE", zmq.utils.z85.decode(B.encode()), True, "b"),  # raw 32 bytes, as ZAP sends
        ("CURVE", OPS, True, OPERATOR_PREFIX + "alice"),
        ("CURVE", STRANGER, False, ""),
        ("CURVE", None, False, ""),
        ("CURVE", b"short", False, ""),
        ("NULL", None, False, ""),
        ("PLAIN", A, False, ""),
    ],
)
def test_allow_list_policy(mechanism: str, key: object, ok: bool, user: str) -> None:
    allowed, who, reason = ALLOW.authenticate(mechanism, key)  # type: ignore[arg-type]
    assert (allowed, who) == (ok, user)
    assert reason == "OK" if ok else reason


def test_operator_key_cannot_double_as_a_node_key() -> None:
    with pytest.raises(ValueError, match="also the key of node"):
        AllowList.build({"a": A}, {A: "alice"})


@pytest.mark.parametrize(
    "request_frames, code, user",
    [
        (
            [
                b"1.0",
                b"7",
                b"m3tgossip",
                b"127.0.0.1",
                b"",
                b"CURVE",
                zmq.utils.z85.decode(A.encode()),
            ],
            b"200",
            b"a",
        ),
        (
            [
                b"1.0",
                b"7",
                b"m3tgossip",
                b"127.0.0.1",
                b"",
                b"CURVE",
                zmq.utils.z85.decode(STRANGER.encode()),
            ],
            b"400",
            b"",
        ),
        ([b"1.0", b"7", b"m3tgossip", b"127.0.0.1", b"", b"NULL"], b"400", b""),
        (
            [
                b"1.0",
                b"7",
                b"elsewhere",
                b"127.0.0.1",
                b"",
                b"CURVE",
                zmq.utils.z85.decode(A.encode()),
            ],
            b"400",
            b"",
        ),
        ([b"2.0", b"7", b"m3tgossip", b"127.0.0.1", b"", b"CURVE"], b"500", b""),
        ([b"1.0"], b"500", b""),
    ],
)
def test_zap_reply(request_frames: list[bytes], code: bytes, user: bytes) -> None:
    reply, ok, _, _ = zap_reply(request_frames, ALLOW)
    assert len(reply) == 6 and reply[0] == b"1.0"
    assert reply[2] == code and reply[4] == user and ok == (code == b"200")
    if len(request_frames) > 1:
        assert reply[1] == request_frames[1]


# ----------------------------------------------------------------------------- real sockets


def keypair() -> Keypair:
    public, secret = zmq.curve_keypair()
    return Keypair(public.decode(), secret.decode())


def hello(sender: str, reason: bytes = b"") -> list:
    tensors = {"fusion": np.frombuffer(MARKER * 4, dtype=np.uint8).copy()} if reason else {}
    body = {"reason": reason.decode()} if reason else {}
    kind = protocol.MsgType.STATE if reason else protocol.MsgType.HEARTBEAT
    if not reason:
        body = {"round": 0}
    return protocol.encode(
        protocol.Message(kind, sender, protocol.new_session(), 1, 0, body, tensors=tensors)
    )


def deliver(
    server: Transport,
    client: Transport,
    frames: list,
    window_s: float,
    resend_s: float | None = None,
) -> list:
    """Keep offering `frames` to the client's link to "srv" until the server receives something
    or `window_s` passes; return what the server received. With `resend_s`, a sent copy that
    has not arrived after that long is sent again (so several copies may arrive)."""
    end = time.monotonic() + window_s
    sent_at: float | None = None
    while time.monotonic() < end:
        if sent_at is None or (resend_s is not None and time.monotonic() - sent_at > resend_s):
            if client.send("srv", frames):  # refused until the handshake completed
                sent_at = time.monotonic()
        got = server.poll(50)
        if got:
            return got
    return []


@pytest.fixture
def server_keys() -> Keypair:
    return keypair()


@pytest.fixture
def transports() -> Iterator[list[Transport]]:
    made: list[Transport] = []
    try:
        yield made
    finally:
        for t in made:
            t.close(0)


def curve_server(
    transports: list[Transport], server_keys: Keypair, allowed: dict[str, str]
) -> Transport:
    t = Transport(
        "srv", "tcp://127.0.0.1:0", {}, FAST, Curve(server_keys, AllowList.build(allowed), {})
    )
    transports.append(t)
    return t


def client(transports: list[Transport], node_id: str, endpoint: str, security) -> Transport:
    t = Transport(node_id, "tcp://127.0.0.1:0", {"srv": endpoint}, FAST, security)
    transports.append(t)
    return t


def test_allow_listed_key_is_delivered_with_its_node_id(transports, server_keys) -> None:
    a = keypair()
    srv = curve_server(transports, server_keys, {"a": a.public})
    cli_t = client(
        transports, "a", srv.endpoint, Curve(a, AllowList(), {"srv": server_keys.public})
    )
    got = deliver(srv, cli_t, hello("a"), ARRIVE_S)
    assert len(got) == 1
    routing_id, frames, user = got[0]
    assert routing_id == b"a" and user == "a"
    assert protocol.decode(frames).sender == "a"


@pytest.mark.parametrize("case", ["unknown key", "plain client", "wrong server key"])
def test_unauthenticated_links_deliver_nothing(transports, server_keys, records, case: str) -> None:
    a, stranger = keypair(), keypair()
    srv = curve_server(transports, server_keys, {"a": a.public})
    security = {
        "unknown key": Curve(stranger, AllowList(), {"srv": server_keys.public}),
        "plain client": Plaintext(),
        "wrong server key": Curve(a, AllowList(), {"srv": keypair().public}),
    }[case]
    cli_t = client(transports, "a", srv.endpoint, security)
    assert deliver(srv, cli_t, hello("a"), ABSENT_S) == []
    if case == "unknown key":  # the others fail in the ZMTP handshake, before ZAP is asked
        assert srv.security.refused >= 1
        assert "refused connection from 127.0.0.1" in messages(records)


def _three_node_spec(tmp_path: Path) -> tuple[Path, dict[str, Keypair]]:
    keys = {nid: generate_keys(tmp_path / "keys", nid) for nid in ("n0", "n1", "n2")}
    spec = tmp_path / "spec.toml"
    spec.write_text(
        'name = "p3"\nedges = [["n0", "n1"], ["n1", "n2"]]\n'
        + "".join(f'[[nodes]]\nid = "{n}"\npublic_key = "{k.public}"\n' for n, k in keys.items())
    )
    return spec, keys


def test_header_sender_must_match_the_authenticated_key(transports, tmp_path, records) -> None:
    spec, keys = _three_node_spec(tmp_path)
    topo = load_topology(spec)
    cfg = NodeConfig(
        id="n1",
        topology=str(spec),
        state_dir=str(tmp_path / "n1"),
        key_dir=str(tmp_path / "keys"),
        workload_options={"size": 8},
    )
    server = Transport(
        "n1",
        "tcp://127.0.0.1:0",
        {},
        FAST,
        for_node("n1", topo, "tcp://127.0.0.1:0", {}, key_dir=cfg.key_dir),
    )
    transports.append(server)
    node = Node(cfg, topology=topo, transport=server)
    server_key = {"srv": keys["n1"].public}
    # n2's key, claiming to be n0 (routing id and header sender both "n0")
    forged = 0
    for signer in ("n2", "n0"):  # one at a time: a ROUTER admits one link per routing id
        t = Transport(
            "n0",
            "tcp://127.0.0.1:0",
            {"srv": server.endpoint},
            FAST,
            Curve(keys[signer], AllowList(), server_key),
        )
        try:
            # resent: a copy offered while the server still holds the previous link of the
            # routing id "n0" is dropped by its ROUTER
            got = deliver(server, t, hello("n0"), ARRIVE_S, resend_s=1.0)
        finally:
            t.close(0)
        assert got and all(m.user_id == signer for m in got)
        for m in got:
            node.handlers.handle(*m)
        forged += len(got) if signer == "n2" else 0
    assert node.link.rejected == forged
    assert "header says sender 'n0', link authenticated the key of 'n2'" in messages(records)
    assert node.peers["n0"].session is not None  # the honest one was accepted
    assert node.peers["n2"].session is None


# ----------------------------------------------------------------------------- eavesdropper


class Relay:
    """A TCP relay on 127.0.0.1 that forwards one connection and records the bytes it sees."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(ARRIVE_S)
        self.port = self.listener.getsockname()[1]
        self.captured = bytearray()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            down, _ = self.listener.accept()
        except OSError:
            return
        up = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=ARRIVE_S)
        peer = {down: up, up: down}
        try:
            while not self.stop.is_set():
                readable, _, _ = select.select(list(peer), [], [], 0.05)
                for s in readable:
                    data = s.recv(1 << 16)
                    if not data:
                        return
                    self.captured += data
                    peer[s].sendall(data)
        except OSError:
            return
        finally:
            down.close()
            up.close()

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        self.thread.join(timeout=ARRIVE_S)
        assert not self.thread.is_alive()


@pytest.mark.parametrize("secure", [True, False], ids=["curve", "insecure"])
def test_eavesdropper_sees_no_plaintext_under_curve(transports, server_keys, secure: bool) -> None:
    a = keypair()
    if secure:
        srv = curve_server(transports, server_keys, {"a": a.public})
        security = Curve(a, AllowList(), {"srv": server_keys.public})
    else:
        srv = Transport("srv", "tcp://127.0.0.1:0", {}, FAST, Plaintext())
        transports.append(srv)
        security = Plaintext()
    relay = Relay(int(srv.endpoint.rsplit(":", 1)[1]))
    try:
        cli_t = client(transports, "a", f"tcp://127.0.0.1:{relay.port}", security)
        got = deliver(srv, cli_t, hello("a", reason=MARKER), ARRIVE_S)
        assert len(got) == 1  # the relay works: the message went through it
        msg = protocol.decode(got[0][1])
        assert msg.body["reason"].encode() == MARKER
    finally:
        relay.close()
    seen = bytes(relay.captured)
    assert len(seen) > len(MARKER) * 4
    assert (MARKER in seen) is (not secure)


# ----------------------------------------------------------------------------- node set-up


def _cfg(tmp_path: Path, spec: Path, **kw) -> NodeConfig:
    return NodeConfig(
        id="n1",
        topology=str(spec),
        state_dir=str(tmp_path / "n1"),
        workload_options={"size": 8},
        **kw,
    )


def test_insecure_is_refused_off_loopback_before_any_bind(tmp_path, monkeypatch) -> None:
    spec, _ = _three_node_spec(tmp_path)
    topo = load_topology(spec)
    cfg = _cfg(tmp_path, spec, insecure=True, bind="tcp://192.0.2.7:5701")
    with pytest.raises(ConfigError, match="only on loopback, but tcp://192.0.2.7:5701"):
        for_node("n1", topo, cfg.bind, {}, insecure=True)
    with pytest.raises(ConfigError, match="only on loopback, but tcp://10.0.0.2:1"):
        for_node("n1", topo, "tcp://127.0.0.1:1", {"n0": "tcp://10.0.0.2:1"}, insecure=True)

    def no_bind(*args, **kwargs):
        raise AssertionError("the transport must not be made: refusal comes before binding")

    monkeypatch.setattr(startup, "Transport", no_bind)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(ConfigError, match="only on loopback"):
            Node(cfg, topology=topo).run()
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def test_insecure_on_loopback_warns_loudly(tmp_path, records) -> None:
    spec, _ = _three_node_spec(tmp_path)
    topo = load_topology(spec)
    secure = for_node("n1", topo, "tcp://127.0.0.1:1", {"n0": "tcp://localhost:2"}, insecure=True)
    assert isinstance(secure, Plaintext)
    warning = [r for r in records if r.levelno == logging.WARNING and "INSECURE" in r.getMessage()]
    assert warning


def test_missing_keys_stop_the_node_with_a_clear_error(tmp_path) -> None:
    spec, keys = _three_node_spec(tmp_path)
    topo = load_topology(spec)
    with pytest.raises(
        ConfigError, match="no key folder: pass --key-dir DIR holding n1.key_secret"
    ):
        for_node("n1", topo, "tcp://127.0.0.1:1", {})
    with pytest.raises(ConfigError, match="no such secret key file"):
        for_node("n1", topo, "tcp://127.0.0.1:1", {}, key_dir=tmp_path / "nowhere")
    bare = tmp_path / "bare.toml"
    bare.write_text(spec.read_text().replace(f'public_key = "{keys["n0"].public}"\n', ""))
    with pytest.raises(ConfigError, match="node n0: no public_key"):
        for_node("n1", load_topology(bare), "tcp://127.0.0.1:1", {}, key_dir=tmp_path / "keys")
    other = tmp_path / "other"
    generate_keys(other, "n1")
    with pytest.raises(ConfigError, match="does not belong to the public_key of node n1"):
        for_node("n1", topo, "tcp://127.0.0.1:1", {}, key_dir=other)


def test_node_security_allows_its_neighbours_and_the_status_keys(tmp_path) -> None:
    spec, keys = _three_node_spec(tmp_path)
    topo = load_topology(spec)
    operator = generate_keys(tmp_path / "ops", "alice")
    status_keys = tmp_path / "ops" / "alice.key"
    secure = for_node(
        "n1",
        topo,
        "tcp://127.0.0.1:1",
        {"n0": "tcp://127.0.0.1:2", "n2": "tcp://127.0.0.1:3"},
        key_dir=tmp_path / "keys",
        status_keys=status_keys,
    )
    assert isinstance(secure, Curve)
    assert secure.keypair == keys["n1"]
    assert secure.peer_keys == {"n0": keys["n0"].public, "n2": keys["n2"].public}
    assert secure.allow.keys == {
        keys["n0"].public: "n0",
        keys["n2"].public: "n2",
        operator.public: f"{OPERATOR_PREFIX}alice",
    }
    clash = tmp_path / "clash.keys"
    clash.write_text(f"{keys['n0'].public} mallory\n")
    with pytest.raises(ConfigError, match=r"clash.keys: operator key 'mallory' is also the key"):
        for_node("n1", topo, "tcp://127.0.0.1:1", {}, key_dir=tmp_path / "keys", status_keys=clash)


def test_status_command_requires_a_key_or_insecure(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["status", "tcp://127.0.0.1:1"]) == 2
    assert "--key" in capsys.readouterr().err

"""Link security: CURVE key files, the ZAP allow-list policy, and the node's security choice.

This module owns who may talk to a node and how its sockets are keyed; the transport owns the
sockets and the loop that answers ZAP requests (`Transport.poll`). The split follows pyzmq's
`zmq/auth/base.py` (policy) and `zmq/auth/thread.py` (driver): `AllowList` and `zap_reply`
decide from plain values and are tested without sockets.

Keys. A node's keypair lives in two files in its key folder: `<id>.key`, the public key as one
line of Z85 text (40 characters), and `<id>.key_secret`, the secret key, created mode 600 with
`O_CREAT | O_EXCL` so it is never readable by others, not even for a moment. A secret key file
that group or others can read is refused. The public keys of all nodes are written into the
shared topology spec (`public_key` of each node).

Policy. Every link is CURVE by default: a node's ROUTER is a CURVE server and admits a
connecting DEALER only if its public key is one of its neighbours' keys in the topology (or an
operator key allowed to query status). The ZAP reply's user id is the node id of that key, and
the daemon drops a message whose header `sender` is not that id. Plaintext only with an
explicit `insecure` flag and only when every endpoint of the node is on loopback.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import zmq
from zmq.utils import z85

from m3tgossip.errors import ConfigError
from m3tgossip.log import get_logger
from m3tgossip.net.transport import Plaintext, Security, is_loopback

if TYPE_CHECKING:
    from m3tgossip.topology import Topology

log = get_logger(__name__)

__all__ = [
    "OPERATOR_PREFIX",
    "PUBLIC_SUFFIX",
    "SECRET_SUFFIX",
    "ZAP_DOMAIN",
    "AllowList",
    "Curve",
    "Keypair",
    "for_node",
    "generate_keys",
    "load_keypair",
    "load_public",
    "load_public_keys",
    "load_secret",
    "public_keys_of",
    "zap_reply",
]

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
#: ZAP domain of every node's ROUTER (ZAP requests name it; it groups nothing else)
ZAP_DOMAIN = "m3tgossip"
#: user ids of operator keys start with this; node ids cannot contain ':' so never collide
OPERATOR_PREFIX = "operator:"

_Z85_KEY = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")


@dataclass(frozen=True)
class Keypair:
    """A CURVE keypair as Z85 text (40 characters each)."""

    public: str
    secret: str


# ----------------------------------------------------------------------------- key files


def _is_comment(words: list[str]) -> bool:
    """Blank, or a `#` comment. Z85 has `#` in its alphabet, so a key may start with one: a
    line whose first word is a well-formed key is a key, whatever its first character."""
    return not words or (words[0].startswith("#") and _Z85_KEY.fullmatch(words[0]) is None)


def _key_text(text: str, path: Path, what: str) -> str:
    """The first non-comment word of a key file, checked to be a 40-character Z85 key."""
    for line in text.splitlines():
        words = line.split()
        if not _is_comment(words):
            if _Z85_KEY.fullmatch(words[0]) is None:
                raise ConfigError(
                    str(path), "", f"not a CURVE {what} key (40 characters of Z85 text)"
                )
            return words[0]
    raise ConfigError(str(path), "", f"no {what} key in the file")


def generate_keys(out_dir: str | os.PathLike[str], node_id: str, force: bool = False) -> Keypair:
    """Write a new keypair as `<out_dir>/<node_id>.key` and `.key_secret` (mode 600).

    Refuses (FileExistsError) to replace an existing file unless `force`. The secret file is
    created with `O_CREAT | O_EXCL` and mode 600, so it never exists with wider permissions.
    """
    if _ID_RE.fullmatch(node_id) is None:
        raise ValueError(f"not a valid node id: {node_id!r}")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    public_path = folder / f"{node_id}{PUBLIC_SUFFIX}"
    secret_path = folder / f"{node_id}{SECRET_SUFFIX}"
    existing = [p for p in (public_path, secret_path) if p.exists() or p.is_symlink()]
    if existing and not force:
        raise FileExistsError(
            f"{existing[0]} exists; refusing to overwrite a key (use --force to replace it)"
        )
    for p in existing:
        p.unlink()
    public, secret = (k.decode("ascii") for k in zmq.curve_keypair())
    _write_new(
        secret_path,
        f"# m3tgossip CURVE secret key of {node_id}: keep it private\n{secret}\n",
        0o600,
    )
    _write_new(public_path, f"{public}\n", 0o644)
    return Keypair(public, secret)


def _write_new(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def load_public(path: str | os.PathLike[str]) -> str:
    """The Z85 public key in a `.key` file."""
    p = Path(path)
    try:
        return _key_text(p.read_text(encoding="ascii"), p, "public")
    except FileNotFoundError:
        raise ConfigError(str(p), "", "no such public key file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(p), "", f"cannot read public key: {exc}") from None


def load_secret(path: str | os.PathLike[str]) -> Keypair:
    """The keypair of a `.key_secret` file; refused if group or others may read the file."""
    p = Path(path)
    try:
        mode = stat.S_IMODE(p.stat().st_mode)
        text = p.read_text(encoding="ascii")
    except FileNotFoundError:
        raise ConfigError(
            str(p), "", "no such secret key file (create one with: m3tgossip keys generate)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(p), "", f"cannot read secret key: {exc}") from None
    if mode & 0o077:
        raise ConfigError(
            str(p), "", f"secret key is readable by others (mode {mode:03o}); chmod 600 it"
        )
    secret = _key_text(text, p, "secret")
    return Keypair(zmq.curve_public(secret.encode("ascii")).decode("ascii"), secret)


def load_keypair(stem: str | os.PathLike[str]) -> Keypair:
    """The keypair named by `DIR/ID` (reads `DIR/ID.key_secret`)."""
    return load_secret(f"{os.fspath(stem)}{SECRET_SUFFIX}")


def load_public_keys(path: str | os.PathLike[str]) -> dict[str, str]:
    """Operator keys allowed to query status: public key -> name, from a text file.

    One key per line, optionally followed by a name (`<key> alice`); a line whose first word
    starts with `#` and is not a key is a comment.
    A bare `.key` file written by `m3tgossip keys generate` is a valid list of one key, named
    after the file.
    """
    p = Path(path)
    try:
        lines = p.read_text(encoding="ascii").splitlines()
    except FileNotFoundError:
        raise ConfigError(str(p), "", "no such status key file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(p), "", f"cannot read status key file: {exc}") from None
    keys: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        words = line.split()
        if _is_comment(words):
            continue
        if _Z85_KEY.fullmatch(words[0]) is None:
            raise ConfigError(
                str(p), f"line {number}", "not a CURVE public key (40 characters of Z85 text)"
            )
        given = len(words) > 1 and not words[1].startswith("#")
        name = words[1] if given else p.name.removesuffix(PUBLIC_SUFFIX)
        if _ID_RE.fullmatch(name) is None:
            raise ConfigError(str(p), f"line {number}", f"not a valid name: {name!r}")
        keys[words[0]] = name
    if not keys:
        raise ConfigError(str(p), "", "no public key in the file")
    return keys


# ----------------------------------------------------------------------------- policy


@dataclass
class AllowList:
    """Who may connect: CURVE public key (Z85) -> the user id the connection is known by.

    Pure policy, no sockets: `authenticate` answers one ZAP request's question.
    """

    keys: dict[str, str] = field(default_factory=dict)

    @classmethod
    def build(
        cls, nodes: Mapping[str, str], operators: Mapping[str, str] | None = None
    ) -> AllowList:
        """From node id -> public key (neighbours) and operator key -> name (status only)."""
        keys: dict[str, str] = {}
        for node_id, key in nodes.items():
            keys[key] = node_id
        for key, name in (operators or {}).items():
            if key in keys:
                raise ValueError(f"operator key {name!r} is also the key of node {keys[key]!r}")
            keys[key] = OPERATOR_PREFIX + name
        return cls(keys)

    def authenticate(self, mechanism: str, client_key: bytes | str | None) -> tuple[bool, str, str]:
        """(allowed, user id, reason) for a connection with this mechanism and client key.

        `client_key` is the 32 raw bytes a ZAP request carries, or Z85 text.
        """
        if mechanism != "CURVE":
            return False, "", f"mechanism {mechanism or 'none'} refused: CURVE required"
        if isinstance(client_key, bytes) and len(client_key) == 32:
            text = z85.encode(client_key).decode("ascii")
        elif isinstance(client_key, bytes):
            text = client_key.decode("ascii", "replace")
        else:
            text = client_key or ""
        user = self.keys.get(text)
        if user is None:
            return False, "", f"key {text[:8]}... is not allow-listed"
        return True, user, "OK"


def zap_reply(request: Sequence[bytes], allow: AllowList) -> tuple[list[bytes], bool, str, str]:
    """Answer one ZAP request (RFC 27): (reply frames, allowed, user id or reason, address).

    A malformed request gets status 500 and is refused; nothing in it can raise.
    """
    if len(request) < 6 or request[0] != b"1.0":
        request_id = request[1] if len(request) > 1 else b""
        return (
            [b"1.0", request_id, b"500", b"malformed ZAP request", b"", b""],
            False,
            "malformed ZAP request",
            "",
        )
    request_id, domain, address = request[1], request[2], request[3]
    mechanism = request[5].decode("ascii", "replace")
    address_text = address.decode("ascii", "replace")
    if domain.decode("ascii", "replace") != ZAP_DOMAIN:
        reason = f"unknown ZAP domain {domain[:32]!r}"
        return [b"1.0", request_id, b"400", reason.encode(), b"", b""], False, reason, address_text
    key = request[6] if mechanism == "CURVE" and len(request) > 6 else None
    ok, user, reason = allow.authenticate(mechanism, key)
    if ok:
        return [b"1.0", request_id, b"200", b"OK", user.encode(), b""], True, user, address_text
    return [b"1.0", request_id, b"400", reason.encode(), b"", b""], False, reason, address_text


# ----------------------------------------------------------------------------- CURVE


class Curve:
    """CURVE on every socket; the ROUTER admits only allow-listed keys (ZAP, answered by the
    transport's loop through `zap`). Implements `transport.Security`."""

    uses_zap = True

    def __init__(self, keypair: Keypair, allow: AllowList, peer_keys: Mapping[str, str]) -> None:
        self.keypair = keypair
        self.allow = allow
        self.peer_keys = dict(peer_keys)
        #: connections refused by ZAP, and the reasons already logged (logged once each)
        self.refused = 0
        self._logged: set[tuple[str, str]] = set()

    def server(self, socket: zmq.Socket) -> None:
        socket.curve_server = True
        socket.curve_secretkey = self.keypair.secret.encode("ascii")
        socket.curve_publickey = self.keypair.public.encode("ascii")
        socket.setsockopt_string(zmq.ZAP_DOMAIN, ZAP_DOMAIN)

    def client(self, socket: zmq.Socket, peer: str) -> None:
        key = self.peer_keys.get(peer)
        if key is None:
            raise ConfigError(
                "topology", f"node {peer}", "no public_key: cannot open a CURVE link to it"
            )
        socket.curve_serverkey = key.encode("ascii")
        socket.curve_publickey = self.keypair.public.encode("ascii")
        socket.curve_secretkey = self.keypair.secret.encode("ascii")

    def zap(self, request: Sequence[bytes]) -> list[bytes]:
        """Answer one ZAP request; a refusal is logged once per (address, reason)."""
        reply, ok, detail, address = zap_reply(request, self.allow)
        if not ok:
            self.refused += 1
            if (address, detail) not in self._logged:
                self._logged.add((address, detail))
                log.warning(
                    "refused connection from %s: %s (further refusals alike are not logged)",
                    address or "?",
                    detail,
                )
        return reply

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- the node's choice


def for_node(
    node_id: str,
    topology: Topology,
    bind: str,
    neighbours: Mapping[str, str],
    *,
    key_dir: str | os.PathLike[str] | None = None,
    status_keys: str | os.PathLike[str] | None = None,
    insecure: bool = False,
) -> Security:
    """The security of node `node_id`, decided before any socket exists; ConfigError if not.

    `neighbours` maps each neighbour id to the endpoint the node connects to; `bind` is its own.
    `insecure` is honoured only when `bind` and every neighbour endpoint are loopback, and is
    announced with a WARNING. Otherwise the node needs its secret key
    (`key_dir`/<node_id>.key_secret) and every neighbour's `public_key` in the topology, and
    allows the operator keys of the `status_keys` file (if given) to query its status.
    """
    if insecure:
        off = [e for e in [bind, *neighbours.values()] if not is_loopback(e)]
        if off:
            raise ConfigError(
                "--insecure",
                f"node {node_id}",
                f"plaintext is allowed only on loopback, but {off[0]} is not; "
                "use CURVE keys (--key-dir) instead",
            )
        log.warning(
            "%s: INSECURE: plaintext links on %s, neither encrypted nor authenticated "
            "(--insecure; loopback only)",
            node_id,
            bind,
        )
        return Plaintext()
    if not key_dir:
        raise ConfigError(
            "node config",
            f"node {node_id}",
            f"no key folder: pass --key-dir DIR holding {node_id}{SECRET_SUFFIX} "
            f"(create it with: m3tgossip keys generate --out DIR --id {node_id}), "
            "or --insecure for plaintext on loopback",
        )
    secret_path = Path(key_dir) / f"{node_id}{SECRET_SUFFIX}"
    keypair = load_secret(secret_path)
    own = topology.node(node_id).public_key
    if own is not None and own != keypair.public:
        raise ConfigError(
            str(secret_path),
            "",
            f"this secret key does not belong to the public_key of node {node_id}"
            f" in {topology.source}",
        )
    peer_keys: dict[str, str] = {}
    for peer in topology.neighbours(node_id):
        key = topology.node(peer).public_key
        if key is None:
            raise ConfigError(
                topology.source,
                f"node {peer}",
                f"no public_key; node {node_id} needs it to authenticate its neighbour "
                "(m3tgossip keys generate, then put the .key text in the spec)",
            )
        peer_keys[peer] = key
    operators = load_public_keys(status_keys) if status_keys else {}
    try:
        allow = AllowList.build(peer_keys, operators)
    except ValueError as exc:
        raise ConfigError(os.fspath(status_keys or ""), "", str(exc)) from None
    log.info(
        "%s: CURVE links; %d neighbour and %d operator keys allowed",
        node_id,
        len(peer_keys),
        len(operators),
    )
    return Curve(keypair, allow, peer_keys)


def public_keys_of(folder: str | os.PathLike[str], ids: Iterable[str]) -> dict[str, str]:
    """node id -> public key from `<folder>/<id>.key` files (testbeds and launch helpers)."""
    return {nid: load_public(Path(folder) / f"{nid}{PUBLIC_SUFFIX}") for nid in ids}

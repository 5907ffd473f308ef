"""Erasure messages: the checks of their bodies, and the origin tags that authenticate a
`forget` beyond the link it arrives on.

A `forget` is flooded: it reaches nodes that are not the origin's neighbours, over links whose
CURVE authentication proves only who forwarded it. So the origin also tags the request for
every node of the spec: `tags[node] = HMAC-SHA256(k, canonical body)`, the key `k` the
X25519 shared secret of the origin's and that node's CURVE keys (the keys every node already
has: its own secret, the others' `public_key` in the spec), hashed with a domain label. A
receiver recomputes its own tag from its secret key and the origin's public key; a forwarder
cannot forge one, and a tag never verifies for another request or another node.

This module owns that arithmetic (X25519 after RFC 7748, in pure Python: one scalar
multiplication per request, nothing the core dependencies lack) and the body checks; it
imports nothing of the package but the errors, so `schema.py` can use its checkers.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Any

import msgpack
from zmq.utils import z85

from m3tgossip.errors import ProtocolError

#: what an erasure names
TARGETS = ("learner", "node")
#: how it is carried out (docs/protocol.md)
MODES = ("exact", "approximate")
#: the body keys a tag covers, in this order
TAGGED_KEYS = ("request", "origin", "target", "ids", "mode")

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
_LEARNER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@\-]{0,127}")
_REQUEST_RE = re.compile(r"[0-9a-f]{32}")
_TAG_RE = re.compile(r"[0-9a-f]{64}")
_MAX_IDS = 1024
_LABEL = b"m3tgossip forget v1"

# ----------------------------------------------------------------------------- X25519

_P = 2**255 - 19
_A24 = 121665


def x25519(scalar: bytes, point: bytes) -> bytes:
    """X25519(scalar, u-coordinate) of RFC 7748, section 5 (constant time is not a goal here:
    it runs once per erasure request, on keys the node holds)."""
    if len(scalar) != 32 or len(point) != 32:
        raise ValueError("X25519 takes 32-byte scalars and points")
    k = bytearray(scalar)
    k[0] &= 248
    k[31] &= 127
    k[31] |= 64
    n = int.from_bytes(k, "little")
    u = int.from_bytes(point, "little") & ((1 << 255) - 1)
    x2, z2, x3, z3, swap = 1, 0, u, 1, 0
    for t in reversed(range(255)):
        bit = (n >> t) & 1
        if swap ^ bit:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = bit
        a, b = (x2 + z2) % _P, (x2 - z2) % _P
        aa, bb = a * a % _P, b * b % _P
        e = (aa - bb) % _P
        c, d = (x3 + z3) % _P, (x3 - z3) % _P
        da, cb = d * a % _P, c * b % _P
        x3 = (da + cb) ** 2 % _P
        z3 = u * (da - cb) ** 2 % _P
        x2 = aa * bb % _P
        z2 = e * (aa + _A24 * e) % _P
    if swap:
        x2, z2 = x3, z3
    return (x2 * pow(z2, _P - 2, _P) % _P).to_bytes(32, "little")


def pair_key(own_secret_z85: str, other_public_z85: str) -> bytes:
    """The tag key two nodes share: BLAKE2b of the label and their X25519 secret."""
    shared = x25519(z85.decode(own_secret_z85), z85.decode(other_public_z85))
    return hashlib.blake2b(shared, key=_LABEL, digest_size=32).digest()


def canonical(body: dict[str, Any]) -> bytes:
    """The bytes a tag covers: msgpack of the tagged keys' values, in `TAGGED_KEYS` order."""
    return msgpack.packb([body[k] for k in TAGGED_KEYS], use_bin_type=True)


def tag(key: bytes, body: dict[str, Any]) -> str:
    return hmac.new(key, canonical(body), hashlib.sha256).hexdigest()


def tags_for(own_secret_z85: str, publics: dict[str, str], body: dict[str, Any]) -> dict[str, str]:
    """The origin's tag of `body` for every node of `publics` (node id -> Z85 public key)."""
    return {nid: tag(pair_key(own_secret_z85, pub), body) for nid, pub in sorted(publics.items())}


def verify_tag(own_id: str, own_secret_z85: str, origin_public_z85: str, body: dict) -> bool:
    """Whether the body's tag for this node is the origin's (constant-time compare)."""
    got = body.get("tags", {}).get(own_id)
    if not isinstance(got, str):
        return False
    want = tag(pair_key(own_secret_z85, origin_public_z85), body)
    return hmac.compare_digest(got, want)


# ----------------------------------------------------------------------------- body checks


def _fail(where: str, problem: str) -> None:
    raise ProtocolError(f"{where}: {problem}")


def check_target(value: Any, where: str, limits: Any) -> str:
    if value not in TARGETS:
        _fail(where, f"expected one of {', '.join(TARGETS)}, got {value!r:.80}")
    return str(value)


def check_mode(value: Any, where: str, limits: Any) -> str:
    if value not in MODES:
        _fail(where, f"expected one of {', '.join(MODES)}, got {value!r:.80}")
    return str(value)


def check_ids(value: Any, where: str, limits: Any) -> list[str]:
    """A non-empty list of distinct learner or node ids."""
    if not isinstance(value, list) or not value:
        _fail(where, f"expected a non-empty list of ids, got {type(value).__name__}")
    if len(value) > min(_MAX_IDS, limits.max_list):
        _fail(where, f"list of {len(value)} ids, limit {min(_MAX_IDS, limits.max_list)}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or _LEARNER_RE.fullmatch(item) is None:
            _fail(f"{where}[{i}]", f"not a valid id: {item!r:.80}")
    if len(set(value)) != len(value):
        _fail(where, "an id is listed twice")
    return value


def check_request(value: Any, where: str, limits: Any) -> str:
    if not isinstance(value, str) or _REQUEST_RE.fullmatch(value) is None:
        _fail(where, f"expected 32 lowercase hex digits, got {value!r:.80}")
    return str(value)


def check_reply_request(value: Any, where: str, limits: Any) -> str:
    """A reply names the request it started, or "" if it started none."""
    return "" if value == "" else check_request(value, where, limits)


def check_node(value: Any, where: str, limits: Any) -> str:
    if not isinstance(value, str) or _ID_RE.fullmatch(value) is None:
        _fail(where, f"not a valid node id: {value!r:.80}")
    return str(value)


def check_tags(value: Any, where: str, limits: Any) -> dict[str, str]:
    """Node id -> 64 lowercase hex digits (may be empty: a plaintext federation has no keys)."""
    if not isinstance(value, dict) or len(value) > limits.max_list:
        _fail(where, f"expected a map of at most {limits.max_list} node tags")
    for nid, t in value.items():
        check_node(nid, f"{where} key", limits)
        if not isinstance(t, str) or _TAG_RE.fullmatch(t) is None:
            _fail(f"{where} {nid!r}", "expected 64 lowercase hex digits")
    return value


def check_accepted(value: Any, where: str, limits: Any) -> bool:
    if not isinstance(value, bool):
        _fail(where, f"expected a boolean, got {type(value).__name__}")
    return bool(value)

"""The schema: checks of a header, its body and tensor entries, and of decoded tensor values.

Every checker takes the value and `where` it was, and raises `ProtocolError` naming both:
`hello body 'listen': expected 'tcp://host:port' ...`. `check_header` validates a whole header
map against the `Limits`; `check_values` rejects NaN/Inf and norms above the cap in decoded
tensors. The key sets of the bodies are those of the TypedDicts in `messages.py`, checked
at import.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from typing import Any, NoReturn, cast

import numpy as np

from m3tgossip.errors import ProtocolError
from m3tgossip.protocol import erasure
from m3tgossip.protocol.messages import (
    BODY_TYPES,
    DTYPES,
    ENCODINGS,
    MAX_DEPTH,
    MAX_NAME,
    MAX_NDIM,
    PROTOCOL_VERSION,
    Body,
    Limits,
    Message,
    MsgType,
    TensorMeta,
)

__all__ = [
    "HEADER_KEYS",
    "check_encoding",
    "check_header",
    "check_values",
    "fail",
    "kind",
    "show",
]

_INT_MAX = 2**63 - 1
_MSGPACK_INT_MIN = -(2**63)
_MSGPACK_INT_MAX = 2**64 - 1

_SENDER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
_SESSION_RE = re.compile(r"[0-9a-f]{32}")
_NAME_RE = re.compile(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)*")
_DIGEST_RE = re.compile(r"[0-9a-f]{32}")
_LISTEN_RE = re.compile(
    r"tcp://([A-Za-z0-9](?:[A-Za-z0-9.\-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\]):([0-9]{1,5})"
)

#: the keys of a header, in the order `encode` packs them
HEADER_KEYS = ("v", "type", "sender", "session", "seq", "round", "body", "tensors")
_TENSOR_KEYS = ("name", "dtype", "shape", "enc", "base", "noise")
_TYPES = {t.value: t for t in MsgType}
#: the types whose messages may carry tensors
_TENSOR_TYPES = frozenset({MsgType.DELTA, MsgType.STATE, MsgType.PUSH})


# ---------------------------------------------------------------------------------------------
# errors


def fail(where: str, problem: str) -> NoReturn:
    """Raise the `ProtocolError` "`where`: `problem`"."""
    raise ProtocolError(f"{where}: {problem}")


def show(value: Any) -> str:
    """`repr(value)`, cut to 80 characters for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def kind(value: Any) -> str:
    """The name of the type of `value`, for an error message."""
    return type(value).__name__


# ---------------------------------------------------------------------------------------------
# scalars, strings, lists, maps


def _int(value: Any, where: str, lowest: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        fail(where, f"expected an integer, got {kind(value)} {show(value)}")
    if not lowest <= value <= _INT_MAX:
        fail(where, f"expected an integer in [{lowest}, 2**63-1], got {value}")
    return value


def _count(value: Any, where: str, limits: Limits) -> int:
    return _int(value, where)


def _finite_float(value: Any, where: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        fail(where, f"expected a number, got {kind(value)} {show(value)}")
    result = float(value)
    if not math.isfinite(result):
        fail(where, f"expected a finite number, got {result}")
    return result


def _str(value: Any, where: str, limits: Limits) -> str:
    if not isinstance(value, str):
        fail(where, f"expected a string, got {kind(value)} {show(value)}")
    if len(value) > limits.max_str:
        fail(where, f"string of {len(value)} characters, limit {limits.max_str}")
    return value


def _matching(value: Any, where: str, limits: Limits, pattern: re.Pattern[str], what: str) -> str:
    text = _str(value, where, limits)
    if pattern.fullmatch(text) is None:
        fail(where, f"not a valid {what}: {show(text)}")
    return text


def _name(value: Any, where: str, limits: Limits) -> str:
    text = _str(value, where, limits)
    if len(text) > MAX_NAME:
        fail(where, f"component name of {len(text)} characters, limit {MAX_NAME}")
    if _NAME_RE.fullmatch(text) is None:
        fail(where, f"not a valid component name: {show(text)}")
    return text


def _list(value: Any, where: str, limit: int) -> list[Any] | tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        fail(where, f"expected a list, got {kind(value)} {show(value)}")
    if len(value) > limit:
        fail(where, f"list of {len(value)} items, limit {limit}")
    return value


def _map(
    value: Any, where: str, required: Iterable[str], optional: Iterable[str] = ()
) -> dict[str, Any]:
    """Check that `value` is a map with exactly the `required` keys plus any of `optional`."""
    if not isinstance(value, dict):
        fail(where, f"expected a map, got {kind(value)} {show(value)}")
    allowed = set(required) | set(optional)
    for key in value:
        if key not in allowed:
            fail(where, f"unknown key {show(key)}")
    for key in required:
        if key not in value:
            fail(where, f"missing key {key!r}")
    return value


# ---------------------------------------------------------------------------------------------
# body values


def _names(value: Any, where: str, limits: Limits) -> list[str]:
    items = _list(value, where, limits.max_list)
    names = [_name(item, f"{where}[{i}]", limits) for i, item in enumerate(items)]
    if len(set(names)) != len(names):
        twice = next(n for i, n in enumerate(names) if n in names[:i])
        fail(where, f"component {twice!r} listed twice")
    return names


def _some_names(value: Any, where: str, limits: Limits) -> list[str]:
    names = _names(value, where, limits)
    if not names:
        fail(where, "names no component")
    return names


def _model_id(value: Any, where: str, limits: Limits) -> str:
    text = _str(value, where, limits)
    if not text or not text.isprintable():
        fail(where, f"expected a non-empty printable model id, got {show(text)}")
    return text


def _listen(value: Any, where: str, limits: Limits) -> str:
    text = _str(value, where, limits)
    match = _LISTEN_RE.fullmatch(text)
    if match is None or not 1 <= int(match.group(2)) <= 65535:
        fail(where, f"expected 'tcp://host:port' with port 1-65535, got {show(text)}")
    return text


def _document(value: Any, where: str, limits: Limits) -> dict[str, Any]:
    """A JSON-like map: str keys; str/int/float/bool/None/list/map values.

    Nested at most `MAX_DEPTH` levels, with at most `max_list` entries in all.
    """
    if not isinstance(value, dict):
        fail(where, f"expected a map, got {kind(value)} {show(value)}")
    budget = [limits.max_list]

    def walk(item: Any, at: str, depth: int) -> None:
        if item is None or isinstance(item, (bool, float)):
            return
        if isinstance(item, int):
            if not _MSGPACK_INT_MIN <= item <= _MSGPACK_INT_MAX:
                fail(at, f"integer {item} outside the msgpack range")
            return
        if isinstance(item, str):
            _str(item, at, limits)
            return
        if not isinstance(item, (dict, list, tuple)):
            fail(at, f"{kind(item)} is not a JSON-like value")
        if depth >= MAX_DEPTH:
            fail(at, f"nested deeper than {MAX_DEPTH} levels")
        budget[0] -= len(item)
        if budget[0] < 0:
            fail(where, f"document has more than {limits.max_list} entries")
        if isinstance(item, dict):
            for key, sub in item.items():
                if not isinstance(key, str):
                    fail(at, f"map key {show(key)} is not a string")
                _str(key, f"{at} key", limits)
                walk(sub, f"{at}[{key!r}]", depth + 1)
        else:
            for i, sub in enumerate(item):
                walk(sub, f"{at}[{i}]", depth + 1)

    walk(value, where, 0)
    return value


def _flag(value: Any, where: str, limits: Limits) -> bool:
    if not isinstance(value, bool):
        fail(where, f"expected true or false, got {kind(value)} {show(value)}")
    return value


def _component_map(
    value: Any, where: str, limits: Limits, item: Callable[[Any, str], Any]
) -> dict[str, Any]:
    """A map of component name -> value checked by `item(value, where)`.

    At most `max_tensors` entries long.
    """
    if not isinstance(value, dict):
        fail(where, f"expected a map, got {kind(value)} {show(value)}")
    if len(value) > limits.max_tensors:
        fail(where, f"map of {len(value)} entries, limit {limits.max_tensors}")
    out = {}
    for key, entry in value.items():
        name = _name(key, f"{where} key", limits)
        out[name] = item(entry, f"{where} {name!r}")
    return out


def _weight(value: Any, where: str) -> float:
    weight = _finite_float(value, where)
    if weight < 0:
        fail(where, f"expected a weight >= 0, got {weight}")
    return weight


def _weights(value: Any, where: str, limits: Limits) -> dict[str, float]:
    """Push-sum weights: component name -> finite weight >= 0."""
    return _component_map(value, where, limits, _weight)


def _digest(value: Any, where: str) -> str:
    if not isinstance(value, str) or _DIGEST_RE.fullmatch(value) is None:
        fail(where, f"expected 32 lowercase hex digits, got {kind(value)} {show(value)}")
    return value


def _origins(value: Any, where: str, limits: Limits) -> dict[str, str]:
    """Hello `origin`: component name -> 32 lowercase hex digits (a 128-bit BLAKE2b digest)."""
    return _component_map(value, where, limits, _digest)


# ---------------------------------------------------------------------------------------------
# bodies

_Check = Callable[[Any, str, Limits], Any]

#: the checker of each required body key
_REQUIRED: dict[MsgType, dict[str, _Check]] = {
    MsgType.HELLO: {"model": _model_id, "components": _names, "listen": _listen, "round": _count},
    MsgType.DELTA: {},
    MsgType.STATE: {"reason": _str},
    MsgType.RESYNC: {"components": _some_names, "reason": _str},
    MsgType.HEARTBEAT: {"round": _count},
    MsgType.LEAVE: {"reason": _str},
    MsgType.STATUS_REQUEST: {},
    MsgType.STATUS: {"state": _document},
    MsgType.PUSH: {"weights": _weights},
    MsgType.RETIRE: {"components": _some_names, "reason": _str},
    MsgType.FORGET_REQUEST: {
        "target": erasure.check_target,
        "ids": erasure.check_ids,
        "mode": erasure.check_mode,
    },
    MsgType.FORGET_REPLY: {
        "accepted": erasure.check_accepted,
        "request": erasure.check_reply_request,
        "reason": _str,
    },
    MsgType.FORGET: {
        "request": erasure.check_request,
        "origin": erasure.check_node,
        "target": erasure.check_target,
        "ids": erasure.check_ids,
        "mode": erasure.check_mode,
        "tags": erasure.check_tags,
    },
}
#: the checker of each key a body may carry beyond its required ones
_OPTIONAL: dict[MsgType, dict[str, _Check]] = {
    MsgType.HELLO: {"answer": _flag, "origin": _origins, "states": _flag},
}


def _check_body_schemas() -> None:
    """The checkers cover exactly the keys of each body's TypedDict, for every type."""
    for mtype in MsgType:
        body = BODY_TYPES.get(mtype)
        if body is None:
            raise RuntimeError(f"message type {mtype.value!r} has no body type in messages.py")
        keys_of = vars(body)  # a TypedDict class keeps its key sets in its namespace
        for what, checks, keys in (
            ("required", _REQUIRED.get(mtype, {}), keys_of["__required_keys__"]),
            ("optional", _OPTIONAL.get(mtype, {}), keys_of["__optional_keys__"]),
        ):
            if set(checks) != set(keys):
                raise RuntimeError(
                    f"{mtype.value} body: {what} keys {sorted(keys)} in {body.__name__},"
                    f" checkers for {sorted(checks)} in schema.py"
                )


_check_body_schemas()


def _body(value: Any, mtype: MsgType, limits: Limits) -> Body:
    schema = _REQUIRED[mtype]
    where = f"{mtype.value} body"
    optional = _OPTIONAL.get(mtype, {})
    body = _map(value, where, schema, optional)
    for key, check in schema.items():
        check(body[key], f"{where} {key!r}", limits)
    for key, check in optional.items():
        if key in body:
            check(body[key], f"{where} {key!r}", limits)
    return cast(Body, body)


# ---------------------------------------------------------------------------------------------
# header


def check_encoding(enc: Any, where: str) -> str:
    """`enc` if it is a wire tag of `ENCODINGS`, else the `ProtocolError` naming the known ones."""
    if enc not in ENCODINGS:  # also rejects non-strings: they never equal an allowed tag
        fail(where, f"encoding {show(enc)} not known (known: {', '.join(ENCODINGS)})")
    return cast(str, enc)


def _tensor_meta(value: Any, index: int, mtype: MsgType, limits: Limits) -> TensorMeta:
    where = f"tensors[{index}]"
    entry = _map(value, where, _TENSOR_KEYS, ("scale",))
    name = _name(entry["name"], f"{where} name", limits)
    where = f"{where} {name!r}"
    dtype = entry["dtype"]
    if dtype not in DTYPES:  # also rejects non-strings: they never equal an allowed name
        fail(where, f"dtype {show(dtype)} not allowed (allowed: {', '.join(DTYPES)})")
    dims = _list(entry["shape"], f"{where} shape", MAX_NDIM)
    shape = tuple(_int(d, f"{where} shape[{i}]") for i, d in enumerate(dims))
    elements = math.prod(shape)
    if elements > limits.max_elements:
        fail(where, f"shape {list(shape)} has {elements} elements, limit {limits.max_elements}")
    enc = check_encoding(entry["enc"], where)
    base = _int(entry["base"], f"{where} base", lowest=-1)
    if mtype is MsgType.DELTA and base < 0:
        fail(where, f"a delta needs the replica version it applies to (base >= 0), got {base}")
    noise = _finite_float(entry["noise"], f"{where} noise")
    if noise < 0:
        fail(f"{where} noise", f"expected a standard deviation >= 0, got {noise}")
    scale = entry.get("scale")
    if scale is not None:
        scale = _finite_float(scale, f"{where} scale")
        if enc != "int8":
            fail(where, f"encoding {enc!r} carries no scale")
    if enc == "int8":
        if dtype != "int8":
            fail(where, f"encoding 'int8' needs dtype int8, got {dtype}")
        if scale is None or scale <= 0:
            fail(where, f"encoding 'int8' needs a scale > 0, got {scale}")
    if enc == "topk" and np.dtype(dtype).kind != "f":
        fail(where, f"encoding 'topk' needs a float dtype, got {dtype}")
    return TensorMeta(name, dtype, shape, enc, base, noise, scale)


def check_header(header: Any, limits: Limits) -> Message:
    """Validate a header map; return its message with `meta` filled and no tensors yet."""
    if not isinstance(header, dict):
        fail("header", f"expected a map, got {kind(header)}")
    if "v" not in header:
        fail("header", "missing key 'v' (protocol version)")
    version = header["v"]
    if type(version) is not int or version != PROTOCOL_VERSION:
        fail(
            "header 'v'",
            f"protocol version {show(version)} received, this node speaks {PROTOCOL_VERSION}",
        )
    _map(header, "header", HEADER_KEYS)
    type_name = header["type"]
    if not isinstance(type_name, str) or type_name not in _TYPES:
        fail("header 'type'", f"unknown message type {show(type_name)}")
    mtype = _TYPES[type_name]
    sender = _matching(header["sender"], "header 'sender'", limits, _SENDER_RE, "node id")
    session = _matching(
        header["session"], "header 'session'", limits, _SESSION_RE, "session id (32 lowercase hex)"
    )
    seq = _int(header["seq"], "header 'seq'")
    round_ = _int(header["round"], "header 'round'")
    body = _body(header["body"], mtype, limits)
    entries = _list(header["tensors"], "header 'tensors'", limits.max_tensors)
    if entries and mtype not in _TENSOR_TYPES:
        fail("header 'tensors'", f"a {mtype.value} message carries no tensors, got {len(entries)}")
    meta: dict[str, TensorMeta] = {}
    total = 0
    for i, entry in enumerate(entries):
        tm = _tensor_meta(entry, i, mtype, limits)
        if tm.name in meta:
            fail(f"tensors[{i}] {tm.name!r}", "name already used by an earlier tensor")
        meta[tm.name] = tm
        total += math.prod(tm.shape) * np.dtype(tm.dtype).itemsize
        if total > limits.max_total_bytes:
            fail(
                f"tensors[{i}] {tm.name!r}",
                f"tensors need {total} bytes or more in total, limit {limits.max_total_bytes}",
            )
    return Message(mtype, sender, session, seq, round_, body, {}, meta)


# ---------------------------------------------------------------------------------------------
# decoded tensor values


def check_values(array: np.ndarray, where: str, limits: Limits) -> None:
    """Reject NaN/Inf and an L2 norm above `limits.max_norm`, in one pass (a dot product)."""
    if array.size == 0:
        return
    flat = array.reshape(-1)
    if flat.dtype.itemsize == 2:
        if not _all_finite(flat):
            fail(where, "contains NaN or Inf")
        flat = flat.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        sq = float(np.dot(flat, flat))
    if not math.isfinite(sq):
        if not bool(np.isfinite(flat).all()):
            fail(where, "contains NaN or Inf")
        if math.isfinite(limits.max_norm):
            fail(where, f"L2 norm overflows, limit {limits.max_norm:g}")
        return
    if sq > limits.max_norm**2:
        fail(where, f"L2 norm {math.sqrt(sq):.3g} above the limit {limits.max_norm:g}")


def _all_finite(array: np.ndarray) -> bool:
    """True if no element is NaN or Inf.

    Fast path: a float sum is NaN/Inf if any element is; a finite sum proves every element
    finite, and an overflowing one falls back to a full scan.
    """
    if array.size == 0:
        return True
    if array.dtype.itemsize == 2:  # float16: non-finite exactly when all exponent bits are set
        return int((array.view("<u2") & 0x7FFF).max()) < 0x7C00
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(array.sum()):
            return True
    return bool(np.isfinite(array).all())

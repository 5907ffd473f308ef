"""The wire protocol: encode and decode gossip messages, with no sockets.

A message is a ZeroMQ multipart: frame 0 is a msgpack header, then one raw frame per tensor
(C-order, little-endian bytes). This module owns the header and body schemas, the limits, the
dtype and encoding allow-lists and every msgpack option; `docs/protocol.md` is the spec it
implements. Tensor bytes are never copied: `encode` hands out memoryviews of the arrays and
`decode` returns read-only numpy views into the received frames. `decode` raises only
`ProtocolError`, whose message says what was wrong and where.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NoReturn

import msgpack
import numpy as np

from m3tgossip.errors import ProtocolError

__all__ = [
    "DEFAULT_LIMITS",
    "DTYPES",
    "ENCODINGS",
    "PROTOCOL_VERSION",
    "Limits",
    "Message",
    "MsgType",
    "TensorMeta",
    "decode",
    "encode",
    "frames_nbytes",
    "new_session",
]

PROTOCOL_VERSION: int = 1

#: dtypes a tensor frame may carry (numpy names; bytes are always little-endian)
DTYPES: tuple[str, ...] = ("float16", "float32", "float64", "int8", "uint8", "int32", "int64")
#: tensor encodings understood by this version ("raw": the array's bytes as they are)
#: raw: the values as they are (float16 is a raw dtype); int8: int8 values times the
#: per-tensor `scale`; topk: k int32 indices (strictly increasing) then k values, of a dense
#: tensor of `shape` that is zero elsewhere
ENCODINGS: tuple[str, ...] = ("raw", "int8", "topk")
_INDEX = np.dtype("<i4")

MAX_NAME = 128  # characters in a component name
MAX_NDIM = 8  # dimensions of a tensor
MAX_DEPTH = 8  # nesting of the `status` document
_INT_MAX = 2**63 - 1
_MSGPACK_INT_MIN = -(2**63)
_MSGPACK_INT_MAX = 2**64 - 1

_SENDER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
_SESSION_RE = re.compile(r"[0-9a-f]{32}")
_NAME_RE = re.compile(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)*")
_LISTEN_RE = re.compile(
    r"tcp://([A-Za-z0-9](?:[A-Za-z0-9.\-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\]):([0-9]{1,5})"
)


class MsgType(str, Enum):
    """The message types; each has its own body schema (see `docs/protocol.md`)."""

    HELLO = "hello"
    DELTA = "delta"
    STATE = "state"
    RESYNC = "resync"
    HEARTBEAT = "heartbeat"
    LEAVE = "leave"
    STATUS_REQUEST = "status_request"
    STATUS = "status"
    ACK = "ack"
    PUSH = "push"
    RETIRE = "retire"


_TYPES = {t.value: t for t in MsgType}
_TENSOR_TYPES = frozenset({MsgType.DELTA, MsgType.STATE, MsgType.PUSH})


@dataclass(frozen=True)
class Limits:
    """Bounds a decoder enforces before trusting a message."""

    max_frames: int = 1025
    max_header_bytes: int = 1 << 20
    max_tensors: int = 1024
    max_elements: int = 1 << 28  # per tensor
    max_total_bytes: int = 1 << 31  # all tensor frames together
    max_str: int = 4096  # characters of any string in the header
    max_list: int = 4096  # items of a list; entries in the whole `status` document
    max_norm: float = 1e9  # L2 norm of one decoded float tensor


DEFAULT_LIMITS = Limits()


@dataclass
class TensorMeta:
    """Header entry describing one tensor frame."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    enc: str = "raw"
    base: int = -1  # replica version the tensor applies to; -1: a fresh full state
    noise: float = 0.0  # std of the differential-privacy noise added, 0 if none
    scale: float | None = None  # reserved for encodings that need one; "raw" carries none


@dataclass
class Message:
    """A decoded message, or one to encode.

    For `encode`, `meta` may be partial: a tensor without an entry gets dtype and shape from the
    array, `base=-1` and `noise=0`. `decode` fills `meta` for every tensor.
    """

    type: MsgType
    sender: str
    session: str
    seq: int
    round: int
    body: dict
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, TensorMeta] = field(default_factory=dict)


def values_digest(array: np.ndarray) -> str:
    """128-bit BLAKE2b of a tensor's dtype, shape and little-endian C-order values (hello `origin`)."""
    a = np.ascontiguousarray(array)
    a = a.astype(a.dtype.newbyteorder("<"), copy=False)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{a.dtype.name}:{list(a.shape)}:".encode())
    h.update(memoryview(a.reshape(-1)).cast("B"))
    return h.hexdigest()


def new_session() -> str:
    """A fresh session id (32 lowercase hex characters), drawn once per daemon start."""
    return secrets.token_hex(16)


# ---------------------------------------------------------------------------------------------
# validation helpers: each checks one value and names `where` it was in the error message


def _fail(where: str, problem: str) -> NoReturn:
    raise ProtocolError(f"{where}: {problem}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _kind(value: Any) -> str:
    return type(value).__name__


def _int(value: Any, where: str, lowest: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        _fail(where, f"expected an integer, got {_kind(value)} {_show(value)}")
    if not lowest <= value <= _INT_MAX:
        _fail(where, f"expected an integer in [{lowest}, 2**63-1], got {value}")
    return value


def _count(value: Any, where: str, limits: Limits) -> int:
    return _int(value, where)


def _finite_float(value: Any, where: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        _fail(where, f"expected a number, got {_kind(value)} {_show(value)}")
    result = float(value)
    if not math.isfinite(result):
        _fail(where, f"expected a finite number, got {result}")
    return result


def _str(value: Any, where: str, limits: Limits) -> str:
    if not isinstance(value, str):
        _fail(where, f"expected a string, got {_kind(value)} {_show(value)}")
    if len(value) > limits.max_str:
        _fail(where, f"string of {len(value)} characters, limit {limits.max_str}")
    return value


def _matching(value: Any, where: str, limits: Limits, pattern: re.Pattern[str], what: str) -> str:
    text = _str(value, where, limits)
    if pattern.fullmatch(text) is None:
        _fail(where, f"not a valid {what}: {_show(text)}")
    return text


def _name(value: Any, where: str, limits: Limits) -> str:
    text = _str(value, where, limits)
    if len(text) > MAX_NAME:
        _fail(where, f"component name of {len(text)} characters, limit {MAX_NAME}")
    if _NAME_RE.fullmatch(text) is None:
        _fail(where, f"not a valid component name: {_show(text)}")
    return text


def _list(value: Any, where: str, limit: int) -> list | tuple:
    if not isinstance(value, (list, tuple)):
        _fail(where, f"expected a list, got {_kind(value)} {_show(value)}")
    if len(value) > limit:
        _fail(where, f"list of {len(value)} items, limit {limit}")
    return value


def _map(value: Any, where: str, required: Iterable[str], optional: Iterable[str] = ()) -> dict:
    """Check that `value` is a map with exactly the `required` keys plus any of `optional`."""
    if not isinstance(value, dict):
        _fail(where, f"expected a map, got {_kind(value)} {_show(value)}")
    allowed = set(required) | set(optional)
    for key in value:
        if key not in allowed:
            _fail(where, f"unknown key {_show(key)}")
    for key in required:
        if key not in value:
            _fail(where, f"missing key {key!r}")
    return value


# ---------------------------------------------------------------------------------------------
# bodies


def _names(value: Any, where: str, limits: Limits) -> list[str]:
    items = _list(value, where, limits.max_list)
    names = [_name(item, f"{where}[{i}]", limits) for i, item in enumerate(items)]
    if len(set(names)) != len(names):
        twice = next(n for i, n in enumerate(names) if n in names[:i])
        _fail(where, f"component {twice!r} listed twice")
    return names


def _some_names(value: Any, where: str, limits: Limits) -> list[str]:
    names = _names(value, where, limits)
    if not names:
        _fail(where, "names no component")
    return names


def _model_id(value: Any, where: str, limits: Limits) -> str:
    text = _str(value, where, limits)
    if not text or not text.isprintable():
        _fail(where, f"expected a non-empty printable model id, got {_show(text)}")
    return text


def _listen(value: Any, where: str, limits: Limits) -> str:
    text = _str(value, where, limits)
    match = _LISTEN_RE.fullmatch(text)
    if match is None or not 1 <= int(match.group(2)) <= 65535:
        _fail(where, f"expected 'tcp://host:port' with port 1-65535, got {_show(text)}")
    return text


def _document(value: Any, where: str, limits: Limits) -> dict:
    """A JSON-like map: str keys; str/int/float/bool/None/list/map values; bounded depth and size."""
    if not isinstance(value, dict):
        _fail(where, f"expected a map, got {_kind(value)} {_show(value)}")
    budget = [limits.max_list]

    def walk(item: Any, at: str, depth: int) -> None:
        if item is None or isinstance(item, (bool, float)):
            return
        if isinstance(item, int):
            if not _MSGPACK_INT_MIN <= item <= _MSGPACK_INT_MAX:
                _fail(at, f"integer {item} outside the msgpack range")
            return
        if isinstance(item, str):
            _str(item, at, limits)
            return
        if not isinstance(item, (dict, list, tuple)):
            _fail(at, f"{_kind(item)} is not a JSON-like value")
        if depth >= MAX_DEPTH:
            _fail(at, f"nested deeper than {MAX_DEPTH} levels")
        budget[0] -= len(item)
        if budget[0] < 0:
            _fail(where, f"document has more than {limits.max_list} entries")
        if isinstance(item, dict):
            for key, sub in item.items():
                if not isinstance(key, str):
                    _fail(at, f"map key {_show(key)} is not a string")
                _str(key, f"{at} key", limits)
                walk(sub, f"{at}[{key!r}]", depth + 1)
        else:
            for i, sub in enumerate(item):
                walk(sub, f"{at}[{i}]", depth + 1)

    walk(value, where, 0)
    return value


_Check = Callable[[Any, str, Limits], Any]


def _flag(value: Any, where: str, limits: Limits) -> bool:
    if not isinstance(value, bool):
        _fail(where, f"expected true or false, got {_kind(value)} {_show(value)}")
    return value


def _component_map(
    value: Any, where: str, limits: Limits, item: Callable[[Any, str], Any]
) -> dict[str, Any]:
    """A map of component name -> value checked by `item(value, where)`, at most `max_tensors` long."""
    if not isinstance(value, dict):
        _fail(where, f"expected a map, got {_kind(value)} {_show(value)}")
    if len(value) > limits.max_tensors:
        _fail(where, f"map of {len(value)} entries, limit {limits.max_tensors}")
    out = {}
    for key, entry in value.items():
        name = _name(key, f"{where} key", limits)
        out[name] = item(entry, f"{where} {name!r}")
    return out


def _weight(value: Any, where: str) -> float:
    weight = _finite_float(value, where)
    if weight < 0:
        _fail(where, f"expected a weight >= 0, got {weight}")
    return weight


def _weights(value: Any, where: str, limits: Limits) -> dict[str, float]:
    """Push-sum weights: component name -> finite weight >= 0."""
    return _component_map(value, where, limits, _weight)


_DIGEST_RE = re.compile(r"[0-9a-f]{32}")


def _digest(value: Any, where: str) -> str:
    if not isinstance(value, str) or _DIGEST_RE.fullmatch(value) is None:
        _fail(where, f"expected 32 lowercase hex digits, got {_kind(value)} {_show(value)}")
    return value


def _origins(value: Any, where: str, limits: Limits) -> dict[str, str]:
    """Hello `origin`: component name -> 32 lowercase hex digits (a 128-bit BLAKE2b digest)."""
    return _component_map(value, where, limits, _digest)


_BODIES: dict[MsgType, dict[str, _Check]] = {
    MsgType.HELLO: {"model": _model_id, "components": _names, "listen": _listen, "round": _count},
    MsgType.DELTA: {},
    MsgType.STATE: {"reason": _str},
    MsgType.RESYNC: {"components": _some_names, "reason": _str},
    MsgType.HEARTBEAT: {"round": _count},
    MsgType.LEAVE: {"reason": _str},
    MsgType.STATUS_REQUEST: {},
    MsgType.STATUS: {"state": _document},
    MsgType.ACK: {"ack_seq": _count},
    MsgType.PUSH: {"weights": _weights},
    MsgType.RETIRE: {"components": _some_names, "reason": _str},
}
#: keys a body may carry beyond its required ones
_OPTIONAL: dict[MsgType, dict[str, _Check]] = {
    MsgType.HELLO: {"answer": _flag, "origin": _origins},
}


def _body(value: Any, mtype: MsgType, limits: Limits) -> dict:
    schema = _BODIES[mtype]
    where = f"{mtype.value} body"
    optional = _OPTIONAL.get(mtype, {})
    body = _map(value, where, schema, optional)
    for key, check in schema.items():
        check(body[key], f"{where} {key!r}", limits)
    for key, check in optional.items():
        if key in body:
            check(body[key], f"{where} {key!r}", limits)
    return body


# ---------------------------------------------------------------------------------------------
# header

_HEADER_KEYS = ("v", "type", "sender", "session", "seq", "round", "body", "tensors")
_TENSOR_KEYS = ("name", "dtype", "shape", "enc", "base", "noise")


def _tensor_meta(value: Any, index: int, mtype: MsgType, limits: Limits) -> TensorMeta:
    where = f"tensors[{index}]"
    entry = _map(value, where, _TENSOR_KEYS, ("scale",))
    name = _name(entry["name"], f"{where} name", limits)
    where = f"{where} {name!r}"
    dtype = entry["dtype"]
    if dtype not in DTYPES:  # also rejects non-strings: they never equal an allowed name
        _fail(where, f"dtype {_show(dtype)} not allowed (allowed: {', '.join(DTYPES)})")
    dims = _list(entry["shape"], f"{where} shape", MAX_NDIM)
    shape = tuple(_int(d, f"{where} shape[{i}]") for i, d in enumerate(dims))
    elements = math.prod(shape)
    if elements > limits.max_elements:
        _fail(where, f"shape {list(shape)} has {elements} elements, limit {limits.max_elements}")
    enc = entry["enc"]
    if enc not in ENCODINGS:
        _fail(where, f"encoding {_show(enc)} not known (known: {', '.join(ENCODINGS)})")
    base = _int(entry["base"], f"{where} base", lowest=-1)
    if mtype is MsgType.DELTA and base < 0:
        _fail(where, f"a delta needs the replica version it applies to (base >= 0), got {base}")
    noise = _finite_float(entry["noise"], f"{where} noise")
    if noise < 0:
        _fail(f"{where} noise", f"expected a standard deviation >= 0, got {noise}")
    scale = entry.get("scale")
    if scale is not None:
        scale = _finite_float(scale, f"{where} scale")
        if enc != "int8":
            _fail(where, f"encoding {enc!r} carries no scale")
    if enc == "int8":
        if dtype != "int8":
            _fail(where, f"encoding 'int8' needs dtype int8, got {dtype}")
        if scale is None or scale <= 0:
            _fail(where, f"encoding 'int8' needs a scale > 0, got {scale}")
    if enc == "topk" and np.dtype(dtype).kind != "f":
        _fail(where, f"encoding 'topk' needs a float dtype, got {dtype}")
    return TensorMeta(name, dtype, shape, enc, base, noise, scale)


def _check_header(header: Any, limits: Limits) -> Message:
    """Validate a header map; return its message with `meta` filled and no tensors yet."""
    if not isinstance(header, dict):
        _fail("header", f"expected a map, got {_kind(header)}")
    if "v" not in header:
        _fail("header", "missing key 'v' (protocol version)")
    version = header["v"]
    if type(version) is not int or version != PROTOCOL_VERSION:
        _fail(
            "header 'v'",
            f"protocol version {_show(version)} received, this node speaks {PROTOCOL_VERSION}",
        )
    _map(header, "header", _HEADER_KEYS)
    kind = header["type"]
    if not isinstance(kind, str) or kind not in _TYPES:
        _fail("header 'type'", f"unknown message type {_show(kind)}")
    mtype = _TYPES[kind]
    sender = _matching(header["sender"], "header 'sender'", limits, _SENDER_RE, "node id")
    session = _matching(
        header["session"], "header 'session'", limits, _SESSION_RE, "session id (32 lowercase hex)"
    )
    seq = _int(header["seq"], "header 'seq'")
    round_ = _int(header["round"], "header 'round'")
    body = _body(header["body"], mtype, limits)
    entries = _list(header["tensors"], "header 'tensors'", limits.max_tensors)
    if entries and mtype not in _TENSOR_TYPES:
        _fail("header 'tensors'", f"a {mtype.value} message carries no tensors, got {len(entries)}")
    meta: dict[str, TensorMeta] = {}
    total = 0
    for i, entry in enumerate(entries):
        tm = _tensor_meta(entry, i, mtype, limits)
        if tm.name in meta:
            _fail(f"tensors[{i}] {tm.name!r}", "name already used by an earlier tensor")
        meta[tm.name] = tm
        total += math.prod(tm.shape) * np.dtype(tm.dtype).itemsize
        if total > limits.max_total_bytes:
            _fail(
                f"tensors[{i}] {tm.name!r}",
                f"tensors need {total} bytes or more in total, limit {limits.max_total_bytes}",
            )
    return Message(mtype, sender, session, seq, round_, body, {}, meta)


# ---------------------------------------------------------------------------------------------
# msgpack, pinned in one place


def _no_ext(code: int, data: bytes) -> NoReturn:
    _fail("header", f"msgpack extension type {code} not allowed")


def _unique_map(pairs: list[tuple[Any, Any]]) -> dict:
    result: dict = {}
    for key, value in pairs:
        if key in result:
            _fail("header", f"map key {_show(key)} appears twice")
        result[key] = value
    return result


def _pack(header: dict) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def _unpack(data: memoryview, limits: Limits) -> Any:
    # unpackb has no max_buffer_size; the caller bounds len(data) by max_header_bytes instead.
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_no_ext,
            object_pairs_hook=_unique_map,
            max_str_len=limits.max_str,
            max_bin_len=0,
            max_array_len=max(limits.max_list, limits.max_tensors),
            max_map_len=max(limits.max_list, len(_HEADER_KEYS)),
            max_ext_len=0,
        )
    except ProtocolError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException) as exc:
        _fail("header", f"msgpack decoding failed ({_kind(exc)}: {exc})")


# ---------------------------------------------------------------------------------------------
# frames and tensors


def _view(frame: Any, index: int) -> memoryview:
    """A flat byte view of a frame: bytes, memoryview, or anything with `.buffer` (zmq.Frame)."""
    source = frame.buffer if hasattr(frame, "buffer") else frame
    try:
        view = memoryview(source)
    except TypeError:
        _fail(f"frame {index}", f"not a contiguous buffer ({_kind(frame)})")
    if not view.c_contiguous:
        _fail(f"frame {index}", "not a contiguous buffer (strided view)")
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


def _wire_array(array: Any, where: str) -> np.ndarray:
    """`array` as allowed, little-endian, C-contiguous; copies only when it is not already."""
    if not isinstance(array, np.ndarray):
        _fail(where, f"expected a numpy array, got {_kind(array)}")
    if array.dtype.name not in DTYPES:
        _fail(where, f"dtype {array.dtype} not allowed (allowed: {', '.join(DTYPES)})")
    little = array.dtype.newbyteorder("<")
    if array.dtype != little:
        array = array.astype(little)
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    return array


def _check_values(array: np.ndarray, where: str, limits: Limits) -> None:
    """Reject NaN/Inf and an L2 norm above `limits.max_norm`, in one pass (a dot product)."""
    if array.size == 0:
        return
    flat = array.reshape(-1)
    if flat.dtype.itemsize == 2:
        if not _all_finite(flat):
            _fail(where, "contains NaN or Inf")
        flat = flat.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        sq = float(np.dot(flat, flat))
    if not math.isfinite(sq):
        if not bool(np.isfinite(flat).all()):
            _fail(where, "contains NaN or Inf")
        if math.isfinite(limits.max_norm):
            _fail(where, f"L2 norm overflows, limit {limits.max_norm:g}")
        return
    if sq > limits.max_norm**2:
        _fail(where, f"L2 norm {math.sqrt(sq):.3g} above the limit {limits.max_norm:g}")


def _all_finite(array: np.ndarray) -> bool:
    """True if no element is NaN or Inf. Fast path: a float sum is NaN/Inf if any element is;
    a finite sum proves every element finite, and an overflowing one falls back to a full scan."""
    if array.size == 0:
        return True
    if array.dtype.itemsize == 2:  # float16: non-finite exactly when all exponent bits are set
        return int((array.view("<u2") & 0x7FFF).max()) < 0x7C00
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(array.sum()):
            return True
    return bool(np.isfinite(array).all())


# ---------------------------------------------------------------------------------------------
# public API


def encode(msg: Message) -> list[bytes | memoryview]:
    """Frames for `msg`: the packed header, then one memoryview per tensor (no byte copies).

    Raises `ProtocolError` if `decode` would reject the message for its header, body, names,
    dtypes or sizes. Tensor values are not scanned here; receivers reject NaN/Inf.
    """
    if not isinstance(msg.tensors, dict) or not isinstance(msg.meta, dict):
        _fail("message", "tensors and meta must be dicts keyed by component name")
    for name in msg.meta:
        if name not in msg.tensors:
            _fail(f"meta {_show(name)}", "describes no tensor of the message")
    arrays: list[np.ndarray] = []
    entries: list[dict[str, Any]] = []
    for i, (name, array) in enumerate(msg.tensors.items()):
        where = f"tensors[{i}] {name!r}"
        array = _wire_array(array, where)
        tm = msg.meta.get(name) or TensorMeta(name, array.dtype.name, array.shape)
        if tm.enc == "topk":
            # the payload is bytes: k indices then k values of the dense tensor `tm.shape`
            per = _INDEX.itemsize + np.dtype(tm.dtype).itemsize
            if array.dtype != np.uint8 or array.ndim != 1 or array.size % per:
                _fail(where, f"a topk payload is 1-D uint8 of a multiple of {per} bytes")
        elif tm.name != name or tm.dtype != array.dtype.name or tuple(tm.shape) != array.shape:
            _fail(
                where,
                f"meta says {tm.name!r} {tm.dtype} {list(tm.shape)},"
                f" array is {array.dtype.name} {list(array.shape)}",
            )
        entry = {
            "name": name,
            "dtype": tm.dtype,
            "shape": list(tm.shape),
            "enc": tm.enc,
            "base": tm.base,
            "noise": tm.noise,
        }
        if tm.scale is not None:
            entry["scale"] = tm.scale
        entries.append(entry)
        arrays.append(array)
    header = {
        "v": PROTOCOL_VERSION,
        "type": msg.type.value if isinstance(msg.type, MsgType) else msg.type,
        "sender": msg.sender,
        "session": msg.session,
        "seq": msg.seq,
        "round": msg.round,
        "body": msg.body,
        "tensors": entries,
    }
    _check_header(header, DEFAULT_LIMITS)
    packed = _pack(header)
    if len(packed) > DEFAULT_LIMITS.max_header_bytes:
        _fail("header", f"{len(packed)} bytes packed, limit {DEFAULT_LIMITS.max_header_bytes}")
    return [packed, *(memoryview(a.reshape(-1).view(np.uint8)) for a in arrays)]


def decode(frames: Sequence[bytes | memoryview | Any], limits: Limits = DEFAULT_LIMITS) -> Message:
    """Validate `frames` and return the message; tensors are read-only views into the frames.

    Raises only `ProtocolError`, saying what was wrong and where.
    """
    try:
        return _decode(frames, limits)
    except ProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - the contract: a peer's bytes raise nothing else
        _fail("message", f"malformed ({_kind(exc)}: {exc})")


def _decode(frames: Sequence[Any], limits: Limits) -> Message:
    count = len(frames)
    if count == 0:
        _fail("message", "no frames")
    if count > limits.max_frames:
        _fail("message", f"{count} frames, limit {limits.max_frames}")
    head = _view(frames[0], 0)
    if head.nbytes > limits.max_header_bytes:
        _fail("header", f"{head.nbytes} bytes, limit {limits.max_header_bytes}")
    msg = _check_header(_unpack(head, limits), limits)
    if count != 1 + len(msg.meta):
        listed = len(msg.meta)
        _fail(
            "message", f"{count} frames, header lists {listed} tensors (needs {1 + listed} frames)"
        )
    for i, tm in enumerate(msg.meta.values()):
        where = f"tensors[{i}] {tm.name!r}"
        view = _view(frames[i + 1], i + 1)
        dtype = np.dtype(tm.dtype).newbyteorder("<")
        if tm.enc == "topk":
            msg.tensors[tm.name] = _decode_topk(view, tm, dtype, where, limits)
            continue
        need = math.prod(tm.shape) * dtype.itemsize
        if view.nbytes != need:
            _fail(
                where,
                f"frame has {view.nbytes} bytes, shape {list(tm.shape)} {tm.dtype} needs {need}",
            )
        array = np.frombuffer(view, dtype=dtype).reshape(tm.shape)
        if dtype.kind == "f":
            _check_values(array, where, limits)
        if tm.enc == "int8":
            array = array.astype(np.float32) * np.float32(tm.scale)
            _check_values(array, where, limits)
        array.flags.writeable = False
        msg.tensors[tm.name] = array
    return msg


def _decode_topk(
    view: memoryview, tm: TensorMeta, dtype: np.dtype, where: str, limits: Limits
) -> np.ndarray:
    """Dense tensor from k strictly increasing int32 indices followed by k values."""
    n = math.prod(tm.shape)
    per = _INDEX.itemsize + dtype.itemsize
    if view.nbytes % per:
        _fail(where, f"topk frame has {view.nbytes} bytes, not a multiple of {per}")
    k = view.nbytes // per
    if k > n:
        _fail(where, f"topk frame holds {k} entries, the tensor has {n} elements")
    index = np.frombuffer(view, dtype=_INDEX, count=k)
    values = np.frombuffer(view, dtype=dtype, count=k, offset=k * _INDEX.itemsize)
    if k and (index[0] < 0 or index[-1] >= n or (k > 1 and not bool(np.all(np.diff(index) > 0)))):
        _fail(where, f"topk indices must increase strictly within [0, {n})")
    _check_values(values, where, limits)
    dense = np.zeros(n, dtype=dtype)
    dense[index] = values
    dense = dense.reshape(tm.shape)
    dense.flags.writeable = False
    return dense


def frames_nbytes(frames: Iterable[bytes | memoryview | Any]) -> int:
    """Total bytes of a multipart message (header and tensor frames), for bytes in/out metrics."""
    return sum(memoryview(getattr(f, "buffer", f)).nbytes for f in frames)

"""Frames: a message to and from a ZeroMQ multipart, with msgpack pinned in this one place.

Frame 0 is the msgpack header, then one frame per tensor (C-order, little-endian bytes).
Tensor bytes are never copied: `encode` hands out memoryviews of the arrays and `decode`
returns read-only numpy views into the received frames (a codec that expands its payload,
like int8 or topk, returns the dense tensor it built). `decode` raises only `ProtocolError`,
whose message says what was wrong and where; the checks are `schema.py`'s, the tensor
decoding is the codec's of each tensor's wire tag.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

import msgpack
import numpy as np

from m3tgossip.errors import ProtocolError
from m3tgossip.protocol.codecs import DECODERS, decoder_for
from m3tgossip.protocol.messages import (
    DEFAULT_LIMITS,
    DTYPES,
    PROTOCOL_VERSION,
    Limits,
    Message,
    MsgType,
    TensorMeta,
)
from m3tgossip.protocol.schema import HEADER_KEYS, check_header, fail, kind, show

__all__ = ["decode", "encode", "frames_nbytes"]


# ---------------------------------------------------------------------------------------------
# msgpack


def _no_ext(code: int, data: bytes) -> NoReturn:
    fail("header", f"msgpack extension type {code} not allowed")


def _unique_map(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    result: dict[Any, Any] = {}
    for key, value in pairs:
        if key in result:
            fail("header", f"map key {show(key)} appears twice")
        result[key] = value
    return result


def _pack(header: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(header, use_bin_type=True)
    return packed


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
            max_map_len=max(limits.max_list, len(HEADER_KEYS)),
            max_ext_len=0,
        )
    except ProtocolError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException) as exc:
        fail("header", f"msgpack decoding failed ({kind(exc)}: {exc})")


# ---------------------------------------------------------------------------------------------
# frames and arrays


def _view(frame: Any, index: int) -> memoryview:
    """A flat byte view of a frame: bytes, memoryview, or anything with `.buffer` (zmq.Frame)."""
    source = frame.buffer if hasattr(frame, "buffer") else frame
    try:
        view = memoryview(source)
    except TypeError:
        fail(f"frame {index}", f"not a contiguous buffer ({kind(frame)})")
    if not view.c_contiguous:
        fail(f"frame {index}", "not a contiguous buffer (strided view)")
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


def _wire_array(array: Any, where: str) -> np.ndarray:
    """`array` as allowed, little-endian, C-contiguous; copies only when it is not already."""
    if not isinstance(array, np.ndarray):
        fail(where, f"expected a numpy array, got {kind(array)}")
    if array.dtype.name not in DTYPES:
        fail(where, f"dtype {array.dtype} not allowed (allowed: {', '.join(DTYPES)})")
    little = array.dtype.newbyteorder("<")
    if array.dtype != little:
        array = array.astype(little)
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    return array


# ---------------------------------------------------------------------------------------------
# encode and decode


def encode(msg: Message) -> list[bytes | memoryview]:
    """Frames for `msg`: the packed header, then one memoryview per tensor (no byte copies).

    Raises `ProtocolError` if `decode` would reject the message for its header, body, names,
    dtypes or sizes. Tensor values are not scanned here; receivers reject NaN/Inf.
    """
    if not isinstance(msg.tensors, dict) or not isinstance(msg.meta, dict):
        fail("message", "tensors and meta must be dicts keyed by component name")
    for name in msg.meta:
        if name not in msg.tensors:
            fail(f"meta {show(name)}", "describes no tensor of the message")
    arrays: list[np.ndarray] = []
    entries: list[dict[str, Any]] = []
    for i, (name, given) in enumerate(msg.tensors.items()):
        where = f"tensors[{i}] {name!r}"
        array = _wire_array(given, where)
        tm = msg.meta.get(name) or TensorMeta(name, array.dtype.name, array.shape)
        decoder_for(tm.enc, where).check_payload(name, array, tm, where)
        entry: dict[str, Any] = {
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
    check_header(header, DEFAULT_LIMITS)
    packed = _pack(header)
    if len(packed) > DEFAULT_LIMITS.max_header_bytes:
        fail("header", f"{len(packed)} bytes packed, limit {DEFAULT_LIMITS.max_header_bytes}")
    return [packed, *(a.reshape(-1).view(np.uint8).data for a in arrays)]


def decode(frames: Sequence[bytes | memoryview | Any], limits: Limits = DEFAULT_LIMITS) -> Message:
    """Validate `frames` and return the message; tensors are read-only views into the frames.

    Raises only `ProtocolError`, saying what was wrong and where.
    """
    try:
        return _decode(frames, limits)
    except ProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - the contract: a peer's bytes raise nothing else
        fail("message", f"malformed ({kind(exc)}: {exc})")


def _decode(frames: Sequence[Any], limits: Limits) -> Message:
    count = len(frames)
    if count == 0:
        fail("message", "no frames")
    if count > limits.max_frames:
        fail("message", f"{count} frames, limit {limits.max_frames}")
    head = _view(frames[0], 0)
    if head.nbytes > limits.max_header_bytes:
        fail("header", f"{head.nbytes} bytes, limit {limits.max_header_bytes}")
    msg = check_header(_unpack(head, limits), limits)
    if count != 1 + len(msg.meta):
        listed = len(msg.meta)
        fail(
            "message", f"{count} frames, header lists {listed} tensors (needs {1 + listed} frames)"
        )
    for i, tm in enumerate(msg.meta.values()):
        where = f"tensors[{i}] {tm.name!r}"
        view = _view(frames[i + 1], i + 1)
        msg.tensors[tm.name] = DECODERS[tm.enc].decode(view, tm, where, limits)
    return msg


def frames_nbytes(frames: Iterable[bytes | memoryview | Any]) -> int:
    """Total bytes of a multipart message (header and tensor frames), for bytes in/out metrics."""
    return sum(memoryview(getattr(f, "buffer", f)).nbytes for f in frames)

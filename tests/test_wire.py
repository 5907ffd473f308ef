"""Wire protocol: round trips, zero-copy, rejected messages, fuzzing, and the spec's examples."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import m3tgossip
from m3tgossip.errors import ProtocolError
from m3tgossip.protocol import (
    BODY_TYPES,
    DEFAULT_LIMITS,
    DTYPES,
    PROTOCOL_VERSION,
    Limits,
    Message,
    MsgType,
    TensorMeta,
    decode,
    encode,
    frames_nbytes,
    new_session,
    schema,
)

SESSION = "0123456789abcdef0123456789abcdef"

BODIES: dict[MsgType, dict[str, Any]] = {
    MsgType.HELLO: {
        "model": "m3t-minilm-l6/v1",
        "components": ["encoder.text", "fusion", "head.dropout"],
        "listen": "tcp://127.0.0.1:5701",
        "round": 3,
    },
    MsgType.DELTA: {},
    MsgType.STATE: {"reason": "start"},
    MsgType.RESYNC: {"components": ["fusion"], "reason": "replica at version 2, base 4"},
    MsgType.HEARTBEAT: {"round": 4},
    MsgType.LEAVE: {"reason": "shutdown"},
    MsgType.STATUS_REQUEST: {},
    MsgType.STATUS: {
        "state": {
            "node": "n1",
            "round": 4,
            "loss": 0.25,
            "ok": True,
            "missing": None,
            "neighbours": ["n2", {"id": "n3", "heard": [1, 2]}],
        }
    },
    MsgType.PUSH: {"weights": {"encoder.text": 0.25, "fusion": 0.25, "head.stress": 0.5}},
    MsgType.RETIRE: {"components": ["encoder.signal"], "reason": "privacy budget spent"},
    MsgType.FORGET_REQUEST: {"target": "learner", "ids": ["17", "42"], "mode": "exact"},
    MsgType.FORGET_REPLY: {"accepted": True, "request": "5" * 32, "reason": "exact started"},
    MsgType.FORGET: {
        "request": "5" * 32,
        "origin": "uni-a",
        "target": "learner",
        "ids": ["17"],
        "mode": "approximate",
        "tags": {"inst-a": "a" * 64, "uni-b": "b" * 64},
    },
}


def tensors_for(mtype: MsgType) -> tuple[dict[str, np.ndarray], dict[str, TensorMeta]]:
    """Three tensors (float16 matrix, 0-d float64, float32 vector) for delta/state, else none."""
    if mtype not in (MsgType.DELTA, MsgType.STATE, MsgType.PUSH):
        return {}, {}
    base = 4 if mtype is MsgType.DELTA else -1
    tensors = {
        "encoder.text": np.arange(6, dtype=np.float16).reshape(2, 3),
        "fusion": np.array(2.5),
        "head.stress": np.linspace(-1.0, 1.0, 100, dtype=np.float32),
    }
    meta = {name: TensorMeta(name, a.dtype.name, a.shape, base=base) for name, a in tensors.items()}
    meta["head.stress"].noise = 0.5
    return tensors, meta


def message(mtype: MsgType = MsgType.DELTA) -> Message:
    tensors, meta = tensors_for(mtype)
    body = json.loads(json.dumps(BODIES[mtype]))  # a fresh copy
    return Message(mtype, "n1", SESSION, 9, 5, body, tensors, meta)


def valid(mtype: MsgType = MsgType.DELTA) -> tuple[dict[str, Any], list[bytes]]:
    """A valid message as (header map, tensor payloads), ready to be tampered with."""
    frames = encode(message(mtype))
    return msgpack.unpackb(frames[0]), [bytes(f) for f in frames[1:]]


def pack(header: Any, payloads: list[Any]) -> list[Any]:
    return [msgpack.packb(header, use_bin_type=True), *payloads]


def raises(frames: list[Any], words: list[str], limits: Limits = DEFAULT_LIMITS) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(frames, limits)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {str(info.value)!r}"


# ---------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("mtype", list(MsgType), ids=lambda t: t.value)
def test_round_trip_every_type(mtype: MsgType) -> None:
    sent = message(mtype)
    frames = encode(sent)
    assert len(frames) == 1 + len(sent.tensors)
    got = decode(frames)
    assert (got.type, got.sender, got.session, got.seq, got.round) == (mtype, "n1", SESSION, 9, 5)
    assert got.body == BODIES[mtype]
    assert list(got.tensors) == list(sent.tensors)
    for name, array in sent.tensors.items():
        assert got.tensors[name].dtype == array.dtype
        assert got.tensors[name].shape == array.shape
        np.testing.assert_array_equal(got.tensors[name], array)
        assert got.meta[name] == sent.meta[name]


SHAPES = [(), (0,), (5,), (3, 0, 2), (2, 3, 4), (1,) * 8]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_every_dtype_and_shape(dtype: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    if np.dtype(dtype).kind == "f":
        array = rng.standard_normal(shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        array = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    frames = encode(Message(MsgType.STATE, "n1", SESSION, 0, 0, {"reason": "t"}, {"x": array}))
    assert frames[1].nbytes == array.nbytes
    got = decode(frames)
    assert got.tensors["x"].dtype == np.dtype(dtype)
    assert got.tensors["x"].shape == shape
    np.testing.assert_array_equal(got.tensors["x"], array)
    assert got.meta["x"] == TensorMeta("x", dtype, shape)


def test_one_megabyte_tensor_round_trips() -> None:
    array = np.random.default_rng(1).standard_normal((512, 512)).astype(np.float32)
    frames = encode(
        Message(
            MsgType.DELTA,
            "n1",
            SESSION,
            0,
            0,
            {},
            {"backbone": array},
            {"backbone": TensorMeta("backbone", "float32", (512, 512), base=0)},
        )
    )
    assert frames_nbytes(frames[1:]) == 1 << 20
    np.testing.assert_array_equal(decode(frames).tensors["backbone"], array)


def test_partial_meta_defaults_from_the_array() -> None:
    sent = message(MsgType.DELTA)
    del sent.meta["fusion"]
    sent.meta["encoder.text"] = TensorMeta("encoder.text", "float16", [2, 3], base=7)  # list shape
    sent.type = MsgType.STATE  # a delta would need base >= 0 for "fusion"
    sent.body = {"reason": "t"}
    got = decode(encode(sent))
    assert got.meta["fusion"] == TensorMeta("fusion", "float64", (), "raw", -1, 0.0, None)
    assert got.meta["encoder.text"].base == 7
    assert got.meta["head.stress"].noise == 0.5


def test_type_may_be_given_as_a_string() -> None:
    sent = message(MsgType.HEARTBEAT)
    sent.type = "heartbeat"  # type: ignore[assignment]
    assert decode(encode(sent)).type is MsgType.HEARTBEAT


def test_new_session_is_32_lowercase_hex_and_fresh() -> None:
    sessions = {new_session() for _ in range(20)}
    assert len(sessions) == 20
    assert all(re.fullmatch(r"[0-9a-f]{32}", s) for s in sessions)


# ---------------------------------------------------------------------------------------------
# zero copy


def test_encode_hands_out_views_of_the_arrays() -> None:
    sent = message(MsgType.DELTA)
    frames = encode(sent)
    assert isinstance(frames[0], bytes)
    for frame, array in zip(frames[1:], sent.tensors.values(), strict=True):
        assert isinstance(frame, memoryview)
        assert np.shares_memory(np.frombuffer(frame, np.uint8), array)


FRAME_KINDS: dict[str, Callable[[bytes], Any]] = {
    "bytes": bytes,
    "memoryview": memoryview,
    "bytearray": bytearray,
    "zmq.Frame": zmq.Frame,
}


@pytest.mark.parametrize("kind", list(FRAME_KINDS))
def test_decoded_arrays_are_read_only_views_of_the_frames(kind: str) -> None:
    frames = [FRAME_KINDS[kind](bytes(f)) for f in encode(message(MsgType.DELTA))]
    got = decode(frames)
    for frame, array in zip(frames[1:], got.tensors.values(), strict=True):
        raw = np.frombuffer(getattr(frame, "buffer", frame), np.uint8)
        assert np.shares_memory(array, raw)
        assert not array.flags.writeable
        with pytest.raises(ValueError):
            array[...] = 0


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.arange(40, dtype=np.float64).reshape(5, 8)[:, ::3],
        lambda: np.asfortranarray(np.arange(12, dtype=np.int32).reshape(3, 4)),
        lambda: np.arange(12, dtype=np.float32).reshape(3, 4).T,
        lambda: np.arange(10, dtype=">f4"),  # big-endian: converted to little-endian
        lambda: np.arange(10, dtype=">i8")[::2],
    ],
    ids=["strided", "fortran", "transposed", "big-endian", "big-endian-strided"],
)
def test_encode_makes_arrays_contiguous_little_endian(make: Callable[[], np.ndarray]) -> None:
    array = make()
    frames = encode(Message(MsgType.STATE, "n1", SESSION, 0, 0, {"reason": "t"}, {"x": array}))
    assert frames[1].nbytes == array.nbytes
    got = decode(frames).tensors["x"]
    assert got.dtype == array.dtype.newbyteorder("<")
    assert got.flags.c_contiguous
    np.testing.assert_array_equal(got, array)


def test_frames_nbytes_counts_every_frame_kind() -> None:
    frames = encode(message(MsgType.DELTA))
    total = len(frames[0]) + 12 + 8 + 400
    assert frames_nbytes(frames) == total
    assert frames_nbytes([zmq.Frame(bytes(f)) for f in frames]) == total
    assert frames_nbytes([]) == 0


# ---------------------------------------------------------------------------------------------
# finiteness check


@pytest.mark.parametrize(
    "dtype,values,ok",
    [
        ("float32", [3e38] * 100, True),  # the sum overflows, every element is finite
        ("float32", [-3e38, 3e38] * 50, True),
        ("float16", [65504.0] * 100, True),
        ("float64", [1.7e308] * 4, True),
        ("float32", [1.0] * 99 + [np.nan], False),
        ("float32", [np.inf, -np.inf], False),  # sums to NaN
        ("float64", [-np.inf], False),
        ("float16", [0.0, np.nan], False),
        ("float16", [np.inf], False),
        ("float16", [-np.inf, 1.0], False),
        ("float32", [], True),
    ],
)
def test_nan_and_inf_rejected_in_float_tensors(dtype: str, values: list[float], ok: bool) -> None:
    array = np.array(values, dtype=dtype)
    frames = encode(Message(MsgType.STATE, "n1", SESSION, 0, 0, {"reason": "t"}, {"x": array}))
    no_cap = Limits(max_norm=float("inf"))  # huge finite values are fine without a norm cap
    if ok:
        np.testing.assert_array_equal(decode(frames, no_cap).tensors["x"], array)
    else:
        raises(frames, ["tensors[0] 'x'", "NaN or Inf"], no_cap)


@settings(max_examples=150, deadline=None)
@given(
    hnp.arrays(
        st.sampled_from([np.float16, np.float32, np.float64]),
        hnp.array_shapes(min_dims=0, max_dims=3, max_side=6),
        elements=st.floats(allow_nan=True, allow_infinity=True, width=16),
    )
)
def test_finite_check_agrees_with_isfinite(array: np.ndarray) -> None:
    frames = encode(Message(MsgType.STATE, "n1", SESSION, 0, 0, {"reason": "t"}, {"x": array}))
    if np.isfinite(array).all():
        decode(frames)
    else:
        raises(frames, ["NaN or Inf"])


# ---------------------------------------------------------------------------------------------
# rejected messages


Mutator = Callable[[dict[str, Any], list[Any]], list[Any]]


def put(*path: Any, value: Any) -> Mutator:
    def mutate(header: dict[str, Any], payloads: list[Any]) -> list[Any]:
        target: Any = header
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return pack(header, payloads)

    return mutate


def drop(*path: Any) -> Mutator:
    def mutate(header: dict[str, Any], payloads: list[Any]) -> list[Any]:
        target: Any = header
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
        return pack(header, payloads)

    return mutate


def payload(index: int, value: Any) -> Mutator:
    def mutate(header: dict[str, Any], payloads: list[Any]) -> list[Any]:
        payloads[index] = value
        return pack(header, payloads)

    return mutate


def with_duplicate_key(header: dict[str, Any], payloads: list[Any]) -> list[Any]:
    packer = msgpack.Packer(use_bin_type=True)
    data = packer.pack_map_header(len(header) + 1)
    for key, value in [*header.items(), ("seq", 10)]:
        data += packer.pack(key) + packer.pack(value)
    return [data, *payloads]


def nested(depth: int) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for _ in range(depth - 1):
        doc = {"a": doc}
    return doc


D, H = MsgType.DELTA, MsgType.HELLO
LONG = "a" * 129
NAN32 = np.array([1.0] * 99 + [np.nan], np.float32).tobytes()

REJECTED: list[Any] = [
    # framing and msgpack
    (D, lambda h, p: [], ["message: no frames"]),
    (D, lambda h, p: [b"\xc1"], ["header: msgpack decoding failed"]),
    (D, lambda h, p: [pack(h, p)[0] + b"\x00", *p], ["msgpack decoding failed"]),
    (D, lambda h, p: [pack(h, p)[0][:-3], *p], ["msgpack decoding failed"]),
    (D, lambda h, p: [b""], ["msgpack decoding failed"]),
    (D, lambda h, p: pack([1, 2], []), ["header: expected a map, got list"]),
    (D, lambda h, p: pack(7, []), ["header: expected a map, got int"]),
    (D, lambda h, p: [msgpack.packb(msgpack.ExtType(5, b""))], ["extension type 5 not allowed"]),
    (D, put("body", value=msgpack.ExtType(3, b"xy")), ["msgpack decoding failed", "max_ext_len"]),
    (D, with_duplicate_key, ["map key 'seq' appears twice"]),
    (D, put("sender", value=b"n1"), ["msgpack decoding failed", "max_bin_len"]),
    (D, put("sender", value=b""), ["header 'sender': expected a string, got bytes"]),
    (D, lambda h, p: [7, *p], ["frame 0: not a contiguous buffer (int)"]),
    (D, lambda h, p: ["text", *p], ["frame 0: not a contiguous buffer (str)"]),
    (D, lambda h, p: [memoryview(pack(h, p)[0] * 2)[::2], *p], ["frame 0", "strided"]),
    # header keys and values
    (D, drop("v"), ["header: missing key 'v'"]),
    (D, put("v", value=2), ["protocol version 2 received", "speaks 1"]),
    (D, put("v", value=0), ["protocol version 0 received"]),
    (D, put("v", value=True), ["protocol version True received"]),
    (D, put("v", value=1.0), ["protocol version 1.0 received"]),
    (D, put("v", value="1"), ["protocol version '1' received"]),
    (D, put("extra", value=1), ["header: unknown key 'extra'"]),
    (D, drop("seq"), ["header: missing key 'seq'"]),
    (D, drop("tensors"), ["header: missing key 'tensors'"]),
    (D, put("type", value="bogus"), ["header 'type': unknown message type 'bogus'"]),
    (D, put("type", value="ack"), ["header 'type': unknown message type 'ack'"]),
    (D, put("type", value=3), ["header 'type': unknown message type 3"]),
    (D, put("type", value="DELTA"), ["unknown message type 'DELTA'"]),
    (D, put("sender", value="-n1"), ["header 'sender': not a valid node id: '-n1'"]),
    (D, put("sender", value="a" * 65), ["header 'sender': not a valid node id"]),
    (D, put("sender", value="n1\n"), ["header 'sender': not a valid node id"]),
    (D, put("sender", value="n 1"), ["header 'sender': not a valid node id"]),
    (D, put("sender", value="n/1"), ["header 'sender': not a valid node id"]),
    (D, put("sender", value=""), ["header 'sender': not a valid node id"]),
    (D, put("sender", value=7), ["header 'sender': expected a string, got int"]),
    (D, put("session", value=SESSION.upper()), ["header 'session': not a valid session id"]),
    (D, put("session", value=SESSION[:31]), ["header 'session'"]),
    (D, put("session", value="g" * 32), ["header 'session'"]),
    (D, put("session", value=None), ["header 'session': expected a string, got NoneType"]),
    (D, put("seq", value=-1), ["header 'seq'", "[0, 2**63-1]", "got -1"]),
    (D, put("seq", value=True), ["header 'seq': expected an integer, got bool"]),
    (D, put("seq", value=2**63), ["header 'seq'", "9223372036854775808"]),
    (D, put("seq", value=2**64 - 1), ["header 'seq'"]),
    (D, put("seq", value=1.5), ["header 'seq': expected an integer, got float"]),
    (D, put("seq", value="3"), ["header 'seq': expected an integer, got str"]),
    (D, put("round", value=-5), ["header 'round'", "got -5"]),
    (D, put("round", value=None), ["header 'round': expected an integer, got NoneType"]),
    # bodies
    (D, put("body", value=[]), ["delta body: expected a map, got list"]),
    (D, put("body", "x", value=1), ["delta body: unknown key 'x'"]),
    (H, drop("body", "listen"), ["hello body: missing key 'listen'"]),
    (H, put("body", "port", value=1), ["hello body: unknown key 'port'"]),
    (H, put("body", "listen", value="udp://h:1"), ["hello body 'listen'", "'tcp://host:port'"]),
    (H, put("body", "listen", value="tcp://h:0"), ["hello body 'listen'", "port 1-65535"]),
    (H, put("body", "listen", value="tcp://h:65536"), ["hello body 'listen'"]),
    (H, put("body", "listen", value="tcp://h"), ["hello body 'listen'"]),
    (H, put("body", "listen", value="tcp://*:5701"), ["hello body 'listen'"]),
    (H, put("body", "listen", value="tcp://h:5701/x"), ["hello body 'listen'"]),
    (H, put("body", "listen", value="tcp://h:5701\n"), ["hello body 'listen'"]),
    (H, put("body", "listen", value=5701), ["hello body 'listen': expected a string"]),
    (H, put("body", "model", value=""), ["hello body 'model'", "non-empty printable"]),
    (H, put("body", "model", value="m\n1"), ["hello body 'model'", "non-empty printable"]),
    (H, put("body", "model", value=3), ["hello body 'model': expected a string, got int"]),
    (H, put("body", "components", value="fusion"), ["hello body 'components': expected a list"]),
    (
        H,
        put("body", "components", 1, value="Fusion"),
        ["hello body 'components'[1]: not a valid component name: 'Fusion'"],
    ),
    (H, put("body", "components", 1, value="encoder.text"), ["'encoder.text' listed twice"]),
    (H, put("body", "components", 0, value=LONG), ["component name of 129 characters"]),
    (H, put("body", "components", 0, value="a..b"), ["not a valid component name"]),
    (H, put("body", "components", 0, value="a."), ["not a valid component name"]),
    (H, put("body", "components", 0, value=".a"), ["not a valid component name"]),
    (H, put("body", "components", 0, value="1a"), ["not a valid component name"]),
    (H, put("body", "components", 0, value=None), ["'components'[0]: expected a string"]),
    (H, put("body", "round", value=-1), ["hello body 'round'", "got -1"]),
    (H, put("body", "round", value=False), ["hello body 'round': expected an integer, got bool"]),
    (MsgType.STATE, put("body", "reason", value=5), ["state body 'reason': expected a string"]),
    (MsgType.STATE, drop("body", "reason"), ["state body: missing key 'reason'"]),
    (
        MsgType.RESYNC,
        put("body", "components", value=[]),
        ["resync body 'components': names no component"],
    ),
    (MsgType.RESYNC, drop("body", "reason"), ["resync body: missing key 'reason'"]),
    (MsgType.HEARTBEAT, put("body", "round", value="x"), ["heartbeat body 'round'"]),
    (MsgType.HEARTBEAT, put("body", "seq", value=1), ["heartbeat body: unknown key 'seq'"]),
    (MsgType.LEAVE, put("body", "reason", value=None), ["leave body 'reason'", "NoneType"]),
    (MsgType.STATUS_REQUEST, put("body", "x", value=1), ["status_request body: unknown key 'x'"]),
    (MsgType.STATUS, put("body", "state", value=[1]), ["status body 'state': expected a map"]),
    (MsgType.STATUS, put("body", "state", value=nested(9)), ["nested deeper than 8 levels"]),
    (MsgType.STATUS, put("body", "state", "b", value=b""), ["bytes is not a JSON-like value"]),
    (MsgType.STATUS, put("body", "state", "m", value={1: 2}), ["msgpack decoding failed"]),
    (MsgType.STATUS, put("body", "state", "t", value=msgpack.Timestamp(1)), ["max_ext_len"]),
    (
        MsgType.STATUS,
        put("body", "state", "l", value=[[0] * 2000] * 3),
        ["status body 'state': document has more than 4096 entries"],
    ),
    # tensor entries
    (
        MsgType.HEARTBEAT,
        lambda h, p: pack({**h, "tensors": valid()[0]["tensors"][:1]}, p),
        ["header 'tensors': a heartbeat message carries no tensors, got 1"],
    ),
    (D, put("tensors", value={}), ["header 'tensors': expected a list, got dict"]),
    (D, put("tensors", 0, value=[]), ["tensors[0]: expected a map, got list"]),
    (D, put("tensors", 0, "order", value="C"), ["tensors[0]: unknown key 'order'"]),
    (D, drop("tensors", 0, "base"), ["tensors[0]: missing key 'base'"]),
    (D, put("tensors", 1, "name", value="Fusion"), ["tensors[1] name: not a valid component"]),
    (D, put("tensors", 1, "name", value=LONG), ["tensors[1] name: component name of 129"]),
    (
        D,
        put("tensors", 2, "name", value="fusion"),
        ["tensors[2] 'fusion': name already used by an earlier tensor"],
    ),
    (
        D,
        put("tensors", 0, "dtype", value="bool"),
        ["tensors[0] 'encoder.text': dtype 'bool' not allowed"],
    ),
    (D, put("tensors", 0, "dtype", value="float128"), ["dtype 'float128' not allowed"]),
    (D, put("tensors", 0, "dtype", value=">f2"), ["dtype '>f2' not allowed"]),
    (D, put("tensors", 0, "dtype", value="object"), ["dtype 'object' not allowed"]),
    (D, put("tensors", 0, "dtype", value=4), ["dtype 4 not allowed"]),
    (D, put("tensors", 0, "dtype", value=["float16"]), ["dtype ['float16'] not allowed"]),
    (D, put("tensors", 0, "enc", value="zstd"), ["tensors[0] 'encoder.text'", "'zstd' not known"]),
    (D, put("tensors", 0, "enc", value=None), ["encoding None not known"]),
    (D, put("tensors", 0, "shape", value=[2, -3]), ["tensors[0] 'encoder.text' shape[1]"]),
    (D, put("tensors", 0, "shape", value=[1] * 9), ["'encoder.text' shape: list of 9 items"]),
    (D, put("tensors", 0, "shape", value="6"), ["'encoder.text' shape: expected a list"]),
    (D, put("tensors", 0, "shape", value=[True, 6]), ["shape[0]: expected an integer, got bool"]),
    (D, put("tensors", 0, "shape", value=[2**40]), ["elements, limit 268435456"]),
    (D, put("tensors", 0, "shape", value=[2**62, 2**62]), ["elements, limit 268435456"]),
    (D, put("tensors", 0, "base", value=-2), ["'encoder.text' base", "[-1, 2**63-1]"]),
    (D, put("tensors", 0, "base", value=-1), ["a delta needs", "base >= 0", "got -1"]),
    (D, put("tensors", 0, "base", value=1.0), ["base: expected an integer, got float"]),
    (D, put("tensors", 2, "noise", value=-0.1), ["tensors[2] 'head.stress' noise", ">= 0"]),
    (D, put("tensors", 2, "noise", value=float("nan")), ["noise: expected a finite number"]),
    (D, put("tensors", 2, "noise", value=float("inf")), ["noise: expected a finite number"]),
    (D, put("tensors", 2, "noise", value="0"), ["noise: expected a number, got str"]),
    (D, put("tensors", 2, "noise", value=True), ["noise: expected a number, got bool"]),
    (D, put("tensors", 2, "scale", value=float("nan")), ["scale: expected a finite number"]),
    (D, put("tensors", 2, "scale", value=0.5), ["'head.stress': encoding 'raw' carries no scale"]),
    # frames against the header
    (D, lambda h, p: [*pack(h, p), b""], ["message: 5 frames, header lists 3 tensors"]),
    (D, lambda h, p: pack(h, p)[:-1], ["message: 3 frames, header lists 3 tensors (needs 4"]),
    (D, lambda h, p: pack(h, p)[:1], ["1 frames, header lists 3 tensors"]),
    (
        D,
        payload(2, NAN32[:396]),
        ["tensors[2] 'head.stress': frame has 396 bytes, shape [100] float32 needs 400"],
    ),
    (D, payload(1, b""), ["tensors[1] 'fusion': frame has 0 bytes, shape [] float64 needs 8"]),
    (D, payload(0, b"\x00" * 13), ["tensors[0] 'encoder.text': frame has 13 bytes"]),
    (D, payload(1, 7), ["frame 2: not a contiguous buffer (int)"]),
    (D, payload(2, NAN32), ["tensors[2] 'head.stress': contains NaN or Inf"]),
    (D, payload(1, np.array(-np.inf).tobytes()), ["tensors[1] 'fusion': contains NaN or Inf"]),
    (D, payload(0, np.array([0, 1, 2, 3, 4, np.inf], np.float16).tobytes()), ["NaN or Inf"]),
    (D, payload(0, np.array([np.nan] * 6, np.float16).tobytes()), ["NaN or Inf"]),
]


@pytest.mark.parametrize(
    "mtype,mutate,words", REJECTED, ids=[f"{i}-{c[2][0][:40]}" for i, c in enumerate(REJECTED)]
)
def test_rejected(mtype: MsgType, mutate: Mutator, words: list[str]) -> None:
    header, payloads = valid(mtype)
    raises(mutate(header, payloads), words)


LIMITED: list[Any] = [
    (Limits(max_frames=3), D, ["message: 4 frames, limit 3"]),
    (Limits(max_header_bytes=64), D, ["header:", "bytes, limit 64"]),
    (Limits(max_tensors=2), D, ["header 'tensors': list of 3 items, limit 2"]),
    (
        Limits(max_elements=50),
        D,
        ["tensors[2] 'head.stress': shape [100] has 100 elements, limit 50"],
    ),
    (Limits(max_total_bytes=407), D, ["tensors[2] 'head.stress'", "420 bytes", "limit 407"]),
    (Limits(max_str=12), H, ["msgpack decoding failed", "max_str_len(12)"]),
    (Limits(max_list=2), H, ["hello body 'components': list of 3 items, limit 2"]),
    (Limits(max_list=5), MsgType.STATUS, ["document has more than 5 entries"]),
]


@pytest.mark.parametrize("limits,mtype,words", LIMITED, ids=[str(c[0]) for c in LIMITED])
def test_rejected_by_limits(limits: Limits, mtype: MsgType, words: list[str]) -> None:
    frames = encode(message(mtype))
    decode(frames)  # valid under the default limits
    raises(frames, words, limits)


ACCEPTED: list[Any] = [
    (D, put("sender", value="A" + "b" * 63)),
    (D, put("sender", value="inst-a.campus_2")),
    (D, put("tensors", 2, "name", value="h" * 128)),
    (D, put("tensors", 1, "shape", value=[1] * 8)),
    (D, put("tensors", 2, "noise", value=0)),  # an integer noise is a number
    (D, put("seq", value=2**63 - 1)),
    (H, put("body", "listen", value="tcp://[::1]:5701")),
    (H, put("body", "listen", value="tcp://node-3.campus.example:65535")),
    (H, put("body", "components", value=[])),
    (MsgType.STATUS, put("body", "state", value=nested(8))),
    (MsgType.STATUS, put("body", "state", "loss", value=float("nan"))),
    (MsgType.STATUS, put("body", "state", "big", value=2**64 - 1)),
]


@pytest.mark.parametrize("mtype,mutate", ACCEPTED, ids=[str(i) for i in range(len(ACCEPTED))])
def test_accepted_edge_cases(mtype: MsgType, mutate: Mutator) -> None:
    header, payloads = valid(mtype)
    assert decode(mutate(header, payloads)).type is mtype


def _with(mtype: MsgType, **fields: Any) -> Message:
    msg = message(mtype)
    for key, value in fields.items():
        setattr(msg, key, value)
    return msg


ENCODE_REJECTED: list[Any] = [
    (
        _with(D, tensors={"x": np.zeros(3, bool)}, meta={}),
        ["tensors[0] 'x'", "dtype bool not allowed"],
    ),
    (_with(D, tensors={"x": np.zeros(3, complex)}, meta={}), ["dtype complex128 not allowed"]),
    (
        _with(D, tensors={"x": [1.0, 2.0]}, meta={}),
        ["tensors[0] 'x': expected a numpy array, got list"],
    ),
    (_with(D, tensors={}), ["meta 'encoder.text': describes no tensor"]),
    (
        _with(D, meta={"head.stress": TensorMeta("head.stress", "float64", (100,), base=0)}),
        ["tensors[2] 'head.stress': meta says 'head.stress' float64 [100], array is float32 [100]"],
    ),
    (_with(D, meta={"fusion": TensorMeta("fusion", "float64", (1,), base=0)}), ["meta says"]),
    (_with(D, meta={"fusion": TensorMeta("other", "float64", (), base=0)}), ["meta says"]),
    (_with(D, meta={}), ["a delta needs the replica version"]),
    (_with(MsgType.HEARTBEAT, tensors={"x": np.zeros(2)}), ["carries no tensors"]),
    (_with(D, sender="bad id"), ["header 'sender'"]),
    (_with(D, session="nope"), ["header 'session'"]),
    (_with(D, seq=-1), ["header 'seq'"]),
    (_with(D, type="bogus"), ["unknown message type 'bogus'"]),
    (_with(D, body=None), ["delta body: expected a map, got NoneType"]),
    (
        _with(MsgType.HEARTBEAT, body={"round": np.int64(3)}),
        ["heartbeat body 'round': expected an integer, got int64"],
    ),
    (
        _with(MsgType.LEAVE, body={"reason": "x" * 5000}),
        ["leave body 'reason': string of 5000 characters, limit 4096"],
    ),
    (_with(MsgType.STATUS, body={"state": {"s": {1, 2}}}), ["set is not a JSON-like value"]),
    (_with(MsgType.STATUS, body={"state": {"n": 2**64}}), ["outside the msgpack range"]),
    (
        _with(MsgType.STATUS, body={"state": {str(i): "x" * 4000 for i in range(300)}}),
        ["header:", "bytes packed, limit 1048576"],
    ),
]


@pytest.mark.parametrize(
    "msg,words", ENCODE_REJECTED, ids=[f"{i}-{c[1][0][:30]}" for i, c in enumerate(ENCODE_REJECTED)]
)
def test_encode_rejects_what_decode_would(msg: Message, words: list[str]) -> None:
    with pytest.raises(ProtocolError) as info:
        encode(msg)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {str(info.value)!r}"


# ---------------------------------------------------------------------------------------------
# fuzzing: decode raises ProtocolError and nothing else


def decode_or_protocol_error(frames: list[Any]) -> Message | None:
    try:
        return decode(frames)
    except ProtocolError:
        return None


# Together the three fuzz tests below generate 10,000 messages.
@settings(max_examples=2000, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=4))
def test_random_frames_raise_only_protocol_error(frames: list[bytes]) -> None:
    decode_or_protocol_error(frames)


@settings(max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mtype=st.sampled_from(list(MsgType)), data=st.data())
def test_mutated_messages_raise_only_protocol_error(mtype: MsgType, data: st.DataObject) -> None:
    frames = [bytearray(f) for f in encode(message(mtype))]
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["flip", "truncate", "extend", "drop", "add"]))
        if op == "add" or not frames:
            at = data.draw(st.integers(0, len(frames)))
            frames.insert(at, bytearray(data.draw(st.binary(max_size=16))))
            continue
        i = data.draw(st.integers(0, len(frames) - 1))
        if op == "drop":
            del frames[i]
        elif op == "extend":
            frames[i] += data.draw(st.binary(min_size=1, max_size=8))
        elif op == "truncate":
            del frames[i][data.draw(st.integers(0, len(frames[i]))) :]
        elif frames[i]:
            at = data.draw(st.integers(0, len(frames[i]) - 1))
            frames[i][at] ^= data.draw(st.integers(1, 255))
    decode_or_protocol_error([bytes(f) for f in frames])


MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=3),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mtype=st.sampled_from(list(MsgType)), data=st.data())
def test_retyped_header_fields_raise_only_protocol_error(
    mtype: MsgType, data: st.DataObject
) -> None:
    header, payloads = valid(mtype)
    targets: list[Any] = [header, header["body"], *header["tensors"]]
    target = data.draw(st.sampled_from([t for t in targets if isinstance(t, dict)]))
    key = data.draw(st.sampled_from([*target, "extra"]))
    target[key] = data.draw(MSGPACK_VALUES)
    got = decode_or_protocol_error(pack(header, payloads))
    if got is not None:  # whatever decode accepts, encode accepts and decode reads back
        again = decode(encode(got))
        assert (again.type, again.body.keys(), again.meta) == (got.type, got.body.keys(), got.meta)


# ---------------------------------------------------------------------------------------------
# typed bodies and the schema agree


@pytest.mark.parametrize("mtype", list(MsgType), ids=lambda t: t.value)
def test_each_body_type_lists_the_keys_the_schema_requires(mtype: MsgType) -> None:
    body = BODY_TYPES[mtype]
    assert set(BODIES[mtype]) == body.__required_keys__
    header, payloads = valid(mtype)
    for key in body.__required_keys__:
        del header["body"][key]
        raises(pack(header, payloads), [f"{mtype.value} body: missing key {key!r}"])
        header, payloads = valid(mtype)
    optional = {"answer", "origin", "states"} if mtype is MsgType.HELLO else set()
    assert body.__optional_keys__ == optional


def test_schema_refuses_to_load_without_a_checker_for_a_body_key(monkeypatch) -> None:
    monkeypatch.setitem(schema._OPTIONAL, MsgType.HELLO, {"answer": schema._flag})
    keys = r"\['answer', 'origin', 'states'\]"
    with pytest.raises(RuntimeError, match=rf"hello body: optional keys {keys}"):
        schema._check_body_schemas()
    monkeypatch.undo()
    monkeypatch.setitem(
        schema._REQUIRED, MsgType.LEAVE, {"reason": schema._str, "why": schema._str}
    )
    with pytest.raises(RuntimeError, match="leave body: required keys"):
        schema._check_body_schemas()


# ---------------------------------------------------------------------------------------------
# the spec's worked examples are valid messages


SPEC = Path(m3tgossip.__file__).parent / "docs" / "protocol.md"
EXAMPLE = re.compile(r"```json\n(.*?)```\n```text\n(.*?)```", re.DOTALL)
FRAME_LINE = re.compile(r"frame (\d+)\s+\S+\s+(\d+) bytes")


def test_spec_examples_decode_and_cover_every_type() -> None:
    examples = EXAMPLE.findall(SPEC.read_text(encoding="utf-8"))
    assert examples
    seen = set()
    for header_text, frames_text in examples:
        header = json.loads(header_text)
        sizes = [(int(i), int(n)) for i, n in FRAME_LINE.findall(frames_text)]
        assert [i for i, _ in sizes] == list(range(len(sizes)))
        packed = msgpack.packb(header, use_bin_type=True)
        assert sizes[0][1] == len(packed), f"header size of the {header['type']} example"
        got = decode([packed, *(bytes(n) for _, n in sizes[1:])])
        assert header["v"] == PROTOCOL_VERSION
        seen.add(got.type)
    assert seen == set(MsgType)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"weights": {"fusion": -1.0}}, ["push body", "'fusion'", ">= 0"]),
        ({"weights": {"fusion": float("nan")}}, ["push body", "'fusion'"]),
        ({"weights": {"Bad Name": 1.0}}, ["push body"]),
        ({"weights": [1.0]}, ["push body", "expected a map"]),
    ],
)
def test_push_weights_rejected(body: dict[str, Any], words: list[str]) -> None:
    header, payloads = valid(MsgType.PUSH)
    header["body"] = body
    raises(pack(header, payloads), words)


def test_hello_answer_flag() -> None:
    msg = message(MsgType.HELLO)
    msg.body["answer"] = True
    assert decode(encode(msg)).body["answer"] is True
    header, payloads = valid(MsgType.HELLO)
    header["body"]["answer"] = "yes"
    raises(pack(header, payloads), ["hello body 'answer'", "true or false"])


def test_norm_cap_rejects_huge_tensors() -> None:
    big = np.full(100, 1e9, dtype=np.float64)
    msg = Message(
        MsgType.DELTA,
        "n1",
        SESSION,
        1,
        0,
        {},
        {"fusion": big},
        {"fusion": TensorMeta("fusion", "float64", (100,), base=0)},
    )
    raises([bytes(f) for f in encode(msg)], ["'fusion'", "L2 norm", "above the limit"])
    overflow = np.full(10, 3e38, dtype=np.float32)
    msg.tensors, msg.meta = (
        {"fusion": overflow},
        {"fusion": TensorMeta("fusion", "float32", (10,), base=0)},
    )
    raises([bytes(f) for f in encode(msg)], ["'fusion'", "overflows"])
    assert decode(encode(message())).type is MsgType.DELTA  # ordinary values pass

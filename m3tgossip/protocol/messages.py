"""What a message is: its types, header fields, typed bodies, tensor metadata and the limits.

This module owns the data of protocol version 1 and nothing that checks or packs it: the
schema (`schema.py`) validates these values, `frames.py` turns them into ZeroMQ frames, and
`codecs.py` turns tensors into what travels in those frames. `docs/protocol.md` is the spec.
"""

# No `from __future__ import annotations` here: on Python 3.11 it hides `NotRequired` from
# TypedDict, and `schema.py` reads each body's required and optional keys at run time.
import hashlib
import secrets
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NotRequired, TypedDict

import numpy as np

__all__ = [
    "DEFAULT_LIMITS",
    "DTYPES",
    "ENCODINGS",
    "MAX_DEPTH",
    "MAX_NAME",
    "MAX_NDIM",
    "PROTOCOL_VERSION",
    "BODY_TYPES",
    "Body",
    "DeltaBody",
    "ForgetBody",
    "ForgetReplyBody",
    "ForgetRequestBody",
    "HeartbeatBody",
    "HelloBody",
    "LeaveBody",
    "Limits",
    "Message",
    "MsgType",
    "PushBody",
    "ResyncBody",
    "RetireBody",
    "StateBody",
    "StatusBody",
    "StatusRequestBody",
    "TensorMeta",
    "new_session",
    "values_digest",
]

PROTOCOL_VERSION: int = 1

#: dtypes a tensor frame may carry (numpy names; bytes are always little-endian)
DTYPES: tuple[str, ...] = ("float16", "float32", "float64", "int8", "uint8", "int32", "int64")
#: the wire tags of the tensor encodings this version understands (the `enc` field):
#: raw: the values as they are (float16 is a raw dtype); int8: int8 values times the
#: per-tensor `scale`; topk: k int32 indices (strictly increasing) then k values, of a dense
#: tensor of `shape` that is zero elsewhere. `codecs.py` has a decoder for each of them.
ENCODINGS: tuple[str, ...] = ("raw", "int8", "topk")

MAX_NAME = 128  # characters in a component name
MAX_NDIM = 8  # dimensions of a tensor
MAX_DEPTH = 8  # nesting of the `status` document


class MsgType(StrEnum):
    """The message types; each has its own body (the TypedDicts below, `docs/protocol.md`)."""

    HELLO = "hello"
    DELTA = "delta"
    STATE = "state"
    RESYNC = "resync"
    HEARTBEAT = "heartbeat"
    LEAVE = "leave"
    STATUS_REQUEST = "status_request"
    STATUS = "status"
    PUSH = "push"
    RETIRE = "retire"
    FORGET_REQUEST = "forget_request"
    FORGET_REPLY = "forget_reply"
    FORGET = "forget"


# ---------------------------------------------------------------------------------------------
# bodies: one TypedDict per message type; `schema.py` checks each key and that it covers them


class HelloBody(TypedDict):
    """The sender (re)started: its model, shared components, listen address and round."""

    model: str
    components: list[str]
    listen: str
    round: int
    #: this hello answers the peer's hello; it is not answered
    answer: NotRequired[bool]
    #: component -> `values_digest` of the values the sender started from (fresh starts only)
    origin: NotRequired[dict[str, str]]
    #: the sender sends a full `state` of its components every round (raw values, nothing
    #: that needs deltas): a receiver need not keep its replicas after mixing them
    states: NotRequired[bool]


class DeltaBody(TypedDict):
    """Empty: a delta's content is its tensors, each with the replica version it applies to."""


class StateBody(TypedDict):
    """Full values of the tensors; `reason` is for logs."""

    reason: str


class ResyncBody(TypedDict):
    """Asks the receiver for a `state` of these components."""

    components: list[str]
    reason: str


class HeartbeatBody(TypedDict):
    """Liveness, and "heard from" in a round with nothing else to send."""

    round: int


class LeaveBody(TypedDict):
    """The sender shuts down on purpose."""

    reason: str


class StatusRequestBody(TypedDict):
    """Empty: a status client asks for the node's status."""


class StatusBody(TypedDict):
    """The node's status report, a JSON-like document."""

    state: dict[str, Any]


class PushBody(TypedDict):
    """Push-sum: component -> running total of the weight ever sent on this link."""

    weights: dict[str, float]


class RetireBody(TypedDict):
    """The sender stops sharing these components for good."""

    components: list[str]
    reason: str


class ForgetRequestBody(TypedDict):
    """An operator asks the node to erase learners it holds, or itself, from the federation."""

    target: str  # "learner" or "node"
    ids: list[str]
    mode: str  # "exact" or "approximate"


class ForgetReplyBody(TypedDict):
    """The answer to `forget_request`: started or refused, and why."""

    accepted: bool
    request: str  # the erasure's request id, "" if refused
    reason: str


class ForgetBody(TypedDict):
    """An erasure, flooded to every node, tagged by its origin for each node (`erasure.py`)."""

    request: str
    origin: str
    target: str
    ids: list[str]
    mode: str
    tags: dict[str, str]


Body = (
    HelloBody
    | DeltaBody
    | StateBody
    | ResyncBody
    | HeartbeatBody
    | LeaveBody
    | StatusRequestBody
    | StatusBody
    | PushBody
    | RetireBody
    | ForgetRequestBody
    | ForgetReplyBody
    | ForgetBody
)

#: the body of each message type
BODY_TYPES: dict[MsgType, type] = {
    MsgType.HELLO: HelloBody,
    MsgType.DELTA: DeltaBody,
    MsgType.STATE: StateBody,
    MsgType.RESYNC: ResyncBody,
    MsgType.HEARTBEAT: HeartbeatBody,
    MsgType.LEAVE: LeaveBody,
    MsgType.STATUS_REQUEST: StatusRequestBody,
    MsgType.STATUS: StatusBody,
    MsgType.PUSH: PushBody,
    MsgType.RETIRE: RetireBody,
    MsgType.FORGET_REQUEST: ForgetRequestBody,
    MsgType.FORGET_REPLY: ForgetReplyBody,
    MsgType.FORGET: ForgetBody,
}


# ---------------------------------------------------------------------------------------------
# limits, tensor metadata, messages


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
    scale: float | None = None  # the int8 encoding's scale; every other encoding carries none


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
    body: Body
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, TensorMeta] = field(default_factory=dict)


def values_digest(array: np.ndarray) -> str:
    """128-bit BLAKE2b of a tensor's dtype, shape and little-endian C-order values.

    The hello body's `origin` carries it, so neighbours that start from the same values can
    skip the first full state.
    """
    a = np.ascontiguousarray(array)
    a = a.astype(a.dtype.newbyteorder("<"), copy=False)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{a.dtype.name}:{list(a.shape)}:".encode())
    h.update(a.reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def new_session() -> str:
    """A fresh session id (32 lowercase hex characters), drawn once per daemon start."""
    return secrets.token_hex(16)

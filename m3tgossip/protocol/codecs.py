"""Tensor codecs: how a delta is encoded for the wire and how each wire tag is decoded.

A codec turns a delta into what goes on the wire and into the dense tensor a receiver will
decode from it. The sender adds that decoded tensor, not the exact delta, to the replica its
neighbours hold; whatever the codec lost stays in `x - replica` and is sent in later rounds
(error feedback, CHOCO-style), so the replicas never drift apart and nothing is lost for good.
Each codec class holds both directions, so what a sender adds and what a receiver decodes
come from one place.

Codec names (per component, `[gossip] compression` and `compress`) and their wire tags
(the `enc` field of a tensor entry):

    raw        raw    the values as they are
    fp16       raw    half precision (2 bytes per value), a raw float16 tensor on the wire
    int8       int8   int8 with one float scale per tensor (1 byte per value)
    topk:F     topk   the fraction F of largest-magnitude values with their indices (8 bytes each)

`DECODERS` maps every wire tag of `messages.ENCODINGS` to its codec; importing this module
fails if a tag has no decoder or a codec's tag is not in the allow-list.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from m3tgossip.protocol.messages import ENCODINGS, Limits, TensorMeta
from m3tgossip.protocol.schema import check_encoding, check_values, fail

__all__ = [
    "DECODERS",
    "INDEX",
    "Codec",
    "Fp16",
    "Int8",
    "Raw",
    "TopK",
    "decoder_for",
    "parse_codec",
]

#: dtype of the indices of a topk frame
INDEX = np.dtype("<i4")


class Codec(ABC):
    """One compression of deltas: the sender's encoding and the decoding of its wire tag."""

    #: the compression's name in a node config
    name: ClassVar[str]
    #: the wire tag (`enc`) of the tensor entries it writes, and that `decode` reads
    tag: ClassVar[str]

    @abstractmethod
    def encode(
        self, comp: str, delta: np.ndarray, base: int, noise: float
    ) -> tuple[np.ndarray, TensorMeta, np.ndarray]:
        """(wire payload, its meta, the dense tensor receivers decode) for one delta."""

    @classmethod
    def check_payload(cls, name: str, array: np.ndarray, meta: TensorMeta, where: str) -> None:
        """Sender side: `array` is the tensor `meta` describes (same name, dtype and shape)."""
        if meta.name != name or meta.dtype != array.dtype.name or tuple(meta.shape) != array.shape:
            fail(
                where,
                f"meta says {meta.name!r} {meta.dtype} {list(meta.shape)},"
                f" array is {array.dtype.name} {list(array.shape)}",
            )

    @classmethod
    @abstractmethod
    def decode(cls, view: memoryview, meta: TensorMeta, where: str, limits: Limits) -> np.ndarray:
        """Receiver side: the read-only dense tensor of a frame whose entry `meta` has this tag.

        `meta` has passed the schema; the frame has not. Raises `ProtocolError` naming `where`.
        """


def _values(view: memoryview, meta: TensorMeta, where: str) -> np.ndarray:
    """The frame as `prod(shape)` little-endian values of `meta.dtype` (a view, not a copy)."""
    dtype = np.dtype(meta.dtype).newbyteorder("<")
    need = math.prod(meta.shape) * dtype.itemsize
    if view.nbytes != need:
        fail(
            where,
            f"frame has {view.nbytes} bytes, shape {list(meta.shape)} {meta.dtype} needs {need}",
        )
    return np.frombuffer(view, dtype=dtype).reshape(meta.shape)


@dataclass(frozen=True)
class Raw(Codec):
    """The values as they are: the frame is the array's bytes."""

    name: ClassVar[str] = "raw"
    tag: ClassVar[str] = "raw"

    def encode(
        self, comp: str, delta: np.ndarray, base: int, noise: float
    ) -> tuple[np.ndarray, TensorMeta, np.ndarray]:
        meta = TensorMeta(comp, delta.dtype.name, delta.shape, base=base, noise=noise)
        return delta, meta, delta

    @classmethod
    def decode(cls, view: memoryview, meta: TensorMeta, where: str, limits: Limits) -> np.ndarray:
        array = _values(view, meta, where)
        if array.dtype.kind == "f":
            check_values(array, where, limits)
        array.flags.writeable = False
        return array


@dataclass(frozen=True)
class Fp16(Raw):
    """Half precision: a raw float16 tensor on the wire, so `Raw` decodes it."""

    name: ClassVar[str] = "fp16"

    def encode(
        self, comp: str, delta: np.ndarray, base: int, noise: float
    ) -> tuple[np.ndarray, TensorMeta, np.ndarray]:
        half = delta.astype(np.float16)
        meta = TensorMeta(comp, "float16", delta.shape, base=base, noise=noise)
        return half, meta, half.astype(delta.dtype)


@dataclass(frozen=True)
class Int8(Codec):
    """int8 values and one float `scale` per tensor; the decoded value is `float32(q) * scale`."""

    name: ClassVar[str] = "int8"
    tag: ClassVar[str] = "int8"

    def encode(
        self, comp: str, delta: np.ndarray, base: int, noise: float
    ) -> tuple[np.ndarray, TensorMeta, np.ndarray]:
        peak = float(np.max(np.abs(delta))) if delta.size else 0.0
        scale = peak / 127.0 if peak > 0 else 1.0
        q = np.clip(np.rint(delta / scale), -127, 127).astype(np.int8)
        dense = (q.astype(np.float32) * np.float32(scale)).astype(delta.dtype)
        meta = TensorMeta(
            comp, "int8", delta.shape, enc=self.tag, base=base, noise=noise, scale=scale
        )
        return q, meta, dense

    @classmethod
    def decode(cls, view: memoryview, meta: TensorMeta, where: str, limits: Limits) -> np.ndarray:
        if meta.scale is None:  # the schema requires it; checked again for the arithmetic
            fail(where, "encoding 'int8' needs a scale > 0, got None")
        array = _values(view, meta, where).astype(np.float32) * np.float32(meta.scale)
        check_values(array, where, limits)
        array.flags.writeable = False
        return array


@dataclass(frozen=True)
class TopK(Codec):
    """The `fraction` of largest-magnitude values: k int32 indices, then the k values.

    The indices increase strictly; the decoded tensor is zero everywhere else.
    """

    fraction: float
    name: ClassVar[str] = "topk"
    tag: ClassVar[str] = "topk"

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"topk needs a fraction in (0, 1], got {self.fraction}")

    def encode(
        self, comp: str, delta: np.ndarray, base: int, noise: float
    ) -> tuple[np.ndarray, TensorMeta, np.ndarray]:
        flat = delta.reshape(-1)
        k = max(1, int(round(self.fraction * flat.size))) if flat.size else 0
        if k >= flat.size:
            index = np.arange(flat.size, dtype=INDEX)
        else:
            top = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :]
            index = np.sort(top).astype(INDEX)
        values = flat[index].astype(np.float32)
        payload = np.concatenate([index.view(np.uint8), values.view(np.uint8)])
        dense = np.zeros(flat.size, dtype=delta.dtype)
        dense[index] = values
        meta = TensorMeta(comp, "float32", delta.shape, enc=self.tag, base=base, noise=noise)
        return payload, meta, dense.reshape(delta.shape)

    @classmethod
    def check_payload(cls, name: str, array: np.ndarray, meta: TensorMeta, where: str) -> None:
        """Sender side: the payload is bytes, k indices then k values of the tensor `meta`."""
        per = INDEX.itemsize + np.dtype(meta.dtype).itemsize
        if array.dtype != np.uint8 or array.ndim != 1 or array.size % per:
            fail(where, f"a topk payload is 1-D uint8 of a multiple of {per} bytes")

    @classmethod
    def decode(cls, view: memoryview, meta: TensorMeta, where: str, limits: Limits) -> np.ndarray:
        dtype = np.dtype(meta.dtype).newbyteorder("<")
        n = math.prod(meta.shape)
        per = INDEX.itemsize + dtype.itemsize
        if view.nbytes % per:
            fail(where, f"topk frame has {view.nbytes} bytes, not a multiple of {per}")
        k = view.nbytes // per
        if k > n:
            fail(where, f"topk frame holds {k} entries, the tensor has {n} elements")
        index = np.frombuffer(view, dtype=INDEX, count=k)
        values = np.frombuffer(view, dtype=dtype, count=k, offset=k * INDEX.itemsize)
        if k and (
            index[0] < 0 or index[-1] >= n or (k > 1 and not bool(np.all(np.diff(index) > 0)))
        ):
            fail(where, f"topk indices must increase strictly within [0, {n})")
        check_values(values, where, limits)
        dense = np.zeros(n, dtype=dtype)
        dense[index] = values
        dense = dense.reshape(meta.shape)
        dense.flags.writeable = False
        return dense


#: the codec of each compression name
_BY_NAME: dict[str, type[Codec]] = {c.name: c for c in (Raw, Fp16, Int8, TopK)}
#: the decoder of each wire tag (fp16 travels as raw float16, so `Raw` decodes it)
DECODERS: dict[str, type[Codec]] = {c.tag: c for c in (Raw, Int8, TopK)}


def _check_registry() -> None:
    """Every allowed wire tag has a decoder, and every codec writes an allowed tag."""
    missing = [tag for tag in ENCODINGS if tag not in DECODERS]
    if missing:
        raise RuntimeError(f"wire encodings without a decoder in codecs.py: {', '.join(missing)}")
    stray = [f"{c.name} ({c.tag})" for c in _BY_NAME.values() if c.tag not in ENCODINGS]
    if stray:
        raise RuntimeError(f"codecs whose wire tag is not in ENCODINGS: {', '.join(stray)}")


_check_registry()


def decoder_for(enc: Any, where: str) -> type[Codec]:
    """The codec of wire tag `enc`; `ProtocolError` naming `where` if the tag is not known."""
    return DECODERS[check_encoding(enc, where)]


def parse_codec(spec: str) -> Codec:
    """`raw`, `fp16`, `int8` or `topk:F` with 0 < F <= 1."""
    name, _, arg = spec.partition(":")
    if name == TopK.name:
        try:
            return TopK(float(arg))
        except ValueError:
            raise ValueError(
                f"compression {spec!r}: topk needs a fraction in (0, 1], e.g. topk:0.1"
            ) from None
    codec = _BY_NAME.get(name)
    if codec is None or arg:
        raise ValueError(f"compression {spec!r}: one of raw, fp16, int8, topk:F")
    return codec()

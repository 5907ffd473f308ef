"""Compression of outgoing deltas, with error feedback through the replicas (CHOCO-style).

A codec turns a delta into what goes on the wire and into the dense tensor a receiver will
decode from it. The sender adds that decoded tensor, not the exact delta, to the replica its
neighbours hold; whatever the codec lost stays in `x - replica` and is sent in later rounds
(error feedback), so the replicas never drift apart and nothing is lost for good.

Codec names (per component, `[gossip] compression` and `compress`):

    raw        the values as they are
    fp16       half precision (2 bytes per value)
    int8       int8 with one float scale per tensor (1 byte per value)
    topk:F     the fraction F of largest-magnitude values with their indices (8 bytes each)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from m3tgossip.protocol.wire import TensorMeta

INDEX = np.dtype("<i4")


@dataclass(frozen=True)
class Codec:
    name: str
    fraction: float = 1.0

    def encode(
        self, comp: str, delta: np.ndarray, base: int, noise: float
    ) -> tuple[np.ndarray, TensorMeta, np.ndarray]:
        """(wire payload, its meta, the dense tensor receivers decode) for one delta."""
        if self.name == "raw":
            return (
                delta,
                TensorMeta(comp, delta.dtype.name, delta.shape, base=base, noise=noise),
                delta,
            )
        if self.name == "fp16":
            half = delta.astype(np.float16)
            return (
                half,
                TensorMeta(comp, "float16", delta.shape, base=base, noise=noise),
                half.astype(delta.dtype),
            )
        if self.name == "int8":
            peak = float(np.max(np.abs(delta))) if delta.size else 0.0
            scale = peak / 127.0 if peak > 0 else 1.0
            q = np.clip(np.rint(delta / scale), -127, 127).astype(np.int8)
            dense = (q.astype(np.float32) * np.float32(scale)).astype(delta.dtype)
            return (
                q,
                TensorMeta(
                    comp, "int8", delta.shape, enc="int8", base=base, noise=noise, scale=scale
                ),
                dense,
            )
        # topk
        flat = delta.reshape(-1)
        k = max(1, int(round(self.fraction * flat.size))) if flat.size else 0
        if k >= flat.size:
            index = np.arange(flat.size, dtype=INDEX)
        else:
            index = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :]).astype(
                INDEX
            )
        values = flat[index].astype(np.float32)
        payload = np.concatenate([index.view(np.uint8), values.view(np.uint8)])
        dense = np.zeros(flat.size, dtype=delta.dtype)
        dense[index] = values
        meta = TensorMeta(comp, "float32", delta.shape, enc="topk", base=base, noise=noise)
        return payload, meta, dense.reshape(delta.shape)


def parse_codec(spec: str) -> Codec:
    """`raw`, `fp16`, `int8` or `topk:F` with 0 < F <= 1."""
    name, _, arg = spec.partition(":")
    if name in ("raw", "fp16", "int8") and not arg:
        return Codec(name)
    if name == "topk":
        try:
            fraction = float(arg)
        except ValueError:
            fraction = -1.0
        if 0.0 < fraction <= 1.0:
            return Codec("topk", fraction)
        raise ValueError(f"compression {spec!r}: topk needs a fraction in (0, 1], e.g. topk:0.1")
    raise ValueError(f"compression {spec!r}: one of raw, fp16, int8, topk:F")

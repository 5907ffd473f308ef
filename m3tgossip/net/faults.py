"""Fault injection and attack modes for tests, chaos runs and robustness research.

`FaultyTransport` wraps a `Transport` and, with seeded probabilities, drops, delays or
duplicates outgoing messages, the way a lossy Wi-Fi link or a congested campus network would.
A dropped message is reported as sent (the sender does not know), exactly like real loss.
Delayed messages wait in a queue that `poll` flushes, so the daemon's one loop still owns the
sockets and nothing blocks.

`Attack` turns a node into a Byzantine neighbour: it replaces the values the node sends with
a malicious vector. Attackers never affect their own model; they only lie to their neighbours.

`slowdown` and `slowdown_s` are a measurement aid, not a fault of the network: they make the
node's machine slower (every local step takes `slowdown` times as long, plus `slowdown_s`
seconds), so that a run can show what a straggler does to its neighbours. The round engine
applies them (`m3tgossip.daemon.engine`); the node's transport is not wrapped for them. What
a node declares of its pace is the topology's `speed` and `bandwidth`, not this.
"""

from __future__ import annotations

import heapq
import math
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

ATTACKS = ("", "huge", "nan", "signflip", "alie", "ipm", "dissensus")


@dataclass(frozen=True)
class FaultConfig:
    """Probabilities are per outgoing message; all draws come from one seeded generator."""

    #: probability that a message is silently lost
    drop: float = 0.0
    #: probability that a message is held back for `delay_s` seconds
    delay: float = 0.0
    delay_s: float = 0.2
    #: probability that a message is sent twice
    duplicate: float = 0.0
    seed: int = 0
    #: Byzantine behaviour of this node ("" = honest): huge, nan, signflip, alie, ipm, dissensus
    attack: str = ""
    #: strength of the attack (scale of huge/dissensus, z of ALIE, epsilon of IPM)
    attack_scale: float = 0.0
    #: measurement aid: every local step takes this many times as long (the node sleeps
    #: `slowdown - 1` times the step's measured time after it); 1 = as fast as it runs
    slowdown: float = 1.0
    #: measurement aid: seconds every local step takes on top (a workload whose steps take no
    #: time, such as consensus, is slowed with this)
    slowdown_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("drop", "delay", "duplicate"):
            p = getattr(self, name)
            if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
                raise ValueError(f"{name}: a probability in [0, 1], got {p!r}")
        if not (
            isinstance(self.delay_s, (int, float))
            and math.isfinite(self.delay_s)
            and self.delay_s >= 0
        ):
            raise ValueError(f"delay_s: a non-negative number of seconds, got {self.delay_s!r}")
        if not (
            isinstance(self.slowdown, (int, float))
            and not isinstance(self.slowdown, bool)
            and math.isfinite(self.slowdown)
            and self.slowdown >= 1
        ):
            raise ValueError(f"slowdown: a factor >= 1 (1 = full speed), got {self.slowdown!r}")
        if not (
            isinstance(self.slowdown_s, (int, float))
            and not isinstance(self.slowdown_s, bool)
            and math.isfinite(self.slowdown_s)
            and self.slowdown_s >= 0
        ):
            raise ValueError(
                f"slowdown_s: a non-negative number of seconds, got {self.slowdown_s!r}"
            )
        if self.attack not in ATTACKS:
            raise ValueError(
                f"attack: one of {', '.join(a for a in ATTACKS if a)}, got {self.attack!r}"
            )

    @property
    def active(self) -> bool:
        """Faults of the transport (the node's messages are wrapped for them)."""
        return bool(self.drop or self.delay or self.duplicate)

    @property
    def slowed(self) -> bool:
        """The node's local steps are slowed down (`slowdown`, `slowdown_s`)."""
        return self.slowdown > 1 or self.slowdown_s > 0

    def pause_after(self, step_s: float) -> float:
        """Seconds to sleep after a local step that took `step_s`."""
        return (self.slowdown - 1.0) * max(0.0, step_s) + self.slowdown_s


class FaultyTransport:
    """A `Transport` whose outgoing messages suffer seeded loss, delay and duplication."""

    def __init__(self, inner: Any, config: FaultConfig) -> None:
        self.inner = inner
        self.config = config
        # each node draws its own pattern from the run's seed
        node = str(getattr(inner, "node_id", "")).encode()
        self.rng = np.random.default_rng([config.seed & 0xFFFFFFFF, zlib.crc32(node), 0xFA17])
        self._held: list[tuple[float, int, str, list[bytes]]] = []
        self._count = 0
        self.dropped = 0
        self.delayed = 0
        self.duplicated = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def send(self, peer: str, frames: Sequence[Any]) -> bool:
        c = self.config
        if c.drop and self.rng.random() < c.drop:
            self.dropped += 1
            return True
        if c.delay and self.rng.random() < c.delay:
            self.delayed += 1
            self._count += 1
            # keep our own copy: the caller may reuse its buffers once send returns
            owned = [bytes(f) for f in frames]
            heapq.heappush(self._held, (time.monotonic() + c.delay_s, self._count, peer, owned))
            return True
        ok = self.inner.send(peer, frames)
        if ok and c.duplicate and self.rng.random() < c.duplicate:
            self.duplicated += 1
            self.inner.send(peer, [bytes(f) for f in frames])
        return ok

    def _flush(self) -> None:
        now = time.monotonic()
        while self._held and self._held[0][0] <= now:
            _, _, peer, frames = heapq.heappop(self._held)
            self.inner.send(peer, frames)

    def poll(self, timeout_ms: int, max_messages: int = 256) -> list:
        self._flush()
        if self._held:
            wait = max(0, int((self._held[0][0] - time.monotonic()) * 1000))
            timeout_ms = min(timeout_ms, wait)
        out = self.inner.poll(timeout_ms, max_messages)
        self._flush()
        return out

    def close(self, linger_ms: int | None = None) -> None:
        self._held.clear()
        self.inner.close(linger_ms)

    def stats(self) -> dict[str, int]:
        return {"dropped": self.dropped, "delayed": self.delayed, "duplicated": self.duplicated}


def malicious_value(
    attack: str,
    scale: float,
    own: np.ndarray,
    neighbours: Mapping[str, np.ndarray],
) -> np.ndarray:
    """The vector a Byzantine node claims as its state for one component.

    huge: its state times a large factor; nan: NaN everywhere (receivers' decoders reject it);
    signflip: the negated state; alie: "a little is enough" (Baruch et al. 2019), mean minus
    z standard deviations of the honest values it sees; ipm: inner-product manipulation (Xie et
    al. 2020), minus epsilon times their mean; dissensus: pushes away from the neighbours' mean.
    """
    honest = [v for v in neighbours.values()] or [own]
    mean = np.mean(honest, axis=0) if len(honest) > 1 else np.array(honest[0], dtype=np.float64)
    if attack == "huge":
        return own * (scale or 1e6)
    if attack == "nan":
        return np.full_like(own, np.nan)
    if attack == "signflip":
        return -own
    if attack == "alie":
        std = np.std(honest, axis=0) if len(honest) > 1 else np.zeros_like(own)
        return (mean - (scale or 1.0) * std).astype(own.dtype)
    if attack == "ipm":
        return (-(scale or 0.5) * mean).astype(own.dtype)
    if attack == "dissensus":
        return (own + (scale or 2.0) * (own - mean)).astype(own.dtype)
    raise ValueError(f"unknown attack {attack!r}")

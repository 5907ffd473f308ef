"""Robust mixing and fault injection, without a network."""

from __future__ import annotations

import numpy as np
import pytest

from m3tgossip.consensus import clipped_mix_into, trimmed_mean_into
from m3tgossip.net import FaultConfig, FaultyTransport, malicious_value


def test_trimmed_mean_ignores_one_outlier_per_side() -> None:
    own = np.array([1.0, 2.0])
    reps = {"a": np.array([1.1, 2.1]), "b": np.array([0.9, 1.9]), "evil": np.array([1e9, -1e9])}
    trimmed_mean_into(own, reps, trim=1)
    assert np.all(np.abs(own - np.array([1.0, 2.0])) < 0.2)


def test_trimmed_mean_shrinks_trim_when_few_values() -> None:
    own = np.array([0.0])
    trimmed_mean_into(own, {"a": np.array([2.0])}, trim=3)
    assert own[0] == pytest.approx(1.0)


def test_clipping_bounds_an_attackers_pull_and_keeps_honest_pulls() -> None:
    own = np.zeros(4)
    reps = {
        "a": np.full(4, 0.1),
        "b": np.full(4, -0.1),
        "c": np.full(4, 0.05),
        "evil": np.full(4, 1e6),
    }
    w = {"self": 0.2, "a": 0.2, "b": 0.2, "c": 0.2, "evil": 0.2}
    tau = clipped_mix_into(own, "self", reps, w)
    assert tau == pytest.approx(np.median([0.2, 0.2, 0.1, 2e6]))
    assert np.linalg.norm(own) <= 0.2 * 4 * tau + 1e-12


def test_clipped_mixing_reaches_consensus_among_honest_nodes() -> None:
    rng = np.random.default_rng(0)
    n = 6
    xs = [rng.normal(size=8) for _ in range(n)]
    w = {j: 1.0 / n for j in range(n)}
    for _ in range(200):
        snapshot = [x.copy() for x in xs]
        for i in range(n):
            clipped_mix_into(xs[i], i, {j: snapshot[j] for j in range(n) if j != i}, w)
    spread = max(np.linalg.norm(x - xs[0]) for x in xs)
    assert spread < 1e-6


@pytest.mark.parametrize("attack", ["huge", "nan", "signflip", "alie", "ipm", "dissensus"])
def test_attacks_produce_vectors_of_the_right_shape(attack: str) -> None:
    own = np.ones(5)
    value = malicious_value(attack, 0.0, own, {"a": np.zeros(5), "b": np.full(5, 2.0)})
    assert value.shape == own.shape
    if attack == "nan":
        assert np.isnan(value).all()
    elif attack == "signflip":
        assert np.array_equal(value, -own)


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, list[bytes]]] = []

    def send(self, peer, frames):
        self.sent.append((peer, [bytes(f) for f in frames]))
        return True

    def poll(self, timeout_ms, max_messages=256):
        return []


def test_faulty_transport_drops_duplicates_and_delays_seeded() -> None:
    inner = Recorder()
    t = FaultyTransport(inner, FaultConfig(drop=0.3, duplicate=0.2, seed=7))
    for i in range(1000):
        assert t.send("p", [str(i).encode()])
    assert 250 < t.dropped < 350 and 100 < t.duplicated < 200
    assert len(inner.sent) == 1000 - t.dropped + t.duplicated
    again = FaultyTransport(Recorder(), FaultConfig(drop=0.3, duplicate=0.2, seed=7))
    for i in range(1000):
        again.send("p", [str(i).encode()])
    assert again.stats() == t.stats()
    slow = FaultyTransport(Recorder(), FaultConfig(delay=1.0, delay_s=0.0))
    slow.send("p", [b"x"])
    assert slow.inner.sent == []
    slow.poll(0)
    assert slow.inner.sent == [("p", [b"x"])]


def test_fault_config_validates() -> None:
    with pytest.raises(ValueError, match="drop"):
        FaultConfig(drop=1.5)
    with pytest.raises(ValueError, match="attack"):
        FaultConfig(attack="meteor")

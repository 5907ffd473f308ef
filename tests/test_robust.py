"""Mixers (CHOCO mean, self-centred clipping, trimmed mean), make_mixer, and fault injection."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest

from m3tgossip.consensus import (
    AGGREGATORS,
    MIXER_INPUTS,
    ChocoMixer,
    ClipMixer,
    TrimmedMeanMixer,
    choco_mix_into,
    clip_tau,
    make_mixer,
)
from m3tgossip.net import FaultConfig, FaultyTransport, malicious_value


def _ref_clip(x: np.ndarray, replicas: Mapping[str, np.ndarray], weights, tau: float):
    """x + sum_j w_j clip(r_j - x, tau), in float64, the pulls summed in replica order."""
    total = np.zeros(x.shape)
    for j, r in replicas.items():
        pull = r.astype(np.float64) - x
        norm = np.linalg.norm(pull)
        total += weights[j] * (pull * (tau / norm) if norm > tau else pull)
    return x + total.astype(x.dtype)


def _ref_trimmed(x: np.ndarray, replicas: Mapping[str, np.ndarray], trim: int) -> np.ndarray:
    values = np.sort(np.stack([x, *replicas.values()]).astype(np.float64), axis=0)
    k = min(trim, (len(values) - 1) // 2)
    return values[k : len(values) - k].mean(axis=0).astype(x.dtype)


def _scene(dtype: type = np.float64, n: int = 5):
    rng = np.random.default_rng(11)
    x = rng.normal(size=6).astype(dtype)
    published = rng.normal(size=6).astype(dtype)
    replicas = {f"n{j}": rng.normal(size=6).astype(dtype) for j in range(n)}
    replicas["n4"] = np.full(6, 50.0, dtype=dtype)  # an outlier for clip and trimmed
    weights = {"self": 0.4, **{j: 0.6 / n for j in replicas}}
    return x, published, replicas, weights


def test_make_mixer_builds_each_aggregator_with_what_it_uses() -> None:
    mean, clip, trimmed = (make_mixer(a) for a in AGGREGATORS)
    assert mean == ChocoMixer(1.0) and clip == ClipMixer() and trimmed == TrimmedMeanMixer(1)
    assert [m.name for m in (mean, clip, trimmed)] == list(AGGREGATORS)
    assert mean.uses == MIXER_INPUTS == {"weights", "replicas", "gamma", "published"}
    assert clip.uses == {"weights", "replicas"}
    assert trimmed.uses == {"replicas"}
    assert make_mixer("mean", gamma=0.2, lossy_codec=True, noise_aware=True) == ChocoMixer(0.2)
    assert make_mixer("clip", noise_aware=True, time_varying=True) == ClipMixer()
    assert make_mixer("trimmed", trim=3) == TrimmedMeanMixer(3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("gamma", [1.0, 0.3])
def test_mean_is_the_choco_step_over_the_published_copy(dtype: type, gamma: float) -> None:
    x, published, replicas, weights = _scene(dtype)
    got = x.copy()
    make_mixer("mean", gamma=gamma).mix_into(got, published, replicas, weights, "self")
    expected = x.copy()
    choco_mix_into(expected, published, replicas, weights, gamma=gamma)
    np.testing.assert_array_equal(got, expected)
    step = sum(
        w * (replicas[j].astype(np.float64) - published) for j, w in weights.items() if j != "self"
    )
    np.testing.assert_allclose(got, x + gamma * step, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clip_keeps_the_numerics_of_self_centred_clipping(dtype: type) -> None:
    x, published, replicas, weights = _scene(dtype)
    tau = clip_tau(x, replicas)
    norms = [np.linalg.norm(r - x) for r in replicas.values()]
    assert tau == pytest.approx(float(np.median(norms)))
    got = x.copy()
    make_mixer("clip").mix_into(got, published, replicas, weights, "self")
    np.testing.assert_array_equal(got, _ref_clip(x, replicas, weights, tau))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("trim", [0, 1, 2, 5])
def test_trimmed_keeps_the_numerics_of_the_trimmed_mean(dtype: type, trim: int) -> None:
    x, published, replicas, weights = _scene(dtype)
    got = x.copy()
    make_mixer("trimmed", trim=trim).mix_into(got, published, replicas, weights, "self")
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, _ref_trimmed(x, replicas, trim))


@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_with_no_replicas_heard_every_mixer_leaves_x_unchanged(aggregator: str) -> None:
    x = np.array([1.0, -2.0, 3.5], dtype=np.float32)
    before = x.copy()
    mixer = make_mixer(aggregator, gamma=0.5) if aggregator == "mean" else make_mixer(aggregator)
    mixer.mix_into(x, np.zeros(3, dtype=np.float32), {}, {"self": 1.0}, "self")
    np.testing.assert_array_equal(x, before)


def test_trimmed_mean_ignores_one_outlier_per_side() -> None:
    own = np.array([1.0, 2.0])
    reps = {"a": np.array([1.1, 2.1]), "b": np.array([0.9, 1.9]), "evil": np.array([1e9, -1e9])}
    make_mixer("trimmed", trim=1).mix_into(own, np.zeros(2), reps, {}, "self")
    assert np.all(np.abs(own - np.array([1.0, 2.0])) < 0.2)


def test_trimmed_mean_shrinks_trim_when_few_values() -> None:
    own = np.array([0.0])
    make_mixer("trimmed", trim=3).mix_into(own, np.zeros(1), {"a": np.array([2.0])}, {}, "self")
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
    tau = clip_tau(own, reps)
    assert tau == pytest.approx(np.median([0.2, 0.2, 0.1, 2e6]))
    make_mixer("clip").mix_into(own, np.zeros(4), reps, w, "self")
    assert np.linalg.norm(own) <= 0.2 * 4 * tau + 1e-12
    # the honest pulls (norms 0.2, 0.2, 0.1 <= tau) pass unclipped, the attacker's is cut to tau
    expected = 0.2 * (reps["a"] + reps["b"] + reps["c"]) + 0.2 * tau * np.full(4, 0.5)
    np.testing.assert_allclose(own, expected, atol=1e-12)


def test_clipped_mixing_reaches_consensus_among_honest_nodes() -> None:
    rng = np.random.default_rng(0)
    n = 6
    ids = [f"n{i}" for i in range(n)]
    xs = {i: rng.normal(size=8) for i in ids}
    w = {j: 1.0 / n for j in ids}
    mixer = make_mixer("clip")
    for _ in range(200):
        snapshot = {i: x.copy() for i, x in xs.items()}
        for i in ids:
            others = {j: snapshot[j] for j in ids if j != i}
            mixer.mix_into(xs[i], snapshot[i], others, w, i)
    spread = max(np.linalg.norm(x - xs["n0"]) for x in xs.values())
    assert spread < 1e-6


LOSSY = "the published copy, on whose CHOCO step the error feedback of a lossy codec"
NOISE = "noise-aware weights that gossip.noise_strength > 0"
DYNAMIC = "time-varying topology's round row"


@pytest.mark.parametrize(
    ("aggregator", "settings", "ignored", "hint"),
    [
        ("clip", {"gamma": 0.2}, ["gossip.gamma = 0.2"], '"mean"'),
        ("trimmed", {"gamma": 0.5}, ["gossip.gamma = 0.5"], '"mean"'),
        ("clip", {"lossy_codec": True}, [LOSSY], '"mean"'),
        ("trimmed", {"lossy_codec": True}, [LOSSY], '"mean"'),
        ("trimmed", {"noise_aware": True}, [NOISE], '"mean" or "clip"'),
        ("trimmed", {"time_varying": True}, [DYNAMIC], '"mean" or "clip"'),
        ("mean", {"trim": 2}, ["gossip.trim = 2"], '"trimmed"'),
        ("clip", {"trim": 0}, ["gossip.trim = 0"], '"trimmed"'),
        (
            "trimmed",
            {"gamma": 0.2, "lossy_codec": True, "noise_aware": True, "time_varying": True},
            ["gossip.gamma = 0.2", LOSSY, NOISE, DYNAMIC],
            '"mean"',
        ),
        ("clip", {"trim": 2, "gamma": 0.2}, ["gossip.gamma = 0.2", "gossip.trim = 2"], "no aggr"),
    ],
)
def test_make_mixer_refuses_settings_the_mixer_would_ignore(
    aggregator: str, settings: dict, ignored: list[str], hint: str
) -> None:
    with pytest.raises(ValueError) as info:
        make_mixer(aggregator, **settings)
    message = str(info.value)
    assert message.startswith(f'gossip.aggregator = "{aggregator}" ignores ')
    for phrase in ignored:
        assert phrase in message
    assert message.count(";") == len(ignored)  # one clause per setting, then the hint
    assert hint in message.rsplit(";", 1)[1]


@pytest.mark.parametrize(
    ("aggregator", "settings", "match"),
    [
        ("median", {}, 'gossip.aggregator = "median": unknown'),
        ("mean", {"gamma": 0.0}, "gossip.gamma"),
        ("mean", {"gamma": 1.5}, "gossip.gamma"),
        ("clip", {"gamma": -1.0}, "gossip.gamma"),
        ("trimmed", {"trim": -1}, "gossip.trim"),
        ("trimmed", {"trim": 1.5}, "gossip.trim"),
    ],
)
def test_make_mixer_rejects_bad_values(aggregator: str, settings: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_mixer(aggregator, **settings)


def test_mixers_reject_mismatched_input() -> None:
    x, published, replicas, weights = _scene()
    bad = {**replicas, "n0": np.zeros(5)}
    for aggregator in AGGREGATORS:
        with pytest.raises(ValueError, match='"n0" has shape'):
            make_mixer(aggregator).mix_into(x.copy(), published, bad, weights, "self")
    unweighted = {k: v for k, v in weights.items() if k != "n1"}
    with pytest.raises(KeyError, match='"n1"'):
        make_mixer("clip").mix_into(x.copy(), published, replicas, unweighted, "self")
    with pytest.raises(ValueError, match="self"):
        make_mixer("mean").mix_into(x.copy(), published, replicas, weights, "me")


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

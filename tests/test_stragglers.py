"""Stragglers: the slowdown measurement aid, loose links (no waiting on a node declared slow,
the newest value mixed once, stale queued rounds skipped), sending in every k-th round, and the
release gate still in front of everything a straggler sends."""

from __future__ import annotations

from typing import Any

import pytest

from m3tgossip.daemon import engine
from m3tgossip.net import FaultConfig

# --------------------------------------------------------------------------- slowdown


@pytest.mark.parametrize(
    ("faults", "step_s", "pause_s"),
    [({}, 0.5, 0.0), ({"slowdown": 10}, 0.5, 4.5), ({"slowdown_s": 0.25}, 0.5, 0.25)],
)
def test_slowdown_pauses_after_each_step(faults: dict, step_s: float, pause_s: float) -> None:
    config = FaultConfig(**faults)
    assert config.slowed == bool(faults) and not config.active
    assert config.pause_after(step_s) == pytest.approx(pause_s)


BAD_SLOWDOWNS = [
    {"slowdown": 0.5},
    {"slowdown": True},
    {"slowdown": float("inf")},
    {"slowdown_s": -1},
]


@pytest.mark.parametrize("faults", BAD_SLOWDOWNS)
def test_a_bad_slowdown_is_refused(faults: dict) -> None:
    with pytest.raises(ValueError, match="slowdown"):
        FaultConfig(**faults)


class Clock:
    """A virtual clock for `engine.time`: sleeping moves it on, nothing waits."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_the_engine_sleeps_the_slowdown_after_the_local_step(monkeypatch) -> None:
    clock = Clock()
    monkeypatch.setattr(engine, "time", clock)

    class Workload:
        def local_step(self, round_: int) -> dict[str, Any]:
            clock.now += 0.3  # the step itself
            return {"steps": 1}

    class State:
        config = type("C", (), {"faults": FaultConfig(slowdown=10, slowdown_s=0.1)})()
        workload = Workload()
        round = 0
        stop_reason = None

    parts: Any = type("P", (), {"state": State()})()
    beats: list[int] = []
    eng = engine.RoundEngine.__new__(engine.RoundEngine)
    eng.parts, eng.beat = parts, lambda: beats.append(1)
    assert eng.local_step() == {"steps": 1}
    assert sum(clock.slept) == pytest.approx(9 * 0.3 + 0.1)
    assert max(clock.slept) <= engine.SLOWDOWN_SLICE_S + 1e-12
    assert len(beats) == len(clock.slept)  # the watchdog hears from a slowed loop

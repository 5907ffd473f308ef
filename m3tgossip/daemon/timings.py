"""Wall time per phase of one round, as written into each round's metrics record."""

from __future__ import annotations

import time


class Timings:
    """`lap(phase)` adds the time since the previous lap to `phase`."""

    PHASES = ("local", "send", "wait", "mix", "eval_checkpoint")

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.spent = dict.fromkeys(self.PHASES, 0.0)

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.spent[phase] += now - self.last
        self.last = now

    def as_dict(self) -> dict[str, float]:
        return {**self.spent, "total": self.last - self.start}

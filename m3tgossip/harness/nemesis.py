"""The fault schedule of a chaos run: which nodes are killed, stopped and cut off, and when.

`plan_nemesis` draws it from a seed (the same list for the same arguments). Every fault starts
after `NEMESIS_START * duration` and ends before the heal at `HEAL_AT * duration`.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

#: fraction of the duration before the nemesis starts, and when everything is healed
NEMESIS_START = 0.15
HEAL_AT = 0.6
#: seconds a killed node stays down / a stopped node stays stopped (min, max)
DOWN_S = (2.0, 6.0)
STOP_S = (1.5, 5.0)


@dataclass(frozen=True)
class Fault:
    """One planned fault: at `at` seconds after the start, on `nodes`, for `duration` s."""

    at: float
    kind: str  # kill (SIGKILL, restart after duration) | stop (SIGSTOP, SIGCONT) | partition
    nodes: tuple[str, ...]
    duration: float


def _ball(adjacency: dict[str, list[str]], start: str, size: int) -> list[str]:
    """`size` nodes around `start`, breadth first (a connected side for a partition)."""
    seen, queue = [start], deque([start])
    while queue and len(seen) < size:
        for nb in sorted(adjacency.get(queue.popleft(), [])):
            if nb not in seen and len(seen) < size:
                seen.append(nb)
                queue.append(nb)
    return seen


def plan_nemesis(
    nodes: list[str],
    adjacency: dict[str, list[str]],
    duration: float,
    seed: int,
    kill_fraction: float = 0.25,
    stop_fraction: float = 0.125,
    partitions: int = 1,
    partition_s: float = 5.0,
    exclude: tuple[str, ...] = (),
) -> list[Fault]:
    """The fault schedule of a run: the same list for the same arguments (seeded).

    Killed and stopped nodes are disjoint and never in `exclude`; every fault ends before the
    heal at `HEAL_AT * duration`. A partition separates a connected ball of a quarter of the
    nodes from the rest.
    """
    rng = random.Random(seed)
    start, heal = NEMESIS_START * duration, HEAL_AT * duration
    pool = [n for n in sorted(nodes) if n not in exclude]
    n_kill = min(len(pool), round(kill_fraction * len(nodes)))
    killed = rng.sample(pool, n_kill)
    rest = [n for n in pool if n not in killed]
    stopped = rng.sample(rest, min(len(rest), round(stop_fraction * len(nodes))))
    plan: list[Fault] = []

    def window(lo: float, hi: float) -> tuple[float, float]:
        d = rng.uniform(lo, hi)
        d = min(d, max(0.5, heal - start - 0.5))
        at = rng.uniform(start, max(start, heal - d))
        return round(at, 3), round(d, 3)

    for node in killed:
        at, d = window(*DOWN_S)
        plan.append(Fault(at, "kill", (node,), d))
    for node in stopped:
        at, d = window(*STOP_S)
        plan.append(Fault(at, "stop", (node,), d))
    for _ in range(partitions):
        side = _ball(adjacency, rng.choice(sorted(nodes)), max(1, len(nodes) // 4))
        at, d = window(partition_s, partition_s)
        plan.append(Fault(at, "partition", tuple(sorted(side)), d))
    plan.sort(key=lambda f: (f.at, f.kind, f.nodes))
    return plan

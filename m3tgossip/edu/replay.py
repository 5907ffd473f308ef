"""A federation of `edu` nodes in one process, with stage checkpoints, for erasure by replay.

This module owns the reference semantics of exact erasure in a gossip federation. Every node
mixes its neighbours' values into its own, so a learner's contribution reaches every node
that holds a component connected to the learner's node within a few rounds. Exact erasure
for the whole federation therefore means: every node returns to a state from before the
learner's first contribution and the federation replays the rounds since, without the
learner. What keeps that from being retraining from scratch is staging (SISA-style slicing,
applied to enrollment): each node's learners enter its training pool in `stages` slices, the
federation keeps a checkpoint of every node at each stage boundary, and an erasure replays
only from the boundary before the earliest slice that held an erased learner. A learner of
the last slice costs one stage of replay; a node that left (it contributed from round 0)
costs the whole run.

`Federation` runs synchronous rounds exactly as the daemons do in lockstep with the mean
mixer, `gamma = 1` and raw values: every node trains `local_steps` steps, then every shared
component is replaced by the Metropolis-Hastings average over its holders' subgraph of the
topology (without the nodes that left). Training is deterministic under an open profile, so
a replay from a checkpoint without the learner gives bit for bit what retraining from scratch
without the learner gives. The daemons' exact mode (`m3tgossip forget --mode exact`) keeps one
stage, the start of the run, and so replays all of it.
Time is the process's CPU time of the rounds, so a replay and a retrain compare like for like
on a shared machine.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from m3tgossip.consensus.weights import metropolis_hastings
from m3tgossip.edu.model.components import component_seed
from m3tgossip.edu.unlearning import learner_mask
from m3tgossip.edu.workload import EduWorkload
from m3tgossip.topology import Topology

State = dict[str, dict[str, np.ndarray]]


def slices(n: int, stages: int, key: str, seed: int) -> np.ndarray:
    """The enrollment slice (0 .. stages-1) of each of n pool records: a seeded permutation
    cut into `stages` near-equal parts."""
    order = np.random.default_rng(component_seed(f"slices/{key}", seed)).permutation(n)
    out = np.empty(n, dtype=np.int64)
    out[order] = np.arange(n) * stages // max(n, 1)
    return out


@dataclass
class Federation:
    """The nodes of `topology` as `EduWorkload`s in one process (see the module docstring)."""

    topology: Topology
    rounds: int
    seed: int = 0
    options: Mapping[str, Any] = field(default_factory=dict)
    stages: int = 1

    def __post_init__(self) -> None:
        if self.stages < 1 or self.stages > self.rounds:
            raise ValueError(f"stages: between 1 and rounds ({self.rounds}), got {self.stages}")
        self.nodes = {
            n.id: EduWorkload(self.topology, n.id, seed=self.seed, options=dict(self.options))
            for n in self.topology.nodes
        }
        self.full_pool = {nid: w.trainer.pool.copy() for nid, w in self.nodes.items()}
        self.slice_of = {
            nid: slices(len(pool), self.stages, nid, self.seed)
            for nid, pool in self.full_pool.items()
        }
        #: the stage boundaries: stage s trains rounds [bounds[s], bounds[s + 1])
        self.bounds = [round(self.rounds * s / self.stages) for s in range(self.stages + 1)]
        self.initial = self.snapshot()
        self.reset()

    # ------------------------------------------------------------------ state

    def snapshot(self) -> State:
        return {nid: w.state() for nid, w in self.nodes.items()}

    def reset(self, state: State | None = None) -> None:
        """Every node back to `state` (default: the start), nobody excluded."""
        for nid, w in self.nodes.items():
            w.load_state((state or self.initial)[nid])
        self.gone: set[str] = set()
        self.erased: dict[str, set[str]] = {}

    def exclude(self, learners: Mapping[str, Iterable[object]] = {}, nodes: Iterable[str] = ()):
        """From now on train without these learners (node -> learner ids) and nodes."""
        for nid, ids in learners.items():
            self.erased.setdefault(nid, set()).update(str(x) for x in ids)
        self.gone |= set(nodes)

    def active(self) -> list[str]:
        return [nid for nid in self.nodes if nid not in self.gone]

    def stage_of(self, round_: int) -> int:
        return max(s for s in range(self.stages) if self.bounds[s] <= round_)

    def first_stage(self, node_id: str, learners: Iterable[object]) -> int:
        """The earliest stage whose pool held one of `learners` of `node_id` (stages if none)."""
        w = self.nodes[node_id]
        mask = learner_mask_of(w, learners)[self.full_pool[node_id]]
        held = self.slice_of[node_id][mask]
        return int(held.min()) if held.size else self.stages

    def set_pools(self, stage: int) -> None:
        """Every node's pool: the slices up to `stage`, without the erased learners."""
        for nid, w in self.nodes.items():
            pool = self.full_pool[nid]
            keep = self.slice_of[nid] <= stage
            if nid in self.erased:
                keep &= ~learner_mask_of(w, self.erased[nid])[pool]
            w.trainer.pool = pool[keep]

    # ------------------------------------------------------------------ rounds

    def mix(self) -> None:
        """Every shared component to the Metropolis-Hastings mean of its active holders."""
        active = set(self.active())
        for comp in self.topology.components():
            holders = [
                h
                for h in self.topology.holders(comp)
                if h in active and comp in self.nodes[h].shared()
            ]
            if len(holders) < 2:
                continue
            graph = self.topology.component_graph(comp).subgraph(holders)
            W = metropolis_hastings(graph, holders)
            views = [self.nodes[h].shared()[comp] for h in holders]
            X = np.stack([v.copy() for v in views])
            Y = W @ X
            for v, y in zip(views, Y, strict=True):
                v[...] = y

    def run(
        self, start: int = 0, stop: int | None = None, checkpoints: dict[int, State] | None = None
    ) -> float:
        """Rounds `start` .. `stop - 1` (default: to the end); with `checkpoints`, a snapshot at
        every stage boundary passed (before its round). Returns the CPU seconds taken."""
        stop = self.rounds if stop is None else stop
        t0 = time.process_time()
        for r in range(start, stop):
            if checkpoints is not None and r in self.bounds:
                checkpoints[r] = self.snapshot()
            self.set_pools(self.stage_of(r))
            for nid in self.active():
                self.nodes[nid].local_step(r)
            self.mix()
        return time.process_time() - t0

    def vectors(self) -> dict[str, dict[str, np.ndarray]]:
        """Every node's trained vectors, copied."""
        return {
            nid: {c: x.copy() for c, x in w.model.vectors().items()}
            for nid, w in self.nodes.items()
        }


def learner_mask_of(workload: EduWorkload, learners: Iterable[object]) -> np.ndarray:
    """The mask of `learners`' records in the workload's train set."""
    return learner_mask(workload.trainer.learners, learners)

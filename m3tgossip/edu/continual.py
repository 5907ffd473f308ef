"""Learning over a semester's stages without forgetting the earlier ones.

A spec with `[[stages]]` (`m3tgossip.topology.stages`) gives a node more tasks and modalities
as rounds pass. In stage k the node trains on the labels of the tasks stage k brought it; the
labels of its earlier tasks are what it would no longer collect, and plain training on the new
ones alone (`continual = "naive"`, sequential fine-tuning) lets the shared encoders, fusion
and backbone drift away from what the earlier heads read. `continual = "replay"` (the
default) keeps earlier tasks in three ways:

- per-task prompts and heads stay apart: the M3T model's block mask lets no task's prompts
  see another's, so a new task's components never change an earlier task's outputs directly;
- a small local replay buffer: `replay` training records per earlier task (drawn once, from
  the federation seed, the node and the task, so every stage keeps the same ones) keep their
  labels of that task;
- an L2 pull to the previous stage's weights: after every optimiser step each component the
  node held before the stage moves `lr * anchor` of the way back to its value at the stage's
  start (a proximal step of the penalty `anchor / 2 * ||w - w_stage||^2`). The pull reads no
  record, so under DP-SGD it is post-processing and costs no privacy.

Every record the node holds over the semester is built from its last stage's topology entry,
so a record is the same record in every stage; only which of its labels count changes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from m3tgossip.edu.data.records import EduData
from m3tgossip.edu.model.components import component_seed
from m3tgossip.topology import Topology

#: `[workload] continual`: earlier tasks kept (replay buffer and L2 pull) or plain sequential
CONTINUAL = ("replay", "naive")


def stage_tasks(topology: Topology, node_id: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(earlier, new): the node's tasks held before this version's stage, and those it brings
    (all of them in the stage the node joins at)."""
    now = topology.node(node_id).tasks
    if topology.stage <= topology.joins_at(node_id):
        return (), now
    before = set(topology.version(topology.stage - 1).node(node_id).tasks)
    return tuple(t for t in now if t in before), tuple(t for t in now if t not in before)


def stage_components(topology: Topology, node_id: str) -> tuple[str, ...]:
    """The components this version's stage brings the node (all of them in stage 0 and in the
    stage it joins at)."""
    now = topology.node(node_id).components
    if topology.stage <= topology.joins_at(node_id):
        return now
    before = set(topology.version(topology.stage - 1).node(node_id).components)
    return tuple(c for c in now if c not in before)


def replay_buffer(train: EduData, task: str, size: int, node_id: str, seed: int) -> np.ndarray:
    """The indices of the `size` records labelled for `task` the node keeps for replay."""
    labelled = np.flatnonzero(train.labels[task] >= 0)
    rng = np.random.default_rng(component_seed(f"replay/{node_id}/{task}", seed))
    return np.sort(rng.permutation(labelled)[:size])


def stage_train(
    train: EduData,
    topology: Topology,
    node_id: str,
    mode: str,
    replay: int,
    seed: int,
) -> EduData:
    """The node's training records of this stage: every label of the tasks the stage brings;
    of earlier tasks, only the replay buffer's (`replay`) or none (`naive`)."""
    if mode not in CONTINUAL:
        raise ValueError(f"continual: one of {', '.join(CONTINUAL)}, got {mode!r}")
    earlier, _ = stage_tasks(topology, node_id)
    if not earlier:
        return train
    labels = dict(train.labels)
    for task in earlier:
        kept = np.full(len(train), -1, dtype=np.int64)
        if mode == "replay" and replay:
            idx = replay_buffer(train, task, replay, node_id, seed)
            kept[idx] = train.labels[task][idx]
        labels[task] = kept
    staged = train.subset(np.arange(len(train)))
    staged.labels = labels
    return staged


class Anchor:
    """The L2 pull of a stage: each anchored component moves `rate` of the way back to its
    value at the start of the stage after every optimiser step."""

    def __init__(
        self, vectors: Mapping[str, np.ndarray], anchored: set[str], rate: float, stage: int
    ) -> None:
        self.vectors = vectors
        self.stage = stage
        self.rate = rate
        self.anchored = sorted(c for c in anchored if c in vectors)
        self.values: dict[str, np.ndarray] = {}

    def begin(self, saved: Mapping[str, np.ndarray]) -> None:
        """The stage's anchor: from a checkpoint of this stage if it has one, else the
        components' values now (the stage begins)."""
        same = "anchor/stage" in saved and int(saved["anchor/stage"]) == self.stage
        for c in self.anchored:
            kept = saved.get(f"anchor/{c}") if same else None
            x = self.vectors[c]
            self.values[c] = kept.copy() if kept is not None and kept.shape == x.shape else x.copy()

    def pull(self) -> None:
        """One proximal step of every anchored component towards its anchor (in place)."""
        if not self.rate:
            return
        for c, a in self.values.items():
            x = self.vectors[c]
            x -= self.rate * (x - a)

    def state(self) -> dict[str, np.ndarray]:
        out = {f"anchor/{c}": a.copy() for c, a in self.values.items()}
        out["anchor/stage"] = np.array(self.stage, dtype=np.int64)
        return out

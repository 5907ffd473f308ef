"""A node's training and test records from its own data folder (`m3tgossip node --data DIR`).

The folder is read and checked (`folder.read_folder`), its records split into training and test
records, the preprocessing fitted on the training records (`adapt.Adapter`) and applied to all.

The split: labels.csv's `split` column where it gives one (`train` or `test`); the other records
follow their learner, a seeded `[split] test_fraction` of the learners (0.3) being held out, so
the test records are those of learners the node never trained on. Records with none of the
node's modalities are left out of both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from m3tgossip.edu.data.adapt import Adapter
from m3tgossip.edu.data.draws import entropy
from m3tgossip.edu.data.folder import RawFolder, read_folder
from m3tgossip.edu.data.records import EduData
from m3tgossip.errors import ConfigError
from m3tgossip.log import get_logger

log = get_logger(__name__)


class NodeLike(Protocol):
    """What is read of the node's topology entry (`m3tgossip.topology.NodeSpec` fits)."""

    @property
    def id(self) -> str: ...
    @property
    def modalities(self) -> tuple[str, ...]: ...
    @property
    def tasks(self) -> tuple[str, ...]: ...


@dataclass
class NodeFolder:
    """A node's own records, split and adapted."""

    raw: RawFolder
    adapter: Adapter
    train: EduData
    test: EduData
    train_records: list[str]
    test_records: list[str]


def held_out(raw: RawFolder, seed: int, key: str) -> np.ndarray:
    """Bool per record: in the test split (see the module docstring)."""
    given = raw.split if raw.split is not None else np.full(len(raw), -1, np.int8)
    learners = sorted({lr for lr, s in zip(raw.learners, given, strict=True) if s < 0})
    rng = np.random.default_rng(np.random.SeedSequence(entropy(seed, "split", key)))
    order = [learners[i] for i in rng.permutation(len(learners))]
    fraction = raw.manifest.test_fraction
    n_test = round(len(order) * fraction)
    if fraction > 0 and len(order) >= 2:
        n_test = min(max(1, n_test), len(order) - 1)
    held_out = set(order[:n_test])
    return np.array(
        [s == 1 or (s < 0 and lr in held_out) for lr, s in zip(raw.learners, given, strict=True)]
    )


def load_node_folder(path: str | Path, node: NodeLike, seed: int = 0) -> NodeFolder:
    """The node's records from its folder; ConfigError naming file, row and field if bad."""
    raw = read_folder(path)
    m = raw.manifest
    if m.node is not None and m.node != node.id:
        raise ConfigError(str(m.path), "node", f"the folder is {m.node!r}'s; this is {node.id!r}")
    usable = np.zeros(len(raw), bool)
    for modality in node.modalities:
        usable |= raw.present[modality]
    if not usable.any():
        raise ConfigError(
            str(path), "", f"no record has any of node {node.id}'s modalities {node.modalities}"
        )
    for modality in node.modalities:
        if not raw.present[modality].any():
            log.warning("%s: %s has no %s records", node.id, path, modality)
    for task in node.tasks:
        if task not in m.tasks:
            log.warning("%s: %s has no labels for the task %s", node.id, path, task)
    is_test = held_out(raw, seed, node.id)
    train, test = usable & ~is_test, usable & is_test
    adapter = Adapter.fit(raw, train)
    data, notes = adapter.apply(raw, node.tasks)
    for note in raw.notes + notes:
        log.info("%s: %s: %s", node.id, path, note)
    if not any((data.labels[t][train] >= 0).any() for t in node.tasks):
        raise ConfigError(
            str(m.file("labels")),
            "",
            f"no training record has a label for node {node.id}'s tasks {node.tasks}",
        )
    records = np.array(raw.records, dtype=object)
    return NodeFolder(
        raw=raw,
        adapter=adapter,
        train=data.subset(train),
        test=data.subset(test),
        train_records=list(records[train]),
        test_records=list(records[test]),
    )

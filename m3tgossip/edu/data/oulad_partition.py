"""OULAD as a federation of data folders: `m3tgossip data from-oulad OULAD_DIR --topology SPEC`.

The Open University Learning Analytics Dataset is read with `oulad.load_oulad` (one record per
registration of a student on a module presentation) and partitioned into the spec's nodes:

- institutions and courses: the module presentations (code_module/code_presentation, sorted)
  are dealt in turn to the spec's institutions (each node's `institution`, its id where it has
  none, in spec order); the presentations an institution gets are its courses;
- learners: each student (id_student) of an institution's courses is placed on one of the
  institution's nodes, with all their registrations there, by a seeded draw weighted as the
  built-in data weighs roles (institution 2, instructor 1, student 0.5), every node getting at
  least one student;
- labels: `at_risk` (final_result Withdrawn or Fail), `engagement` (tertile of total clicks)
  and `next_response` (the last scored assessment passed), for the tasks each node serves;
- groups per learner: OULAD's gender, disability, imd_band and age_band;
- modalities: tabular (the twelve features `load_oulad` derives, z-scored over the data set,
  so the manifests turn standardisation off) and clickstream (the event sequence `load_oulad`
  builds, `t` being the position in it), as far as each node has them.

A node with none of OULAD's modalities or tasks, or more institutions (or an institution with
more nodes than students) than the data set can fill, stops the conversion with a ConfigError.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from m3tgossip.edu.data.config import ROLE_SCALE
from m3tgossip.edu.data.draws import entropy
from m3tgossip.edu.data.oulad import load_oulad_registrations
from m3tgossip.edu.data.writer import write_folder
from m3tgossip.errors import ConfigError
from m3tgossip.topology import NodeSpec, Topology

MODALITIES = ("tabular", "clickstream")
TASKS = ("at_risk", "engagement", "next_response")


def _quotas(weights: np.ndarray, n: int) -> np.ndarray:
    """Counts summing to n in proportion to weights (largest remainder), each at least 1."""
    raw = weights / weights.sum() * n
    counts = np.floor(raw).astype(int)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    while (counts == 0).any():
        counts[np.argmax(counts)] -= 1
        counts[np.flatnonzero(counts == 0)[0]] += 1
    return counts


def institutions_of(topology: Topology) -> dict[str, list[NodeSpec]]:
    """Institution -> its nodes, in spec order."""
    out: dict[str, list[NodeSpec]] = {}
    for node in topology.nodes:
        out.setdefault(node.institution or node.id, []).append(node)
    return out


def partition(
    keys: list[tuple[str, str, str]], topology: Topology, seed: int, source: str
) -> tuple[dict[str, list[int]], dict[str, list[str]]]:
    """Node -> indices of its registrations, and institution -> its courses."""
    institutions = institutions_of(topology)
    courses = sorted({(m, p) for m, p, _ in keys})
    names = list(institutions)
    if len(courses) < len(names):
        raise ConfigError(
            source,
            "",
            f"{len(courses)} module presentations for {len(names)} institutions in "
            f"{topology.source}: every institution needs one",
        )
    institution_of = {c: names[i % len(names)] for i, c in enumerate(courses)}
    placed: dict[str, list[int]] = {node.id: [] for node in topology.nodes}
    for name, nodes in institutions.items():
        mine = [i for i, (m, p, _) in enumerate(keys) if institution_of[(m, p)] == name]
        students = sorted({keys[i][2] for i in mine}, key=lambda s: (len(s), s))
        if len(students) < len(nodes):
            raise ConfigError(
                source,
                "",
                f"institution {name!r} has {len(nodes)} nodes but its courses only "
                f"{len(students)} students",
            )
        rng = np.random.default_rng(np.random.SeedSequence(entropy(seed, "oulad", name)))
        order = [students[k] for k in rng.permutation(len(students))]
        counts = _quotas(np.array([ROLE_SCALE[n.role] for n in nodes], float), len(order))
        bounds = np.concatenate([[0], np.cumsum(counts)])
        node_of = {
            s: nodes[k].id for k in range(len(nodes)) for s in order[bounds[k] : bounds[k + 1]]
        }
        for i in mine:
            placed[node_of[keys[i][2]]].append(i)
    by_institution = {
        n: [f"{m}/{p}" for m, p in courses if institution_of[(m, p)] == n] for n in names
    }
    return placed, by_institution


def _check(node: NodeSpec) -> tuple[list[str], list[str]]:
    modalities = [m for m in node.modalities if m in MODALITIES]
    tasks = [t for t in node.tasks if t in TASKS]
    if not modalities or not tasks:
        raise ConfigError(
            f"node {node.id}",
            "modalities" if not modalities else "tasks",
            f"OULAD has the modalities {MODALITIES} and the tasks {TASKS}; this node has "
            f"{node.modalities} and {node.tasks}",
        )
    return modalities, tasks


def write_oulad(
    oulad: str | Path,
    topology: Topology,
    out: str | Path,
    *,
    seed: int = 0,
    max_students: int | None = None,
) -> dict[str, Path]:
    """Convert the OULAD folder `oulad` into one data folder per node under `out`."""
    plans = {node.id: _check(node) for node in topology.nodes}
    keys, data = load_oulad_registrations(oulad, max_students=max_students)
    placed, courses = partition(keys, topology, seed, str(oulad))
    written = {}
    for node in topology.nodes:
        modalities, tasks = plans[node.id]
        idx = np.array(placed[node.id], dtype=np.intp)
        part = data.subset(idx)  # group attributes no record has (language, ...) are not written
        inst = node.institution or node.id
        written[node.id] = write_folder(
            Path(out) / node.id,
            part,
            records=["_".join(keys[i]) for i in idx],
            learners=[keys[i][2] for i in idx],
            modalities=modalities,
            tasks=tasks,
            node=node.id,
            description=(
                f"OULAD students of institution {inst} (courses {', '.join(courses[inst])}) "
                f"placed on node {node.id} (seed {seed})"
            ),
            settings={"tabular": {"standardize": False}},
        )
    return written

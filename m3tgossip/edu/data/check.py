"""`m3tgossip data check DIR`: what a data folder holds, counted per modality, task and group."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from m3tgossip.edu.data.adapt import tabular_slots
from m3tgossip.edu.data.folder import RawFolder
from m3tgossip.edu.data.schema import MODALITIES


def describe(raw: RawFolder) -> dict[str, Any]:
    """A JSON-able account of the folder: records, learners, modalities, tasks, groups, split."""
    m = raw.manifest
    learners = sorted(set(raw.learners))
    tasks = {}
    for name, spec in m.tasks.items():
        labels = raw.labels[name]
        counts = np.bincount(labels[labels >= 0], minlength=len(spec.classes))
        tasks[name] = {
            "kind": spec.kind,
            "labelled": int((labels >= 0).sum()),
            "classes": {c: int(k) for c, k in zip(spec.classes, counts, strict=True)},
        }
    first: dict[str, int] = {}
    for i, learner in enumerate(raw.learners):
        first.setdefault(learner, i)
    groups = raw.groups()
    by_group = {
        g: dict(sorted(Counter(str(values[i]) for i in first.values()).items()))
        for g, values in groups.items()
    }
    split = raw.split if raw.split is not None else np.full(len(raw), -1)
    _, dropped = tabular_slots(raw.tabular_columns)
    return {
        "folder": str(m.path.parent),
        "node": m.node,
        "records": len(raw),
        "learners": len(learners),
        "modalities": {
            mod: int(raw.present[mod].sum()) for mod in MODALITIES if mod in m.modalities
        },
        "clickstream_events": int(raw.event_counts.sum()),
        "tabular_columns": list(raw.tabular_columns),
        "tabular_dropped": dropped,
        "tasks": tasks,
        "groups": by_group,
        "split": {
            "train": int((split == 0).sum()),
            "test": int((split == 1).sum()),
            "by learner": int((split < 0).sum()),
        },
        "notes": list(raw.notes),
    }


def format_description(d: dict[str, Any]) -> str:
    """`describe` as the text `data check` prints."""
    node = f" (node {d['node']})" if d["node"] else ""
    lines = [f"{d['folder']}{node}: {d['records']} records of {d['learners']} learners"]
    lines.append("modalities (records with it):")
    for mod, n in d["modalities"].items():
        extra = ""
        if mod == "clickstream":
            extra = f", {d['clickstream_events']} events"
        elif mod == "tabular":
            extra = f", {len(d['tabular_columns'])} columns"
            if d["tabular_dropped"]:
                extra += (
                    f" (beyond the encoder's width, dropped: {', '.join(d['tabular_dropped'])})"
                )
        lines.append(f"  {mod:<12} {n}{extra}")
    lines.append("tasks (labelled records per class):")
    for name, t in d["tasks"].items():
        classes = ", ".join(f"{c} {k}" for c, k in t["classes"].items())
        lines.append(f"  {name:<14} {t['kind']:<12} {t['labelled']:>6} labelled: {classes}")
    lines.append("groups (learners per value):")
    for g, values in d["groups"].items():
        lines.append(f"  {g:<16} " + ", ".join(f"{v} {k}" for v, k in values.items()))
    s = d["split"]
    lines.append(f"split: {s['train']} train, {s['test']} test, {s['by learner']} split by learner")
    lines += [f"note: {note}" for note in d["notes"]]
    return "\n".join(lines)

"""`m3tgossip predict --state-dir DIR --data DIR2 --out FILE`: a trained node's predictions.

The node is rebuilt from its state folder (`restore`), the records of the data folder DIR2 are
read and adapted as the node's training records were (the preprocessing kept in its
checkpoint; the built-in scales for a node trained on built-in records), and every record that
has at least one of the node's modalities gets a prediction for each of the node's tasks.

The CSV has one row per record and task: `record_id, learner_id, task, prediction,
probability, label` (the predicted class, by the name the training folder gave it; the model's
probability of it; the folder's label if it has one, else empty), followed by one
`p_<class>` column per class of the task with the most classes (empty past a task's own).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from m3tgossip.edu.data.folder import RawFolder, read_folder
from m3tgossip.edu.data.schema import TASKS
from m3tgossip.edu.restore import TrainedNode, load_trained_node

#: records run through the model at a time
CHUNK = 256


@dataclass
class Predictions:
    """What `predict` wrote."""

    path: Path
    node: str
    records: int
    skipped: int
    tasks: tuple[str, ...]
    #: task -> accuracy on the records the folder labels for it
    accuracy: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@torch.no_grad()
def probabilities(
    trained: TrainedNode, data_dir: str | Path
) -> tuple[RawFolder, np.ndarray, dict[str, np.ndarray], list[str]]:
    """The folder as read, the indices of the records predicted (those with one of the node's
    modalities), task -> class probabilities [n, classes], and notes on the adaptation."""
    raw = read_folder(data_dir)
    data, notes = trained.adapter.apply(raw)
    usable = np.zeros(len(raw), bool)
    for m in trained.node.modalities:
        usable |= raw.present[m]
    idx = np.flatnonzero(usable)
    parts: dict[str, list[np.ndarray]] = {t: [] for t in trained.model.tasks}
    for start in range(0, len(idx), CHUNK):
        batch = trained.model.prepare(data.subset(idx[start : start + CHUNK]))
        for t, logits in trained.model(batch).items():
            parts[t].append(torch.softmax(logits, dim=1).numpy())
    probs = {
        t: np.concatenate(p) if p else np.zeros((0, TASKS[t]), np.float32) for t, p in parts.items()
    }
    return raw, idx, probs, notes + raw.notes


def predict(state_dir: str | Path, data_dir: str | Path, out: str | Path) -> Predictions:
    """Write the node's predictions for the records of `data_dir` to the CSV `out`."""
    trained = load_trained_node(state_dir)
    raw, idx, probs, notes = probabilities(trained, data_dir)
    tasks = trained.model.tasks
    width = max(TASKS[t] for t in tasks)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if trained.adapter.source == "folder":
        notes += [
            f"{t}: the node's own folder had no labels for it; its head is what its neighbours "
            "trained (or untrained)"
            for t in tasks
            if t not in trained.adapter.classes
        ]
    result = Predictions(out, trained.node.id, len(idx), len(raw) - len(idx), tasks, notes=notes)
    right: dict[str, list[bool]] = {t: [] for t in tasks}
    with open(out, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        header = ["record_id", "learner_id", "task", "prediction", "probability", "label"]
        writer.writerow(header + [f"p_{k}" for k in range(width)])
        for row, i in enumerate(idx):
            for t in tasks:
                names = trained.adapter.class_names(t)
                p = probs[t][row]
                k = int(p.argmax())
                label = int(raw.labels[t][i]) if t in raw.labels else -1
                if label >= 0:
                    right[t].append(label == k)
                label_names = raw.manifest.tasks[t].classes if t in raw.manifest.tasks else names
                writer.writerow(
                    [
                        raw.records[i],
                        raw.learners[i],
                        t,
                        names[k],
                        f"{p[k]:.6f}",
                        label_names[label] if label >= 0 else "",
                        *(f"{x:.6f}" for x in p),
                        *([""] * (width - len(p))),
                    ]
                )
    result.accuracy = {t: float(np.mean(r)) for t, r in right.items() if r}
    return result

"""`m3tgossip explain --state-dir DIR --data DIR2 --out OUT`: what a node's predictions rest on.

Attribution over the node's modalities (at most `MAX_MODALITIES`), exact, by coalitions: the
fusion masks a modality a record lacks, so a record with only the modalities S marked present
*is* the record as a coalition S sees it, and the empty coalition is the fusion's null token
alone. The encoders run once over the records; the fusion, backbone and heads evaluate every
coalition (2^m evaluations, all tasks at once, the coalitions of a chunk of records stacked
into one batch).

The value of a coalition S for a task is the mean log-probability (nats) of the record's
label with only S present, over the records labelled for the task; for a task the data labels
nowhere, the label is replaced by the class the node predicts with every modality (then the
value says how much each modality supports the prediction, not whether it is right). The
Shapley value phi_m of modality m is exact (every coalition evaluated); by efficiency
sum_m phi_m = v(all) - v(empty), and the share of m is phi_m / sum phi. A total at or below
`TINY_TOTAL` means the modalities together do not make the label more likely than the null
token does: shares are then not given (`shares: null`, with a note).

Masking measures a modality against its absence, and the null token is what absence looks
like to the model. A node whose training records always have some modality never saw the
coalitions without it, so their values are the model's extrapolation, and a modality can earn
phi merely by making a record look like the records the node trained on (content-free
presence). The permutation check keeps presence and changes content (`leave_one_out`,
v(all) - v(all without m), is its counterpart by masking): where the two disagree, that, or
modalities carrying the same information (Shapley splits it among them), is the likely reason.

What is computed (`Explainer`, over one prepared batch):

- `shapley`: phi, shares, v(all), v(empty) per task, on all records or a subset (a group);
- `permutation`: per modality and task, the drop in v(all) when that modality's inputs
  (tokens and presence together) are shuffled across the records (seeded, `repeats` times),
  and the Spearman correlation of phi and the drops per task; `pooled_spearman` pools it over
  nodes and tasks;
- `record`: one record's explanation: its prediction per task and the Shapley values of the
  log-probability of the predicted class (a modality the record lacks gets exactly 0);
- `components`: per trained component, the drop in v(all) when it alone is reverted to the
  base: the LoRA delta of `encoder.<m>`, `fusion`, `backbone` set to zero (their pretrained
  weights), a `prompt.<task>` reset to its seeded initial tokens. A head cannot be removed
  (its task has no prediction without it), and a frozen component has nothing to revert.

Role views (`role_view`) split the records by what the data has and give shares per group: an
institution per course (a `course` attribute in learners.csv; the format has no course field
of its own, so without one: per value of each of the folder's group attributes), an
instructor per class (a `class` attribute; without one the node's records are its class), a
student per learner (their own records, each with its prediction explained). The role is the
node's, from the topology in its state folder.

`round_attribution(trainer)` is the cheap per-round form: Shapley shares on the held-out
records the trainer holds already, a fixed seeded sample of them within `ROUND_ROWS` rows
(records x 2^m). `explain` writes OUT/explain.json (keys in
`m3tgossip/docs/data.md`) and OUT/explain.png (stacked share bars per task; needs matplotlib,
the `plot` extra).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m3tgossip.edu.data.folder import read_folder
from m3tgossip.edu.model.m3t import Batch
from m3tgossip.edu.model.node_model import NodeModel
from m3tgossip.edu.restore import build_model, load_trained_node
from m3tgossip.errors import ConfigError

FORMAT = "m3tgossip.explain/1"
#: rows run through the model at a time (records x the variants stacked for each)
CHUNK = 1024
#: most modalities a node may have for exact attribution (2^5 = 32 coalitions)
MAX_MODALITIES = 5
#: a Shapley total (nats) at or below this makes shares meaningless
TINY_TOTAL = 1e-3
#: shuffles per modality in the permutation check
REPEATS = 3
#: rows (records x 2^m coalitions) `round_attribution` runs by default
ROUND_ROWS = 128
#: most groups per attribute in a role view (the largest), most records explained per learner
#: and most learners in a student view
MAX_GROUPS = 50
MAX_OWN_RECORDS = 20
MAX_LEARNERS = 50
#: what the role views group by when the data has it
ROLE_FIELDS = {"institution": "course", "instructor": "class", "student": "learner"}
VALUE = (
    "mean log-probability (nats) of the true label over the records labelled for the task; "
    "of the class predicted with every modality where the data labels none"
)


@cache
def shapley_matrix(m: int) -> np.ndarray:
    """W [m, 2^m] with phi = W @ v for values v indexed by coalition bitmask (bit k = the k-th
    modality present): W[i, S | i] += w and W[i, S] -= w, w = |S|! (m - |S| - 1)! / m!."""
    w = np.zeros((m, 1 << m))
    for i in range(m):
        for s in range(1 << m):
            if s >> i & 1:
                continue
            size = bin(s).count("1")
            weight = math.factorial(size) * math.factorial(m - size - 1) / math.factorial(m)
            w[i, s | 1 << i] += weight
            w[i, s] -= weight
    w.flags.writeable = False
    return w


def shapley(values: np.ndarray) -> np.ndarray:
    """Exact Shapley values [m, ...] of coalition values [2^m, ...] (indexed by bitmask)."""
    values = np.asarray(values, dtype=np.float64)
    m = len(values).bit_length() - 1
    if len(values) != 1 << m or m < 1:
        raise ValueError(f"coalition values: 2^m of them, got {len(values)}")
    return np.tensordot(shapley_matrix(m), values, axes=1)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their mean rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation; None with fewer than two points or a constant side."""
    a, b = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(a) != len(b):
        raise ValueError(f"spearman: {len(a)} against {len(b)} values")
    if len(a) < 2:
        return None
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def pooled_spearman(reports: Iterable[Mapping[str, Any]], key: str = "phi") -> dict[str, Any]:
    """Shapley phi (or another per-modality entry of the task summaries, `key`) against the
    permutation drop over explain reports of several nodes (each with `tasks: {task: {phi,
    permutation: {drop}}}`): one Spearman over every (node, task, modality) pair pooled (both
    are in nats of the same value, so they pool), and the mean of the per-(node, task)
    correlations where defined."""
    xs: list[float] = []
    ys: list[float] = []
    per: list[float] = []
    pairs = 0
    for report in reports:
        for summary in report.get("tasks", {}).values():
            drop = (summary.get("permutation") or {}).get("drop")
            if not drop:
                continue
            mods = [m for m in summary[key] if m in drop]
            xs += [summary[key][m] for m in mods]
            ys += [drop[m] for m in mods]
            pairs += 1
            rho = spearman([summary[key][m] for m in mods], [drop[m] for m in mods])
            if rho is not None:
                per.append(rho)
    return {
        "pooled": spearman(xs, ys),
        "mean": float(np.mean(per)) if per else None,
        "node_tasks": pairs,
        "defined": len(per),
        "points": len(xs),
    }


def summarize(modalities: Sequence[str], values: np.ndarray, n: int, kind: str) -> dict[str, Any]:
    """The JSON summary of one task's coalition values [2^m] on n records."""
    phi = shapley(values)
    total = float(phi.sum())
    full = len(values) - 1
    out: dict[str, Any] = {
        "value": kind,
        "records": n,
        "v_all": float(values[-1]),
        "v_empty": float(values[0]),
        "phi": {m: float(p) for m, p in zip(modalities, phi, strict=True)},
        "total": total,
        "shares": None,
        "note": None,
        # v(all) - v(all without m): what masking m alone costs (the permutation check's
        # counterpart by masking; Shapley also credits m where the others are absent)
        "leave_one_out": {
            m: float(values[full] - values[full ^ 1 << k]) for k, m in enumerate(modalities)
        },
    }
    if n == 0:
        out["note"] = "no records"
    elif total <= TINY_TOTAL:
        out["note"] = (
            f"total {total:.3g} nats <= {TINY_TOTAL:g}: the modalities together do not make "
            "the label more likely than none; shares are not meaningful"
        )
    else:
        out["shares"] = {m: float(p / total) for m, p in zip(modalities, phi, strict=True)}
    return out


@dataclass
class Targets:
    """Per task the class whose log-probability is the value, and the records that count."""

    classes: dict[str, np.ndarray]
    used: dict[str, np.ndarray]
    #: "label" or "prediction" (see the module docstring)
    kinds: dict[str, str]


class Explainer:
    """The coalition passes of `model` over one prepared `batch` (labels per task, -1 where
    unknown), and the attributions computed from them (see the module docstring)."""

    def __init__(
        self,
        model: NodeModel,
        batch: Batch,
        labels: Mapping[str, np.ndarray],
        *,
        chunk: int = CHUNK,
    ) -> None:
        self.model = model
        self.modalities = model.modalities
        self.tasks = model.tasks
        if len(self.modalities) > MAX_MODALITIES:
            raise ValueError(
                f"exact attribution covers at most {MAX_MODALITIES} modalities, "
                f"the node has {len(self.modalities)}"
            )
        if not len(batch):
            raise ValueError("no records to explain")
        self.batch = batch
        self.chunk = chunk
        self.full = (1 << len(self.modalities)) - 1
        self.passes = 0
        if model.training:  # (toggling every module's mode costs as much as a small pass)
            model.eval()
        self.tokens = self._encode()
        coalitions = [
            {
                m: batch.present[m] if mask >> k & 1 else torch.zeros_like(batch.present[m])
                for k, m in enumerate(self.modalities)
            }
            for mask in range(self.full + 1)
        ]
        passes = self._decode([(self.tokens, present) for present in coalitions])
        #: task -> log-probabilities [2^m, n, classes] (float64)
        self.log_probs = {t: np.stack([lp[t] for lp in passes]) for t in self.tasks}
        self.targets = self._targets(labels)

    def __len__(self) -> int:
        return len(self.batch)

    @torch.no_grad()
    def _encode(self) -> dict[str, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {m: [] for m in self.modalities}
        for start in range(0, len(self.batch), self.chunk):
            idx = torch.arange(start, min(start + self.chunk, len(self.batch)))
            for m, x in self.model.base.encode(self.batch.take(idx)).items():
                parts[m].append(x)
        return {m: torch.cat(x) for m, x in parts.items()}

    @torch.no_grad()
    def _decode(
        self,
        variants: Sequence[tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]],
    ) -> list[dict[str, np.ndarray]]:
        """Per variant (tokens, presence) of the records, the log-probabilities per task
        [n, classes] of the fusion, backbone and heads. The variants of a chunk of records are
        stacked into one batch (one pass of the model's layers, not one per variant)."""
        base = self.model.base
        k = len(variants)
        step = max(1, self.chunk // k)
        parts: list[dict[str, list[np.ndarray]]] = [{t: [] for t in self.tasks} for _ in variants]
        for start in range(0, len(self.batch), step):
            sl = slice(start, start + step)
            tokens = {m: torch.cat([v[0][m][sl] for v in variants]) for m in self.modalities}
            present = {m: torch.cat([v[1][m][sl] for v in variants]) for m in self.modalities}
            logits = base.decode(base.fuse(Batch({}, present), tokens))
            for t, z in logits.items():
                lp = torch.log_softmax(z.double(), dim=1).numpy()
                for j, part in enumerate(np.split(lp, k)):
                    parts[j][t].append(part)
        self.passes += k
        return [{t: np.concatenate(p[t]) for t in self.tasks} for p in parts]

    @torch.no_grad()
    def _forward(self) -> dict[str, np.ndarray]:
        """Log-probabilities per task [n, classes] of a whole pass, encoders included."""
        parts: dict[str, list[np.ndarray]] = {t: [] for t in self.tasks}
        for start in range(0, len(self.batch), self.chunk):
            idx = torch.arange(start, min(start + self.chunk, len(self.batch)))
            for t, z in self.model(self.batch.take(idx)).items():
                parts[t].append(torch.log_softmax(z.double(), dim=1).numpy())
        self.passes += 1
        return {t: np.concatenate(p) for t, p in parts.items()}

    def _targets(self, labels: Mapping[str, np.ndarray]) -> Targets:
        classes, used, kinds = {}, {}, {}
        for t in self.tasks:
            predicted = self.log_probs[t][self.full].argmax(axis=1)
            y = np.asarray(labels.get(t, np.full(len(self), -1)), np.int64)
            if (y >= 0).any():
                classes[t], used[t], kinds[t] = np.where(y >= 0, y, predicted), y >= 0, "label"
            else:
                classes[t], used[t], kinds[t] = predicted, np.ones(len(self), bool), "prediction"
        return Targets(classes, used, kinds)

    def _picked(self, t: str, log_probs: np.ndarray) -> np.ndarray:
        """log_probs [..., n, classes] at each record's target class -> [..., n]."""
        k = np.broadcast_to(self.targets.classes[t][:, None], (*log_probs.shape[:-1], 1))
        return np.take_along_axis(log_probs, k, axis=-1)[..., 0]

    def record_values(self, t: str) -> np.ndarray:
        """Per coalition and record, the log-probability of the target class [2^m, n]."""
        return self._picked(t, self.log_probs[t])

    def values(self, t: str, select: np.ndarray | None = None) -> tuple[np.ndarray, int]:
        """The coalition values [2^m] of task t on the counted records (within `select`, a bool
        mask), and how many records they are."""
        use = self.targets.used[t] if select is None else self.targets.used[t] & select
        n = int(use.sum())
        if not n:
            return np.zeros(self.full + 1), 0
        return self.record_values(t)[:, use].mean(axis=1), n

    def shapley(self, select: np.ndarray | None = None) -> dict[str, dict[str, Any]]:
        """Per task, `summarize` of its coalition values on the records (or the `select`ed)."""
        out = {}
        for t in self.tasks:
            values, n = self.values(t, select)
            out[t] = summarize(self.modalities, values, n, self.targets.kinds[t])
        return out

    def permutation(self, repeats: int = REPEATS, seed: int = 0) -> dict[str, dict[str, Any]]:
        """Per task: the drop in v(all) when each modality is shuffled across the records, its
        spread over the repeats, and Spearman(phi, drop) over the modalities."""
        rng = np.random.default_rng(seed)
        present = {m: self.batch.present[m] for m in self.modalities}
        full = {t: self.values(t)[0][-1] for t in self.tasks}
        shuffles = [
            (m, torch.from_numpy(rng.permutation(len(self))))
            for m in self.modalities
            for _ in range(repeats)
        ]
        passes = self._decode(
            [
                ({**self.tokens, m: self.tokens[m][perm]}, {**present, m: present[m][perm]})
                for m, perm in shuffles
            ]
        )
        drops: dict[str, dict[str, list[float]]] = {t: {} for t in self.tasks}
        for (m, _), shuffled in zip(shuffles, passes, strict=True):
            for t in self.tasks:
                use = self.targets.used[t]
                v = float(self._picked(t, shuffled[t])[use].mean()) if use.any() else 0.0
                drops[t].setdefault(m, []).append(float(full[t]) - v)
        out = {}
        for t in self.tasks:
            phi = shapley(self.values(t)[0])
            drop = {m: float(np.mean(d)) for m, d in drops[t].items()}
            out[t] = {
                "repeats": repeats,
                "seed": seed,
                "drop": drop,
                "drop_std": {m: float(np.std(d)) for m, d in drops[t].items()},
                "spearman": spearman(phi, [drop[m] for m in self.modalities]),
            }
        return out

    def record(
        self,
        i: int,
        class_names: Callable[[str], Sequence[str]] | None = None,
        labels: Mapping[str, np.ndarray] | None = None,
        label_names: Callable[[str], Sequence[str]] | None = None,
    ) -> dict[str, Any]:
        """The explanation of the record at position i: per task its prediction (named by
        `class_names`), the label where known (named by `label_names`, default the same), and
        the Shapley values of the predicted class's log-probability."""
        names = class_names or (lambda t: [str(k) for k in range(self.log_probs[t].shape[2])])
        label_names = label_names or names
        absent = [m for m in self.modalities if not bool(self.batch.present[m][i])]
        tasks = {}
        for t in self.tasks:
            lp = self.log_probs[t][:, i]  # [2^m, classes]
            k = int(lp[self.full].argmax())
            phi = shapley(lp[:, k])
            total = float(phi.sum())
            y = int(labels[t][i]) if labels is not None and t in labels else -1
            tasks[t] = {
                "prediction": names(t)[k],
                "class": k,
                "probability": float(np.exp(lp[self.full, k])),
                "label": label_names(t)[y] if y >= 0 else None,
                "log_probability": float(lp[self.full, k]),
                "log_probability_no_modality": float(lp[0, k]),
                "phi": {m: float(p) for m, p in zip(self.modalities, phi, strict=True)},
                "shares": (
                    {m: float(p / total) for m, p in zip(self.modalities, phi, strict=True)}
                    if total > TINY_TOTAL
                    else None
                ),
            }
        return {"absent": absent, "tasks": tasks}

    def components(self, base: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
        """Per component the node holds, the drop in v(all) per task when it alone is reverted
        to `base` (component -> its flat vector before training), or why it cannot be."""
        model = self.model
        vectors = model.vectors()
        full = {t: self.values(t)[0][-1] for t in self.tasks}
        out: dict[str, dict[str, Any]] = {}
        for c in model.held():
            entry: dict[str, Any] = {"policy": model.policies[c], "removable": False}
            out[c] = entry
            if c.startswith("head."):
                entry["note"] = "a head cannot be removed: its task has no prediction without it"
                continue
            if c not in vectors:
                entry["note"] = "not trained on this node (its base weights): nothing to revert"
                continue
            if c not in base or base[c].shape != vectors[c].shape:
                entry["note"] = "no base state to revert to"
                continue
            saved = vectors[c].copy()
            try:
                vectors[c][...] = base[c]
                reverted = self._forward()
            finally:
                vectors[c][...] = saved
            tasks = [c.split(".", 1)[1]] if c.startswith("prompt.") else list(self.tasks)
            entry["removable"] = True
            entry["reverted_to"] = (
                "its seeded initial tokens" if c.startswith("prompt.") else "the base (no LoRA)"
            )
            entry["drop"] = {}
            for t in tasks:
                use = self.targets.used[t]
                v = float(self._picked(t, reverted[t])[use].mean()) if use.any() else 0.0
                entry["drop"][t] = float(full[t]) - v
        return out


def round_attribution(
    trainer: Any, max_rows: int | None = ROUND_ROWS, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """Shapley shares per task on the held-out records a `train.Trainer` holds (its `test_set`),
    made to run every round: one encoder pass, then the 2^m coalitions stacked into batches of
    the fusion, backbone and heads, 2^m rows per record. With `max_rows` (None: every
    held-out record) a seeded sample of max(1, max_rows // 2^m) records, the same every round,
    bounds that work whatever the node's modalities. {} without held-out records."""
    held = trainer.test_set
    batch, labels = held.batch, held.labels
    if not len(batch):
        return {}
    n = len(batch) if max_rows is None else max(1, max_rows >> len(trainer.model.modalities))
    if len(batch) > n:
        idx = np.sort(np.random.default_rng(seed).choice(len(batch), n, replace=False))
        batch = batch.take(torch.from_numpy(idx))
        labels = {t: y[idx] for t, y in labels.items()}
    return Explainer(trainer.model, batch, labels).shapley()


def _by(view: str, group_names: Sequence[str], group_by: str | None) -> tuple[list[str], str]:
    """The attributes a view groups by ("learner" and "node" being special) and a note."""
    if group_by is not None:
        if group_by in ("learner", "node") or group_by in group_names:
            return [group_by], ""
        raise ConfigError(
            "--group-by",
            group_by,
            "not a group attribute of the data; it has "
            + ", ".join(["learner", "node", *group_names]),
        )
    wanted = ROLE_FIELDS[view]
    if wanted == "learner" or wanted in group_names:
        return [wanted], ""
    if view == "institution":
        if group_names:
            return list(group_names), (
                "the data has no course field (a `course` attribute in learners.csv): "
                "grouped by each of its group attributes instead"
            )
        return ["node"], "the data has no course field nor group attributes: the node as one group"
    return ["node"], (
        "the data has no class field (a `class` attribute in learners.csv): an instructor's node "
        "holds its class, so the view is the node's records"
    )


def role_view(
    explainer: Explainer,
    view: str,
    *,
    learners: Sequence[str],
    groups: Mapping[str, np.ndarray],
    records: Sequence[str],
    group_by: str | None = None,
    class_names: Callable[[str], Sequence[str]] | None = None,
    labels: Mapping[str, np.ndarray] | None = None,
    label_names: Callable[[str], Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Shapley shares per group of records (see the module docstring); a student view also
    explains each of the learner's records."""
    if view not in ROLE_FIELDS:
        raise ConfigError("--view", view, f"one of {', '.join(ROLE_FIELDS)}")
    by, note = _by(view, list(groups), group_by)
    learner = np.asarray(learners, dtype=str)
    out: dict[str, Any] = {"role": view, "by": by, "note": note or None, "groups": {}}
    notes = []
    for attribute in by:
        if attribute == "node":
            values = np.full(len(explainer), "all")
        elif attribute == "learner":
            values = learner
        else:
            values = np.asarray(groups[attribute], dtype=str)
        names, counts = np.unique(values, return_counts=True)
        order = np.argsort(-counts, kind="stable")
        limit = MAX_LEARNERS if attribute == "learner" else MAX_GROUPS
        if len(order) > limit:
            notes.append(f"{attribute}: the {limit} largest of {len(order)} groups")
        out["groups"][attribute] = {
            str(names[j]): {
                "records": int(counts[j]),
                "tasks": explainer.shapley(values == names[j]),
            }
            for j in order[:limit]
        }
    if view == "student":
        shown = out["groups"].get("learner", {})
        own: dict[str, list[dict[str, Any]]] = {}
        for who in shown:
            mine = np.flatnonzero(learner == who)
            if len(mine) > MAX_OWN_RECORDS:
                notes.append(f"learner {who}: {MAX_OWN_RECORDS} of {len(mine)} records explained")
            own[who] = [
                {"record": records[i], **explainer.record(int(i), class_names, labels, label_names)}
                for i in mine[:MAX_OWN_RECORDS]
            ]
        out["predictions"] = own
    if notes:
        out["note"] = "; ".join([note, *notes]) if note else "; ".join(notes)
    return out


@dataclass
class Explanation:
    """What `explain` wrote."""

    json_path: Path
    png_path: Path | None
    report: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def plot(report: Mapping[str, Any], path: Path) -> Path | None:
    """Stacked modality share bars per task (negative shares below 0) to `path`; None if
    matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    tasks = list(report["tasks"])
    mods = report["modalities"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(tasks), 4.2))
    up, down = np.zeros(len(tasks)), np.zeros(len(tasks))
    colours = plt.get_cmap("tab10")
    for k, m in enumerate(mods):
        shares = np.array(
            [(report["tasks"][t]["shares"] or {}).get(m, 0.0) for t in tasks], np.float64
        )
        bottom = np.where(shares >= 0, up, down)
        ax.bar(range(len(tasks)), shares, bottom=bottom, label=m, color=colours(k))
        up += np.clip(shares, 0, None)
        down += np.clip(shares, None, 0)
    labels = []
    for t in tasks:
        s = report["tasks"][t]
        labels.append(f"{t}\n{s['total']:.3f} nats" + ("" if s["shares"] else "\n(no shares)"))
    ax.set_xticks(range(len(tasks)), labels, fontsize=8)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylabel("Shapley share of the modality")
    ax.set_title(f"node {report['node']}: {report['records']} records", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def explain(
    state_dir: str | Path,
    data_dir: str | Path,
    out: str | Path,
    *,
    record: str | None = None,
    max_records: int | None = None,
    view: str | None = None,
    group_by: str | None = None,
    repeats: int = REPEATS,
    seed: int = 0,
) -> Explanation:
    """Explain the node of `state_dir` on the records of `data_dir`; write OUT/explain.json and
    OUT/explain.png (see the module docstring and `m3tgossip/docs/data.md`)."""
    if max_records is not None and max_records < 1:
        raise ConfigError("explain", "--max-records", f"must be >= 1, got {max_records}")
    if repeats < 1:
        raise ConfigError("explain", "--repeats", f"must be >= 1, got {repeats}")
    if view is not None and view not in ROLE_FIELDS:
        raise ConfigError("explain", "--view", f"one of {', '.join(ROLE_FIELDS)}, got {view!r}")
    trained = load_trained_node(state_dir)
    model, node = trained.model, trained.node
    if len(model.modalities) > MAX_MODALITIES:
        raise ConfigError(str(state_dir), "modalities", f"more than {MAX_MODALITIES}")
    started = time.perf_counter()
    raw = read_folder(data_dir)
    data, notes = trained.adapter.apply(raw)
    notes = notes + raw.notes
    usable = np.zeros(len(raw), bool)
    for m in model.modalities:
        usable |= raw.present[m]
        if not raw.present[m].any():
            notes.append(f"{m}: no record of {data_dir} has it, so its phi is 0 by construction")
    if not usable.any():
        raise ConfigError(
            str(data_dir),
            "modalities",
            f"no record has any of node {node.id}'s modalities {list(model.modalities)} "
            f"(the folder has {list(raw.manifest.modalities)}): not a data folder for this node",
        )
    idx = np.flatnonzero(usable)
    sampled_from = len(idx)
    if max_records is not None and len(idx) > max_records:
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(idx, max_records, replace=False))
        notes.append(f"{max_records} of {sampled_from} records (seeded sample, seed {seed})")
    position = None
    if record is not None:
        if record not in raw.records:
            raise ConfigError(str(raw.manifest.file("labels")), "--record", f"no record {record!r}")
        position = raw.records.index(record)
        if not usable[position]:
            raise ConfigError(
                str(data_dir),
                "--record",
                f"{record!r} has none of node {node.id}'s modalities {list(model.modalities)}",
            )
    labels = {t: data.labels[t][idx] for t in model.tasks}

    def label_names(t: str) -> Sequence[str]:  # labels by the folder's names, as `predict`
        spec = raw.manifest.tasks.get(t)
        return spec.classes if spec else trained.adapter.class_names(t)

    def class_names(t: str) -> Sequence[str]:  # the training folder's, else the same
        return trained.adapter.classes.get(t) or label_names(t)

    batch = model.prepare(data.subset(idx))
    read_s = time.perf_counter() - started
    t0 = time.perf_counter()
    explainer = Explainer(model, batch, labels)
    coalition_s = time.perf_counter() - t0
    report: dict[str, Any] = {
        "format": FORMAT,
        "node": node.id,
        "role": node.role,
        "institution": node.institution,
        "modalities": list(model.modalities),
        "data": str(data_dir),
        "records": len(idx),
        "usable": sampled_from,
        "skipped": int(len(raw) - sampled_from),
        "value": VALUE,
        "coalitions": explainer.full + 1,
        "tasks": explainer.shapley(),
    }
    t0 = time.perf_counter()
    for t, check in explainer.permutation(repeats, seed).items():
        report["tasks"][t]["permutation"] = check
    permutation_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if position is None:
        report["record"] = None
    else:
        hit = np.flatnonzero(idx == position)
        if len(hit):
            one, at, one_labels = explainer, int(hit[0]), labels
        else:  # outside the sample: its own 2^m passes
            one_labels = {t: data.labels[t][[position]] for t in model.tasks}
            one = Explainer(model, model.prepare(data.subset([position])), one_labels)
            at = 0
        report["record"] = {
            "record": record,
            "learner": raw.learners[position],
            **one.record(at, class_names, one_labels, label_names),
        }
    base = build_model(node, int(trained.info["seed"]), trained.options)
    report["components"] = explainer.components({c: x.copy() for c, x in base.vectors().items()})
    del base
    component_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    role = view or node.role
    report["view"] = role_view(
        explainer,
        role,
        learners=[raw.learners[i] for i in idx],
        groups={g: data.groups[g][idx] for g in raw.group_names},
        records=[raw.records[i] for i in idx],
        group_by=group_by,
        class_names=class_names,
        labels=labels,
        label_names=label_names,
    )
    view_s = time.perf_counter() - t0
    report["forward_passes"] = explainer.passes
    report["seconds"] = {
        "read": read_s,
        "coalitions": coalition_s,
        "permutation": permutation_s,
        "components": component_s,
        "view": view_s,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png = plot(report, out / "explain.png")
    if png is None:
        notes.append("matplotlib is not installed (the `plot` extra): JSON only, no explain.png")
    report["plot"] = png.name if png else None
    report["notes"] = notes
    path = out / "explain.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return Explanation(path, png, report, notes)

"""`m3tgossip explain --state-dir DIR --data DIR2 --out OUT`: what a node's predictions rest on.

Attribution over the node's modalities (at most `MAX_MODALITIES`), exact, by coalitions: the
fusion masks a modality a record lacks, so a record with only the modalities S marked present
*is* the record as a coalition S sees it, and the empty coalition is the fusion's null token
alone. The encoders run once over the records; the fusion, backbone and heads evaluate every
coalition (2^m evaluations, all tasks at once, the coalitions of a chunk of records stacked
into one batch).

The value of a coalition S for a task is the mean log-probability (nats) of the record's
label with only S present, over the records labelled for the task (`quantity="prob"`: its
probability instead; the permutation check always averages the same quantity); for a task
the data labels nowhere, the label is replaced by the class the node predicts with every
modality (then the value says how much each modality supports the prediction, not whether it
is right). The Shapley value phi_m of modality m is exact (every coalition evaluated); by
efficiency sum_m phi_m = v(all) - v(empty), and the share of m is phi_m / sum phi. A total at
or below `TINY_TOTAL` means the modalities together do not make the label more likely than
the null token does: shares are then not given (`shares: null`, with a note).

Masking measures a modality against its absence, and the null token is what absence looks
like to the model. A node whose training records always have some modality never saw the
coalitions without it, so their values are the model's extrapolation, and a modality can earn
phi merely by making a record look like the records the node trained on (content-free
presence). The permutation check keeps presence and changes content (`leave_one_out`,
v(all) - v(all without m), is its counterpart by masking): where the two disagree, that, or
modalities carrying the same information (Shapley splits it among them), is the likely reason.
Training with modality dropout (`m3tgossip.edu.train`, the workload's `modality_dropout`)
shows the model records without each modality, so masking is absence it has learned.

What is computed (`Explainer`, over one prepared batch):

- `shapley`: phi, shares, v(all), v(empty) per task, on all records or a subset (a group);
- `permutation`: per modality and task, the drop in v(all) when that modality's inputs
  (tokens and presence together) are shuffled across the records (seeded, `repeats` times,
  with the standard error of the mean drop), of the same quantity as the coalition values,
  and the Spearman correlation of phi and the drops per task; `pooled_spearman` pools it over
  nodes and tasks from the ranks within each node-task;
- `record`: one record's explanation: its prediction per task and the Shapley values of the
  log-probability of the predicted class (a modality the record lacks gets exactly 0);
- `components`: per trained component, the drop in v(all) when it alone is reverted to the
  base: the LoRA delta of `encoder.<m>`, `fusion`, `backbone` set to zero (their pretrained
  weights), a `prompt.<task>` reset to its seeded initial tokens. A head cannot be removed
  (its task has no prediction without it), and a frozen component has nothing to revert.

Role views and the files `m3tgossip explain` writes are `m3tgossip.edu.explain_report`'s.

`round_attribution(trainer)` is the cheap per-round form: Shapley shares on the held-out
records the trainer holds already, a fixed seeded sample of them within `ROUND_ROWS` rows
(records x 2^m).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch

from m3tgossip.edu.explain_ranks import spearman
from m3tgossip.edu.model.m3t import Batch
from m3tgossip.edu.model.node_model import NodeModel

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
#: what a coalition's value averages over the records (`Explainer(quantity=...)`): the
#: log-probability of the target class (the default; the negative of the loss the node trains
#: on) or its probability (bounded: a few confidently wrong records weigh no more than others)
QUANTITIES = ("log_prob", "prob")


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


def summarize(
    modalities: Sequence[str],
    values: np.ndarray,
    n: int,
    kind: str,
    quantity: str = "log_prob",
) -> dict[str, Any]:
    """The JSON summary of one task's coalition values [2^m] of `quantity` on n records."""
    phi = shapley(values)
    total = float(phi.sum())
    full = len(values) - 1
    out: dict[str, Any] = {
        "value": kind,
        "quantity": quantity,
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
            f"total {total:.3g} <= {TINY_TOTAL:g}: the modalities together do not make "
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
        quantity: str = "log_prob",
    ) -> None:
        if quantity not in QUANTITIES:
            raise ValueError(f"quantity: one of {', '.join(QUANTITIES)}, got {quantity!r}")
        #: what the values average (`QUANTITIES`); the permutation check uses the same
        self.quantity = quantity
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
        """log_probs [..., n, classes] at each record's target class -> [..., n], as the
        explainer's quantity (the log-probability or the probability)."""
        k = np.broadcast_to(self.targets.classes[t][:, None], (*log_probs.shape[:-1], 1))
        picked = np.take_along_axis(log_probs, k, axis=-1)[..., 0]
        return np.exp(picked) if self.quantity == "prob" else picked

    def record_values(self, t: str) -> np.ndarray:
        """Per coalition and record, the quantity of the target class [2^m, n]."""
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
            out[t] = summarize(self.modalities, values, n, self.targets.kinds[t], self.quantity)
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
                "quantity": self.quantity,
                "repeats": repeats,
                "seed": seed,
                "drop": drop,
                "drop_std": {m: float(np.std(d)) for m, d in drops[t].items()},
                # the standard error of each mean drop over the shuffles (None for one)
                "drop_se": {
                    m: float(np.std(d, ddof=1) / math.sqrt(len(d))) if len(d) > 1 else None
                    for m, d in drops[t].items()
                },
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

"""Local multi-task training and evaluation of a node's model on its own records.

`Trainer` runs AdamW on the node's trained parameters (LoRA, prompts, heads) with a weighted sum
of per-task cross-entropies; labels of -1 are ignored, so a record counts for the tasks it has
labels for. After `use_private(noise)` every step is a per-learner DP-SGD step
(`m3tgossip.edu.dpsgd`): Poisson-sampled learners, clipped per learner, noised, then AdamW.
Inputs are prepared once per data set (the frozen text model never runs in a step). Batches follow a
seeded permutation per epoch, so a trainer restored with `load_state` continues exactly where the
saved one was.

With `modality_dropout` p > 0 every step hides each modality a record has from the fusion with
probability p, independently per record and modality (a record may lose all of them: it then
sees the fusion's null token alone). The model meets records with missing modalities, as
learners without a reflection or a wearable are, and a masked modality becomes absence it has
learned, not unusual input: what `m3tgossip.edu.explain` measures by masking. The draws are
seeded by the trainer seed and the step, so a restored trainer drops the same modalities; DP-SGD
steps drop them the same way (a function of each record alone: per-learner clipping bounds a
learner's gradient whatever its records look like).

`evaluate` reports, on the held-out records (and on unseen learners, when given), per-task
accuracy and macro-F1, per-group accuracy for every value of each attribute in
`GROUP_ATTRIBUTES`, and the gap between the best and worst group (groups with at least
`MIN_GROUP` labelled records); on the unseen learners also, per binary task and attribute, the
accuracy, true and false positive rate gaps, ABROCA and its randomization p-value
(`m3tgossip.edu.equity`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from m3tgossip.edu.data.records import EduData
from m3tgossip.edu.data.schema import GROUP_ATTRIBUTES
from m3tgossip.edu.dpsgd import LearnerSGD, learners_of, sampling_rate
from m3tgossip.edu.equity import group_gaps
from m3tgossip.edu.model.m3t import Batch
from m3tgossip.edu.model.node_model import NodeModel
from m3tgossip.privacy import TrainingNoise

#: smallest group (labelled test records) that enters the worst-group gap
MIN_GROUP = 5
#: `Trainer(fairness=...)`: plain losses, group-balanced weights, or online group DRO
FAIRNESS = ("none", "balanced", "dro")
#: largest weight a record gets from the fairness option (a tiny group is not blown up)
MAX_RECORD_WEIGHT = 10.0
#: the seed stream of the modality dropout draws (apart from the batches' permutations)
DROPOUT_STREAM = 0x6D6F64


def check_modality_dropout(value: object) -> float:
    """`value` as a modality dropout probability: a number in [0, 1), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(
            "modality_dropout: the probability that a step hides a record's modality, a number "
            f"in [0, 1) (0: never), got {value!r}"
        )
    return float(value)


def drop_modalities(batch: Batch, p: float, rng: np.random.Generator) -> Batch:
    """`batch` with each present modality of each record marked absent with probability p
    (the inputs are kept: the fusion masks what is absent)."""
    if not p:
        return batch
    present = {
        m: x & torch.from_numpy(rng.random(len(x)) >= p) for m, x in sorted(batch.present.items())
    }
    return Batch(batch.inputs, present)


class GroupWeights:
    """Per-record loss weights that favour the groups a node serves worst.

    Every group attribute of the training records with at least two values takes part; a
    record's weight is the mean over attributes of its group's weight there, and each
    attribute's weights average 1 over the records, so the loss keeps its scale.

    - `balanced`: each group of an attribute weighs as much as every other group of it in
      total (weight 1 / (groups * share)), fixed from the training records' group counts.
    - `dro`: online group DRO (Sagawa et al., 2020): each attribute keeps a distribution q over
      its groups, multiplied after every step by exp(eta * the group's mean loss in the batch)
      and renormalised, so the groups with the highest loss gain weight; a record of group g
      weighs groups * q_g, and groups absent from a batch keep their q.

    Weights are capped at `MAX_RECORD_WEIGHT`. Both read other learners' records (counts or
    losses), so they are for training without differential privacy.
    """

    def __init__(self, groups: Mapping[str, np.ndarray], mode: str, eta: float) -> None:
        if mode not in FAIRNESS[1:]:
            raise ValueError(f"fairness: one of {', '.join(FAIRNESS)}, got {mode!r}")
        self.mode = mode
        self.eta = eta
        #: attribute -> group index per record, and per attribute the group weights
        self.index: dict[str, np.ndarray] = {}
        self.q: dict[str, np.ndarray] = {}
        self.share: dict[str, np.ndarray] = {}
        for attribute, values in groups.items():
            names, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
            if len(names) < 2:
                continue
            self.index[attribute] = inverse
            self.share[attribute] = counts / counts.sum()
            self.q[attribute] = np.full(len(names), 1.0 / len(names))

    def weights(self, idx: np.ndarray) -> np.ndarray:
        """The loss weights of records `idx` (ones when no attribute takes part)."""
        if not self.index:
            return np.ones(len(idx))
        total = np.zeros(len(idx))
        for attribute, inverse in self.index.items():
            g = inverse[idx]
            k = len(self.q[attribute])
            if self.mode == "balanced":
                total += 1.0 / (k * self.share[attribute][g])
            else:
                # q over groups -> per record, normalised so the records average 1 under the
                # training group shares
                w = self.q[attribute] / float(self.q[attribute] @ self.share[attribute])
                total += w[g]
        return np.minimum(total / len(self.index), MAX_RECORD_WEIGHT)

    def update(self, idx: np.ndarray, losses: np.ndarray) -> None:
        """Group DRO's step from the records' losses in the last batch (`balanced`: nothing)."""
        if self.mode != "dro":
            return
        for attribute, inverse in self.index.items():
            g = inverse[idx]
            q = self.q[attribute]
            for group in np.unique(g):
                q[group] *= np.exp(self.eta * float(losses[g == group].mean()))
            q /= q.sum()

    def state(self) -> dict[str, np.ndarray]:
        return {f"fairness/{a}": q.copy() for a, q in self.q.items()}

    def load_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        for a, q in self.q.items():
            saved = arrays.get(f"fairness/{a}")
            if saved is not None and saved.shape == q.shape:
                q[...] = saved


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
    """Mean cross-entropy over the labelled records (label >= 0); None if there are none."""
    known = labels >= 0
    if not bool(known.any()):
        return None
    return F.cross_entropy(logits[known], labels[known])


def macro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    """Unweighted mean of per-class F1 over the classes that occur in `y` or `pred`."""
    scores = []
    for c in np.union1d(y, pred):
        tp = np.sum((pred == c) & (y == c))
        fp = np.sum((pred == c) & (y != c))
        fn = np.sum((pred != c) & (y == c))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


class Trainer:
    """Multi-task training of `model` on `train`, evaluation on `test`."""

    def __init__(
        self,
        model: NodeModel,
        train: EduData,
        test: EduData,
        *,
        loss_weights: Mapping[str, float] | None = None,
        lr: float = 1e-3,
        batch_size: int = 32,
        seed: int = 0,
        weight_decay: float = 0.01,
        unseen: EduData | None = None,
        fairness: str = "none",
        fairness_eta: float = 0.1,
        modality_dropout: float = 0.0,
        lr_scale: Mapping[str, float] | None = None,
    ) -> None:
        weights = dict(loss_weights or {})
        unknown = sorted(set(weights) - set(model.tasks))
        if unknown:
            raise ValueError(f"loss_weights: {unknown} are not tasks of this node ({model.tasks})")
        self.model = model
        self.weights = {t: float(weights.get(t, 1.0)) for t in model.tasks}
        self.batch_size = batch_size
        self.seed = seed
        #: probability that a step hides a record's modality (see the module docstring)
        self.modality_dropout = check_modality_dropout(modality_dropout)
        self.train_batch = model.prepare(train)
        self.train_labels = {t: torch.from_numpy(train.labels[t]) for t in model.tasks}
        self.test_set = _EvalSet(model, test)
        #: learners the node never saw, from its institution's population (None: not known)
        self.unseen_set = _EvalSet(model, unseen, equity=True) if unseen is not None else None
        labelled = np.zeros(len(train), dtype=bool)
        for t in model.tasks:
            labelled |= train.labels[t] >= 0
        #: records with at least one label for the node's tasks
        self.pool = np.flatnonzero(labelled)
        self.params = model.trainable_parameters()
        #: component -> factor on the learning rate (`weighting`; 1 for the others)
        self.lr_scale = dict(lr_scale or {})
        scales = {c: self.lr_scale.get(c, 1.0) for c in model.trained_flat()}
        groups = [
            {"params": f.params, "lr": lr * scales[c], "scale": scales[c]}
            for c, f in model.trained_flat().items()
            if f.params
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, foreach=True)
        self.step = 0
        self.learners = learners_of(len(train), train.learner)
        #: per-learner DP-SGD, once `use_private` was called
        self.private: LearnerSGD | None = None
        if fairness not in FAIRNESS:
            raise ValueError(f"fairness: one of {', '.join(FAIRNESS)}, got {fairness!r}")
        #: the fairness option's record weights (None: plain losses)
        self.fairness = (
            GroupWeights(train.groups, fairness, fairness_eta) if fairness != "none" else None
        )
        #: the learners DP-SGD samples from at `private_sampling_rate` (None: those of the
        #: pool); a learner outside the pool is in no step, so a larger count stays sound
        self.population: int | None = None
        #: called after every optimiser step (the L2 pull of `m3tgossip.edu.continual`)
        self.after_step: Callable[[], None] | None = None

    def private_sampling_rate(self) -> float:
        """The Poisson rate of learners that gives `batch_size` learners a step on average."""
        learners = self.population or len(np.unique(self.learners[self.pool]))
        return sampling_rate(self.batch_size, learners)

    def use_private(
        self, noise: TrainingNoise, seed: int | None = None, lr: float | None = None
    ) -> None:
        """Train with per-learner DP-SGD at `noise` from now on, at learning rate `lr` if given
        (`seed`: tests only).

        Refused with a fairness option: its weights read other learners' records, which
        per-learner clipping does not account for."""
        if self.fairness is not None:
            raise ValueError(
                f"fairness {self.fairness.mode!r} cannot run under differential privacy: its "
                'weights depend on other learners\' records; use fairness = "none" or an '
                "open privacy profile"
            )
        self.private = LearnerSGD(
            self.model.net,
            self.train_batch,
            self.train_labels,
            self.weights,
            self.learners,
            self.pool,
            noise,
            seed=seed,
        )
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = float(lr) * group["scale"]
        if self.modality_dropout:
            self.private.augment = lambda batch: self._dropped(batch, self.step)

    def _dropped(self, batch: Batch, step: int) -> Batch:
        """`batch` with the modalities step `step` hides (itself without modality dropout)."""
        if not self.modality_dropout:
            return batch
        rng = np.random.default_rng([self.seed, step, DROPOUT_STREAM])
        return drop_modalities(batch, self.modality_dropout, rng)

    def _indices(self, step: int) -> torch.Tensor:
        per_epoch = -(-len(self.pool) // self.batch_size)
        epoch, i = divmod(step, per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.pool))
        return torch.from_numpy(self.pool[order[i * self.batch_size : (i + 1) * self.batch_size]])

    def train_steps(self, k: int) -> dict[str, float]:
        """k optimiser steps; the mean loss of each task over the steps whose batch had its labels.

        A task of weight 0 is reported but gets no gradient at all.
        """
        if not len(self.pool) or not self.params:
            return {}
        self.model.train()
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        if self.private is not None:
            for _ in range(k):
                for t, losses in self.private.step(self.optimizer).items():
                    sums[t] = sums.get(t, 0.0) + float(np.mean(losses))
                    counts[t] = counts.get(t, 0) + 1
                if self.after_step is not None:
                    self.after_step()
                self.step += 1
            return {t: sums[t] / counts[t] for t in sums}
        for _ in range(k):
            idx = self._indices(self.step)
            logits = self.model(self._dropped(self.train_batch.take(idx), self.step))
            total = torch.zeros(())
            fair = self.fairness
            w = torch.from_numpy(fair.weights(idx.numpy())).float() if fair is not None else None
            per_record = torch.zeros(len(idx))
            for t in self.model.tasks:
                y = self.train_labels[t][idx]
                known = y >= 0
                if not bool(known.any()):
                    continue
                ce = F.cross_entropy(logits[t][known], y[known], reduction="none")
                sums[t] = sums.get(t, 0.0) + ce.mean().item()
                counts[t] = counts.get(t, 0) + 1
                per_record[known] += ce.detach()
                if self.weights[t]:
                    loss = ce.mean() if w is None else (w[known] * ce).mean()
                    total = total + self.weights[t] * loss
            if fair is not None:
                fair.update(idx.numpy(), per_record.numpy())
            self.optimizer.zero_grad(set_to_none=True)
            if total.requires_grad:
                total.backward()
                self.optimizer.step()
                if self.after_step is not None:
                    self.after_step()
            self.step += 1
        return {t: sums[t] / counts[t] for t in sums}

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Held-out metrics (JSON-able):

        {"tasks": {task: {"acc", "f1", "n"}}, "groups": {attribute: {value: {task: acc}}},
         "gaps": {attribute: {task: best - worst group acc}}, "worst_group_gap": float | None,
         "mean_acc": float | None, "unseen": {the same on the unseen learners} (if known)}
        """
        self.model.eval()
        out = self.test_set.metrics(self.model)
        if self.unseen_set is not None:
            out["unseen"] = self.unseen_set.metrics(self.model)
        return out

    def state(self) -> dict[str, np.ndarray]:
        """Step counter and AdamW moments, flat per component like the parameter vectors."""
        out = {"trainer/step": np.array(self.step, dtype=np.int64)}
        if self.fairness is not None:
            out.update(self.fairness.state())
        for c, flat in self.model.trained_flat().items():
            states = [self.optimizer.state.get(p, {}) for p in flat.params]
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"adam/{c}/{key}"] = flat.flatten(
                    [
                        s.get(key, torch.zeros_like(p))
                        for s, p in zip(states, flat.params, strict=True)
                    ]
                )
            out[f"adam/{c}/step"] = np.array([float(s.get("step", 0.0)) for s in states])
        return out

    def load_state(self, arrays: Mapping[str, np.ndarray], new: Iterable[str] = ()) -> None:
        """Restore what `state` returned (for the same model layout; components in `new`, the
        ones a stage brings, may have no state and start with none)."""
        fresh = set(new)
        flats = {
            c: f for c, f in self.model.trained_flat().items() if c not in fresh or _has(arrays, c)
        }
        wanted = ["trainer/step"] + [
            f"adam/{c}/{key}" for c in flats for key in ("exp_avg", "exp_avg_sq", "step")
        ]
        missing = [k for k in wanted if k not in arrays]
        if missing:
            raise ValueError(f"no optimiser state for {', '.join(missing[:4])}")
        self.step = int(arrays["trainer/step"])
        if self.fairness is not None:
            self.fairness.load_state(arrays)
        for c, flat in flats.items():
            avg = flat.unflatten(arrays[f"adam/{c}/exp_avg"])
            avg_sq = flat.unflatten(arrays[f"adam/{c}/exp_avg_sq"])
            steps = np.asarray(arrays[f"adam/{c}/step"])
            for p, m, v, step in zip(flat.params, avg, avg_sq, steps, strict=True):
                self.optimizer.state.pop(p, None)
                if step > 0:
                    self.optimizer.state[p] = {
                        "step": torch.tensor(float(step)),
                        "exp_avg": m,
                        "exp_avg_sq": v,
                    }


def _has(arrays: Mapping[str, np.ndarray], component: str) -> bool:
    return f"adam/{component}/exp_avg" in arrays


class _EvalSet:
    """A prepared evaluation set: the model's inputs, labels of its tasks and group attributes."""

    def __init__(self, model: NodeModel, data: EduData, *, equity: bool = False) -> None:
        #: also report the group gaps of `m3tgossip.edu.equity` (TPR/FPR gaps, ABROCA, p-value)
        self.equity = equity
        self.batch = model.prepare(data)
        self.labels = {t: data.labels[t] for t in model.tasks}
        self.groups = {g: data.groups[g] for g in GROUP_ATTRIBUTES}

    def metrics(self, model: NodeModel) -> dict[str, Any]:
        """Per-task accuracy and macro-F1, per-group accuracy and gaps, mean accuracy."""
        logits = model(self.batch)
        tasks: dict[str, dict[str, float | int]] = {}
        groups: dict[str, dict[str, dict[str, float]]] = {g: {} for g in self.groups}
        gaps: dict[str, dict[str, float]] = {g: {} for g in self.groups}
        for t in model.tasks:
            y = self.labels[t]
            known = y >= 0
            if not known.any():
                continue
            pred = logits[t].argmax(dim=1).numpy()
            right = pred == y
            tasks[t] = {
                "acc": float(right[known].mean()),
                "f1": macro_f1(y[known], pred[known]),
                "n": int(known.sum()),
            }
            for g, values in self.groups.items():
                accs = {}
                for value in np.unique(values[known]):
                    member = known & (values == value)
                    groups[g].setdefault(str(value), {})[t] = float(right[member].mean())
                    if member.sum() >= MIN_GROUP:
                        accs[str(value)] = float(right[member].mean())
                if len(accs) >= 2:
                    gaps[g][t] = max(accs.values()) - min(accs.values())
        all_gaps = [v for per_task in gaps.values() for v in per_task.values()]
        out: dict[str, Any] = {
            "tasks": tasks,
            "groups": groups,
            "gaps": gaps,
            "worst_group_gap": max(all_gaps) if all_gaps else None,
            "mean_acc": float(np.mean([m["acc"] for m in tasks.values()])) if tasks else None,
        }
        if self.equity:
            scores = {
                t: torch.softmax(logits[t], dim=1)[:, 1].numpy()
                for t in model.tasks
                if logits[t].shape[1] == 2
            }
            out["equity"] = group_gaps(self.labels, scores, self.groups)
        return out

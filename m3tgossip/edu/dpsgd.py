"""Per-learner DP-SGD for a node's local training (Abadi et al. 2016; per learner, as the
user-level DP-SGD of McMahan et al. 2018).

One step, over the node's trained parameters only (LoRA B matrices, prompts, heads; the frozen
weights never get a gradient):

1. Poisson sampling: every learner of the training records is in the step independently with
   probability `q`, with all of their records.
2. Per-record gradients of the weighted multi-task loss (`torch.func`: `functional_call` of
   the PEFT-wrapped model under `vmap(grad)`), summed per learner, so a learner with several
   records is one unit.
3. Each learner's gradient is clipped to L2 norm `clip` over all trained parameters together.
4. Gaussian noise is added to the sum: std `z_c * clip` per element of component `c`
   (`TrainingNoise.multiplier`: the node's z, more for strict modality encoders).
5. The sum is divided by the expected number of learners in a step (`q` times the learners)
   and handed to the optimiser as the gradient.

The optimiser is the trainer's AdamW. Where the noise dominates a coordinate's gradient, as it
does at these budgets, Adam's second moment is mostly the noise's variance, so its step on the
gradient shrinks by the gradient's share of that moment; a private node therefore trains at
the workload's `dp_lr`, above the learning rate of open training.

Each step is the Poisson-subsampled Gaussian mechanism on one learner (add/remove), which is
what `m3tgossip.privacy` accounts. The number of learners (which sets `q` and the divisor) is
taken as public, as DP-SGD implementations do. The sampling and the noise draw from operating-system
entropy unless a seed is given (tests only): a neighbour that could predict them could
subtract the noise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from m3tgossip.edu.model.components import component_of
from m3tgossip.edu.model.m3t import Batch
from m3tgossip.privacy import TrainingNoise


class LearnerSGD:
    """Noised, per-learner clipped gradients of a node model's multi-task loss.

    `batch` and `labels` hold every training record (prepared once); `learners[i]` is the
    learner of record `i`; `pool` the records that enter training (those with a label for one
    of the node's tasks). `weights` are the tasks' loss weights.
    """

    def __init__(
        self,
        net: nn.Module,
        batch: Batch,
        labels: Mapping[str, torch.Tensor],
        weights: Mapping[str, float],
        learners: np.ndarray,
        pool: np.ndarray,
        noise: TrainingNoise,
        seed: int | None = None,
    ) -> None:
        self.net = net
        self.batch = batch
        self.labels = dict(labels)
        self.weights = {t: float(w) for t, w in weights.items() if w}
        self.noise = noise
        self.named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        self.std = [noise.multiplier(component_of(n)) * noise.clip for n, _ in self.named]
        pool = np.asarray(pool, dtype=np.int64)
        ids = np.asarray(learners)[pool]
        #: the learners of the pool, and which records each has
        self.learner_ids, inverse = np.unique(ids, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[order], np.arange(len(self.learner_ids) + 1))
        self.records = [pool[order[bounds[i] : bounds[i + 1]]] for i in range(len(bounds) - 1)]
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator()
        self.gen.manual_seed(int(np.random.default_rng(seed).integers(2**62)))
        self.steps = 0
        #: applied to the sampled records before their gradients (the trainer's modality
        #: dropout): a function of each record alone, so clipping still bounds each learner
        self.augment: Callable[[Batch], Batch] | None = None
        self._per_record = vmap(grad(self._record_loss, has_aux=True), in_dims=(None, 0, 0, 0))

    @property
    def n_learners(self) -> int:
        return len(self.learner_ids)

    def _record_loss(
        self,
        params: dict[str, torch.Tensor],
        inputs: dict[str, torch.Tensor],
        present: dict[str, torch.Tensor],
        labels: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        one = Batch(
            {m: x.unsqueeze(0) for m, x in inputs.items()},
            {m: p.unsqueeze(0) for m, p in present.items()},
        )
        logits = functional_call(self.net, params, (one,))
        total = torch.zeros(())
        losses = {}
        for t, y in labels.items():
            known = y >= 0
            ce = F.cross_entropy(logits[t], y.clamp(min=0).unsqueeze(0), reduction="none")[0]
            ce = torch.where(known, ce, torch.zeros_like(ce))
            losses[t] = ce.detach()
            if t in self.weights:
                total = total + self.weights[t] * ce
        return total, losses

    def sample(self) -> np.ndarray:
        """The records of a Poisson sample of learners (each with probability q)."""
        take = self.rng.random(self.n_learners) < self.noise.sampling_rate
        chosen = [self.records[i] for i in np.flatnonzero(take)]
        return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)

    def clipped_sum(self, idx: np.ndarray) -> tuple[list[torch.Tensor], dict[str, list[float]]]:
        """Sum over the learners of records `idx` of their clipped gradients (no noise), and
        each task's losses on the labelled records."""
        sums = [torch.zeros_like(p) for p in self.params]
        losses: dict[str, list[float]] = {}
        if not len(idx):
            return sums, losses
        tidx = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        sub = self.batch.take(tidx)
        if self.augment is not None:
            sub = self.augment(sub)
        labels = {t: y[tidx] for t, y in self.labels.items()}
        params = {n: p.detach() for n, p in self.named}
        grads, per_task = self._per_record(params, sub.inputs, sub.present, labels)
        for t, y in labels.items():
            known = y >= 0
            if bool(known.any()):
                losses[t] = per_task[t][known].tolist()
        # records -> learners: the learners are runs of equal ids in the sample
        _, inverse = np.unique(self._learner_of(idx), return_inverse=True)
        inv = torch.from_numpy(inverse.astype(np.int64))
        n = int(inverse.max()) + 1
        per_learner = [
            torch.zeros((n, *p.shape), dtype=p.dtype).index_add_(0, inv, grads[name])
            for name, p in self.named
        ]
        sq = torch.zeros(n, dtype=torch.float64)
        for g in per_learner:
            sq += g.reshape(n, -1).double().pow(2).sum(dim=1)
        scale = (self.noise.clip / (sq.sqrt() + 1e-12)).clamp(max=1.0).to(per_learner[0].dtype)
        for s, g in zip(sums, per_learner, strict=True):
            s += torch.tensordot(scale, g, dims=1)
        return sums, losses

    def _learner_of(self, idx: np.ndarray) -> np.ndarray:
        if not hasattr(self, "_record_learner"):
            lookup = np.full(len(self.batch), -1, dtype=np.int64)
            for i, recs in enumerate(self.records):
                lookup[recs] = i
            self._record_learner = lookup
        return self._record_learner[idx]

    def step(self, optimizer: torch.optim.Optimizer) -> dict[str, list[float]]:
        """One DP-SGD step: sample, clip, noise, optimiser step. Returns the tasks' losses on
        the sampled records (for the node's own metrics; they are not released)."""
        idx = self.sample()
        sums, losses = self.clipped_sum(idx)
        expected = max(self.noise.sampling_rate * self.n_learners, 1.0)
        for p, s, std in zip(self.params, sums, self.std, strict=True):
            noise = torch.randn(s.shape, generator=self.gen, dtype=s.dtype) * std
            p.grad = (s + noise) / expected
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return losses


def sampling_rate(batch_size: int, learners: int) -> float:
    """Poisson rate that gives `batch_size` learners a step in expectation (at most 1)."""
    if learners < 1:
        raise ValueError("private training needs at least one learner")
    return min(1.0, batch_size / learners)


def learners_of(n: int, learner: Sequence[object] | np.ndarray | None) -> np.ndarray:
    """Learner ids of n records: the given ones, or one learner per record."""
    if learner is None:
        return np.arange(n)
    ids = np.asarray(learner)
    if len(ids) != n:
        raise ValueError(f"learner ids: {len(ids)} for {n} records")
    return ids

"""The canary audit of a node's private training: an empirical lower bound on its epsilon.

`canary_audit` copies `canaries` of the node's training records, gives each copy a wrong label
for every task it has and a learner id of its own (so each canary is one protected learner),
puts each into the training data independently with probability 1/2, and trains the node's
model for the planned rounds x local steps as the daemon would, with per-learner DP-SGD at
the noise the daemon calibrates from the profile (or without DP, `profile` open, to show what
the audit finds when nothing protects the canaries). It then scores every canary by minus its
loss and guesses in / out for the most and least confident tenth each
(`m3tgossip.privacy.audit`): the lower bound at confidence 1 - beta sits next to the
accountant's epsilon for the same run. Training is local only (no gossip): what a node
releases is post-processing of exactly this training.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from m3tgossip.edu.data.config import DataConfig
from m3tgossip.edu.data.federation import NodeLike as DataNode
from m3tgossip.edu.data.federation import node_data
from m3tgossip.edu.data.records import EduData
from m3tgossip.edu.data.schema import TASKS
from m3tgossip.edu.mia import record_losses
from m3tgossip.edu.model.lora import LoraSpec
from m3tgossip.edu.model.node_model import build_node_model
from m3tgossip.edu.train import Trainer
from m3tgossip.privacy import (
    PrivacyProfile,
    RDPAccountant,
    TrainingPlan,
    training_noise,
)
from m3tgossip.privacy.audit import guess, lower_bound


class AuditNode(DataNode, Protocol):
    """What the audit reads of a topology node (`NodeSpec` fits)."""

    @property
    def compute(self) -> str: ...
    @property
    def local(self) -> tuple[str, ...]: ...


def make_canaries(
    train: EduData, tasks: tuple[str, ...], m: int, rng: np.random.Generator
) -> EduData:
    """m copies of training records with a wrong label for each of `tasks` they have, each a
    learner of its own."""
    pick = rng.choice(len(train), size=m, replace=m > len(train))
    canaries = train.subset(pick)
    for t in tasks:
        y = canaries.labels[t]
        known = y >= 0
        shift = rng.integers(1, TASKS[t], size=int(known.sum()))
        y[known] = (y[known] + shift) % TASKS[t]
    base = int(np.max(train.learner)) + 1 if len(train) else 0
    canaries.learner = np.arange(base, base + m, dtype=np.int64)
    return canaries


def canary_audit(
    node: AuditNode,
    profile: PrivacyProfile,
    *,
    seed: int = 0,
    rounds: int = 30,
    local_steps: int = 5,
    canaries: int = 200,
    records: int = 240,
    batch_size: int = 32,
    lr: float = 3e-3,
    dp_lr: float = 1e-2,
    beta: float = 0.05,
    audit_seed: int | None = None,
) -> dict[str, Any]:
    """The audit of one node's training (see the module docstring); JSON-able result.

    The run without DP trains at `lr`, the private one at `dp_lr`, as the edu workload does."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(audit_seed)
    train, test = node_data(node, DataConfig(records=records, seed=seed))
    canary = make_canaries(train, tuple(node.tasks), canaries, rng)
    included = rng.random(canaries) < 0.5
    data = EduData.concat([train, canary.subset(included)])
    model = build_node_model(node, seed=seed, lora=LoraSpec())
    trainer = Trainer(model, data, test, lr=lr, batch_size=batch_size, seed=seed)
    result: dict[str, Any] = {
        "canaries": canaries,
        "included": int(included.sum()),
        "rounds": rounds,
        "local_steps": local_steps,
        "profile": profile.name,
    }
    eps_accountant = None
    if not profile.is_open:
        plan = TrainingPlan(trainer.private_sampling_rate(), local_steps)
        noise = training_noise(profile, plan, rounds, sorted(model.vectors()))
        trainer.use_private(noise, seed=audit_seed, lr=dp_lr)
        acc = RDPAccountant()
        acc.step(noise.noise_multiplier, rounds * local_steps, plan.sampling_rate)
        eps_accountant = acc.epsilon(profile.delta)
        result.update(noise_multiplier=noise.noise_multiplier, sampling_rate=plan.sampling_rate)
    trainer.train_steps(rounds * local_steps)
    labels = {t: canary.labels[t] for t in node.tasks}
    scores = -record_losses(model, model.prepare(canary), labels)
    scores = np.nan_to_num(scores, nan=float(np.nanmean(scores)))
    k = max(1, canaries // 10)
    right, guesses = guess(scores, included, k, k)
    delta = 0.0 if profile.is_open else profile.delta
    result.update(
        guesses=guesses,
        correct=right,
        epsilon_lower_bound=lower_bound(right, guesses, beta, canaries, delta),
        epsilon_accountant=eps_accountant,
        beta=beta,
        delta=delta,
    )
    return result

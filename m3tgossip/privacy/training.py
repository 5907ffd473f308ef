"""Private local training (per-learner DP-SGD) as the accountant sees it: plan and noise.

This module owns the arithmetic that turns a node's profile into the noise of its DP-SGD steps;
it sees sampling rates, step counts and multipliers, never gradients (the training itself is
`m3tgossip.edu.dpsgd`).

A workload that trains with per-learner DP-SGD states a `TrainingPlan`: each step takes every
learner of the node independently with probability `sampling_rate` (Poisson sampling), clips
each sampled learner's summed gradient to L2 norm `clip` over all trained parameters together,
adds Gaussian noise and steps; `steps_per_round` such steps make a round. One step is the
Poisson-subsampled Gaussian mechanism on one learner (add/remove neighbouring: a learner's
records are all in or all out), so a run of R rounds composes R x steps of them, and
everything the node releases (its shared parameters after each round, and whatever schedules
compute from them) is post-processing of those steps.

`training_noise` calibrates the noise multiplier z (noise std on the clipped sum, in units of
the clip norm) so that the planned rounds spend the profile's epsilon at its delta: one
budget per learner per node over the whole run, for every component and modality together.
The modality factor of the profile becomes extra noise on the modality encoders: the
parameters of `encoder.<m>` get multiplier z_m >= z, calibrated so that those parameters
alone spend at most `factor[m] * epsilon` (their clipped gradient has norm <= clip, so they
are a subsampled Gaussian of multiplier z_m). Every other component (fusion, backbone, prompts,
heads) gets z. Without planned rounds (a node run until stopped) z is the profile's fixed
`sgd_noise_multiplier` and z_m = z / factor[m]; the gate then stops the node's releases once
the budget is spent.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from m3tgossip.privacy.accountant import DEFAULT_ORDERS, calibrate_noise_multiplier
from m3tgossip.privacy.profiles import PrivacyProfile


@dataclass(frozen=True)
class TrainingPlan:
    """What one round of a workload's private training does, for the accountant."""

    #: probability that a learner is in a step (Poisson sampling)
    sampling_rate: float
    #: DP-SGD steps per round
    steps_per_round: int

    def __post_init__(self) -> None:
        q = self.sampling_rate
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 < q <= 1.0:
            raise ValueError(f"sampling_rate: must be in (0, 1], got {q!r}")
        k = self.steps_per_round
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"steps_per_round: must be a positive integer, got {k!r}")


@dataclass(frozen=True)
class TrainingNoise:
    """The noise of a node's DP-SGD steps: what the trainer adds and the accountant charges."""

    #: L2 norm each learner's gradient (all trained parameters together) is clipped to
    clip: float
    #: z: noise std on the clipped sum in units of `clip`; every parameter gets at least this
    noise_multiplier: float
    sampling_rate: float
    steps_per_round: int
    #: z of the components that get more than `noise_multiplier` (strict modality encoders)
    component_multipliers: Mapping[str, float] = field(default_factory=dict)

    def multiplier(self, component: str) -> float:
        """The noise multiplier of `component`'s parameters."""
        return self.component_multipliers.get(component, self.noise_multiplier)


def encoder_modality(component: str) -> str | None:
    """`m` for a component `encoder.<m>`, else None."""
    if component.startswith("encoder."):
        return component.split(".", 1)[1]
    return None


def training_noise(
    profile: PrivacyProfile,
    plan: TrainingPlan,
    rounds_planned: int | None,
    components: Iterable[str],
    orders: Iterable[float] = DEFAULT_ORDERS,
) -> TrainingNoise:
    """The calibrated DP-SGD noise of a node under `profile` (see the module docstring).

    ValueError for an open profile (it trains without DP) or a budget the order grid cannot
    certify over so many steps.
    """
    if profile.is_open:
        raise ValueError("an open profile trains without differential privacy")
    a = tuple(orders)
    q = plan.sampling_rate
    steps = (rounds_planned or 0) * plan.steps_per_round
    if steps:
        z = calibrate_noise_multiplier(profile.epsilon, profile.delta, steps, a, sampling_rate=q)
    else:
        z = profile.sgd_noise_multiplier
    per_component: dict[str, float] = {}
    by_factor: dict[float, float] = {}
    for name in sorted(components):
        m = encoder_modality(name)
        if m is None:
            continue
        factor = profile.modality_factor.get(m, min(profile.modality_factor.values()))
        if factor >= 1.0:
            continue
        if factor not in by_factor:
            if steps:
                zm = calibrate_noise_multiplier(
                    profile.epsilon * factor, profile.delta, steps, a, sampling_rate=q
                )
            else:
                zm = z / factor
            by_factor[factor] = max(z, zm)
        per_component[name] = by_factor[factor]
    if not math.isfinite(z) or z <= 0:
        raise ValueError(f"noise multiplier must be positive and finite, got {z}")
    return TrainingNoise(profile.clip, z, q, plan.steps_per_round, per_component)

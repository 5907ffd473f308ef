"""Privacy profiles: a regulation as numbers, and the modality whose sensitivity a component takes.

This module owns what a node's `privacy` attribute (topology spec) or `[privacy]` table (node
config) means; it does no arithmetic on released values. The `open` profile means no
differential privacy at all: no clipping, no noise, no budget, no cost.

A profile states (`epsilon`, `delta`) for one protected person (a learner) per node over the
whole run: everything the node releases, all components and all modalities together, at the
profile's `delta`. The modality factor is how the budget treats stricter modalities: the
parameters of the encoder of modality `m` alone may spend at most `factor[m] * epsilon`, so
that encoder gets more noise than the rest of the model.

| profile | epsilon | delta | clip C | sgd z | release sigma | signal | image | text | click | tab |
|---------|---------|-------|--------|-------|---------------|--------|-------|------|-------|-----|
| open    | inf     | 0     | none   | 0     | 0             | 1      | 1     | 1    | 1     | 1   |
| ferpa   | 8.0     | 1e-5  | 1.0    | 3.0   | 17.0          | 0.5    | 0.5   | 0.75 | 1     | 1   |
| gdpr    | 3.0     | 1e-6  | 1.0    | 7.5   | 45.0          | 0.2    | 0.25  | 0.5  | 0.75  | 1   |
| custom  | from the node config's privacy table, over a base profile (default ferpa)             |

`sgd z` and `release sigma` are the fixed multipliers of a run without planned rounds (DP-SGD
and release noise); a planned run calibrates its own. At `sgd z` the budget lasts about 500
DP-SGD steps at sampling rate 0.2 (100 rounds of 5 steps). `click` is clickstream, `tab` tabular.

How a node spends it. A workload that trains with per-learner DP-SGD (the `edu` workload)
clips each learner's gradient to C and noises every step; the noise multiplier is calibrated
to the planned rounds x local steps x sampling rate so that the run ends at `epsilon`
(`m3tgossip.privacy.training`); what the node releases is post-processing and gets no noise
of its own. A workload without private training has each round's update clipped to C and
noised at release instead (`m3tgossip.privacy.gate`), the budget split over the components by
their modality factors. Without planned rounds the fixed multipliers of the table are used
and the node stops releasing once its budget is spent.

Why these numbers. `signal` (physiological signals, eye gaze, audio prosody) and `image`
(faces, handwriting) are biometric: GDPR Art. 9 makes them special-category data, FERPA
treats them as education records with no lesser status but institutions commonly restrict
them; they get the smallest share. `text` (essays, answers) is identifying in style and content
and sits in between; `clickstream` and `tabular` (grades, demographics already coarsened) are
the least sensitive. ferpa's budget (8 at 1e-5) is the order used in production user-level DP;
gdpr's (3 at 1e-6) is strict. So under gdpr a signal encoder's own parameters reveal at most
epsilon 3 * 0.2 = 0.6 about a learner, the node's whole release at most 3.

A component's sensitivity is that of the strictest modality it touches: `encoder.<m>` touches
`m`; `fusion`, `backbone`, `head.*`, `prompt.*` (and any other name) are trained on all of the
node's modalities and take the strictest of them (smallest factor, ties broken in the order
signal, image, text, clickstream, tabular).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

#: the modalities a profile must give a factor for, strictest first (the tie-break order)
MODALITY_ORDER = ("signal", "image", "text", "clickstream", "tabular")


@dataclass(frozen=True)
class PrivacyProfile:
    """A node's privacy regulation, as numbers.

    `epsilon` is the (epsilon, `delta`) budget of one learner per node over the whole run
    (`inf` for no DP at all); `clip` the L2 norm a learner's gradient (DP-SGD) or a release is
    clipped to; `noise_multiplier` the release noise std in units of `clip` used when no run
    length is planned (modality `m` uses `noise_multiplier / modality_factor[m]`);
    `modality_factor[m]` in (0, 1] the share of the budget the encoder of `m` may spend on
    its own; `sgd_noise_multiplier` the DP-SGD noise multiplier when no run length is planned.
    """

    name: str
    epsilon: float
    delta: float
    clip: float
    noise_multiplier: float
    modality_factor: Mapping[str, float] = field(default_factory=dict)
    sgd_noise_multiplier: float = 1.0

    def __post_init__(self) -> None:
        factors = dict(self.modality_factor)
        object.__setattr__(self, "modality_factor", factors)
        if self.is_open:
            if self.noise_multiplier != 0.0:
                raise ValueError("noise_multiplier: an open profile (epsilon = inf) adds no noise")
            return
        _check(self.epsilon, "epsilon", positive=True)
        if not (isinstance(self.delta, (int, float)) and 0.0 < self.delta < 1.0):
            raise ValueError(f"delta: must be in (0, 1), got {self.delta!r}")
        _check(self.clip, "clip", positive=True)
        _check(self.noise_multiplier, "noise_multiplier", positive=True)
        _check(self.sgd_noise_multiplier, "sgd_noise_multiplier", positive=True)
        for m in MODALITY_ORDER:
            if m not in factors:
                raise ValueError(f"modality_factor.{m}: missing")
        for m, f in factors.items():
            if m not in MODALITY_ORDER:
                raise ValueError(f"modality_factor.{m}: unknown modality")
            if not (isinstance(f, (int, float)) and not isinstance(f, bool) and 0.0 < f <= 1.0):
                raise ValueError(f"modality_factor.{m}: must be in (0, 1], got {f!r}")

    @property
    def is_open(self) -> bool:
        """True for a profile without differential privacy (infinite budget)."""
        return self.epsilon == math.inf


def _check(value: Any, key: str, positive: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0.0):
        raise ValueError(f"{key}: must be a positive finite number, got {value!r}")


PROFILES: dict[str, PrivacyProfile] = {
    "open": PrivacyProfile("open", math.inf, 0.0, math.inf, 0.0, {m: 1.0 for m in MODALITY_ORDER}),
    "ferpa": PrivacyProfile(
        "ferpa",
        8.0,
        1e-5,
        1.0,
        17.0,
        {"signal": 0.5, "image": 0.5, "text": 0.75, "clickstream": 1.0, "tabular": 1.0},
        3.0,
    ),
    "gdpr": PrivacyProfile(
        "gdpr",
        3.0,
        1e-6,
        1.0,
        45.0,
        {"signal": 0.2, "image": 0.25, "text": 0.5, "clickstream": 0.75, "tabular": 1.0},
        7.5,
    ),
}

_CUSTOM_KEYS = (
    "base",
    "epsilon",
    "delta",
    "clip",
    "noise_multiplier",
    "sgd_noise_multiplier",
    "modality_factor",
)


def profile_for(name: str, custom: Mapping[str, Any] | None = None) -> PrivacyProfile:
    """The profile a topology `privacy` attribute names.

    `custom` is the node config's privacy table and is only read for `name == "custom"`: keys
    `base` (a built-in profile to start from, default "ferpa"; not "open"), `epsilon`, `delta`,
    `clip`, `noise_multiplier`, `sgd_noise_multiplier` and `modality_factor` (a table
    overriding some modalities).
    Raises ValueError naming the key at fault.
    """
    if name != "custom":
        if name not in PROFILES:
            known = ", ".join([*PROFILES, "custom"])
            raise ValueError(f'privacy: unknown profile "{name}" (known: {known})')
        if custom:
            raise ValueError(
                f'privacy: the topology names profile "{name}"; only "custom" takes a table'
            )
        return PROFILES[name]
    if custom is None:
        raise ValueError('privacy: profile "custom" needs a privacy table in the node config')
    for key in custom:
        if key not in _CUSTOM_KEYS:
            raise ValueError(f"privacy.{key}: unknown key (known: {', '.join(_CUSTOM_KEYS)})")
    base_name = custom.get("base", "ferpa")
    if base_name not in PROFILES or base_name == "open":
        raise ValueError(f"privacy.base: must be ferpa or gdpr, got {base_name!r}")
    base = PROFILES[base_name]
    factors = dict(base.modality_factor)
    overrides = custom.get("modality_factor", {})
    if not isinstance(overrides, Mapping):
        raise ValueError(f"privacy.modality_factor: must be a table, got {overrides!r}")
    factors.update(overrides)
    numbers = ("epsilon", "delta", "clip", "noise_multiplier", "sgd_noise_multiplier")
    values = {k: custom[k] for k in numbers if k in custom}
    try:
        for key in ("epsilon", "clip", "noise_multiplier", "sgd_noise_multiplier"):
            if key in values:
                _check(values[key], key, positive=True)
        return replace(base, name="custom", modality_factor=factors, **values)
    except ValueError as exc:
        raise ValueError(f"privacy.{exc}") from None


def component_modality(
    component: str, node_modalities: Iterable[str], profile: PrivacyProfile
) -> str:
    """The modality whose sensitivity a component takes (the strictest one it touches)."""
    held = tuple(node_modalities)
    touched: tuple[str, ...]
    for m in held:
        if m not in MODALITY_ORDER:
            raise ValueError(f'unknown modality "{m}" (known: {", ".join(MODALITY_ORDER)})')
    if component.startswith("encoder."):
        m = component.split(".", 2)[1]
        # an encoder of a modality this module does not know: be conservative
        touched = (m,) if m in MODALITY_ORDER else MODALITY_ORDER
    else:
        touched = held or MODALITY_ORDER
    factor = profile.modality_factor
    return min(touched, key=lambda m: (factor.get(m, 1.0), MODALITY_ORDER.index(m)))

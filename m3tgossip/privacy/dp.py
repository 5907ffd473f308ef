"""Differential privacy of outgoing deltas: profiles, clipping, Gaussian noise, RDP accounting.

This module owns the privacy arithmetic and nothing else: it sees numpy arrays, never sockets,
messages or torch. A node names its profile in the topology spec (`privacy = "gdpr"`); the
daemon builds one `DeltaPrivatizer` from it and passes every outgoing release of a shared
component through `privatize`, which clips it to an L2 norm `C` and adds Gaussian noise of
standard deviation `sigma * C` per element, and records the release in an RDP accountant. Once
one more release of a component would overspend its budget, `can_share` turns False and the
node must stop sending that component.

Profiles (regulation-style; `epsilon` is the budget of one component over the whole run, at the
profile's `delta`; the modality factor scales that budget):

| profile | epsilon | delta | clip C | fixed sigma | signal | image | text | clickstream | tabular |
|---------|---------|-------|--------|-------------|--------|-------|------|-------------|---------|
| open    | inf     | 0     | none   | 0 (none)    | 1      | 1     | 1    | 1           | 1       |
| ferpa   | 8.0     | 1e-5  | 1.0    | 17.0        | 0.5    | 0.5   | 0.75 | 1           | 1       |
| gdpr    | 3.0     | 1e-6  | 1.0    | 45.0        | 0.2    | 0.25  | 0.5  | 0.75        | 1       |
| custom  | from the node config's privacy table, over a base profile (default ferpa)           |

Why these numbers. `signal` (physiological signals, eye gaze, audio prosody) and `image`
(faces, handwriting) are biometric: GDPR Art. 9 makes them special-category data, FERPA
treats them as education records with no lesser status but institutions commonly restrict
them; they get the smallest share. `text` (essays, answers) is identifying in style and content
and sits in between; `clickstream` and `tabular` (grades, demographics already coarsened) are
the least sensitive. ferpa's budget (8 at 1e-5) is the order used in production user-level DP;
gdpr's (3 at 1e-6) is strict. So under gdpr a signal encoder has budget 3 * 0.2 = 0.6.

A component's sensitivity is that of the strictest modality it touches: `encoder.<m>` touches
`m`; `fusion`, `backbone`, `head.*`, `prompt.*` (and any other name) are trained on all of the
node's modalities and take the strictest of them (smallest factor, ties broken in the order
signal, image, text, clickstream, tabular).

Noise calibration. With `rounds_planned` the noise multiplier of each component is calibrated by
the accountant so that exactly `rounds_planned` releases spend its budget (binary search); every
node then spends the same epsilon per component over the run whatever its schedule, and stricter
modalities get more noise. Without it (`rounds_planned` None or 0: a run with no planned end)
the multiplier is fixed at `profile.noise_multiplier / factor`, which gives every modality
about the same number of releases before its (smaller) budget is spent: with the table's
numbers (replace neighbouring) ferpa allows 177 releases of a tabular component (sigma 17) up to
215 of a signal one (sigma 34), gdpr 187 (tabular, sigma 45) up to 236 (signal, sigma 225).
Privacy depends only on the multiplier; the clipping norm is a utility knob (it should sit near
the typical norm of a component's release) and sets the absolute noise `sigma * C`. The noise is
large because each release protects the node's whole update, not one gradient of a batch: at
these budgets the noise std per element exceeds the clipped signal's whole norm, and only the
averaging over neighbours and rounds recovers the signal.

Neighbouring relation. A release is `clip(u) + N(0, (sigma C)^2 I)`. Between ANY two datasets
of the node (e.g. with and without one student's records) two clipped vectors differ by up to
`2C` in L2 norm, so by default (`neighbouring="replace"`) the accountant charges a Gaussian
mechanism of multiplier `sigma / 2`. `neighbouring="add-remove"` charges `sigma` (sensitivity
`C`, the DP-FedAvg user-level convention in which the whole node is present or absent and an
absent node releases zero); it is only right if that is the unit being protected.

Accountant. Renyi DP (Mironov 2017) of the Gaussian mechanism at order `alpha` is
`alpha / (2 z^2)` for noise multiplier `z` = noise std / L2 sensitivity; releases compose by
adding RDP (adaptively chosen releases included). RDP is turned into (epsilon, delta)-DP with
the conversion of Canonne, Kamath, Steinke 2020 and Balle et al. 2020 (Theorem 21):
`eps = min_alpha rdp(alpha) + log((alpha - 1) / alpha) - (log(delta) + log(alpha)) / (alpha - 1)`,
over the fixed order grid `DEFAULT_ORDERS`, clamped at 0. It is never looser than the classic
`rdp(alpha) + log(1/delta) / (alpha - 1)`.

The `open` profile does nothing: no clipping, no noise, no budget, no cost.

Noise must be unpredictable to the neighbours: use `seed=None` (operating-system entropy) in a
deployment, never the federation seed every node knows; a fixed seed is for tests only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

#: the modalities a profile must give a factor for, strictest first (the tie-break order)
MODALITY_ORDER = ("signal", "image", "text", "clickstream", "tabular")

#: Renyi orders of the accountant: a fine grid near 1 (large epsilon) up to 1024 (small epsilon)
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    sorted(
        {round(1.0 + k / 20.0, 6) for k in range(1, 20)}  # 1.05 .. 1.95
        | {round(2.0 + k / 4.0, 6) for k in range(0, 33)}  # 2 .. 10
        | {float(a) for a in range(11, 64)}
        | {64.0, 80.0, 96.0, 128.0, 160.0, 192.0, 256.0, 384.0, 512.0, 768.0, 1024.0}
    )
)

NEIGHBOURING = {"replace": 2.0, "add-remove": 1.0}  # L2 sensitivity in units of the clip norm

#: relative slack when checking a release against its budget (float round-off only)
BUDGET_SLACK = 1e-9


class PrivacyBudgetExhausted(RuntimeError):
    """`privatize` was called for a component whose budget one more release would exceed."""


@dataclass(frozen=True)
class PrivacyProfile:
    """A node's privacy regulation, as numbers.

    `epsilon` is the (epsilon, `delta`) budget of one component over the whole run before the
    modality factor (`inf` for no DP at all); `clip` the L2 norm a release is clipped to;
    `noise_multiplier` the noise std in units of `clip` used when no run length is planned
    (modality `m` uses `noise_multiplier / modality_factor[m]`); `modality_factor[m]` in (0, 1]
    scales the budget of components touching `m`.
    """

    name: str
    epsilon: float
    delta: float
    clip: float
    noise_multiplier: float
    modality_factor: Mapping[str, float] = field(default_factory=dict)

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
    ),
    "gdpr": PrivacyProfile(
        "gdpr",
        3.0,
        1e-6,
        1.0,
        45.0,
        {"signal": 0.2, "image": 0.25, "text": 0.5, "clickstream": 0.75, "tabular": 1.0},
    ),
}

_CUSTOM_KEYS = ("base", "epsilon", "delta", "clip", "noise_multiplier", "modality_factor")


def profile_for(name: str, custom: Mapping[str, Any] | None = None) -> PrivacyProfile:
    """The profile a topology `privacy` attribute names.

    `custom` is the node config's privacy table and is only read for `name == "custom"`: keys
    `base` (a built-in profile to start from, default "ferpa"; not "open"), `epsilon`, `delta`,
    `clip`, `noise_multiplier` and `modality_factor` (a table overriding some modalities).
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
    values = {k: custom[k] for k in ("epsilon", "delta", "clip", "noise_multiplier") if k in custom}
    try:
        for key in ("epsilon", "clip", "noise_multiplier"):  # a custom profile is never open
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


# --- accountant ----------------------------------------------------------------------------


def gaussian_rdp(noise_multiplier: float, orders: Iterable[float] = DEFAULT_ORDERS) -> np.ndarray:
    """RDP of one Gaussian release, `alpha / (2 z^2)` at every order (z = std / sensitivity)."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0.0):
        raise ValueError(f"noise_multiplier must be positive and finite, got {noise_multiplier}")
    a = np.asarray(tuple(orders), dtype=float)
    return a / (2.0 * noise_multiplier**2)


def rdp_to_epsilon(rdp: np.ndarray, orders: Iterable[float], delta: float) -> float:
    """(epsilon, delta)-DP from RDP by the Canonne-Kamath-Steinke / Balle et al. conversion.

    `min_alpha rdp + log((alpha-1)/alpha) - (log delta + log alpha)/(alpha-1)`, clamped at 0.
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    a = np.asarray(tuple(orders), dtype=float)
    r = np.asarray(rdp, dtype=float)
    if not np.any(r > 0.0):
        return 0.0
    eps = r + np.log1p(-1.0 / a) - (math.log(delta) + np.log(a)) / (a - 1.0)
    return max(0.0, float(np.min(eps)))


class RDPAccountant:
    """Renyi-DP accountant of a sequence of Gaussian releases (one per `step`)."""

    def __init__(self, orders: Iterable[float] = DEFAULT_ORDERS) -> None:
        self.orders = np.asarray(tuple(orders), dtype=float)
        if self.orders.ndim != 1 or not self.orders.size or np.any(self.orders <= 1.0):
            raise ValueError("Renyi orders must be a non-empty list of numbers > 1")
        self.rdp = np.zeros_like(self.orders)
        self.releases = 0

    def step(self, noise_multiplier: float, count: int = 1) -> None:
        """Record `count` Gaussian releases of multiplier `noise_multiplier` (std/sensitivity)."""
        if count < 0:
            raise ValueError(f"count must not be negative, got {count}")
        self.rdp += count * gaussian_rdp(noise_multiplier, self.orders)
        self.releases += count

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at `delta`."""
        return rdp_to_epsilon(self.rdp, self.orders, delta)

    def epsilon_after(self, noise_multiplier: float, delta: float, count: int = 1) -> float:
        """Epsilon that `count` more releases of `noise_multiplier` would bring the total to."""
        extra = count * gaussian_rdp(noise_multiplier, self.orders)
        return rdp_to_epsilon(self.rdp + extra, self.orders, delta)

    def state(self) -> dict[str, Any]:
        """JSON-able state, for checkpoints (a restarted node must not forget what it spent)."""
        return {"orders": self.orders.tolist(), "rdp": self.rdp.tolist(), "releases": self.releases}

    def load(self, state: Mapping[str, Any]) -> None:
        """Restore from `state()`; the order grid must be the same."""
        orders = np.asarray(state["orders"], dtype=float)
        if orders.shape != self.orders.shape or not np.allclose(orders, self.orders):
            raise ValueError("accountant state was written with another Renyi order grid")
        rdp = np.asarray(state["rdp"], dtype=float)
        if rdp.shape != self.rdp.shape or np.any(~np.isfinite(rdp)) or np.any(rdp < 0):
            raise ValueError("accountant state has a bad rdp vector")
        self.rdp = rdp.copy()
        self.releases = int(state["releases"])


def calibrate_noise_multiplier(
    epsilon: float, delta: float, releases: int, orders: Iterable[float] = DEFAULT_ORDERS
) -> float:
    """Smallest multiplier z (std / sensitivity) whose `releases` releases spend <= `epsilon`.

    Binary search on log z; the result spends `epsilon` to about 1e-9 relative. ValueError if
    `epsilon` is below what the order grid can certify at `delta`.
    """
    if releases < 1:
        raise ValueError(f"releases must be >= 1, got {releases}")
    _check(epsilon, "epsilon", positive=True)
    a = tuple(orders)

    def spent(z: float) -> float:
        return rdp_to_epsilon(releases * gaussian_rdp(z, a), a, delta)

    floor = rdp_to_epsilon(np.full(len(a), 1e-300), a, delta)
    if epsilon <= floor * (1.0 + 1e-6):
        raise ValueError(
            f"epsilon {epsilon} is too small to certify at delta {delta} with this order grid"
        )
    lo, hi = 1.0, 1.0
    while spent(hi) > epsilon:
        hi *= 2.0
    while spent(lo) <= epsilon:
        lo /= 2.0
    for _ in range(200):  # invariant: spent(lo) > epsilon >= spent(hi)
        mid = math.sqrt(lo * hi)
        if mid in (lo, hi):
            break
        if spent(mid) > epsilon:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1.0 + 1e-12:
            break
    return hi


# --- privatizer ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ComponentPrivacy:
    """How one component's releases are privatized.

    `noise_multiplier` is sigma: the noise std per element in units of `clip`. `budget` is the
    component's epsilon over the run. Open profile: `clip = budget = inf`, sigma 0.
    """

    name: str
    modality: str
    size: int
    clip: float
    noise_multiplier: float
    budget: float

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise added to each element of a release."""
        return 0.0 if self.noise_multiplier == 0.0 else self.noise_multiplier * self.clip


class DeltaPrivatizer:
    """Clips and noises a node's outgoing releases and accounts for them per component.

    `components` maps each shared component to its number of elements. `rounds_planned`
    (>= 1) calibrates every component's noise so that that many releases spend its budget
    exactly; None or 0 uses the profile's fixed multiplier. `seed` None draws the noise from
    operating-system entropy (use it in deployments); an int makes it reproducible (tests).
    """

    def __init__(
        self,
        profile: PrivacyProfile,
        node_modalities: Iterable[str],
        components: Mapping[str, int],
        rounds_planned: int | None = None,
        seed: int | None = None,
        *,
        neighbouring: str = "replace",
        orders: Iterable[float] = DEFAULT_ORDERS,
    ) -> None:
        if neighbouring not in NEIGHBOURING:
            raise ValueError(f"neighbouring must be one of {', '.join(NEIGHBOURING)}")
        if rounds_planned is not None and rounds_planned < 0:
            raise ValueError(f"rounds_planned must not be negative, got {rounds_planned}")
        self.profile = profile
        self.neighbouring = neighbouring
        self.sensitivity = NEIGHBOURING[neighbouring]  # in units of the clip norm
        self.orders = tuple(orders)
        self.rng = np.random.default_rng(seed)
        modalities = tuple(node_modalities)
        self.components: dict[str, ComponentPrivacy] = {}
        self._accountants: dict[str, RDPAccountant] = {}
        calibrated: dict[float, float] = {}
        for name, size in sorted(components.items()):
            if not isinstance(size, int) or size < 1:
                raise ValueError(f'component "{name}": size must be a positive int, got {size!r}')
            modality = component_modality(name, modalities, profile)
            if profile.is_open:
                spec = ComponentPrivacy(name, modality, size, math.inf, 0.0, math.inf)
            else:
                factor = profile.modality_factor[modality]
                budget = profile.epsilon * factor
                if rounds_planned:
                    if budget not in calibrated:
                        z = calibrate_noise_multiplier(
                            budget, profile.delta, rounds_planned, self.orders
                        )
                        calibrated[budget] = z * self.sensitivity
                    sigma = calibrated[budget]
                else:
                    sigma = profile.noise_multiplier / factor
                spec = ComponentPrivacy(name, modality, size, profile.clip, sigma, budget)
            self.components[name] = spec
            self._accountants[name] = RDPAccountant(self.orders)

    def _spec(self, component: str) -> ComponentPrivacy:
        try:
            return self.components[component]
        except KeyError:
            raise KeyError(f'component "{component}" is not privatized by this node') from None

    def _z(self, spec: ComponentPrivacy) -> float:
        """The accountant's multiplier: noise std over L2 sensitivity."""
        return spec.noise_multiplier / self.sensitivity

    def can_share(self, component: str) -> bool:
        """False once one more release of `component` would exceed its budget."""
        spec = self._spec(component)
        if self.profile.is_open:
            return True
        after = self._accountants[component].epsilon_after(self._z(spec), self.profile.delta)
        return after <= spec.budget * (1.0 + BUDGET_SLACK)

    def spent(self, component: str) -> float:
        """Epsilon spent so far on `component` (0 under the open profile)."""
        self._spec(component)
        if self.profile.is_open:
            return 0.0
        return self._accountants[component].epsilon(self.profile.delta)

    def releases(self, component: str) -> int:
        """Releases of `component` made so far."""
        self._spec(component)
        return self._accountants[component].releases

    def node_epsilon(self) -> float:
        """Epsilon of everything the node released (all components come from the same data,
        so their RDP adds up); 0 under the open profile."""
        if self.profile.is_open:
            return 0.0
        total = sum((acc.rdp for acc in self._accountants.values()), np.zeros(len(self.orders)))
        return rdp_to_epsilon(total, self.orders, self.profile.delta)

    def privatize(
        self, component: str, delta: np.ndarray, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, float]:
        """Clip `delta` to L2 norm C, add N(0, (sigma C)^2) per element, record the release.

        Writes into `out` if given (leaving `delta` untouched), else into `delta` itself.
        Returns (the released array, the noise std per element). Raises
        PrivacyBudgetExhausted if `can_share(component)` is False, TypeError for a non-float
        array, ValueError for a wrong size or a non-finite value.
        """
        spec = self._spec(component)
        if not isinstance(delta, np.ndarray) or delta.dtype.kind != "f":
            raise TypeError(f"{component}: privatize needs a float numpy array")
        if delta.size != spec.size:
            raise ValueError(
                f"{component}: release has {delta.size} elements, expected {spec.size}"
            )
        if out is None:
            target = delta
        else:
            if out.shape != delta.shape or out.dtype.kind != "f":
                raise ValueError(f"{component}: out must be a float array of shape {delta.shape}")
            np.copyto(out, delta, casting="same_kind")
            target = out
        if self.profile.is_open:
            self._accountants[component].releases += 1
            return target, 0.0
        if not self.can_share(component):
            raise PrivacyBudgetExhausted(
                f"{component}: budget {spec.budget:g} spent after "
                f"{self._accountants[component].releases} releases"
            )
        norm = float(np.linalg.norm(target.reshape(-1).astype(np.float64, copy=False)))
        if not math.isfinite(norm):
            raise ValueError(f"{component}: release has a non-finite value")
        if norm > spec.clip:
            target *= spec.clip / norm
        std = spec.noise_std
        dtype = np.float32 if target.dtype == np.float32 else np.float64
        noise = self.rng.standard_normal(target.shape, dtype=dtype)
        noise *= std
        np.add(target, noise, out=target, casting="unsafe")
        self._accountants[component].step(self._z(spec))
        return target, std

    def report(self) -> dict[str, dict[str, Any]]:
        """Per component: modality, clip, sigma, noise_std, releases, epsilon_spent, budget,
        exhausted. JSON-able: infinite clip/budget (open profile) are None."""

        def finite(x: float) -> float | None:
            return x if math.isfinite(x) else None

        return {
            name: {
                "modality": spec.modality,
                "clip": finite(spec.clip),
                "sigma": spec.noise_multiplier,
                "noise_std": spec.noise_std,
                "releases": self._accountants[name].releases,
                "epsilon_spent": self.spent(name),
                "budget": finite(spec.budget),
                "exhausted": not self.can_share(name),
            }
            for name, spec in self.components.items()
        }

    def state(self) -> dict[str, Any]:
        """JSON-able accounting state for the node's checkpoint."""
        return {
            "profile": self.profile.name,
            "components": {n: a.state() for n, a in self._accountants.items()},
        }

    def load(self, state: Mapping[str, Any]) -> None:
        """Restore the accounting of a checkpoint (components not in it start at zero)."""
        if state.get("profile") != self.profile.name:
            raise ValueError(
                f"privacy state is for profile {state.get('profile')!r}, "
                f"this node runs {self.profile.name!r}"
            )
        for name, acc_state in state.get("components", {}).items():
            if name in self._accountants:
                self._accountants[name].load(acc_state)

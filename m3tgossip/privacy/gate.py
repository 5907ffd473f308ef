"""The release gate: every private value a node releases passes through it and is charged.

This module owns the clipping, the noise and the charging of a node's releases; it sees numpy
arrays, never sockets, messages or torch. A node names its profile in the topology spec
(`privacy = "gdpr"`); the daemon builds one `ReleaseGate` from it and passes every outgoing
release of a shared component through `privatize`, which clips it to an L2 norm `C`, adds
Gaussian noise of standard deviation `sigma * C` per element and charges the release to the
component's RDP accountant. Once one more release of a component would overspend its budget,
`can_share` turns False and `privatize` refuses it: the node must stop sending that component.
`charged` and `released` count what the gate charged, so a test can check that every value a
node sent went through it.

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

Noise must be unpredictable to the neighbours: use `seed=None` (operating-system entropy) in a
deployment, never the federation seed every node knows; a fixed seed is for tests only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from m3tgossip.privacy.accountant import (
    DEFAULT_ORDERS,
    RDPAccountant,
    calibrate_noise_multiplier,
    rdp_to_epsilon,
)
from m3tgossip.privacy.profiles import PrivacyProfile, component_modality

NEIGHBOURING = {"replace": 2.0, "add-remove": 1.0}  # L2 sensitivity in units of the clip norm

#: relative slack when checking a release against its budget (float round-off only)
BUDGET_SLACK = 1e-9


class PrivacyBudgetExhausted(RuntimeError):
    """`privatize` was called for a component whose budget one more release would exceed."""


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


class ReleaseGate:
    """Clips and noises a node's outgoing releases and charges them per component.

    `components` maps each shared component to its number of elements. `rounds_planned`
    (>= 1) calibrates every component's noise so that that many releases spend its budget
    exactly; None or 0 uses the profile's fixed multiplier. `seed` None draws the noise from
    operating-system entropy (use it in deployments); an int makes it reproducible (tests).

    `releases(c)` counts every release of `c` the accountant knows of, those restored from a
    checkpoint by `load` included; `charged(c)` and `released` count only the releases this
    gate let out and charged (at zero cost under the open profile) since it was built.
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
        self._charged: dict[str, int] = {}
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
            self._charged[name] = 0

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

    def charged(self, component: str) -> int:
        """Releases of `component` this gate let out and charged since it was built."""
        self._spec(component)
        return self._charged[component]

    @property
    def released(self) -> int:
        """Releases of all components this gate let out and charged since it was built."""
        return sum(self._charged.values())

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
            self._charged[component] += 1
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
        self._charged[component] += 1
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

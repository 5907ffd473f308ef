"""The release gate: every private value a node releases passes through it and is charged.

This module owns the clipping, the noise and the charging of a node's releases; it sees numpy
arrays, never sockets, messages or torch. A node names its profile in the topology spec
(`privacy = "gdpr"`); the daemon builds one `ReleaseGate` from it and passes every outgoing
release of a shared component through `privatize`. The profile's budget is one per protected
learner per node over the whole run: `node_epsilon` composes everything the node released,
and once the next release would overspend it, `can_share` turns False and `privatize` refuses
it: the node must stop sending. `charged` and `released` count what the gate charged, so a
test can check that every value a node sent went through it. `state` and `load` carry the
accounting through checkpoints (and the daemon's release ledger).

Three mechanisms: two chosen by how the workload trains, one by the node's topology entry.

Private training (`training`, a `TrainingNoise`: the workload trains with per-learner DP-SGD,
`m3tgossip.privacy.training`). What the node releases is post-processing of its DP-SGD steps,
so `privatize` adds no noise and does not clip; `begin_round` charges the round's steps (the
Poisson-subsampled Gaussian, `steps_per_round` of them at the sampling rate) to the node's
accountant before anything of the round is released, and opens one release per component for
that round. Per component, `spent(c)` is what that component's parameters alone reveal (the
same steps at its own multiplier: strict modality encoders get more noise, see `training`).

Release noise (no `training`: a workload without private training). Each release is clipped
to L2 norm `C` and gets Gaussian noise of standard deviation `sigma * C` per element. With
`rounds_planned` the node's budget is split over its components by their modality factors:
component c gets multiplier z_c = z sqrt(W / f_c) (W the sum of the factors f_c of the
node's components, f_c that of the strictest modality c touches), so a round of every
component is one Gaussian release of multiplier z, and z is calibrated so that
`rounds_planned` rounds spend the budget exactly; stricter modalities get more noise. Without
it (`rounds_planned` None or 0: a run with no planned end) the multiplier is fixed at
`profile.noise_multiplier / factor` and the node stops once the budget is spent. Privacy
depends only on the multiplier; the clipping norm is a utility knob and sets the absolute
noise `sigma * C`. The noise is large because each release protects the node's whole update,
not one gradient of a batch.

Neighbouring relation of release noise. A release is `clip(u) + N(0, (sigma C)^2 I)`. Between
ANY two datasets of the node two clipped vectors differ by up to `2C` in L2 norm, so by
default (`neighbouring="replace"`) the accountant charges a Gaussian mechanism of multiplier
`sigma / 2`. `neighbouring="add-remove"` charges `sigma` (sensitivity `C`, the DP-FedAvg
user-level convention in which the whole node is present or absent and an absent node
releases zero). DP-SGD is accounted add/remove per learner, its standard unit.

Cancelling noise (`cancel`, a `CancellingNoise`: a node with `single_learner = "cancel"`,
whatever its profile, `m3tgossip.privacy.cancel`). The node trains without DP-SGD and
`privatize` leaves the value as it is; it draws the round's per-edge masks, which the exchange
takes once (`edge_masks`) and adds edge by edge, and no send of the component happens without
them. This is not differential privacy: nothing is charged, `spent` and `node_epsilon` are
inf (no guarantee, never a number the node does not have) and `can_share` is always True.

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
    gaussian_rdp,
    rdp_to_epsilon,
    sampled_gaussian_rdp,
)
from m3tgossip.privacy.cancel import CancellingNoise
from m3tgossip.privacy.profiles import PrivacyProfile, component_modality
from m3tgossip.privacy.training import TrainingNoise, encoder_modality

NEIGHBOURING = {"replace": 2.0, "add-remove": 1.0}  # L2 sensitivity in units of the clip norm

#: relative slack when checking a release against its budget (float round-off only)
BUDGET_SLACK = 1e-9


class PrivacyBudgetExhausted(RuntimeError):
    """`privatize` was called for a component whose budget one more release would exceed."""


@dataclass(frozen=True)
class ComponentPrivacy:
    """How one component's releases are privatized.

    `noise_multiplier` is sigma: the noise std per element in units of `clip` (of a release,
    or with `trained` of every DP-SGD step on the component's parameters). `budget` is the
    epsilon the component may spend on its own over the run (the node's budget, or a strict
    modality encoder's share of it). Open profile: `clip = budget = inf`, sigma 0.
    """

    name: str
    modality: str
    size: int
    clip: float
    noise_multiplier: float
    budget: float
    #: trained with DP-SGD: the release is post-processing and gets no noise of its own
    trained: bool = False

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise added to each element of a release."""
        if self.trained or self.noise_multiplier == 0.0:
            return 0.0
        return self.noise_multiplier * self.clip


class ReleaseGate:
    """Clips and noises a node's outgoing releases and charges them per component.

    `components` maps each shared component to its number of elements. `rounds_planned`
    (>= 1) calibrates the release noise so that that many rounds spend the budget exactly;
    None or 0 uses the profile's fixed multiplier. `training` switches to private training
    (DP-SGD noise, calibrated by `m3tgossip.privacy.training`). `seed` None draws the noise from
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
        training: TrainingNoise | None = None,
        cancel: CancellingNoise | None = None,
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
        #: the per-edge masks of a single-learner node (None: a DP mechanism or open)
        self.cancel = cancel
        #: the DP-SGD noise of a privately trained workload (None: release noise)
        self.training = None if profile.is_open or cancel is not None else training
        #: this round's masks per component, drawn by `privatize`, taken by `edge_masks`
        self._masks: dict[str, dict[str, np.ndarray]] = {}
        modalities = tuple(node_modalities)
        self.components: dict[str, ComponentPrivacy] = {}
        self._accountants: dict[str, RDPAccountant] = {}
        self._node = RDPAccountant(self.orders)
        self._releases: dict[str, int] = {}
        self._charged: dict[str, int] = {}
        #: components this round's private-training charge still lets out once
        self._open: set[str] = set()
        for name, size in components.items():
            if not isinstance(size, int) or size < 1:
                raise ValueError(f'component "{name}": size must be a positive int, got {size!r}')
        mods = {name: component_modality(name, modalities, profile) for name in components}
        factor = {name: profile.modality_factor.get(m, 1.0) for name, m in mods.items()}
        z_node = 0.0
        if not profile.is_open and self.training is None and rounds_planned:
            z_node = calibrate_noise_multiplier(
                profile.epsilon, profile.delta, rounds_planned, self.orders
            )
        weight = sum(factor.values())
        for name, size in sorted(components.items()):
            modality = mods[name]
            if profile.is_open or cancel is not None:
                spec = ComponentPrivacy(name, modality, size, math.inf, 0.0, math.inf)
            elif self.training is not None:
                share = factor[name] if encoder_modality(name) is not None else 1.0
                spec = ComponentPrivacy(
                    name,
                    modality,
                    size,
                    self.training.clip,
                    self.training.multiplier(name),
                    profile.epsilon * share,
                    trained=True,
                )
            else:
                if rounds_planned:
                    sigma = z_node * math.sqrt(weight / factor[name]) * self.sensitivity
                else:
                    sigma = profile.noise_multiplier / factor[name]
                spec = ComponentPrivacy(name, modality, size, profile.clip, sigma, profile.epsilon)
            self.components[name] = spec
            self._accountants[name] = RDPAccountant(self.orders)
            self._releases[name] = 0
            self._charged[name] = 0

    def _spec(self, component: str) -> ComponentPrivacy:
        try:
            return self.components[component]
        except KeyError:
            raise KeyError(f'component "{component}" is not privatized by this node') from None

    def _z(self, spec: ComponentPrivacy) -> float:
        """The accountant's multiplier of a release: noise std over L2 sensitivity."""
        return spec.noise_multiplier / self.sensitivity

    def _fits(self, rdp: np.ndarray) -> bool:
        """Whether `rdp` more on the node stays within its budget."""
        after = rdp_to_epsilon(self._node.rdp + rdp, self.orders, self.profile.delta)
        return after <= self.profile.epsilon * (1.0 + BUDGET_SLACK)

    def _round_rdp(self) -> np.ndarray:
        t = self.training
        assert t is not None
        rdp = sampled_gaussian_rdp(t.sampling_rate, t.noise_multiplier, self.orders)
        return t.steps_per_round * rdp

    def can_share(self, component: str) -> bool:
        """False once the next release of `component` would exceed the node's budget (with
        private training: unless this round's charge still lets it out)."""
        spec = self._spec(component)
        if self.profile.is_open or self.cancel is not None:
            return True
        if self.training is not None:
            return component in self._open or (not self._open and self._fits(self._round_rdp()))
        return self._fits(gaussian_rdp(self._z(spec), self.orders))

    def begin_round(self) -> bool:
        """Private training: charge this round's DP-SGD steps to the node before anything of
        the round is released, and let each component out once; False (nothing charged, nothing
        let out) if they would exceed the budget. Release noise and open: nothing to do, True.
        """
        t = self.training
        if t is None:
            return True
        self._open = set()
        if not self._fits(self._round_rdp()):
            return False
        self._node.step(t.noise_multiplier, t.steps_per_round, t.sampling_rate)
        for name, spec in self.components.items():
            self._accountants[name].step(spec.noise_multiplier, t.steps_per_round, t.sampling_rate)
        self._open = set(self.components)
        return True

    def spent(self, component: str) -> float:
        """Epsilon spent so far by `component`'s releases on their own (0 under open, inf
        with cancelling noise: no guarantee)."""
        self._spec(component)
        if self.cancel is not None:
            return math.inf
        if self.profile.is_open:
            return 0.0
        return self._accountants[component].epsilon(self.profile.delta)

    def releases(self, component: str) -> int:
        """Releases of `component` made so far."""
        self._spec(component)
        return self._releases[component]

    def charged(self, component: str) -> int:
        """Releases of `component` this gate let out and charged since it was built."""
        self._spec(component)
        return self._charged[component]

    @property
    def released(self) -> int:
        """Releases of all components this gate let out and charged since it was built."""
        return sum(self._charged.values())

    def node_epsilon(self) -> float:
        """Epsilon of everything the node released, all components composed (they come from
        the same learners); 0 under the open profile, inf with cancelling noise (not DP)."""
        if self.cancel is not None:
            return math.inf
        if self.profile.is_open:
            return 0.0
        return self._node.epsilon(self.profile.delta)

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
        if self.cancel is not None:
            if not np.all(np.isfinite(target)):
                raise ValueError(f"{component}: release has a non-finite value")
            self._masks[component] = self.cancel.draw(component, target.size, target.dtype)
            self._releases[component] += 1
            self._charged[component] += 1
            return target, 0.0
        if self.profile.is_open:
            self._releases[component] += 1
            self._charged[component] += 1
            return target, 0.0
        if self.training is not None:
            if component not in self._open:
                raise PrivacyBudgetExhausted(
                    f"{component}: not charged for release: released already this round, or "
                    f"the round's charge was refused (node epsilon {self.node_epsilon():.4g}, "
                    f"budget {self.profile.epsilon:g})"
                )
            if not np.all(np.isfinite(target)):
                raise ValueError(f"{component}: release has a non-finite value")
            self._open.discard(component)
            self._releases[component] += 1
            self._charged[component] += 1
            return target, 0.0
        if not self.can_share(component):
            raise PrivacyBudgetExhausted(
                f"{component}: the node's budget {self.profile.epsilon:g} is spent "
                f"(epsilon {self.node_epsilon():.4g}) after {self._releases[component]} releases"
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
        self._node.step(self._z(spec))
        self._releases[component] += 1
        self._charged[component] += 1
        return target, std

    def edge_masks(self, component: str) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Cancelling noise: this round's masks of `component` per neighbour and each edge's
        std, once per release. Raises PrivacyBudgetExhausted if the round's release did not
        draw them (or they were taken already): the component must not be sent."""
        if self.cancel is None:
            raise ValueError("edge_masks: this node does not send cancelling noise")
        masks = self._masks.pop(component, None)
        if masks is None:
            raise PrivacyBudgetExhausted(
                f"{component}: no cancelling masks drawn for this release (not released this "
                "round, or sent already)"
            )
        return masks, self.cancel.edge_std[component]

    def report(self) -> dict[str, dict[str, Any]]:
        """Per component: modality, clip, sigma, noise_std, releases, epsilon_spent, budget,
        trained, exhausted. JSON-able: infinite clip/budget (open profile) and the infinite
        epsilon of cancelling noise are None."""

        def finite(x: float) -> float | None:
            return x if math.isfinite(x) else None

        return {
            name: {
                "modality": spec.modality,
                "clip": finite(spec.clip),
                "sigma": spec.noise_multiplier,
                "noise_std": spec.noise_std,
                "releases": self._releases[name],
                "epsilon_spent": finite(self.spent(name)),
                "budget": finite(spec.budget),
                "trained": spec.trained,
                "exhausted": not self.can_share(name),
            }
            for name, spec in self.components.items()
        }

    def state(self) -> dict[str, Any]:
        """JSON-able accounting state for the node's checkpoint and release ledger."""
        return {
            "profile": self.profile.name,
            "components": {n: a.state() for n, a in self._accountants.items()},
            "node": self._node.state(),
            "releases": dict(self._releases),
        }

    @staticmethod
    def spend(state: Mapping[str, Any] | None) -> tuple[int, float]:
        """How much a `state()` has spent, to pick the later of two states of one node (both
        only grow): the node accountant's charges, then its summed RDP."""
        if not state:
            return (0, 0.0)
        node = state.get("node")
        if node is None:  # written before node-level accounting: the components' sum
            comps = state.get("components", {}).values()
            return (
                sum(int(c["releases"]) for c in comps),
                float(sum(sum(c["rdp"]) for c in comps)),
            )
        return (int(node["releases"]), float(sum(node["rdp"])))

    def load(self, state: Mapping[str, Any]) -> None:
        """Restore the accounting of a checkpoint or ledger (components not in it start at
        zero)."""
        if state.get("profile") != self.profile.name:
            raise ValueError(
                f"privacy state is for profile {state.get('profile')!r}, "
                f"this node runs {self.profile.name!r}"
            )
        comps = state.get("components", {})
        for name, acc_state in comps.items():
            if name in self._accountants:
                self._accountants[name].load(acc_state)
        if "node" in state:
            self._node.load(state["node"])
        else:  # an older state: every component's releases composed
            self._node = RDPAccountant(self.orders)
            for acc_state in comps.values():
                acc = RDPAccountant(self.orders)
                acc.load(acc_state)
                self._node.rdp += acc.rdp
                self._node.releases += acc.releases
        releases = state.get("releases")
        for name in self._releases:
            if releases is not None:
                self._releases[name] = int(releases.get(name, 0))
            elif name in comps:
                self._releases[name] = int(comps[name]["releases"])
        self._open = set()

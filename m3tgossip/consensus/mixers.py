"""Mixers: how a node combines its state with its neighbours' replicas, behind one interface.

This module owns the choice of aggregator (`gossip.aggregator`) and which settings each one
takes. A `Mixer` updates one component of one node in place, per round, from its own state
`x`, its published copy (the replica its neighbours hold of it), the replicas of the
neighbours heard this round and the round's weight row. Three exist:

- `mean` (`ChocoMixer`): the CHOCO-gossip step over replicas, `kernels.choco_mix_into`. The
  only one that takes the step size `gamma` and the published copy, and so the only one that
  works with a lossy codec (fp16, int8, top-k), whose error feedback rests on that step.
  It is linear in the replicas, so it can also run from their weighted sum (`mix_sum_into`),
  which a node adds up as the replicas arrive instead of holding them all until the mix.
- `clip` (`ClipMixer`): self-centred clipping (He, Karimireddy and Jaggi, 2022). Every
  neighbour's pull `x_j - x_i` is clipped to norm `tau` before the weighted sum, so one
  neighbour can move a node by at most `w_ij * tau` per round. `tau` adapts: by default the
  median of the pull norms, so honest neighbours (a majority) pass unclipped while outliers
  are cut down.
- `trimmed` (`TrimmedMeanMixer`): coordinate-wise trimmed mean. For each coordinate, drop the
  `trim` largest and smallest of {own, neighbours'} values and average the rest; no weights.

`make_mixer` builds one from the node's settings and refuses settings the chosen mixer would
silently ignore. With no replicas heard, every mixer leaves `x` unchanged. numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from m3tgossip.consensus.kernels import choco_mix_into, choco_sum_into

#: the aggregator names `make_mixer` knows (`gossip.aggregator`)
AGGREGATORS = ("mean", "clip", "trimmed")

#: what a mixer may use: the round's weight row, the neighbours' replicas, the CHOCO step size
#: and the node's published copy
MIXER_INPUTS = frozenset({"weights", "replicas", "gamma", "published"})


class Mixer(Protocol):
    """Updates one component of one node in place from the replicas heard this round."""

    #: the aggregator name (one of `AGGREGATORS`)
    name: str
    #: the inputs and settings this mixer takes, a subset of `MIXER_INPUTS`
    uses: frozenset[str]

    def mix_into(
        self,
        x: np.ndarray,
        published: np.ndarray,
        replicas: Mapping[str, np.ndarray],
        weights: Mapping[str, float],
        self_id: str,
    ) -> None:
        """Mix `x` in place; `replicas` are the neighbours heard this round, `weights` the
        round's row renormalised over them (`self_id` and the ids of `replicas`)."""
        ...


@dataclass(frozen=True)
class ChocoMixer:
    """`mean`: `x += gamma * sum_j w_ij * (replicas[j] - published)`, the CHOCO-gossip step."""

    gamma: float = 1.0
    name = "mean"
    uses = frozenset({"weights", "replicas", "gamma", "published"})

    def __post_init__(self) -> None:
        _check_gamma(self.gamma)

    def mix_into(
        self,
        x: np.ndarray,
        published: np.ndarray,
        replicas: Mapping[str, np.ndarray],
        weights: Mapping[str, float],
        self_id: str,
    ) -> None:
        """The CHOCO step; with `gamma = 1` and exact replicas, the weighted average."""
        if self_id not in weights:
            raise ValueError(f'weights have no entry for self "{self_id}"')
        choco_mix_into(x, published, replicas, weights, gamma=self.gamma)

    def coefficient(self, weight: float) -> float:
        """The factor of a replica of weight `weight` in the step's sum: `gamma * weight`."""
        return self.gamma * weight

    def mix_sum_into(
        self, x: np.ndarray, published: np.ndarray, total: np.ndarray, weight_sum: float
    ) -> None:
        """The CHOCO step from `total = sum_j coefficient(w_ij) * replicas[j]` over the
        replicas heard and `weight_sum = sum_j w_ij` over the same: `mix_into`'s result up to
        float rounding, without the replicas."""
        choco_sum_into(x, published, total, weight_sum, gamma=self.gamma)


@dataclass(frozen=True)
class ClipMixer:
    """`clip`: `x += sum_j w_ij * clip(replicas[j] - x, tau)`, tau the median pull norm."""

    name = "clip"
    uses = frozenset({"weights", "replicas"})

    def mix_into(
        self,
        x: np.ndarray,
        published: np.ndarray,
        replicas: Mapping[str, np.ndarray],
        weights: Mapping[str, float],
        self_id: str,
    ) -> None:
        """Self-centred clipping of the pulls towards the replicas; `published` is not read."""
        if replicas:
            clipped_mix_into(x, self_id, replicas, weights)


@dataclass(frozen=True)
class TrimmedMeanMixer:
    """`trimmed`: `x` becomes the coordinate-wise `trim`-trimmed mean of x and the replicas."""

    trim: int = 1
    name = "trimmed"
    uses = frozenset({"replicas"})

    def __post_init__(self) -> None:
        _check_trim(self.trim)

    def mix_into(
        self,
        x: np.ndarray,
        published: np.ndarray,
        replicas: Mapping[str, np.ndarray],
        weights: Mapping[str, float],
        self_id: str,
    ) -> None:
        """The trimmed mean over {x, replicas}; `published` and `weights` are not read."""
        if replicas:
            trimmed_mean_into(x, replicas, self.trim)


def make_mixer(
    aggregator: str,
    *,
    trim: int = 1,
    gamma: float = 1.0,
    lossy_codec: bool = False,
    noise_aware: bool = False,
    time_varying: bool = False,
) -> Mixer:
    """The mixer `gossip.aggregator` names, for a node with these settings.

    `trim` is `gossip.trim` (only `trimmed` trims), `gamma` is `gossip.gamma` (only `mean`
    steps), `lossy_codec` is whether some shared component goes out through a lossy codec
    (fp16, int8, top-k: their error feedback needs the CHOCO step over published copies),
    `noise_aware` is whether `gossip.noise_strength > 0` shapes the weights and `time_varying`
    whether the weights are a time-varying topology's round row. ValueError naming the
    aggregator and every conflicting setting if the mixer would ignore one of them, or if the
    aggregator is unknown.
    """
    mixer: Mixer
    if aggregator == "mean":
        mixer = ChocoMixer(gamma)
    elif aggregator == "clip":
        mixer = ClipMixer()
    elif aggregator == "trimmed":
        mixer = TrimmedMeanMixer(trim)
    else:
        raise ValueError(
            f'gossip.aggregator = "{aggregator}": unknown (known: {", ".join(AGGREGATORS)})'
        )
    _check_gamma(gamma)
    _check_trim(trim)
    settings = (trim, gamma, lossy_codec, noise_aware, time_varying)
    ignored = _ignored(aggregator, *settings)
    if ignored:
        fitting = " or ".join(f'"{a}"' for a in AGGREGATORS if not _ignored(a, *settings))
        hint = f"use gossip.aggregator = {fitting}" if fitting else "no aggregator takes them all"
        raise ValueError(
            f'gossip.aggregator = "{aggregator}" ignores ' + "; ".join(ignored) + f"; {hint}"
        )
    return mixer


#: what each aggregator's mixer uses, by name
_USES: dict[str, frozenset[str]] = {
    ChocoMixer.name: ChocoMixer.uses,
    ClipMixer.name: ClipMixer.uses,
    TrimmedMeanMixer.name: TrimmedMeanMixer.uses,
}


def _ignored(
    aggregator: str,
    trim: int,
    gamma: float,
    lossy_codec: bool,
    noise_aware: bool,
    time_varying: bool,
) -> list[str]:
    """The settings `aggregator`'s mixer would ignore, each as a phrase for the error."""
    uses = _USES[aggregator]
    out = []
    if gamma != 1.0 and "gamma" not in uses:
        out.append(f'gossip.gamma = {gamma:g} (the CHOCO step size of "mean")')
    if trim != 1 and aggregator != TrimmedMeanMixer.name:
        out.append(f'gossip.trim = {trim} (only "trimmed" trims)')
    if lossy_codec and "published" not in uses:
        out.append(
            "the published copy, on whose CHOCO step the error feedback of a lossy codec "
            "rests (gossip.compression or gossip.compress = fp16, int8 or topk:F)"
        )
    if noise_aware and "weights" not in uses:
        out.append("the noise-aware weights that gossip.noise_strength > 0 asks for")
    if time_varying and "weights" not in uses:
        out.append("the weights of the time-varying topology's round row")
    return out


def _check_gamma(gamma: float) -> None:
    ok = isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and 0.0 < gamma <= 1.0
    if not ok:
        raise ValueError(f"gossip.gamma: a number in (0, 1], got {gamma!r}")


def _check_trim(trim: int) -> None:
    if not isinstance(trim, int) or isinstance(trim, bool) or trim < 0:
        raise ValueError(f"gossip.trim: an integer >= 0, got {trim!r}")


# --- the robust kernels --------------------------------------------------------------------


def _check_replicas(own: np.ndarray, replicas: Mapping[str, np.ndarray]) -> None:
    for j, r in replicas.items():
        if r.shape != own.shape:
            raise ValueError(f'replica of "{j}" has shape {r.shape}, expected {own.shape}')


def clip_tau(own: np.ndarray, replicas: Mapping[str, np.ndarray]) -> float:
    """The clipping radius: median distance from `own` to the neighbours' values."""
    if not replicas:
        return 0.0
    return float(np.median([np.linalg.norm(r - own) for r in replicas.values()]))


def clipped_mix_into(
    own: np.ndarray,
    self_id: str,
    replicas: Mapping[str, np.ndarray],
    weights: Mapping[str, float],
    tau: float | None = None,
) -> float:
    """`own += sum_j w_ij * clip(replicas[j] - own, tau)`, in place; returns tau used.

    `tau` None takes `clip_tau`; a tau of 0 leaves `own` unchanged. Every replica needs a
    weight (`self_id`'s own weight is not read: its pull is zero).
    """
    _check_replicas(own, replicas)
    for j in replicas:
        if j not in weights:
            raise KeyError(f'no weight for the replica of "{j}" (renormalise over those heard)')
    if tau is None:
        tau = clip_tau(own, replicas)
    total = np.zeros(own.shape, dtype=np.float64)
    for j, r in replicas.items():
        pull = r.astype(np.float64) - own
        norm = float(np.linalg.norm(pull))
        if norm > tau > 0.0:
            pull *= tau / norm
        elif tau == 0.0:
            continue
        total += weights[j] * pull
    own += total.astype(own.dtype, copy=False)
    return tau


def trimmed_mean_into(own: np.ndarray, replicas: Mapping[str, np.ndarray], trim: int = 1) -> None:
    """Replace `own` by the coordinate-wise trimmed mean of own and neighbours' values.

    With fewer than `2 * trim + 1` values the trim shrinks so that at least one value is left.
    """
    _check_replicas(own, replicas)
    stack = np.stack([own.astype(np.float64), *(r.astype(np.float64) for r in replicas.values())])
    n = stack.shape[0]
    k = max(0, min(trim, (n - 1) // 2))
    if k:
        stack.sort(axis=0)
        stack = stack[k : n - k]
    own[...] = stack.mean(axis=0)

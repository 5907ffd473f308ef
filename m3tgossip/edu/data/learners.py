"""Learners: the latent profiles every modality of a record is rendered from, and the label skew.

Every record is one learner in one course week, drawn from a latent profile: ability,
engagement (correlated with ability), workload, stress (raised by workload and by being a
first-generation student, lowered by ability) and the groups gender, first_generation,
language and disability, in the proportions of the learner's institution.

Labels drawn here: `at_risk` (fail or withdraw) from ability, engagement and stress with noise;
`engagement` (low, medium, high) and `stress` (no, yes) from their latents with noise.

Non-IID label skew: each node draws its proportions of the six (at_risk, engagement) label
cells from Dirichlet(alpha * 6 * p), p being its institution's own cell proportions, and keeps
candidate learners until the counts match (smaller alpha, stronger skew). The other labels
follow from the learners kept.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from m3tgossip.edu.data.config import DataConfig
from m3tgossip.edu.data.draws import entropy
from m3tgossip.edu.data.institutions import Institution, institution_profile

_CELLS = 6  # at_risk (2) x engagement (3)
_MAX_BATCHES = 64


def draw_learners(inst: Institution, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Latent profiles, groups and the at_risk, engagement and stress labels of n learners."""
    female, nonbinary = inst.female_share, inst.nonbinary_share
    gender = rng.choice(
        np.array(["female", "male", "nonbinary"], "<U16"),
        n,
        p=[female, 1 - female - nonbinary, nonbinary],
    )
    first_gen = rng.random(n) < inst.first_gen_share
    language = np.where(rng.random(n) < inst.second_share, inst.second_language, inst.language)
    disability = rng.random(n) < inst.disability_share
    z = rng.standard_normal((n, 7))
    ability = inst.ability_mean + z[:, 0]
    engagement = inst.engagement_mean + 0.35 * z[:, 0] + 0.94 * z[:, 1]
    workload = z[:, 2]
    stress = inst.stress_mean + 0.55 * workload - 0.25 * z[:, 0] + 0.3 * first_gen + 0.75 * z[:, 3]
    risk = inst.risk_offset - 1.3 * ability - 0.9 * engagement + 0.35 * stress + 0.6 * z[:, 4]
    at_risk = (risk > 0).astype(np.int64)
    engagement_level = np.digitize(engagement + 0.45 * z[:, 5], [-0.5, 0.5]).astype(np.int64)
    return {
        "ability": ability,
        "engagement": engagement,
        "workload": workload,
        "stress": stress,
        "gender": gender,
        "first_generation": first_gen,
        "language": language.astype("<U16"),
        "disability": disability,
        "at_risk": at_risk,
        "engagement_level": engagement_level,
        "stress_label": (stress + 0.45 * z[:, 6] > 0.5).astype(np.int64),
        "cell": at_risk * 3 + engagement_level,
    }


@lru_cache(maxsize=256)
def _cell_prior(name: str, seed: int) -> np.ndarray:
    """The institution's proportions of the six (at_risk, engagement) cells, floored at 0.5%."""
    rng = np.random.default_rng(np.random.SeedSequence(entropy(seed, "cells", name)))
    cells = draw_learners(institution_profile(name, seed), rng, 8192)["cell"]
    prior = np.maximum(np.bincount(cells, minlength=_CELLS) / len(cells), 0.005)
    prior /= prior.sum()
    prior.setflags(write=False)  # cached and shared
    return prior


def _largest_remainder(share: np.ndarray, n: int) -> np.ndarray:
    """Integer counts that sum to n, each within 1 of share * n (largest-remainder rounding)."""
    raw = share * n
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    return counts


def node_share(inst: Institution, config: DataConfig, rng: np.random.Generator) -> np.ndarray:
    """The node's Dirichlet draw of the six label cells' proportions (its label skew)."""
    return rng.dirichlet(config.alpha * _CELLS * _cell_prior(inst.name, config.seed))


def skewed_learners(
    inst: Institution,
    config: DataConfig,
    rng: np.random.Generator,
    n: int,
    share: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """n learners whose label cells follow the node's Dirichlet draw, in random order.

    The draw is the first thing taken from `rng` (`node_share`) unless `share` gives it.
    """
    if share is None:
        share = node_share(inst, config, rng)
    need = _largest_remainder(share, n)
    parts: list[dict[str, np.ndarray]] = []
    for _ in range(_MAX_BATCHES):
        batch = draw_learners(inst, rng, max(2 * n, 512))
        take = np.concatenate(
            [np.flatnonzero(batch["cell"] == c)[: need[c]] for c in range(_CELLS)]
        )
        parts.append({k: v[take] for k, v in batch.items()})
        need -= np.bincount(batch["cell"][take], minlength=_CELLS)
        if need.sum() == 0:
            break
    else:
        # a cell too rare to fill: its remaining quota goes to learners of any cell
        spare = np.setdiff1d(np.arange(len(batch["cell"])), take)[: need.sum()]
        parts.append({k: v[spare] for k, v in batch.items()})
    order = rng.permutation(n)
    return {k: np.concatenate([p[k] for p in parts])[order] for k in parts[0]}

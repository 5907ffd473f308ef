"""Institutions: the properties all nodes of one institution share, from its name and the seed.

Institutions differ. Their properties come from a hash of the institution name and the
federation seed, so all nodes of one institution agree without talking: main and second
language and the share of learners writing in the second one, subject domain (its vocabulary
is in `m3tgossip.edu.data.text`), group mix (institutions teaching mathematics or programming
have few women; second-language and disabled learners are minorities everywhere), means of the
latents and the at-risk base rate, skill difficulty, platform habits and how often a reflection
or a wearable recording is missing. A node without an institution is its own institution.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from m3tgossip.edu.data.draws import entropy
from m3tgossip.edu.data.schema import ACTIVITIES, PRIME_DIGITS, SKILLS

LANGUAGES = ("en", "es", "fr")
#: subject domains an institution teaches, in the order its profile draws from
DOMAINS = ("biology", "history", "mathematics", "programming")


@dataclass(frozen=True)
class Institution:
    """The properties all nodes of one institution share (see `institution_profile`)."""

    name: str
    language: str
    second_language: str
    second_share: float
    domain: str
    female_share: float
    nonbinary_share: float
    first_gen_share: float
    disability_share: float
    mature_share: float
    ability_mean: float
    engagement_mean: float
    stress_mean: float
    risk_offset: float
    text_missing: float
    signal_missing: float
    phrase_offset: int
    token_bias: np.ndarray  # [len(ACTIVITIES)]
    skill_weights: np.ndarray  # [SKILLS], sums to 1
    skill_offset: np.ndarray  # [SKILLS]
    prime_weights: np.ndarray  # [len(PRIME_DIGITS)], sums to 1

    def __post_init__(self) -> None:
        for array in (self.token_bias, self.skill_weights, self.skill_offset, self.prime_weights):
            array.setflags(write=False)  # profiles are cached and shared


@lru_cache(maxsize=256)
def institution_profile(name: str, seed: int) -> Institution:
    """The institution's properties, a pure function of its name and the federation seed."""
    rng = np.random.default_rng(np.random.SeedSequence(entropy(seed, "institution", name)))
    language = str(rng.choice(LANGUAGES, p=[0.6, 0.2, 0.2]))
    second = str(rng.choice([lang for lang in LANGUAGES if lang != language]))
    domain = str(rng.choice(DOMAINS))
    stem = domain in ("mathematics", "programming")  # few women, as in many STEM programmes
    return Institution(
        name=name,
        language=language,
        second_language=second,
        second_share=float(rng.uniform(0.02, 0.45)),
        domain=domain,
        female_share=float(rng.uniform(0.12, 0.3) if stem else rng.uniform(0.45, 0.65)),
        nonbinary_share=float(rng.uniform(0.01, 0.05)),
        first_gen_share=float(rng.uniform(0.1, 0.5)),
        disability_share=float(rng.uniform(0.03, 0.15)),
        mature_share=float(rng.uniform(0.1, 0.5)),
        ability_mean=float(rng.normal(0.0, 0.3)),
        engagement_mean=float(rng.normal(0.0, 0.3)),
        stress_mean=float(rng.normal(0.0, 0.25)),
        risk_offset=float(rng.uniform(-1.8, -0.5)),
        text_missing=float(rng.uniform(0.02, 0.15)),
        signal_missing=float(rng.uniform(0.0, 0.12)),
        phrase_offset=int(rng.integers(3)),
        token_bias=rng.normal(0.0, 0.3, len(ACTIVITIES)),
        skill_weights=rng.dirichlet(np.full(SKILLS, 2.0)),
        skill_offset=rng.normal(0.0, 0.4, SKILLS),
        prime_weights=rng.dirichlet(np.full(len(PRIME_DIGITS), 3.0)),
    )

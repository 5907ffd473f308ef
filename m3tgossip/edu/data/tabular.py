"""The tabular modality: a learner's registration and activity summary, `TABULAR_FEATURES`.

Each feature is on a standard scale against a fixed reference population (never per-node
statistics). First-generation students get lower prior-education and higher deprivation values
at the same ability: a proxy bias the equity metrics can show.
"""

from __future__ import annotations

import numpy as np

from m3tgossip.edu.data.institutions import Institution
from m3tgossip.edu.data.schema import TABULAR_DIM


def tabular_features(
    inst: Institution, people: dict[str, np.ndarray], rng: np.random.Generator
) -> np.ndarray:
    """`TABULAR_FEATURES` on a standard scale against the reference population."""
    n = len(people["ability"])
    a, e, s, w = people["ability"], people["engagement"], people["stress"], people["workload"]
    fg = people["first_generation"].astype(float)
    noise = rng.standard_normal((n, TABULAR_DIM))
    age = np.where(rng.random(n) < inst.mature_share, 1 + (rng.random(n) < 0.25), 0)
    attempts = rng.poisson(np.exp(-1.5 - 0.5 * a))
    columns = [
        0.7 * a - 0.35 * fg + 0.6 * noise[:, 0],  # prior_education
        0.7 * w + 0.7 * noise[:, 1],  # credits
        0.7 * e + 0.6 * noise[:, 2],  # active_days
        0.5 * e + 0.3 * a + 0.6 * noise[:, 3],  # submission_rate
        0.7 * a + 0.2 * e + 0.6 * noise[:, 4],  # mean_score
        (age - 0.4) / 0.6,  # age_band
        (attempts - 0.25) / 0.55,  # previous_attempts
        0.6 * e + 0.7 * noise[:, 7],  # click_volume
        -0.5 * e - 0.2 * a + 0.3 * s + 0.7 * noise[:, 8],  # late_submissions
        0.7 * fg - 0.25 + 0.8 * noise[:, 9],  # deprivation
        0.5 * e + 0.2 * w + 0.7 * noise[:, 10],  # activity_breadth
        0.4 * e + 0.9 * noise[:, 11],  # registration_lead
    ]
    return np.stack(columns, axis=1).astype(np.float32)

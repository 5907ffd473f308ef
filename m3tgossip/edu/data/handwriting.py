"""The image modality: the learner's handwritten answer to a worksheet item, a real digit.

The item is "write a prime number below 10". The answer is a digit from scikit-learn's bundled
`load_digits` (scaled to [0, 1], shifted by a pixel now and then, with pen noise that is
stronger for learners with a motor disability). The `handwriting` label is 1 exactly when the
digit is one of `PRIME_DIGITS`, so correctness is readable from the image alone; learners of
low ability write a wrong digit more often. Test records draw from a quarter of the digit
images that train records never use.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from m3tgossip.edu.data.draws import sigmoid
from m3tgossip.edu.data.institutions import Institution
from m3tgossip.edu.data.schema import PRIME_DIGITS


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled handwritten digits: images [1797, 1, 8, 8] in [0, 1], labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32)[:, None], digits.target.astype(np.int64)


_WRONG_DIGITS = (0, 1, 4, 6, 8, 9)
_WRONG_WEIGHTS = np.array([1.0, 3.0, 1.5, 1.0, 1.0, 2.0]) / 9.5


def handwritten_answers(
    inst: Institution, people: dict[str, np.ndarray], is_test: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Handwritten answers [n, 1, 8, 8] and the handwriting labels [n] (1 = prime digit)."""
    images, targets = _digits()
    n = len(people["ability"])
    correct = rng.random(n) < sigmoid(1.3 * people["ability"] + 0.4)
    digit = np.where(
        correct,
        rng.choice(PRIME_DIGITS, n, p=inst.prime_weights),
        rng.choice(_WRONG_DIGITS, n, p=_WRONG_WEIGHTS),
    )
    held_out = np.arange(len(targets)) % 4 == 0
    source = np.empty(n, np.int64)
    for d in range(10):
        for test in (False, True):
            rows = np.flatnonzero((digit == d) & (is_test == test))
            pool = np.flatnonzero((targets == d) & (held_out == test))
            source[rows] = rng.choice(pool, len(rows))
    padded = np.pad(images[source], ((0, 0), (0, 0), (1, 1), (1, 1)))
    shift = np.where(rng.random((n, 2)) < 0.3, rng.integers(0, 3, (n, 2)), 1)
    out = np.stack([padded[i, :, y : y + 8, x : x + 8] for i, (y, x) in enumerate(shift)])
    out += rng.normal(0, 1, out.shape) * (0.04 + 0.08 * people["disability"])[:, None, None, None]
    return np.clip(out, 0.0, 1.0).astype(np.float32), correct.astype(np.int64)

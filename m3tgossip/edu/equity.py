"""Group gaps of a node's predictions: accuracy, true and false positive rates, ABROCA.

For every binary task and every group attribute, the largest group of the attribute (the
majority) is compared with each other group that has at least `MIN_MEMBERS` labelled records
of both classes, and the worst of those comparisons (largest ABROCA) is reported:

    acc_gap   majority accuracy minus the group's (signed: > 0, the group is served worse)
    tpr_gap   majority true positive rate minus the group's (signed)
    fpr_gap   the group's false positive rate minus the majority's (signed: > 0, the group is
              flagged wrongly more often)
    abroca    the absolute area between the two groups' ROC curves (Gardner et al., 2019):
              0 when the score ranks both groups alike, whatever the threshold
    p_value   randomization test of the ABROCA: the group labels of the two groups' records
              are permuted `permutations` times and the share of permuted ABROCAs at least as
              large as the observed one is reported ((1 + k) / (1 + permutations)), so a small
              value says the gap is unlikely under no group difference

Multi-class tasks (engagement) are left out: their rates have no single positive class.
Everything here is numpy on arrays the node already holds; nothing is sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

#: labelled records of each class a group needs to be compared
MIN_MEMBERS = 5
#: points of the common false positive rate grid the ROC curves are compared on
GRID = np.linspace(0.0, 1.0, 201)


def roc(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the score for labels y in {0, 1}, from (0, 0) to (1, 1), ties as one step."""
    order = np.argsort(-score, kind="stable")
    s, yy = score[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the end of each run of equal scores
    tps = np.cumsum(yy)[last]
    fps = np.cumsum(1 - yy)[last]
    tpr = np.r_[0.0, tps / max(tps[-1], 1)]
    fpr = np.r_[0.0, fps / max(fps[-1], 1)]
    return fpr, tpr


def abroca(y: np.ndarray, score: np.ndarray, in_a: np.ndarray) -> float:
    """Absolute area between the ROC curves of the records in `in_a` and the others."""
    fa, ta = roc(y[in_a], score[in_a])
    fb, tb = roc(y[~in_a], score[~in_a])
    gap = np.abs(np.interp(GRID, fa, ta) - np.interp(GRID, fb, tb))
    return float(np.sum((gap[1:] + gap[:-1]) * np.diff(GRID)) / 2)


def _rates(y: np.ndarray, pred: np.ndarray) -> tuple[float, float, float]:
    """(accuracy, true positive rate, false positive rate)."""
    pos, neg = y == 1, y == 0
    return (
        float(np.mean(pred == y)),
        float(np.mean(pred[pos] == 1)) if pos.any() else float("nan"),
        float(np.mean(pred[neg] == 1)) if neg.any() else float("nan"),
    )


def compare(
    y: np.ndarray,
    score: np.ndarray,
    pred: np.ndarray,
    in_group: np.ndarray,
    *,
    permutations: int,
    rng: np.random.Generator,
) -> dict[str, float]:
    """Gaps of the records `in_group` against the others (the majority) among y, score, pred."""
    acc_m, tpr_m, fpr_m = _rates(y[~in_group], pred[~in_group])
    acc_g, tpr_g, fpr_g = _rates(y[in_group], pred[in_group])
    observed = abroca(y, score, in_group)
    at_least = sum(
        abroca(y, score, rng.permutation(in_group)) >= observed - 1e-12 for _ in range(permutations)
    )
    return {
        "acc_gap": acc_m - acc_g,
        "tpr_gap": tpr_m - tpr_g,
        "fpr_gap": fpr_g - fpr_m,
        "abroca": observed,
        "p_value": (1 + at_least) / (1 + permutations),
    }


def group_gaps(
    labels: Mapping[str, np.ndarray],
    scores: Mapping[str, np.ndarray],
    groups: Mapping[str, np.ndarray],
    *,
    permutations: int = 100,
    seed: int = 0,
) -> dict[str, dict[str, dict[str, Any]]]:
    """{task: {attribute: {"majority", "group", "n_majority", "n_group", gaps...}}} for every
    binary task in `labels` (-1 = unlabelled) with its positive-class `scores`, and every
    attribute in `groups` that has a comparable minority group (see the module docstring)."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for task, y_all in labels.items():
        known = y_all >= 0
        if task not in scores or not known.any() or y_all[known].max() > 1:
            continue
        y, score = y_all[known].astype(np.int64), scores[task][known]
        pred = (score >= 0.5).astype(np.int64)
        for attribute, values_all in groups.items():
            values = values_all[known]
            names, counts = np.unique(values, return_counts=True)
            majority = names[np.argmax(counts)]
            worst: dict[str, Any] | None = None
            for name in names:
                if name == majority:
                    continue
                pair = (values == name) | (values == majority)
                member = values[pair] == name
                yp = y[pair]
                if min(np.sum(yp[member] == c) for c in (0, 1)) < MIN_MEMBERS:
                    continue
                if min(np.sum(yp[~member] == c) for c in (0, 1)) < MIN_MEMBERS:
                    continue
                gaps = compare(
                    yp, score[pair], pred[pair], member, permutations=permutations, rng=rng
                )
                if worst is None or gaps["abroca"] > worst["abroca"]:
                    worst = {
                        "majority": str(majority),
                        "group": str(name),
                        "n_majority": int((~member).sum()),
                        "n_group": int(member.sum()),
                        **gaps,
                    }
            if worst is not None:
                out.setdefault(task, {})[attribute] = worst
    return out


# ------------------------------------------------------------------ federation-wide, from counts

#: score bins of the counts; bin BINS // 2 starts at 0.5, so "bin >= BINS // 2" is the
#: prediction at threshold 0.5 and the binned rates match the records' rates exactly
BINS = 20
#: the binary tasks and group values counted (a value not listed is counted as "other")
COUNTED_TASKS = ("at_risk", "stress", "handwriting", "next_response")
COUNTED_GROUPS: dict[str, tuple[str, ...]] = {
    "gender": ("female", "male", "nonbinary"),
    "first_generation": ("no", "yes"),
    "language": ("en", "es", "fr"),
    "disability": ("no", "yes"),
}
OTHER = "other"


def count_keys() -> list[tuple[str, str, str]]:
    """The (task, attribute, value) cells of a count vector, in its order; each cell holds
    2 x BINS counts (label 0 then label 1, by score bin)."""
    return [
        (t, a, v) for t in COUNTED_TASKS for a, vs in COUNTED_GROUPS.items() for v in (*vs, OTHER)
    ]


def count_vector(
    labels: Mapping[str, np.ndarray],
    scores: Mapping[str, np.ndarray],
    groups: Mapping[str, np.ndarray],
) -> np.ndarray:
    """A node's counts of labelled records per task, group value, label and score bin, as one
    float64 vector in `count_keys` order (zeros for what the node does not have). Summing the
    vectors of several nodes gives the counts of all their records together, which is what
    consensus averaging (times the number of nodes) computes without moving a record."""
    keys = count_keys()
    out = np.zeros((len(keys), 2, BINS))
    where = {k: i for i, k in enumerate(keys)}
    for task in COUNTED_TASKS:
        if task not in labels or task not in scores:
            continue
        y_all = np.asarray(labels[task])
        known = y_all >= 0
        if not known.any() or y_all[known].max() > 1:
            continue
        y = y_all[known].astype(np.int64)
        b = np.clip((np.asarray(scores[task])[known] * BINS).astype(np.int64), 0, BINS - 1)
        for attribute, listed in COUNTED_GROUPS.items():
            if attribute not in groups:
                continue
            values = np.asarray(groups[attribute])[known]
            for value in (*listed, OTHER):
                member = ~np.isin(values, listed) if value == OTHER else values == value
                cell = out[where[(task, attribute, value)]]
                np.add.at(cell, (y[member], b[member]), 1.0)
    return out.reshape(-1)


def gaps_from_counts(
    vector: np.ndarray, *, permutations: int = 100, seed: int = 0
) -> dict[str, dict[str, dict[str, Any]]]:
    """`group_gaps` of the records a count vector describes, scored at their bins' centres:
    the same figures (worst group per task and attribute, its gaps, ABROCA on the binned
    scores and the randomization p-value), from counts alone. Counts are rounded to whole
    records (an average times the number of nodes is a count up to rounding)."""
    keys = count_keys()
    cells = np.rint(np.asarray(vector, dtype=np.float64).reshape(len(keys), 2, BINS))
    cells = np.clip(cells, 0, None).astype(np.int64)
    centres = (np.arange(BINS) + 0.5) / BINS
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for task in COUNTED_TASKS:
        for attribute, listed in COUNTED_GROUPS.items():
            y_parts, s_parts, g_parts = [], [], []
            for value in (*listed, OTHER):
                cell = cells[keys.index((task, attribute, value))]
                for label in (0, 1):
                    n = cell[label]
                    y_parts.append(np.full(int(n.sum()), label))
                    s_parts.append(np.repeat(centres, n))
                    g_parts.append(np.full(int(n.sum()), value, dtype="<U16"))
            y = np.concatenate(y_parts)
            if not len(y):
                continue
            found = group_gaps(
                {task: y},
                {task: np.concatenate(s_parts)},
                {attribute: np.concatenate(g_parts)},
                permutations=permutations,
                seed=seed,
            )
            if task in found:
                out.setdefault(task, {}).update(found[task])
    return out

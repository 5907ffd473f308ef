"""Group gaps of predictions: ROC, ABROCA, rate gaps and the randomization test."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from m3tgossip.edu.equity import BINS, abroca, count_vector, gaps_from_counts, group_gaps, roc


def _auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    return float(np.sum((tpr[1:] + tpr[:-1]) * np.diff(fpr)) / 2)


def test_roc_matches_scikit_learn_with_ties() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    score = np.round(rng.random(400) * 0.5 + 0.4 * y, 2)  # many ties
    fpr, tpr = roc(y, score)
    ref_fpr, ref_tpr, _ = roc_curve(y, score, drop_intermediate=False)
    assert _auc(fpr, tpr) == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)  # one point per distinct score
    np.testing.assert_allclose(tpr, ref_tpr, atol=1e-12)


def test_abroca_is_zero_for_alike_groups_and_large_for_a_blind_one() -> None:
    rng = np.random.default_rng(1)
    n = 2000
    y = rng.integers(0, 2, n)
    member = rng.random(n) < 0.3
    good = y + rng.normal(0, 0.5, n)
    assert abroca(y, good, member) < 0.05
    blind = np.where(member, rng.random(n), good)  # the model cannot rank the group at all
    # the other group's AUC is about 0.92, the blind group's 0.5: the area between is the gap
    gap = roc_auc_score(y[~member], good[~member]) - 0.5
    assert abroca(y, blind, member) == pytest.approx(gap, abs=0.06)


def test_group_gaps_finds_the_group_served_worse_and_tests_it() -> None:
    rng = np.random.default_rng(2)
    n = 600
    y = rng.integers(0, 2, n)
    language = np.where(rng.random(n) < 0.25, "es", "en")
    gender = rng.choice(np.array(["female", "male"]), n)
    noise = np.where(language == "es", 2.0, 0.3)  # the second-language learners get noise
    logit = (2 * y - 1) * 1.5 + rng.normal(0, 1, n) * noise
    score = 1 / (1 + np.exp(-logit))
    labels = {"at_risk": y, "engagement": rng.integers(0, 3, n), "stress": np.full(n, -1)}
    out = group_gaps(
        labels,
        {"at_risk": score},
        {"language": language, "gender": gender},
        permutations=200,
    )
    assert set(out) == {"at_risk"}  # multi-class and unlabelled tasks are left out
    lang, sex = out["at_risk"]["language"], out["at_risk"]["gender"]
    assert (lang["majority"], lang["group"]) == ("en", "es")
    assert lang["acc_gap"] > 0.1 and lang["tpr_gap"] > 0 and lang["abroca"] > 0.1
    assert lang["p_value"] < 0.01  # unlikely without a real group difference
    assert sex["abroca"] < lang["abroca"] and sex["p_value"] > 0.05
    assert lang["n_group"] + lang["n_majority"] == n


def test_a_group_too_small_to_compare_is_left_out() -> None:
    y = np.array([0, 1] * 50)
    values = np.array(["a"] * 96 + ["b"] * 4)
    out = group_gaps({"at_risk": y}, {"at_risk": np.linspace(0, 1, 100)}, {"g": values})
    assert out == {}


def test_counts_give_the_gaps_of_the_binned_scores_and_add_up_across_nodes() -> None:
    rng = np.random.default_rng(3)
    n = 600
    y = rng.integers(0, 2, n)
    group = np.where(rng.random(n) < 0.3, "yes", "no").astype("<U16")
    score = np.clip(
        0.5 + 0.3 * (2 * y - 1) * np.where(group == "yes", 0.3, 1.0) + rng.normal(0, 0.15, n),
        0,
        0.999,
    )
    labels, groups = {"at_risk": y}, {"disability": group}
    binned = (np.floor(score * BINS) + 0.5) / BINS
    expected = group_gaps(labels, {"at_risk": binned}, groups, seed=5)
    # two nodes' counts of halves of the records add up to the counts of all of them
    half = np.arange(n) < n // 2
    parts = [
        count_vector({"at_risk": y[m]}, {"at_risk": score[m]}, {"disability": group[m]})
        for m in (half, ~half)
    ]
    whole = count_vector(labels, {"at_risk": score}, groups)
    np.testing.assert_array_equal(parts[0] + parts[1], whole)
    assert whole.sum() == n  # one count per record for the one attribute the records have
    # what consensus averaging gives every node, times the number of nodes
    got = gaps_from_counts(np.mean(parts, axis=0) * 2, seed=5)
    assert got["at_risk"]["disability"]["group"] == "yes"
    for key in ("acc_gap", "tpr_gap", "fpr_gap", "abroca"):
        assert got["at_risk"]["disability"][key] == pytest.approx(
            expected["at_risk"]["disability"][key], abs=1e-12
        )
    assert got["at_risk"]["disability"]["acc_gap"] > 0.05

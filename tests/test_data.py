"""The built-in education data: contract, determinism, heterogeneity, skew and learnable signal."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from m3tgossip.edu.data import (
    CLICK_LEN,
    CLICK_VOCAB,
    GROUP_ATTRIBUTES,
    IMAGE_SHAPE,
    MODALITIES,
    PRIME_DIGITS,
    SIGNAL_SHAPE,
    TABULAR_DIM,
    TASKS,
    TOKEN_ID,
    DataConfig,
    EduData,
    institution_profile,
    node_data,
    node_records,
    nonmember_data,
    pooled_data,
    unseen_data,
)
from m3tgossip.edu.data.learners import _cell_prior
from m3tgossip.topology import NodeSpec

INSTITUTIONS = ("uni-a", "uni-b", "college-c", "school-d", "academy-e", "poly-f")


def make_node(
    node_id: str,
    *,
    role: str = "instructor",
    institution: str | None = "uni-a",
    modalities: tuple[str, ...] = MODALITIES,
    tasks: tuple[str, ...] = tuple(TASKS),
) -> NodeSpec:
    return NodeSpec(
        id=node_id,
        index=0,
        role=role,
        institution=institution,
        modalities=modalities,
        tasks=tasks,
        host="127.0.0.1",
        port=None,
        compute="full",
        privacy="open",
        public_key=None,
        local=(),
    )


def both(node: NodeSpec, config: DataConfig) -> EduData:
    return EduData.concat(node_data(node, config))


def assert_same(a: EduData, b: EduData) -> None:
    assert a.text == b.text
    for name in ("image", "signal", "clickstream", "tabular"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    for part in ("present", "labels", "groups"):
        for key, value in getattr(a, part).items():
            np.testing.assert_array_equal(value, getattr(b, part)[key])


# ----------------------------------------------------------------------------- contract


def test_shapes_and_dtypes() -> None:
    config = DataConfig(records=100, test_fraction=0.3)
    train, test = node_data(make_node("uni-a-1"), config)
    assert (len(train), len(test)) == (70, 30)
    for data in (train, test):
        n = len(data)
        assert isinstance(data.text, list) and all(isinstance(t, str) for t in data.text)
        assert data.image.shape == (n, *IMAGE_SHAPE) and data.image.dtype == np.float32
        assert data.signal.shape == (n, *SIGNAL_SHAPE) and data.signal.dtype == np.float32
        assert data.clickstream.shape == (n, CLICK_LEN) and data.clickstream.dtype == np.int64
        assert data.tabular.shape == (n, TABULAR_DIM) and data.tabular.dtype == np.float32
        assert set(data.present) == set(MODALITIES)
        assert all(v.dtype == bool and v.shape == (n,) for v in data.present.values())
        assert set(data.labels) == set(TASKS)
        for task, classes in TASKS.items():
            assert data.labels[task].dtype == np.int64
            assert set(np.unique(data.labels[task])) <= set(range(classes))
        assert set(data.groups) == set(GROUP_ATTRIBUTES)
        assert all(v.dtype == np.dtype("<U16") for v in data.groups.values())
        assert 0.0 <= data.image.min() and data.image.max() <= 1.0
        assert np.isfinite(data.signal).all() and np.isfinite(data.tabular).all()
        assert data.clickstream.min() >= 0 and data.clickstream.max() < CLICK_VOCAB


def test_records_scale_with_role() -> None:
    config = DataConfig(records=80)
    counts = {}
    for role in ("institution", "instructor", "student"):
        node = make_node(f"n-{role}", role=role)
        train, test = node_data(node, config)
        counts[role] = len(train) + len(test)
        assert counts[role] == node_records(node, config)
    assert counts == {"institution": 160, "instructor": 80, "student": 8}


def test_clickstream_sessions_are_well_formed() -> None:
    data = both(make_node("uni-a-1"), DataConfig(records=60))
    answers = data.clickstream >= TOKEN_ID["quiz_correct_0"]
    for tokens, is_answer in zip(data.clickstream, answers, strict=True):
        length = int((tokens != 0).sum())
        assert (tokens[:length] != 0).all() and (tokens[length:] == 0).all()  # right padding
        assert tokens[0] == TOKEN_ID["login"] and tokens[length - 1] == TOKEN_ID["logout"]
        start = list(tokens).index(TOKEN_ID["quiz_start"])
        count = int(is_answer.sum())
        assert count >= 2 and is_answer[start + 1 : start + 1 + count].all()
        assert tokens[start + 1 + count] == TOKEN_ID["quiz_submit"]


def test_absent_modalities_and_unserved_tasks() -> None:
    node = make_node("uni-a-2", modalities=("clickstream", "tabular"), tasks=("at_risk",))
    data = both(node, DataConfig(records=60))
    assert data.present["clickstream"].all() and data.present["tabular"].all()
    for modality in ("text", "image", "signal"):
        assert not data.present[modality].any()
    assert data.text == [""] * len(data)
    assert not data.image.any() and not data.signal.any()
    assert set(np.unique(data.labels["at_risk"])) == {0, 1}
    for task in ("engagement", "stress", "handwriting", "next_response"):
        assert (data.labels[task] == -1).all()


def test_missing_records_within_collected_modalities() -> None:
    data = both(make_node("uni-a-3", modalities=("text", "signal")), DataConfig(records=200))
    assert (data.present["text"] | data.present["signal"]).all()  # never a record without input
    for modality in ("text", "signal"):
        assert 0.5 < data.present[modality].mean() <= 1.0
    missing = ~data.present["signal"]
    assert not data.signal[missing].any()
    assert all((t != "") == p for t, p in zip(data.text, data.present["text"], strict=True))


def test_subset_and_concat() -> None:
    data = both(make_node("uni-a-1"), DataConfig(records=40))
    first, rest = data.subset(np.arange(10)), data.subset(np.arange(len(data)) >= 10)
    assert_same(EduData.concat([first, rest]), data)
    other = EduData.empty(3)
    other.groups["imd_band"] = np.full(3, "unknown", "<U16")
    with pytest.raises(ValueError, match="different label or group keys"):
        EduData.concat([data, other])
    with pytest.raises(ValueError, match="records"):
        EduData(**{**vars(data), "tabular": data.tabular[:-1]})


@pytest.mark.parametrize(
    ("field", "value"),
    [("records", 2), ("test_fraction", 1.0), ("alpha", 0.0), ("seed", 1.5)],
)
def test_config_validation(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        DataConfig(**{field: value})


def test_unknown_task_or_modality() -> None:
    with pytest.raises(ValueError, match="'essay_score'"):
        node_data(make_node("x", tasks=("at_risk", "essay_score")), DataConfig())
    with pytest.raises(ValueError, match="'video'"):
        node_data(make_node("x", modalities=("video",)), DataConfig())


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_data() -> None:
    config = DataConfig(records=60, seed=7)
    assert_same(both(make_node("uni-a-1"), config), both(make_node("uni-a-1"), config))


def test_different_node_or_seed_different_data() -> None:
    config = DataConfig(records=60, seed=7)
    base = both(make_node("uni-a-1"), config)
    for other in (
        both(make_node("uni-a-9"), config),
        both(make_node("uni-a-1"), DataConfig(60, seed=8)),
    ):
        assert not np.array_equal(base.tabular, other.tabular)
        assert base.text != other.text


def test_institution_profile_depends_on_name_and_seed_only() -> None:
    a = institution_profile("uni-a", 3)
    assert a is institution_profile("uni-a", 3)
    assert a.female_share != institution_profile("uni-b", 3).female_share
    assert a.female_share != institution_profile("uni-a", 4).female_share
    # a node without an institution is its own institution
    alone = make_node("solo", role="student", institution=None)
    named = make_node("solo", role="student", institution="solo")
    assert_same(both(alone, DataConfig(records=40)), both(named, DataConfig(records=40)))


def test_pooled_data_concatenates_every_node() -> None:
    nodes = (make_node("uni-a-1"), make_node("uni-b-1", institution="uni-b", role="student"))
    config = DataConfig(records=40)
    train, test = pooled_data(SimpleNamespace(nodes=nodes), config)
    assert_same(train, EduData.concat([node_data(n, config)[0] for n in nodes]))
    assert_same(test, EduData.concat([node_data(n, config)[1] for n in nodes]))


# ----------------------------------------------------------------------------- heterogeneity


def institution_data(alpha: float = 1e4, records: int = 300) -> dict[str, EduData]:
    config = DataConfig(records=records, alpha=alpha)
    return {
        name: both(make_node(f"{name}-node", institution=name), config) for name in INSTITUTIONS
    }


def test_label_prevalence_differs_across_institutions() -> None:
    data = institution_data()
    at_risk = [d.labels["at_risk"].mean() for d in data.values()]
    stress = [d.labels["stress"].mean() for d in data.values()]
    assert max(at_risk) - min(at_risk) > 0.1
    assert max(stress) - min(stress) > 0.1
    assert all(0.05 < p < 0.7 for p in at_risk)


def test_groups_and_under_representation() -> None:
    data = institution_data()
    values = {g: set() for g in GROUP_ATTRIBUTES}
    for d in data.values():
        for g in GROUP_ATTRIBUTES:
            values[g] |= set(d.groups[g])
    assert values["gender"] == {"female", "male", "nonbinary"}
    assert values["first_generation"] == values["disability"] == {"yes", "no"}
    assert len(values["language"]) >= 2
    female = [np.mean(d.groups["gender"] == "female") for d in data.values()]
    assert min(female) < 0.35 < max(female)  # some institution has few women
    for d in data.values():
        assert np.mean(d.groups["disability"] == "yes") < 0.25


def test_text_follows_the_writers_language() -> None:
    words: dict[str, set[str]] = {}
    for d in institution_data().values():
        for text, language in zip(d.text, d.groups["language"], strict=True):
            words.setdefault(str(language), set()).update(text.lower().split())
    assert len(words) >= 2
    languages = sorted(words)
    for i, a in enumerate(languages):
        for b in languages[i + 1 :]:
            overlap = len(words[a] & words[b]) / len(words[a] | words[b])
            assert overlap < 0.2, (a, b, overlap)


def label_skew(alpha: float) -> float:
    """Mean total-variation distance of nodes' (at_risk, engagement) cells from their pool."""
    config = DataConfig(records=120, alpha=alpha)
    cells = []
    for i in range(12):
        data = both(make_node(f"uni-a-{i}"), config)
        cells.append(data.labels["at_risk"] * 3 + data.labels["engagement"])
    pooled = np.bincount(np.concatenate(cells), minlength=6) / sum(map(len, cells))
    return float(
        np.mean([0.5 * np.abs(np.bincount(c, minlength=6) / len(c) - pooled).sum() for c in cells])
    )


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    skews = [label_skew(alpha) for alpha in (100.0, 1.0, 0.1)]
    assert skews[0] < 0.12
    assert skews[0] + 0.1 < skews[1] < skews[2] - 0.1


# ----------------------------------------------------------------------------- signal


def balanced_accuracy(
    features, task: str, train: EduData, test: EduData, mask: str | None = None
) -> float:
    """Test balanced accuracy (mean recall over classes) of a class-weighted softmax regression
    on `features(data)`, fitted by gradient descent; chance is 1 / classes whatever the balance."""
    keep_train = train.present[mask] if mask else np.ones(len(train), bool)
    keep_test = test.present[mask] if mask else np.ones(len(test), bool)
    x, xt = features(train)[keep_train], features(test)[keep_test]
    y, yt = train.labels[task][keep_train], test.labels[task][keep_test]
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    design = np.c_[(x - mean) / std, np.ones(len(x))]
    classes = TASKS[task]
    weight = (len(y) / (classes * np.bincount(y, minlength=classes)))[y][:, None]
    targets = np.eye(classes)[y]
    w = np.zeros((design.shape[1], classes))
    for _ in range(300):
        z = design @ w
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        w -= 0.5 * (design.T @ (weight * (p - targets)) / len(y) + 1e-3 * w)
    predicted = (np.c_[(xt - mean) / std, np.ones(len(xt))] @ w).argmax(axis=1)
    return float(np.mean([(predicted[yt == c] == c).mean() for c in range(classes)]))


@pytest.fixture(scope="module")
def pooled() -> tuple[EduData, EduData]:
    nodes = [
        make_node(f"{name}-node", institution=name, role="institution") for name in INSTITUTIONS[:4]
    ]
    return pooled_data(SimpleNamespace(nodes=nodes), DataConfig(records=300, alpha=1.0))


def signal_features(d: EduData) -> np.ndarray:
    return np.c_[d.signal.mean(axis=1), d.signal.std(axis=1), d.signal.max(axis=1)]


def token_counts(d: EduData) -> np.ndarray:
    return np.stack([(d.clickstream == t).sum(axis=1) for t in range(1, CLICK_VOCAB)], axis=1)


def last_answer(d: EduData) -> np.ndarray:
    answers = np.where(d.clickstream >= TOKEN_ID["quiz_correct_0"], d.clickstream, 0)
    last = answers[np.arange(len(d)), CLICK_LEN - 1 - np.argmax(answers[:, ::-1] > 0, axis=1)]
    return np.c_[token_counts(d), np.eye(CLICK_VOCAB)[last]]


@pytest.mark.parametrize(
    ("task", "features", "mask", "margin"),
    [
        ("at_risk", lambda d: d.tabular, None, 0.2),
        ("stress", signal_features, "signal", 0.2),
        ("engagement", token_counts, None, 0.25),
        ("next_response", last_answer, None, 0.1),
    ],
    ids=["at_risk-tabular", "stress-signal", "engagement-clickstream", "next_response-clickstream"],
)
def test_modality_carries_the_task(pooled, task, features, mask, margin) -> None:
    accuracy = balanced_accuracy(features, task, *pooled, mask=mask)
    assert 1 / TASKS[task] + margin < accuracy < 0.95  # learnable, not trivial


def test_handwriting_is_readable_from_the_image(pooled) -> None:
    train, test = pooled
    x, xt = train.image.reshape(len(train), -1), test.image.reshape(len(test), -1)
    y, yt = train.labels["handwriting"], test.labels["handwriting"]
    distance = (xt**2).sum(1)[:, None] - 2 * xt @ x.T + (x**2).sum(1)[None, :]
    votes = y[np.argsort(distance, axis=1)[:, :5]].mean(axis=1)
    accuracy = float(((votes > 0.5) == yt).mean())
    assert accuracy > 0.85 and accuracy > max(yt.mean(), 1 - yt.mean()) + 0.2


def test_handwriting_label_is_whether_the_digit_is_prime(pooled) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    reference = digits.images.reshape(len(digits.images), -1) / 16.0
    _, test = pooled
    x = test.image.reshape(len(test), -1)
    distance = (x**2).sum(1)[:, None] - 2 * x @ reference.T + (reference**2).sum(1)[None, :]
    digit = digits.target[distance.argmin(axis=1)]
    agree = np.isin(digit, PRIME_DIGITS) == (test.labels["handwriting"] == 1)
    assert agree.mean() > 0.9


def test_low_ability_shows_in_handwriting_and_risk(pooled) -> None:
    train, _ = pooled
    at_risk = train.labels["at_risk"] == 1
    correct = train.labels["handwriting"] == 1
    assert correct[at_risk].mean() + 0.1 < correct[~at_risk].mean()


# ----------------------------------------------------------------------------- unseen learners


def test_unseen_learners_are_the_institutions_not_the_nodes() -> None:
    config = DataConfig(records=60, alpha=0.2, seed=3)
    a = make_node("uni-a-1", modalities=("tabular", "clickstream"), tasks=("at_risk",))
    b = make_node("uni-a-2", modalities=("tabular", "text"), tasks=("at_risk", "engagement"))
    new_a, new_b = unseen_data(a, config, 200), unseen_data(b, config, 200)
    # the same learners for every node of the institution, shown in each node's modalities
    np.testing.assert_array_equal(new_a.labels["at_risk"], new_b.labels["at_risk"])
    np.testing.assert_array_equal(new_a.groups["gender"], new_b.groups["gender"])
    assert not new_a.present["text"].any() and new_b.present["text"].any()
    assert (new_a.labels["engagement"] == -1).all() and (new_b.labels["engagement"] >= 0).all()
    # deterministic, and not any node's own records
    assert_same(new_a, unseen_data(a, config, 200))
    own = both(a, config)
    assert not np.isin(new_a.tabular.round(6), own.tabular.round(6)).all(axis=1).any()
    # another institution has other learners
    other = unseen_data(make_node("uni-b-1", institution="uni-b"), config, 200)
    assert not np.array_equal(other.tabular, unseen_data(make_node("uni-a-9"), config, 200).tabular)


def test_unseen_learners_follow_the_population_not_the_node_skew() -> None:
    config = DataConfig(records=200, alpha=0.1, seed=0)
    node = make_node("uni-a-1")
    prior = _cell_prior("uni-a", config.seed)
    new = unseen_data(node, config, 3000)
    cells = new.labels["at_risk"] * 3 + new.labels["engagement"]
    share = np.bincount(cells, minlength=6) / len(cells)
    np.testing.assert_allclose(share, prior, atol=0.04)
    own = both(node, config)
    own_share = np.bincount(own.labels["at_risk"] * 3 + own.labels["engagement"], minlength=6)
    assert np.abs(own_share / own_share.sum() - prior).max() > 0.1  # the node's own are skewed


# ----------------------------------------------------------------------------- non-members


def _cells(d: EduData) -> np.ndarray:
    c = np.bincount(d.labels["at_risk"] * 3 + d.labels["engagement"], minlength=6)
    return c / c.sum()


def test_nonmembers_are_drawn_as_the_nodes_own_records_are() -> None:
    config = DataConfig(records=1500, alpha=0.1, seed=0)
    node = make_node("uni-a-1")
    own = both(node, config)
    others = nonmember_data(node, config, 3000)
    # the node's label skew, not the institution's proportions
    np.testing.assert_allclose(_cells(others), _cells(own), atol=0.04)
    assert np.abs(_cells(others) - _cell_prior("uni-a", config.seed)).max() > 0.1
    # in the node's modalities and tasks, deterministic, and not the node's own learners
    assert_same(others, nonmember_data(node, config, 3000))
    assert not np.isin(others.tabular.round(6), own.tabular.round(6)).all(axis=1).any()
    small = make_node("stu-1", role="student", modalities=("tabular",), tasks=("at_risk",))
    few = nonmember_data(small, DataConfig(records=60, seed=0), 50)
    assert not few.present["text"].any() and (few.labels["engagement"] == -1).all()
    # drawing them changes neither the node's records nor the unseen learners
    assert_same(own, both(node, config))

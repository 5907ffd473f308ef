"""Modality attribution (`m3tgossip.edu.explain`): exact Shapley values from coalition passes,
the permutation check, per-record and per-component attributions, role views, the CLI."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import TINY

from m3tgossip.cli import main
from m3tgossip.edu.data.records import EduData
from m3tgossip.edu.explain import (
    QUANTITIES,
    TINY_TOTAL,
    Explainer,
    round_attribution,
    shapley,
    summarize,
)
from m3tgossip.edu.explain_ranks import pooled_spearman, spearman
from m3tgossip.edu.explain_report import role_view
from m3tgossip.edu.model import build_node_model
from m3tgossip.edu.model.m3t import Batch
from m3tgossip.edu.train import Trainer, drop_modalities
from m3tgossip.edu.workload import DEFAULTS, workload_options
from m3tgossip.errors import ConfigError
from m3tgossip.privacy import TrainingNoise

MODALITIES = ("tabular", "clickstream", "image")


@dataclass(frozen=True)
class Spec:
    id: str = "n0"
    role: str = "institution"
    institution: str | None = "uni-a"
    modalities: tuple[str, ...] = MODALITIES
    tasks: tuple[str, ...] = ("at_risk", "engagement")
    compute: str = "full"
    local: tuple[str, ...] = ()


def records(n: int, seed: int) -> EduData:
    """Only tabular carries the labels (its first two columns); clickstream and image are noise.
    Each modality is missing from a seeded third of the records (so the model meets every
    coalition in training), and record 0 has tabular and clickstream but no image."""
    rng = np.random.default_rng(seed)
    data = EduData.empty(n)
    data.tabular[:] = rng.normal(size=data.tabular.shape)
    data.clickstream[:] = rng.integers(1, 64, size=data.clickstream.shape)
    data.image[:] = rng.random(data.image.shape)
    for m in MODALITIES:
        data.present[m][:] = rng.random(n) > 1 / 3
    data.present["tabular"][0] = data.present["clickstream"][0] = True
    data.present["image"][0] = False
    for m, x in (("tabular", data.tabular), ("clickstream", data.clickstream)):
        x[~data.present[m]] = 0
    data.image[~data.present["image"]] = 0
    data.labels["at_risk"] = (data.tabular[:, 0] > 0).astype(np.int64)
    data.labels["engagement"] = np.digitize(data.tabular[:, 1], [-0.43, 0.43]).astype(np.int64)
    data.labels["engagement"][::5] = -1  # some records unlabelled for it
    data.groups["gender"] = np.array(["female", "male"] * (n // 2), dtype="<U16")
    data.learner = np.arange(n) // 4  # four records per learner
    return data


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread, as a daemon runs (many threads crawl on a shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained() -> Trainer:
    torch.manual_seed(0)
    model = build_node_model(Spec(), checkpoint=None, config=TINY)
    trainer = Trainer(model, records(160, 0), records(80, 1), lr=1e-2, seed=0)
    trainer.train_steps(40)
    model.eval()
    return trainer


@pytest.fixture(scope="module")
def explainer(trained: Trainer) -> Explainer:
    return Explainer(trained.model, trained.test_set.batch, trained.test_set.labels)


def coalition_value(game: dict[frozenset[int], float], m: int) -> np.ndarray:
    return np.array([game[frozenset(k for k in range(m) if s >> k & 1)] for s in range(1 << m)])


def test_shapley_of_a_known_game() -> None:
    """v(S) = sum of a_i over S, plus b when S holds both 0 and 1: phi = a, with b split."""
    a, b = [0.5, -0.2, 1.5], 0.8
    game = {
        frozenset(s): sum(a[i] for i in s) + (b if {0, 1} <= set(s) else 0.0)
        for r in range(4)
        for s in itertools.combinations(range(3), r)
    }
    phi = shapley(coalition_value(game, 3))
    np.testing.assert_allclose(phi, [a[0] + b / 2, a[1] + b / 2, a[2]], atol=1e-12)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
def test_shapley_is_efficient_and_matches_the_permutation_definition(m: int) -> None:
    values = np.random.default_rng(m).normal(size=(1 << m, 7))
    phi = shapley(values)
    np.testing.assert_allclose(phi.sum(axis=0), values[-1] - values[0], atol=1e-12)
    # the mean marginal contribution over every order of the modalities
    by_order = np.zeros((m, 7))
    for order in itertools.permutations(range(m)):
        s = 0
        for i in order:
            by_order[i] += values[s | 1 << i] - values[s]
            s |= 1 << i
    np.testing.assert_allclose(phi, by_order / math.factorial(m), atol=1e-12)
    with pytest.raises(ValueError):
        shapley(values[:-1])


def test_spearman() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties get their mean rank: ranks [1.5, 1.5, 3] against [1, 2, 3]
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(
        np.corrcoef([1.5, 1.5, 3], [1, 2, 3])[0, 1]
    )
    assert spearman([1.0], [2.0]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


def test_pooled_spearman_over_nodes_and_tasks() -> None:
    def report(phi: list[float], drop: list[float]) -> dict:
        mods = ["a", "b", "c"]
        return {
            "tasks": {
                "t": {
                    "phi": dict(zip(mods, phi, strict=True)),
                    "permutation": {"drop": dict(zip(mods, drop, strict=True))},
                }
            }
        }

    pooled = pooled_spearman(
        [report([0.1, 0.5, 0.9], [0.2, 0.4, 1.0]), report([0, 1, 2], [2, 1, 0])]
    )
    assert pooled["node_tasks"] == 2 and pooled["points"] == 6 and pooled["defined"] == 2
    assert pooled["mean"] == pytest.approx(0.0)
    # within-node-task ranks: one order agrees, the other is reversed
    assert pooled["pooled"] == pytest.approx(0.0) and pooled["per_task"]["t"] == 0.0
    assert pooled["pooled_raw"] == pytest.approx(
        spearman([0.1, 0.5, 0.9, 0, 1, 2], [0.2, 0.4, 1, 2, 1, 0])
    )


def test_pooled_spearman_ranks_within_each_node_task_not_across_scales() -> None:
    """Two node-tasks that order their modalities exactly as the check does, on scales a
    hundred times apart, agree perfectly; pooling their raw values says otherwise."""

    def report(task: str, phi: list[float], drop: list[float]) -> dict:
        mods = ["a", "b", "c"][: len(phi)]
        return {
            "tasks": {
                task: {
                    "phi": dict(zip(mods, phi, strict=True)),
                    "permutation": {"drop": dict(zip(mods, drop, strict=True))},
                }
            }
        }

    reports = [
        report("t", [1.0, 2.0, 3.0], [0.01, 0.02, 0.03]),
        report("u", [0.01, 0.02, 0.03], [1.0, 2.0, 3.0]),
        report("u", [0.5, 0.1], [0.2, 0.3]),  # two modalities, reversed
    ]
    pooled = pooled_spearman(reports[:2])
    assert pooled["pooled"] == pytest.approx(1.0) and pooled["mean"] == pytest.approx(1.0)
    assert pooled["pooled_raw"] < 0
    # centred ranks pooled: covariances 2 + 2 - 0.5 over variances 2 + 2 + 0.5
    three = pooled_spearman(reports)
    assert three["pooled"] == pytest.approx(3.5 / 4.5)
    assert three["per_task"] == pytest.approx({"t": 1.0, "u": 1.5 / 2.5})
    assert three["node_tasks"] == 3 and three["points"] == 8
    # only the node-tasks whose shares are given (a total above TINY_TOTAL)
    reports[2]["tasks"]["u"]["shares"] = None
    for r in reports[:2]:
        for summary in r["tasks"].values():
            summary["shares"] = {"a": 1.0}
    assert pooled_spearman(reports)["pooled_with_shares"] == pytest.approx(1.0)
    assert pooled_spearman(reports)["with_shares"] == 2


def test_shares_are_not_given_for_a_tiny_or_negative_total() -> None:
    summary = summarize(["a", "b"], np.array([0.0, -0.1, -0.1, -0.3]), 10, "label")
    assert summary["shares"] is None and "not meaningful" in summary["note"]
    assert summary["total"] == pytest.approx(-0.3)
    small = summarize(["a", "b"], np.array([0.0, 0.0, 0.0, TINY_TOTAL / 2]), 10, "label")
    assert small["shares"] is None
    fine = summarize(["a", "b"], np.array([0.0, 0.3, 0.1, 0.6]), 10, "label")
    assert fine["shares"] == pytest.approx({"a": 0.4 / 0.6, "b": 0.2 / 0.6})
    assert fine["leave_one_out"] == pytest.approx({"a": 0.6 - 0.1, "b": 0.6 - 0.3})


def test_a_coalition_is_the_batch_with_those_modalities_absent(
    trained: Trainer, explainer: Explainer
) -> None:
    model, batch = trained.model, trained.test_set.batch
    for mask in (explainer.full, 0b101, 0b010, 0):
        present = {
            m: batch.present[m] & bool(mask >> k & 1) for k, m in enumerate(model.modalities)
        }
        with torch.no_grad():
            logits = model(Batch(batch.inputs, present))
        for t in model.tasks:
            want = torch.log_softmax(logits[t].double(), dim=1).numpy()
            np.testing.assert_allclose(explainer.log_probs[t][mask], want, atol=1e-5)


def test_shares_sum_to_one_and_phi_is_exactly_efficient(explainer: Explainer) -> None:
    for t, summary in explainer.shapley().items():
        phi = np.array(list(summary["phi"].values()))
        assert phi.sum() == pytest.approx(summary["v_all"] - summary["v_empty"], abs=1e-12)
        assert summary["value"] == "label" and summary["shares"] is not None
        assert sum(summary["shares"].values()) == pytest.approx(1.0, abs=1e-12)
        want = 80 if t == "at_risk" else 64  # every fifth record has no engagement label
        assert summary["records"] == want


def test_the_one_modality_that_carries_signal_dominates_and_the_permutation_check_agrees(
    explainer: Explainer,
) -> None:
    shapley_ = explainer.shapley()
    checks = explainer.permutation(repeats=3, seed=0)
    for t in explainer.tasks:
        shares, drop = shapley_[t]["shares"], checks[t]["drop"]
        assert max(shares, key=shares.get) == "tabular" and shares["tabular"] > 0.8, shares
        assert max(drop, key=drop.get) == "tabular", drop
        assert drop["tabular"] > 5 * max(abs(drop["clickstream"]), abs(drop["image"]))
        assert checks[t]["repeats"] == 3 and set(checks[t]["drop_std"]) == set(MODALITIES)
    again = explainer.permutation(repeats=3, seed=0)
    assert again == checks  # seeded


def test_the_permutation_check_averages_the_explainers_quantity(
    trained: Trainer, explainer: Explainer
) -> None:
    """Both sides use the same quantity: the log-probability by default, or the probability."""
    batch, labels = trained.test_set.batch, trained.test_set.labels
    prob = Explainer(trained.model, batch, labels, quantity="prob")
    for t in prob.tasks:
        np.testing.assert_allclose(prob.record_values(t), np.exp(explainer.record_values(t)))
    summary, check = prob.shapley()["at_risk"], prob.permutation(repeats=2, seed=0)["at_risk"]
    assert summary["quantity"] == check["quantity"] == "prob" and 0 < summary["v_all"] < 1
    assert explainer.permutation(repeats=2)["at_risk"]["quantity"] == "log_prob"
    assert set(check["drop_se"]) == set(MODALITIES) and all(check["drop_se"].values())
    assert QUANTITIES == ("log_prob", "prob")
    with pytest.raises(ValueError, match="quantity: one of log_prob, prob"):
        Explainer(trained.model, batch, labels, quantity="accuracy")


def test_a_record_explanation(trained: Trainer, explainer: Explainer) -> None:
    labels = trained.test_set.labels
    out = explainer.record(0, labels=labels)  # record 0 has no image
    assert out["absent"] == ["image"]
    for t, e in out["tasks"].items():
        assert e["phi"]["image"] == 0.0  # a modality the record lacks changes nothing
        lp = explainer.log_probs[t][explainer.full, 0]
        assert e["class"] == int(lp.argmax()) and e["prediction"] == str(e["class"])
        assert e["probability"] == pytest.approx(math.exp(lp.max()))
        total = sum(e["phi"].values())
        assert total == pytest.approx(e["log_probability"] - e["log_probability_no_modality"])
        y = int(labels[t][0])
        assert e["label"] == (str(y) if y >= 0 else None)


def test_component_contributions(trained: Trainer, explainer: Explainer) -> None:
    model = trained.model
    before = {c: x.copy() for c, x in model.vectors().items()}
    base = build_node_model(Spec(), checkpoint=None, config=TINY)
    out = explainer.components({c: x.copy() for c, x in base.vectors().items()})
    assert set(out) == set(model.held())
    assert not out["head.at_risk"]["removable"] and "head" in out["head.at_risk"]["note"]
    assert out["encoder.tabular"]["removable"] and set(out["encoder.tabular"]["drop"]) == {
        "at_risk",
        "engagement",
    }
    assert set(out["prompt.engagement"]["drop"]) == {"engagement"}
    for c, x in model.vectors().items():  # every component is back as it was
        np.testing.assert_array_equal(x, before[c])
    assert out["fusion"]["drop"]["at_risk"] != 0.0  # its trained LoRA delta did something


def test_round_attribution_uses_the_held_out_records(
    trained: Trainer, explainer: Explainer
) -> None:
    assert round_attribution(trained, max_rows=None) == explainer.shapley()
    # by default a seeded sample of 128 / 2^3 = 16 records, the same every time
    sampled = round_attribution(trained)
    assert sampled["at_risk"]["records"] == 16 and sampled == round_attribution(trained)
    assert sum(sampled["at_risk"]["shares"].values()) == pytest.approx(1.0)


def test_role_views(trained: Trainer, explainer: Explainer) -> None:
    test = records(80, 1)
    kwargs = {
        "learners": [f"l{k}" for k in test.learner],
        "groups": {"gender": test.groups["gender"]},
        "records": [f"r{i}" for i in range(80)],
    }
    inst = role_view(explainer, "institution", **kwargs)
    assert inst["by"] == ["gender"] and "no course field" in inst["note"]
    female = inst["groups"]["gender"]["female"]
    assert female["records"] == 40
    np.testing.assert_allclose(
        sum(female["tasks"]["at_risk"]["phi"].values()),
        female["tasks"]["at_risk"]["v_all"] - female["tasks"]["at_risk"]["v_empty"],
    )
    course = role_view(
        explainer, "institution", **{**kwargs, "groups": {"course": np.array(["A", "B"] * 40)}}
    )
    assert course["by"] == ["course"] and course["note"] is None
    assert role_view(explainer, "instructor", **kwargs)["by"] == ["node"]
    student = role_view(explainer, "student", **kwargs, labels=trained.test_set.labels)
    assert student["by"] == ["learner"] and len(student["groups"]["learner"]) == 20
    own = student["predictions"]["l0"]
    assert [r["record"] for r in own] == ["r0", "r1", "r2", "r3"]
    assert own[0] == {"record": "r0", **explainer.record(0, labels=trained.test_set.labels)}
    by_learner = role_view(explainer, "institution", **kwargs, group_by="learner")
    assert by_learner["by"] == ["learner"]
    with pytest.raises(ConfigError, match="not a group attribute"):
        role_view(explainer, "institution", **kwargs, group_by="course")


# ---------------------------------------------------------------------------------- the CLI

SPEC = """\
name = "two"
edges = [["uni", "lab"]]

[[nodes]]
id = "uni"
role = "institution"
institution = "uni-a"
modalities = ["image", "clickstream", "tabular"]
tasks = ["at_risk", "handwriting"]

[[nodes]]
id = "lab"
role = "instructor"
institution = "uni-a"
modalities = ["signal", "clickstream", "tabular"]
tasks = ["at_risk", "stress"]
"""
OPTIONS = {"records": 40, "local_steps": 2, "eval_every": 1}


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A state folder as the daemon leaves it for node lab, and lab's `data example` folder."""
    from m3tgossip.daemon import checkpoint
    from m3tgossip.daemon.config import NodeConfig
    from m3tgossip.daemon.nodeinfo import write_node_info
    from m3tgossip.edu.workload import EduWorkload
    from m3tgossip.topology import load_topology

    tmp = tmp_path_factory.mktemp("explain")
    (tmp / "two.toml").write_text(SPEC)
    topology = load_topology(tmp / "two.toml")
    w = EduWorkload(topology, "lab", seed=1, options=OPTIONS)
    for r in range(3):
        w.local_step(r)
    folder = tmp / "state"
    config = NodeConfig(
        id="lab",
        topology=str(tmp / "two.toml"),
        workload="edu",
        seed=1,
        state_dir=str(folder),
        workload_options=OPTIONS,
    )
    write_node_info(config, topology)
    checkpoint.save(folder, w.state(), {"model_id": w.model_id(), "round": 3})
    args = ["--topology", str(tmp / "two.toml"), "--out", str(tmp / "data")]
    assert main(["data", "example", *args, "--seed", "1", "--records", "40"]) == 0
    return folder, tmp / "data"


def test_explain_writes_json_and_png(state: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    folder, data = state
    out = tmp_path / "out"
    argv = ["explain", "--state-dir", str(folder), "--data", str(data / "lab"), "--out", str(out)]
    assert main([*argv, "--record", "lab-r00002", "--max-records", "30"]) == 0
    printed = capsys.readouterr().out
    assert "lab: 30 records, 3 modalities, 8 coalitions" in printed and "at_risk:" in printed
    report = json.loads((out / "explain.json").read_text())
    assert report["format"] == "m3tgossip.explain/1" and report["node"] == "lab"
    assert report["role"] == "instructor" and report["view"]["role"] == "instructor"
    assert report["modalities"] == ["clickstream", "signal", "tabular"]
    assert report["records"] == 30 and report["usable"] == 40 and report["coalitions"] == 8
    for t in ("at_risk", "stress"):
        s = report["tasks"][t]
        assert sum(s["phi"].values()) == pytest.approx(s["v_all"] - s["v_empty"], abs=1e-9)
        if s["shares"] is not None:
            assert sum(s["shares"].values()) == pytest.approx(1.0)
        assert set(s["permutation"]["drop"]) == set(report["modalities"])
    rec = report["record"]
    assert rec["record"] == "lab-r00002" and rec["learner"] == "lab-l00002"
    assert rec["tasks"]["at_risk"]["label"] in ("no", "yes")  # the folder's class names
    assert rec["tasks"]["at_risk"]["prediction"] in ("no", "yes")
    assert report["components"]["encoder.signal"]["removable"]
    assert not report["components"]["head.stress"]["removable"]
    # 8 coalitions, 3 shuffles of each of 3 modalities, 7 components reverted one at a time
    assert report["forward_passes"] == 8 + 3 * 3 + 7
    assert (out / "explain.png").stat().st_size > 1000 and report["plot"] == "explain.png"
    assert main([*argv, "--view", "student"]) == 0
    report = json.loads((out / "explain.json").read_text())
    assert report["view"]["by"] == ["learner"] and report["records"] == 40
    assert len(report["view"]["predictions"]) == 40  # the built-in data: a learner per record
    capsys.readouterr()


def test_explain_errors_name_what_and_where(
    state: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    folder, data = state
    out = str(tmp_path / "out")

    def error(*argv: str) -> str:
        assert main(["explain", *argv, "--out", out]) == 2
        err = capsys.readouterr().err
        assert err.startswith("m3tgossip: error: ") and "Traceback" not in err
        return err

    err = error("--state-dir", str(tmp_path / "nowhere"), "--data", str(data / "lab"))
    assert "nowhere/node.json" in err and "missing" in err
    err = error("--state-dir", str(folder), "--data", str(tmp_path / "no-data"))
    assert "no-data: not a folder" in err
    # uni's folder: clickstream and tabular overlap lab's, so make one with only images
    only_images = tmp_path / "images-only"
    (only_images / "images").mkdir(parents=True)
    Image.new("L", (8, 8), 255).save(only_images / "images" / "r1.png")
    (only_images / "manifest.toml").write_text(
        'format = 1\nmodalities = ["image"]\n[files]\nimage = "images"\n'
    )
    err = error("--state-dir", str(folder), "--data", str(only_images))
    assert str(only_images) in err and "no record has any of node lab's modalities" in err
    err = error("--state-dir", str(folder), "--data", str(data / "lab"), "--record", "nope")
    assert "labels.csv: --record" in err and "'nope'" in err
    err = error("--state-dir", str(folder), "--data", str(data / "lab"), "--group-by", "course")
    assert "--group-by: course" in err and "gender" in err
    err = error("--state-dir", str(folder), "--data", str(data / "lab"), "--max-records", "0")
    assert "--max-records" in err


# ------------------------------------------------------------------------ modality dropout


def test_drop_modalities_hides_present_modalities_at_the_rate() -> None:
    n = 4000
    present = {
        "tabular": torch.ones(n, dtype=torch.bool),
        "image": torch.arange(n) % 2 == 0,  # half the records have an image
    }
    inputs = {m: torch.randn(n, 3) for m in present}
    batch = Batch(inputs, present)
    dropped = drop_modalities(batch, 0.25, np.random.default_rng(0))
    assert dropped.inputs is batch.inputs  # inputs kept: the fusion masks the absent
    for m, was in present.items():
        now = dropped.present[m]
        assert not bool((now & ~was).any())  # nothing absent becomes present
        assert float(now[was].float().mean()) == pytest.approx(0.75, abs=0.03)
    again = drop_modalities(batch, 0.25, np.random.default_rng(0))
    assert all(torch.equal(again.present[m], dropped.present[m]) for m in present)
    assert drop_modalities(batch, 0.0, np.random.default_rng(0)) is batch


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, True, "0.25", None])
def test_modality_dropout_is_validated(bad: object) -> None:
    model = build_node_model(Spec(), checkpoint=None, config=TINY)
    with pytest.raises(ValueError, match=r"modality_dropout: .* in \[0, 1\)"):
        Trainer(model, records(16, 0), records(8, 1), modality_dropout=bad)
    with pytest.raises(ValueError, match=r"workload option modality_dropout: .*got"):
        workload_options({"modality_dropout": bad})


def test_modality_dropout_is_a_workload_option() -> None:
    assert workload_options({})["modality_dropout"] == DEFAULTS["modality_dropout"]
    assert workload_options({"modality_dropout": 0})["modality_dropout"] == 0.0
    assert workload_options({"modality_dropout": 0.25})["modality_dropout"] == 0.25


def test_dropout_steps_are_seeded_by_the_step_and_reach_dp_sgd() -> None:
    def trainer(p: float) -> Trainer:
        torch.manual_seed(0)
        model = build_node_model(Spec(), checkpoint=None, config=TINY)
        return Trainer(model, records(64, 0), records(16, 1), lr=1e-2, seed=3, modality_dropout=p)

    a, b = trainer(0.3), trainer(0.3)
    batch = a.train_batch
    for step in (0, 7):
        x, y = a._dropped(batch, step), b._dropped(batch, step)
        assert all(torch.equal(x.present[m], y.present[m]) for m in batch.present)
    assert not torch.equal(a._dropped(batch, 0).present["tabular"], batch.present["tabular"])
    a.train_steps(3)
    b.train_steps(3)  # the same steps, the same modalities hidden: the same weights
    for c, x in a.model.vectors().items():
        np.testing.assert_array_equal(x, b.model.vectors()[c])
    assert trainer(0.0)._dropped(batch, 0) is batch
    private = trainer(0.3)
    private.use_private(TrainingNoise(0.5, 1.0, 0.5, 2, {}), seed=0)
    assert private.private is not None and private.private.augment is not None


@pytest.fixture(scope="module")
def complete_records() -> tuple[EduData, EduData]:
    """As `records`, but every record has every modality: training never meets a masked
    one unless modality dropout hides it."""

    def complete(n: int, seed: int) -> EduData:
        data = records(n, seed)
        rng = np.random.default_rng(seed + 100)
        for m in MODALITIES:
            data.present[m][:] = True
        data.tabular[:] = rng.normal(size=data.tabular.shape)
        data.clickstream[:] = rng.integers(1, 64, size=data.clickstream.shape)
        data.image[:] = rng.random(data.image.shape)
        data.labels["at_risk"] = (data.tabular[:, 0] > 0).astype(np.int64)
        engagement = np.digitize(data.tabular[:, 1], [-0.43, 0.43]).astype(np.int64)
        engagement[::5] = -1
        data.labels["engagement"] = engagement
        return data

    return complete(160, 0), complete(80, 1)


def test_masked_coalitions_of_a_model_trained_with_dropout(
    complete_records: tuple[EduData, EduData],
) -> None:
    """On complete records, with modality dropout: each coalition is the masked batch, the
    shares sum to 1, and the informative modality leads on both sides."""
    train, test = complete_records
    torch.manual_seed(0)
    model = build_node_model(Spec(), checkpoint=None, config=TINY)
    trainer = Trainer(model, train, test, lr=1e-2, seed=0, modality_dropout=0.25)
    trainer.train_steps(40)
    model.eval()
    batch = trainer.test_set.batch
    explainer = Explainer(model, batch, trainer.test_set.labels)
    for mask in (0, 0b001, 0b110, explainer.full):
        present = {
            m: batch.present[m] & bool(mask >> k & 1) for k, m in enumerate(model.modalities)
        }
        with torch.no_grad():
            logits = model(Batch(batch.inputs, present))
        for t in model.tasks:
            want = torch.log_softmax(logits[t].double(), dim=1).numpy()
            np.testing.assert_allclose(explainer.log_probs[t][mask], want, atol=1e-5)
    checks = explainer.permutation(repeats=3, seed=0)
    for t, summary in explainer.shapley().items():
        assert summary["shares"] is not None
        assert sum(summary["shares"].values()) == pytest.approx(1.0, abs=1e-12)
        assert max(summary["shares"], key=summary["shares"].get) == "tabular"
        assert max(checks[t]["drop"], key=checks[t]["drop"].get) == "tabular"


def test_explain_reports_the_neighbours_influence_from_the_metrics(
    state: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    """Rounds measured with `gossip.influence_every` in the state folder's metrics become the
    per-neighbour summary of explain.json; a folder without them has none."""
    import shutil

    folder, data = state
    copy = tmp_path / "state"
    shutil.copytree(folder, copy)
    argv = ["explain", "--state-dir", str(copy), "--data", str(data / "lab"), "--max-records", "8"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "explain.json").read_text())["neighbours"] is None
    rounds = [
        {"per_neighbour": {"uni": -0.2}, "first_order": {"uni": -0.25}, "actual_change": -0.2},
        {"per_neighbour": {"uni": 0.1}, "first_order": {"uni": 0.05}, "actual_change": 0.1},
    ]
    with (copy / "metrics.jsonl").open("w") as f:
        for r, inf in enumerate(rounds):
            f.write(json.dumps({"round": r, "node": "lab", "train": {"influence": inf}}) + "\n")
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    report = json.loads((tmp_path / "b" / "explain.json").read_text())
    uni = report["neighbours"]["neighbours"]["uni"]
    assert report["neighbours"]["rounds_measured"] == [0, 1]
    assert uni["rounds"] == 2 and uni["helped_rounds"] == 1
    assert uni["mean_change"] == pytest.approx(-0.05)
    capsys.readouterr()

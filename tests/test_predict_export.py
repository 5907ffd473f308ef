"""Nodes trained through the testbed on data folders (written by `data example` and by
`data from-oulad` from the OULAD-format sample), then `predict` and `export` on their state."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel

from m3tgossip.cli import main
from m3tgossip.edu.data.folder import read_folder
from m3tgossip.edu.model import M3TConfig, M3TModel
from m3tgossip.edu.model.node_model import load_base_weights
from m3tgossip.edu.model.pretrained import DEFAULT_CHECKPOINT, load_checkpoint
from m3tgossip.edu.restore import load_trained_node
from m3tgossip.errors import ConfigError
from m3tgossip.harness import Testbed, TestbedSpec

OULAD_SAMPLE = Path(__file__).resolve().parent / "data" / "oulad-sample"
SPEC = """\
name = "three"
edges = [["uni", "lab"], ["lab", "stu"]]

[[nodes]]
id = "uni"
role = "institution"
institution = "uni-a"
modalities = ["text", "image", "clickstream", "tabular"]
tasks = ["at_risk", "engagement", "handwriting"]

[[nodes]]
id = "lab"
role = "instructor"
institution = "uni-b"
modalities = ["signal", "clickstream", "tabular"]
tasks = ["at_risk", "stress"]

[[nodes]]
id = "stu"
role = "student"
institution = "uni-b"
modalities = ["clickstream", "tabular"]
tasks = ["at_risk", "engagement"]
compute = "lite"
"""
OPTIONS = {"records": 40, "local_steps": 2, "eval_every": 1}


def train(tmp_path: Path, data: Path, name: str) -> Path:
    spec = TestbedSpec(
        topology=tmp_path / "three.toml",
        out=tmp_path / name,
        workload="edu",
        rounds=3,
        seed=1,
        deadline=30.0,
        options=OPTIONS,
        insecure=True,
        quiet=True,
        data=data,
        timeout=500.0,
    )
    summary = Testbed(spec).run()
    assert summary.exit_code == 0, summary
    assert summary.rounds_done == {"uni": 3, "lab": 3, "stu": 3}
    return tmp_path / name / "nodes"


def predictions(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def check_predictions(rows: list[dict[str, str]], folder: Path, tasks: tuple[str, ...]) -> None:
    raw = read_folder(folder)
    assert len(rows) == len(raw) * len(tasks)
    assert [r["record_id"] for r in rows[:: len(tasks)]] == raw.records
    for r in rows:
        probs = [float(r[f"p_{k}"]) for k in range(3) if r[f"p_{k}"]]
        assert abs(sum(probs) - 1) < 1e-4 and float(r["probability"]) == pytest.approx(max(probs))
        spec = raw.manifest.tasks.get(r["task"])
        classes = spec.classes if spec else [str(k) for k in range(len(probs))]
        assert r["prediction"] == classes[int(np.argmax(probs))]


@pytest.mark.multiprocess
def export_matches(state: Path, folder: Path, out: Path, rows: int | None = None) -> str:
    """Export the node of `state` into `out`, load it back with PEFT on the base checkpoint,
    check it predicts what the node does on (the first `rows` of) its `folder`; the card."""
    assert main(["export", "--state-dir", str(state), "--out", str(out)]) == 0
    info = json.loads((out / "m3t.json").read_text())
    base = M3TModel(
        M3TConfig.from_dict(info["config"]),
        info["modalities"],
        {t: len(c) for t, c in info["tasks"].items()},
        seed=info["seed"],
    )
    load_base_weights(base, load_checkpoint(DEFAULT_CHECKPOINT), None)
    peft = PeftModel.from_pretrained(base, str(out)).eval()
    trained = load_trained_node(state)
    records, _ = trained.adapter.apply(read_folder(folder))
    if rows is not None:
        records = records.subset(np.arange(rows))
    batch = trained.model.prepare(records)
    with torch.no_grad():
        want, got = trained.model(batch), peft(batch)
    for task in info["tasks"]:
        torch.testing.assert_close(got[task], want[task])
    return (out / "README.md").read_text()


def test_a_data_example_federation_trains_predicts_and_exports(tmp_path: Path, capsys) -> None:
    (tmp_path / "three.toml").write_text(SPEC)
    data = tmp_path / "data"
    args = ["--topology", str(tmp_path / "three.toml"), "--out", str(data), "--seed", "1"]
    assert main(["data", "example", *args, "--records", "40"]) == 0
    nodes = train(tmp_path, data, "run")
    for node, tasks in (
        ("uni", ("at_risk", "engagement", "handwriting")),
        ("stu", ("at_risk", "engagement")),
    ):
        info = json.loads((nodes / node / "node.json").read_text())
        assert info["node"] == node and info["workload_options"]["data"] == str(data / node)
        out = tmp_path / f"{node}.csv"
        assert (
            main(
                [
                    "predict",
                    "--state-dir",
                    str(nodes / node),
                    "--data",
                    str(data / node),
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        check_predictions(predictions(out), data / node, tasks)
    # another node's folder: stu predicts its tasks for lab's records from their clickstream
    # and tabular inputs; lab labels at_risk, not engagement
    out = tmp_path / "stu-on-lab.csv"
    assert (
        main(
            [
                "predict",
                "--state-dir",
                str(nodes / "stu"),
                "--data",
                str(data / "lab"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = predictions(out)
    assert {r["task"] for r in rows} == {"at_risk", "engagement"}
    assert {r["label"] for r in rows if r["task"] == "engagement"} == {""}  # lab has no such labels
    assert {r["label"] for r in rows if r["task"] == "at_risk"} == {"no", "yes"}

    card = export_matches(nodes / "uni", data / "uni", tmp_path / "export", rows=16)
    assert "| `encoder.image` | shared |" in card and "uni, lab, stu" in card
    assert "rounds trained: 3" in card and "Profile: `open`" in card
    # the lite student exports the adapters it mixed (not trained) with the heads it trained
    card = export_matches(nodes / "stu", data / "stu", tmp_path / "export-stu")
    assert "| `backbone` | followed |" in card and "(mixed here, not trained)" in card
    trained = load_trained_node(nodes / "stu")
    assert any(b.abs().sum() > 0 for b in trained.model.delta_weights().values())
    capsys.readouterr()


@pytest.mark.multiprocess
def test_the_oulad_sample_trains_through_the_testbed_and_predicts(tmp_path: Path) -> None:
    spec = SPEC.replace('["text", "image", "clickstream", "tabular"]', '["clickstream", "tabular"]')
    spec = spec.replace('["signal", "clickstream", "tabular"]', '["clickstream", "tabular"]')
    (tmp_path / "three.toml").write_text(spec)
    data = tmp_path / "oulad"
    assert (
        main(
            [
                "data",
                "from-oulad",
                str(OULAD_SAMPLE),
                "--topology",
                str(tmp_path / "three.toml"),
                "--out",
                str(data),
            ]
        )
        == 0
    )
    nodes = train(tmp_path, data, "run")
    metrics = [json.loads(line) for line in (nodes / "uni" / "metrics.jsonl").open()]
    assert metrics[-1]["tasks"]["at_risk"]["n"] > 0
    out = tmp_path / "uni.csv"
    assert (
        main(
            [
                "predict",
                "--state-dir",
                str(nodes / "uni"),
                "--data",
                str(data / "uni"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    # uni serves handwriting too; OULAD has no such labels, so its classes keep their indices
    check_predictions(predictions(out), data / "uni", ("at_risk", "engagement", "handwriting"))
    rows = predictions(out)
    assert {r["prediction"] for r in rows if r["task"] == "at_risk"} <= {"no", "yes"}
    assert main(["export", "--state-dir", str(nodes / "lab"), "--out", str(tmp_path / "x")]) == 0
    assert (tmp_path / "x" / "adapter_model.safetensors").is_file()


def test_predict_on_a_node_trained_on_built_in_records(tmp_path: Path) -> None:
    """In-process: a state folder as the daemon leaves it, for a node without --data; predict
    reads a `data example` folder of the same node with the built-in scales."""
    from m3tgossip.daemon import checkpoint
    from m3tgossip.daemon.config import NodeConfig
    from m3tgossip.daemon.nodeinfo import write_node_info
    from m3tgossip.edu.predict import predict
    from m3tgossip.edu.workload import EduWorkload
    from m3tgossip.topology import load_topology

    (tmp_path / "three.toml").write_text(SPEC)
    topology = load_topology(tmp_path / "three.toml")
    w = EduWorkload(topology, "lab", seed=1, options=OPTIONS)
    w.local_step(0)
    state = tmp_path / "state"
    config = NodeConfig(
        id="lab",
        topology=str(tmp_path / "three.toml"),
        workload="edu",
        seed=1,
        state_dir=str(state),
        workload_options=OPTIONS,
    )
    write_node_info(config, topology)
    checkpoint.save(state, w.state(), {"model_id": w.model_id(), "round": 1})
    args = ["--topology", str(tmp_path / "three.toml"), "--out", str(tmp_path / "data")]
    assert main(["data", "example", *args, "--seed", "1", "--records", "40"]) == 0
    result = predict(state, tmp_path / "data" / "lab", tmp_path / "p.csv")
    rows = predictions(tmp_path / "p.csv")
    raw = read_folder(tmp_path / "data" / "lab")
    test_ids = {r for r, split in zip(raw.records, raw.split, strict=True) if split == 1}
    with torch.no_grad():
        want = torch.softmax(w.model(w.trainer.test_set.batch)["at_risk"], dim=1).numpy()
    got = [
        [float(r["p_0"]), float(r["p_1"])]
        for r in rows
        if r["task"] == "at_risk" and r["record_id"] in test_ids
    ]
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert result.records == 40 and set(result.accuracy) == {"at_risk", "stress"}
    with pytest.raises(ConfigError, match="model_id"):
        checkpoint.save(state, w.state(), {"model_id": "edu-other", "round": 1})
        load_trained_node(state)

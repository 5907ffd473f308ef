"""A node's data folder: the format round trip, adapting real inputs, `data check` and its errors,
and the OULAD partition (all in-process)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from m3tgossip.cli import main
from m3tgossip.edu.data import CLICK_LEN, GROUP_ATTRIBUTES, DataConfig, node_data
from m3tgossip.edu.data.adapt import Adapter
from m3tgossip.edu.data.example import write_node_example
from m3tgossip.edu.data.folder import read_folder
from m3tgossip.edu.data.inputs import FREE_IDS, fit_image, fit_signal, hashed_id
from m3tgossip.edu.data.node_folder import load_node_folder
from m3tgossip.edu.data.oulad_partition import write_oulad
from m3tgossip.edu.data.schema import TOKEN_ID
from m3tgossip.errors import ConfigError
from m3tgossip.topology import parse_topology

OULAD_SAMPLE = Path(__file__).resolve().parent / "data" / "oulad-sample"
SPEC = {
    "name": "folders",
    "edges": [["uni", "lab"], ["lab", "stu"]],
    "nodes": [
        {
            "id": "uni",
            "role": "institution",
            "institution": "uni-a",
            "modalities": ["text", "image", "clickstream", "tabular"],
            "tasks": ["at_risk", "engagement", "handwriting", "next_response"],
        },
        {
            "id": "lab",
            "role": "instructor",
            "institution": "uni-b",
            "modalities": ["signal", "tabular"],
            "tasks": ["at_risk", "stress"],
        },
        {
            "id": "stu",
            "role": "student",
            "institution": "uni-b",
            "modalities": ["clickstream", "tabular"],
            "tasks": ["at_risk", "engagement"],
        },
    ],
}
CONFIG = DataConfig(records=40, seed=3)


@pytest.fixture(scope="module")
def topology():
    return parse_topology(SPEC, "test")


def write(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


MINIMAL = {
    "manifest.toml": """\
format = 1
modalities = ["tabular"]
[tasks.at_risk]
kind = "binary"
classes = ["no", "yes"]
""",
    "labels.csv": "record_id,learner_id,at_risk\nr1,a,yes\nr2,a,no\nr3,b,\nr4,c,no\n",
    "learners.csv": "learner_id,gender,disability\na,female,no\nb,male,yes\nc,female,no\n",
    "tabular.csv": "learner_id,record_id,credits,x\na,r1,60,1\na,r2,120,2\nb,r3,,3\nc,r4,30,4\n",
}


@pytest.mark.parametrize("name", ["uni", "lab"])
def test_a_folder_written_by_data_example_reads_back_as_the_built_in_records(
    topology, tmp_path: Path, name: str
) -> None:
    node = topology.node(name)
    write_node_example(node, tmp_path / name, CONFIG)
    folder = load_node_folder(tmp_path / name, node, seed=CONFIG.seed)
    for got, want in zip((folder.train, folder.test), node_data(node, CONFIG), strict=True):
        assert len(got) == len(want)
        np.testing.assert_allclose(got.tabular, want.tabular, atol=1e-6)
        np.testing.assert_allclose(got.signal, want.signal, atol=1e-6)
        np.testing.assert_allclose(got.image, want.image, atol=1 / 510 + 1e-6)
        assert (got.clickstream == want.clickstream).all()
        assert got.text == want.text
        for m, present in want.present.items():
            assert (got.present[m] == present).all(), m
        for t in node.tasks:
            assert (got.labels[t] == want.labels[t]).all(), t
        for g in GROUP_ATTRIBUTES:
            assert (got.groups[g] == want.groups[g]).all(), g


def test_data_check_counts_modalities_tasks_and_groups(tmp_path: Path, capsys) -> None:
    folder = write(tmp_path / "f", MINIMAL)
    assert main(["data", "check", str(folder), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["records"] == 4 and report["learners"] == 3
    assert report["modalities"] == {"tabular": 4}
    assert report["tasks"]["at_risk"] == {
        "kind": "binary",
        "labelled": 3,
        "classes": {"no": 2, "yes": 1},
    }
    assert report["groups"]["gender"] == {"female": 2, "male": 1}
    assert report["groups"]["disability"] == {"no": 2, "yes": 1}
    assert main(["data", "check", str(folder)]) == 0
    text = capsys.readouterr().out
    assert "4 records of 3 learners" in text and "at_risk" in text and "female 2" in text


@pytest.mark.parametrize(
    ("change", "file", "entry"),
    [
        ({"labels.csv": "record_id,learner_id\nr1,a\n"}, "labels.csv", "row 1, field 'at_risk'"),
        (
            {"tabular.csv": "learner_id,record_id,credits,x\na,r1,sixty,1\n"},
            "tabular.csv",
            "row 2, field 'credits'",
        ),
        (
            {"labels.csv": "record_id,learner_id,at_risk\nr1,a,yes\nr2,a,maybe\n"},
            "labels.csv",
            "row 3, field 'at_risk'",
        ),
        (
            {"tabular.csv": "learner_id,record_id,credits,x\na,r9,1,1\n"},
            "tabular.csv",
            "row 2, field 'record_id'",
        ),
        (
            {"tabular.csv": "learner_id,record_id,credits,x\nb,r1,1,1\n"},
            "tabular.csv",
            "row 2, field 'learner_id'",
        ),
    ],
)
def test_a_bad_file_is_reported_by_file_row_and_field(
    tmp_path: Path, capsys, change: dict[str, str], file: str, entry: str
) -> None:
    folder = write(tmp_path / "f", {**MINIMAL, **change})
    with pytest.raises(ConfigError) as caught:
        read_folder(folder)
    assert str(caught.value).startswith(f"{folder / file}: {entry}: ")
    assert main(["data", "check", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"{folder / file}: {entry}" in err and "Traceback" not in err


def test_an_unreadable_image_is_named_with_its_row(tmp_path: Path, capsys) -> None:
    files = {
        **MINIMAL,
        "manifest.toml": MINIMAL["manifest.toml"].replace('["tabular"]', '["tabular", "image"]'),
        "images.csv": "record_id,file\nr1,good.png\nr2,bad.png\n",
    }
    folder = write(tmp_path / "f", files)
    Image.new("L", (30, 20), 255).save(folder / "good.png")
    (folder / "bad.png").write_bytes(b"not a png at all")
    assert main(["data", "check", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"{folder / 'images.csv'}: row 3, field 'file': bad.png: unreadable image" in err
    assert "Traceback" not in err


def test_images_of_any_size_become_bright_ink_on_eight_by_eight() -> None:
    page = np.full((120, 200), 255, np.uint8)  # white paper
    page[30:90, 90:110] = 0  # a dark vertical stroke
    x = fit_image(Image.fromarray(page).convert("RGB"))
    assert x.shape == (1, 8, 8) and x.dtype == np.float32
    assert x.max() > 0.9 and x[0, :, 0].max() == 0  # ink bright, centred, dark ground
    assert fit_image(Image.fromarray(page), crop=False).max() < 0.9  # thin stroke, whole page


def test_signals_of_any_length_are_resampled_or_cropped_to_the_encoder() -> None:
    t = np.linspace(0, 1, 250)
    window = np.stack([t, 2 * t, np.ones_like(t)], axis=1)
    x = fit_signal(window, [1, 0, -1])
    assert x.shape == (64, 4)
    np.testing.assert_allclose(x[:, 1], np.linspace(0, 1, 64), atol=1e-6)
    np.testing.assert_allclose(x[:, 0], np.linspace(0, 2, 64), atol=1e-6)
    assert not x[:, 2:].any()
    short = fit_signal(np.arange(10.0), [0], "crop")
    assert (short[:54, 0] == 0).all() and (short[54:, 0] == np.arange(10)).all()


def test_long_event_logs_keep_their_most_recent_events_and_own_names(tmp_path: Path) -> None:
    rows = ["learner_id,record_id,t,event"]
    rows += [f"a,r1,{t},{'video_play' if t % 2 else 'lab_sim'}" for t in range(200, 0, -1)]
    rows += ["a,r2,2024-01-01T10:00:00,rare_tool", "a,r2,2024-01-01T09:00:00,login"]
    files = {
        **MINIMAL,
        "manifest.toml": MINIMAL["manifest.toml"].replace('["tabular"]', '["clickstream"]'),
        "clickstream.csv": "\n".join(rows) + "\n",
    }
    raw = read_folder(write(tmp_path / "f", files))
    assert raw.event_counts.tolist() == [200, 2, 0, 0]
    assert len(raw.events[0]) == CLICK_LEN and raw.events[1] == ["login", "rare_tool"]
    adapter = Adapter.fit(raw, np.array([True, True, False, False]))
    assert adapter.vocabulary == {"lab_sim": FREE_IDS[0], "rare_tool": FREE_IDS[1]}
    data, _ = adapter.apply(raw)
    expected = [FREE_IDS[0] if t % 2 == 0 else TOKEN_ID["video_play"] for t in range(153, 201)]
    assert data.clickstream[0].tolist() == expected
    assert data.clickstream[1, :3].tolist() == [TOKEN_ID["login"], FREE_IDS[1], 0]
    assert 1 <= hashed_id("never_seen") < 64


def test_tabular_columns_are_placed_standardised_and_cut_to_the_encoder(tmp_path: Path) -> None:
    names = [f"f{k}" for k in range(14)] + ["mean_score"]
    lines = ["learner_id,record_id," + ",".join(names)]
    learner = {1: "a", 2: "a", 3: "b", 4: "c"}
    lines += [f"{learner[i]},r{i},{','.join(str(i * (k + 1)) for k in range(15))}" for i in learner]
    folder = write(tmp_path / "f", {**MINIMAL, "tabular.csv": "\n".join(lines) + "\n"})
    raw = read_folder(folder)
    adapter = Adapter.fit(raw, np.ones(4, bool))
    assert adapter.tabular_slots[4] == "mean_score"  # the built-in feature keeps its slot
    assert adapter.tabular_slots.count("") == 0 and "f11" not in adapter.tabular_slots
    data, notes = adapter.apply(raw)
    np.testing.assert_allclose(data.tabular.mean(axis=0), 0, atol=1e-6)
    assert any("f11" in n for n in notes)
    assert Adapter.from_array(adapter.to_array()) == adapter


def test_the_split_holds_out_whole_learners(tmp_path: Path) -> None:
    lines = ["record_id,learner_id,at_risk"] + [f"r{i},l{i % 10},{i % 2}" for i in range(60)]
    tab = ["learner_id,record_id,credits"] + [f"l{i % 10},r{i},{i}" for i in range(60)]
    folder = write(
        tmp_path / "f",
        {**MINIMAL, "labels.csv": "\n".join(lines) + "\n", "tabular.csv": "\n".join(tab) + "\n"},
    )
    f = load_node_folder(
        folder, SimpleNamespace(id="n", modalities=("tabular",), tasks=("at_risk",))
    )
    train = {r.split(",")[1] for r in lines[1:] if r.split(",")[0] in f.train_records}
    test = {r.split(",")[1] for r in lines[1:] if r.split(",")[0] in f.test_records}
    assert not train & test and len(test) == 3 and len(f.train) + len(f.test) == 60
    # each record keeps its learner: DP-SGD clips per learner, erasure removes all of theirs
    assert set(f.train.learner) == train and set(f.test.learner) == test


def test_a_folder_of_another_node_is_refused(topology, tmp_path: Path) -> None:
    write_node_example(topology.node("stu"), tmp_path / "stu", CONFIG)
    with pytest.raises(ConfigError, match="manifest.toml: node: the folder is 'stu'"):
        load_node_folder(tmp_path / "stu", topology.node("lab"))


def test_oulad_is_partitioned_into_the_nodes_of_each_institution(topology, tmp_path) -> None:
    spec = {
        **SPEC,
        "nodes": [dict(n, modalities=["clickstream", "tabular"]) for n in SPEC["nodes"]],
    }
    topo = parse_topology(spec, "oulad-test")
    written = write_oulad(OULAD_SAMPLE, topo, tmp_path, seed=0)
    assert set(written) == {"uni", "lab", "stu"}
    seen: dict[str, str] = {}
    for node_id, folder in written.items():
        raw = read_folder(folder)
        assert raw.manifest.node == node_id and len(raw) > 0
        assert set(raw.group_names) == {"gender", "disability", "imd_band", "age_band"}
        assert set(raw.manifest.tasks) == set(topo.node(node_id).tasks) - {"handwriting", "stress"}
        inst = topo.node(node_id).institution
        for record, learner in zip(raw.records, raw.learners, strict=True):
            module, presentation, sid = record.split("_")
            assert sid == learner
            assert seen.setdefault(f"{inst}/{learner}", node_id) == node_id  # one node each
    with open(OULAD_SAMPLE / "studentInfo.csv", newline="") as handle:
        results = {
            "_".join((r["code_module"], r["code_presentation"], r["id_student"])): r["final_result"]
            for r in csv.DictReader(handle)
        }
    raw = read_folder(written["uni"])
    for record, label in zip(raw.records, raw.labels["at_risk"], strict=True):
        assert label == (results[record] in ("Fail", "Withdrawn"))


def test_a_hand_made_folder_of_every_modality_is_read_and_adapted(tmp_path: Path) -> None:
    """Real-world shapes: JPEG and PNG scans of any size in a folder, signal CSVs of any length
    with a time column, a text CSV with long answers, named classes and a given split."""
    folder = write(
        tmp_path / "campus-x",
        {
            "manifest.toml": """\
format = 1
node = "n"
modalities = ["image", "signal", "text", "tabular"]
[files]
image = "scans"
text = "answers.csv"
[tasks.stress]
kind = "binary"
classes = ["calm", "stressed"]
[tasks.engagement]
kind = "ordinal"
[groups]
attributes = ["gender"]
[signal]
fit = "crop"
""",
            "labels.csv": "record_id,learner_id,stress,engagement,split\n"
            "s1,p1,calm,0,train\ns2,p1,stressed,2,train\ns3,p2,,1,test\n",
            "learners.csv": "learner_id,gender,language\np1,female,en\np2,male,de\n",
            "tabular.csv": "learner_id,record_id,credits\np1,s1,60\np2,s3,NA\n",
            "answers.csv": 'record_id,text\ns1,"' + "A long answer. " * 300 + '"\ns3,Short.\n',
        },
    )
    (folder / "scans").mkdir()
    Image.new("RGB", (640, 480), "white").save(folder / "scans" / "s1.jpg")
    Image.new("L", (3, 5), 0).save(folder / "scans" / "s2.png")
    (folder / "signal").mkdir()
    (folder / "signal" / "s1.csv").write_text(
        "t,heart_rate,eda\n" + "".join(f"{i},{70 + i % 5},{i / 10}\n" for i in range(300))
    )
    np.save(folder / "signal" / "s2.npy", np.ones((20, 2)))
    raw = read_folder(folder)
    assert raw.records == ["s1", "s2", "s3"] and raw.learners == ["p1", "p1", "p2"]
    assert raw.labels["stress"].tolist() == [0, 1, -1]
    assert raw.labels["engagement"].tolist() == [0, 2, 1]
    assert raw.split.tolist() == [0, 0, 1] and raw.group_names == ("gender",)
    assert raw.present["image"].tolist() == [True, True, False]
    assert raw.present["signal"].tolist() == [True, True, False]
    assert raw.present["text"].tolist() == [True, False, True]
    assert raw.image.shape == (3, 1, 8, 8) and not raw.image[1].any()  # black stays empty
    # the CSV window is cropped to its last 64 steps, heart_rate and eda in their slots
    assert raw.signal[0, -1, 1] == 70 + 299 % 5 and raw.signal[0, -1, 0] == pytest.approx(29.9)
    assert raw.signal[1, :44].sum() == 2 * 44 and raw.signal[1, :, 2:].sum() == 0
    node = SimpleNamespace(id="n", modalities=("image", "signal", "tabular"), tasks=("stress",))
    f = load_node_folder(folder, node)
    assert f.train_records == ["s1", "s2"] and f.test_records == ["s3"]
    assert f.adapter.classes["stress"] == ("calm", "stressed")
    np.testing.assert_allclose(f.train.signal[:, :, :2].mean(axis=(0, 1)), 0, atol=1e-5)
    assert f.train.labels["engagement"].tolist() == [-1, -1]  # not a task of this node


def test_a_testbed_spec_takes_a_data_folder_per_node(tmp_path: Path) -> None:
    from m3tgossip.harness import Testbed, TestbedSpec, testbed_spec

    ring = str(Path(__file__).resolve().parent.parent / "topology" / "ring-8.toml")
    spec = TestbedSpec(topology=ring, out=tmp_path / "bed", workload="edu", data=tmp_path)
    assert spec.data == tmp_path and testbed_spec.parse_args(spec.argv()) == spec
    with pytest.raises(ConfigError, match="^testbed spec: data: data folders are for the edu"):
        TestbedSpec(topology=ring, out=tmp_path / "bed", data=tmp_path)
    (tmp_path / "n0").mkdir()
    with pytest.raises(ConfigError, match=r"^testbed spec: data: .* has no folder for n1, n2"):
        Testbed(spec)
    assert not (tmp_path / "bed").exists()


def test_oulad_conversion_names_what_the_data_set_cannot_fill(tmp_path: Path) -> None:
    images_only = {**SPEC, "nodes": [dict(SPEC["nodes"][0], modalities=["image"])]}
    images_only["edges"] = []
    with pytest.raises(ConfigError, match=r"^node uni: modalities: OULAD has the modalities"):
        write_oulad(OULAD_SAMPLE, parse_topology(images_only, "t"), tmp_path)
    many = {
        "name": "many",
        "generator": {"kind": "cycle", "n": 8},
        "defaults": {"modalities": ["tabular"], "tasks": ["at_risk"]},
    }
    with pytest.raises(ConfigError, match="6 module presentations for 8 institutions"):
        write_oulad(OULAD_SAMPLE, parse_topology(many, "t"), tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("manifest", "entry"),
    [
        (
            'modalities = ["tabular"]\n[tasks.grade]\nkind = "binary"\n',
            r"\[tasks.grade\]: no model",
        ),
        (
            'modalities = []\n[tasks.engagement]\nkind = "ordinal"\nclasses = ["a", "b"]\n',
            r"\[tasks.engagement\] classes: 2 classes; the model's engagement head has 3",
        ),
        ('modalities = ["smell"]\n', "modalities: unknown modality 'smell'"),
        ('modalities = []\n[files]\nlabels = "../x.csv"\n', r"\[files\] labels: a path inside"),
        ('modalities = []\ncolour = "red"\n', "colour: unknown key"),
    ],
)
def test_a_bad_manifest_names_its_entry(tmp_path: Path, manifest: str, entry: str) -> None:
    folder = write(tmp_path / "f", {"manifest.toml": manifest})
    with pytest.raises(ConfigError, match=f"^{folder / 'manifest.toml'}: {entry}"):
        read_folder(folder)

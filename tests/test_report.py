"""`m3tgossip report`: which folders it reads, what it adds up, the self-contained page it
writes, a real testbed run reported, and the page rendered by headless Chromium (Debian's
`chromium`, installed by the test where it can be)."""

from __future__ import annotations

import base64
import io
import json
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import WAIT_S
from system_packages import system_binary

from m3tgossip import cli
from m3tgossip.daemon.metrics import MetricsWriter
from m3tgossip.errors import ConfigError
from m3tgossip.harness import Testbed, TestbedSpec
from m3tgossip.report import load_run, write_report

pytest.importorskip("matplotlib")

PNG = b"\x89PNG\r\n\x1a\n"
TASKS = ("at_risk", "engagement")


def edu_record(node: str, session: str, r: int, sent: int, private: bool) -> dict[str, Any]:
    """One end-of-round record shaped as the engine writes it for the edu workload."""
    rec: dict[str, Any] = {
        "round": r,
        "node": node,
        "session": session,
        "time": 1.0e9 + r,
        "consensus_distance": 0.5 / (r + 1),
        "component_distance": {"head:at_risk": 0.4 / (r + 1)},
        "bytes_in": sent + 10,
        "bytes_out": sent,
        "heard": ["x"],
        "neighbours": 2,
        "deadline_s": 1.0,
        "timings": {
            "local": 0.1,
            "send": 0.01,
            "wait": 0.2,
            "mix": 0.02,
            "eval_checkpoint": 0.05,
            "total": 0.4,
        },
    }
    if private:
        rec["privacy"] = {
            "node_epsilon": 0.1 * (r + 1),
            "epsilon": {"head:at_risk": 0.1},
            "retired": [],
        }
    if r % 2 == 1:
        acc = min(1.0, 0.4 + 0.05 * r)
        rec.update(
            tasks={t: {"acc": acc, "f1": acc - 0.1, "n": 40} for t in TASKS},
            groups={"gender": {"f": {t: acc for t in TASKS}, "m": {t: acc - 0.1 for t in TASKS}}},
            gaps={"gender": {t: 0.1 for t in TASKS}, "language": {"at_risk": 0.2}},
            worst_group_gap=0.2,
            mean_acc=acc,
        )
    return rec


def write_node(folder: Path, records: list[dict[str, Any]]) -> None:
    writer = MetricsWriter(folder / "metrics.jsonl")
    for rec in records:
        writer.write(rec)
    writer.close()


def edu_run(tmp_path: Path, rounds: int = 8) -> Path:
    """A testbed-shaped run folder: summary.json and nodes/<id>/metrics.jsonl; `b` was killed
    after round 3 and restarted (a second session, its byte counters from zero)."""
    run = tmp_path / "run"
    nodes = ["a", "b", "c"]
    for nid in nodes:
        recs = [edu_record(nid, "s1", r, 1000 * (r + 1), nid != "c") for r in range(rounds)]
        if nid == "b":
            recs = recs[:4] + [
                edu_record(nid, "s2", r, 1000 * (r - 2), True) for r in range(3, rounds)
            ]
        write_node(run / "nodes" / nid, recs)
    summary = {
        "topology": "tri",
        "nodes": nodes,
        "rounds": rounds,
        "workload": "edu",
        "mode": "sync",
        "seed": 0,
        "wall_seconds": 12.5,
        "crashed": [],
        "killed": ["b"],
        "hung": [],
        "byzantine": [],
        "exit_codes": {"a": [0], "b": [-9, 0], "c": [0]},
        "final_mean_acc": 0.75,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_the_report_of_a_run_has_every_plot_and_a_row_per_node(tmp_path: Path) -> None:
    run = edu_run(tmp_path)
    path, loaded = write_report([run], title="<b>campus</b> & co")
    assert path == run / "report.html"
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>")
    for key in ("accuracy", "distance", "bytes", "privacy", "gaps", "time", "nodes"):
        assert f'<h2 id="{key}">' in page, key
    pngs = images(page)
    assert len(pngs) == 6 and all(p.startswith(PNG) and len(p) > 5000 for p in pngs)
    # self-contained: nothing is fetched from anywhere
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "&lt;b&gt;campus&lt;/b&gt; &amp; co" in page and "<b>campus" not in page
    rows = re.findall(r"<tr><td>([^<]*)</td>", page)
    assert rows == ["a", "b", "c"]
    assert "[-9, 0] (killed)" in page
    assert loaded.workload == "edu" and loaded.rounds == 8 and loaded.private and loaded.evaluated


def test_counters_of_a_restarted_node_add_up_over_its_sessions(tmp_path: Path) -> None:
    b = load_run([edu_run(tmp_path)]).nodes["b"]
    assert b.sessions == 2
    rounds, sent = b.cumulative("bytes_out")
    assert rounds == list(range(8))
    # session 1: 1000..4000 over rounds 0-3; session 2 repeats round 3 from zero: 1000, 2000...
    assert sent == [1000, 2000, 3000, 5000, 6000, 7000, 8000, 9000]
    assert b.by_round[3]["session"] == "s2"


def test_state_folders_of_deployed_nodes(tmp_path: Path) -> None:
    fleet = tmp_path / "collected"
    for nid, folder in (("uni-a", "host1"), ("uni-b", "host2")):
        write_node(fleet / folder, [edu_record(nid, "s", r, 100 * r, False) for r in range(4)])
    run = load_run([fleet])
    assert list(run.nodes) == ["uni-a", "uni-b"]  # named by their records, not folders
    assert run.summary is None and run.workload == "edu" and not run.private
    one = load_run([fleet / "host1", fleet / "host2" / "metrics.jsonl"])
    assert list(one.nodes) == ["uni-a", "uni-b"]
    path, _ = write_report([fleet / "host1", fleet / "host2"], tmp_path / "out" / "r.html")
    page = path.read_text()
    assert '<h2 id="privacy">' not in page and "No node recorded privacy accounting" in page
    assert "exit codes" not in page


def test_folders_without_metrics_or_twice_the_same_node_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty.*no metrics.jsonl"):
        load_run([tmp_path / "empty"])
    with pytest.raises(ConfigError, match="no such folder"):
        load_run([tmp_path / "missing"])
    write_node(tmp_path / "x", [edu_record("a", "s", 0, 1, False)])
    write_node(tmp_path / "y", [edu_record("a", "s", 0, 1, False)])
    with pytest.raises(ConfigError, match="node 'a' also in .*x/metrics.jsonl"):
        load_run([tmp_path / "x", tmp_path / "y"])


def test_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = edu_run(tmp_path)
    out = tmp_path / "page.html"
    assert cli.main(["report", str(run), "--out", str(out)]) == 0
    assert f"report: wrote {out} (3 nodes, 8 rounds)" in capsys.readouterr().out
    assert out.read_text().count("<img ") == 6
    assert cli.main(["report", str(tmp_path / "nothing")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_without_matplotlib_the_command_says_what_to_install(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert cli.main(["report", str(edu_run(tmp_path))]) == 1
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install -e '.[plot]'" in err


def png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(PNG) and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def screenshot(page: Path, tmp_path: Path) -> bytes:
    chromium, why = system_binary("chromium", "chromium")
    if chromium is None:
        pytest.skip(f"no headless browser: {why}")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            f"--screenshot={shot}",
            "--window-size=1280,2000",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        timeout=WAIT_S * 2,
        stdin=subprocess.DEVNULL,
        check=True,
    )
    return shot.read_bytes()


def assert_drawn(data: bytes) -> None:
    """A full-window PNG that is not blank: many distinct colours (the plots' lines)."""
    assert png_size(data) == (1280, 2000)
    from matplotlib.image import imread

    pixels = imread(io.BytesIO(data), format="png")
    colours = np.unique(pixels.reshape(-1, pixels.shape[-1]).round(2), axis=0)
    assert len(colours) > 50, f"only {len(colours)} colours: a blank page?"


@pytest.mark.multiprocess
def test_the_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    path, _ = write_report([edu_run(tmp_path)])
    assert_drawn(screenshot(path, tmp_path))


@pytest.mark.multiprocess
def test_a_real_testbed_run_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "tri.toml"
    spec.write_text('name = "tri"\n[generator]\nkind = "cycle"\nn = 3\n')
    out = tmp_path / "run"
    bed = Testbed(
        TestbedSpec(
            topology=spec, out=out, rounds=6, deadline=2.0, options={"size": 64}, prometheus=True
        )
    )
    summary = bed.run()
    assert summary.exit_code == 0
    printed = capsys.readouterr()
    # not a terminal: plain progress lines, no bar
    assert "testbed: rounds done min " in printed.out and "\r" not in printed.err
    targets = json.loads((out / "prometheus.json").read_text())
    assert [t["labels"]["node"] for t in targets] == summary.nodes
    for t in targets:
        assert bed.readies(t["labels"]["node"])[0]["prometheus"] == t["targets"][0]
    path, run = write_report([out])
    assert run.workload == "consensus" and list(run.nodes) == summary.nodes and run.rounds == 6
    page = path.read_text()
    for key in ("error", "distance", "bytes", "time"):
        assert f'<h2 id="{key}">' in page, key
    assert '<h2 id="accuracy">' not in page
    assert re.findall(r"<tr><td>([^<]*)</td>", page) == summary.nodes
    assert all(len(p) > 5000 for p in images(page))

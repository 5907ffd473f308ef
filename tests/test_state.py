"""Checkpoints, metrics files and node configs: the files an operator and the daemon share."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from m3tgossip.daemon import checkpoint
from m3tgossip.daemon.config import load_node_config
from m3tgossip.daemon.metrics import MetricsWriter, read_metrics
from m3tgossip.errors import ConfigError
from m3tgossip.topology import load_topology
from m3tgossip.workloads.consensus import ConsensusWorkload

ROOT = Path(__file__).resolve().parent.parent


def test_checkpoint_round_trip_and_atomic_replace(tmp_path: Path) -> None:
    a = {"shared/backbone": np.arange(10.0), "opt/m": np.ones((2, 3), np.float32)}
    checkpoint.save(tmp_path, a, {"round": 3, "node": "n0"})
    (tmp_path / ".checkpoint.npz.999.tmp").write_bytes(b"half-written")  # a killed writer
    arrays, meta = checkpoint.load(tmp_path)
    assert meta == {"round": 3, "node": "n0"}
    assert np.array_equal(arrays["shared/backbone"], a["shared/backbone"])
    assert arrays["opt/m"].dtype == np.float32
    assert not list(tmp_path.glob(".*.tmp"))
    checkpoint.save(tmp_path, {"x": np.zeros(2)}, {"round": 4})
    assert checkpoint.load(tmp_path)[1]["round"] == 4


def test_checkpoint_missing_and_corrupt(tmp_path: Path) -> None:
    assert checkpoint.load(tmp_path) is None
    (tmp_path / checkpoint.FILENAME).write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint.npz"):
        checkpoint.load(tmp_path)


def test_metrics_skip_torn_last_line_and_nan(tmp_path: Path) -> None:
    w = MetricsWriter(tmp_path / "m.jsonl")
    w.write({"round": 0, "loss": float("nan"), "v": np.float32(1.5)})
    w.write({"round": 1})
    w.close()
    with open(tmp_path / "m.jsonl", "a") as fh:
        fh.write('{"round": 2, "tor')
    recs = read_metrics(tmp_path / "m.jsonl")
    assert recs == [{"round": 0, "loss": None, "v": 1.5}, {"round": 1}]


def test_consensus_workload_exact_mean_and_resume() -> None:
    topo = load_topology(ROOT / "topology/ring-8.toml")
    loads = [ConsensusWorkload(topo, nid, seed=3, options={"size": 50}) for nid in topo.ids()]
    for comp in loads[0].shared():
        mean = np.mean([w.shared()[comp] for w in loads], axis=0)
        for w in loads:
            w.shared()[comp][...] = mean
    assert all(w.error_to_mean() < 1e-12 for w in loads)
    fresh = ConsensusWorkload(topo, "n0", seed=3, options={"size": 50})
    assert fresh.error_to_mean() > 0.1
    fresh.load_state(loads[0].state())
    assert fresh.error_to_mean() < 1e-12
    with pytest.raises(ValueError, match="unknown"):
        ConsensusWorkload(topo, "n0", options={"sise": 5})


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[node]\nid = 'n0'\ntopology = 'x.toml'\nroundz = 3\n", ["[node] roundz", "unknown key"]),
        ("[gossip]\nmode = 'flood'\n", ["[gossip]", "mode"]),
        ("[gossip]\nquorum = 2.0\n", ["quorum"]),
        ("[transport]\nlinger_ms = -1\n", ["transport.linger_ms"]),
        ("[extra]\na = 1\n", ["[extra]", "unknown table"]),
        ("[node\n", ["not valid TOML"]),
        ("[node]\nworkload = 'train'\n", ["workload"]),
    ],
)
def test_bad_node_config_names_file_and_entry(tmp_path: Path, text: str, words: list[str]) -> None:
    path = tmp_path / "node.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_node_config(str(path), {"id": "n0", "topology": "x.toml"})
    assert str(path) in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_config_paths_relative_to_file(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(
        "[node]\nid = 'n0'\ntopology = 'topo.toml'\nstate_dir = 'state'\n[workload]\nsize = 7\n"
    )
    cfg = load_node_config(str(path), {"rounds": 5})
    assert cfg.topology == str(tmp_path / "topo.toml")
    assert cfg.state_path == tmp_path / "state" and cfg.rounds == 5
    assert cfg.workload_options == {"size": 7}


@pytest.mark.multiprocess
def test_cli_reports_bad_config_and_topology(tmp_path: Path) -> None:
    bad = tmp_path / "node.toml"
    bad.write_text("[node]\nid = 'n0'\ntopology = 'nowhere.toml'\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run(
        [sys.executable, "-m", "m3tgossip", "node", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert run.returncode == 2 and "nowhere.toml" in run.stderr
    topo = tmp_path / "t.toml"
    topo.write_text("name = 't'\nedges = [['a', 'a']]\n[[nodes]]\nid = 'a'\n")
    run = subprocess.run(
        [sys.executable, "-m", "m3tgossip", "topology", "check", str(topo)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert run.returncode == 2 and "t.toml" in run.stderr
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "m3tgossip",
            "topology",
            "check",
            str(ROOT / "topology/ring-8.toml"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert run.returncode == 0 and json.loads(run.stdout)["connected"] is True

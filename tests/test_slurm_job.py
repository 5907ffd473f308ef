"""A 16-daemon consensus job through a real SLURM: sbatch runs the keys step, srun one
`m3tgossip slurm task` per node on a private single-host cluster (munged, slurmctld and slurmd
started by the test, 16 tasks on 2 CPUs with --overcommit), and every node converges."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import slurm_cluster

from m3tgossip.cli import main
from m3tgossip.topology import load_topology, parse_topology

ROOT = Path(__file__).resolve().parent.parent
TORUS = ROOT / "topology" / "torus-16.toml"
ROUNDS = 80
JOB_S = 600.0


@pytest.fixture
def cluster(tmp_path_factory):
    reason = slurm_cluster.unavailable()
    if reason:
        pytest.skip(f"no single-host SLURM: {reason}")
    local = slurm_cluster.LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        try:
            local.start()
        except RuntimeError as exc:
            pytest.skip(f"single-host SLURM did not start: {exc}")
        yield local
    finally:
        local.stop()


@pytest.mark.multiprocess
def test_a_sixteen_daemon_consensus_job_converges(cluster, tmp_path: Path) -> None:
    out = tmp_path / "job"
    base = slurm_cluster.consecutive_free_ports(16)
    argv = ["slurm", "sbatch", "--topology", str(TORUS), "--out", str(out)]
    argv += ["--workload", "consensus", "--rounds", str(ROUNDS), "--base-port", str(base)]
    argv += ["--overcommit", "--startup-grace", "120", "-o", "size=256"]
    assert main(argv) == 0
    env = cluster.env
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    try:
        done = subprocess.run(
            ["sbatch", "--wait", "--parsable", str(out / "job.sbatch")],
            env=env,
            capture_output=True,
            text=True,
            timeout=JOB_S,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the job did not end within {JOB_S:g} s")
    job_id = done.stdout.strip().split(";")[0]
    output = out / f"slurm-{job_id}.out"
    text = output.read_text(errors="replace") if output.exists() else ""
    assert done.returncode == 0, f"{done.stderr}\n{text[-4000:]}\n{cluster.log('slurmd')}"

    ids = load_topology(TORUS).ids()
    job = out / f"job-{job_id}"
    shared = (job / "topology.toml").read_text()
    spec = parse_topology(tomllib.loads(shared), "resolved")
    for rank, nid in enumerate(ids):
        # every task wrote the same resolved spec; its row is this task's host and port
        assert (job / "nodes" / nid / "topology.toml").read_text() == shared
        node = spec.node(nid)
        assert (node.host, node.port) == ("localhost", base + rank)
        assert node.public_key == (job / "keys" / f"{nid}.key").read_text().strip()
        assert re.search(
            rf"slurm task {rank}/16: node {nid} on localhost:{base + rank} \(CURVE\)", text
        )
    for nid in ids:
        records = [
            json.loads(line)
            for line in (job / "nodes" / nid / "metrics.jsonl").read_text().splitlines()
        ]
        assert records[-1]["round"] == ROUNDS - 1, nid
        assert records[-1]["error_to_mean"] <= 1e-6, (nid, records[-1]["error_to_mean"])
    summary = json.loads((job / "summary.json").read_text())
    assert summary["missing"] == [] and summary["max_error"] <= 1e-6
    assert "target 1e-06 reached" in text

"""The SLURM launcher without SLURM: host lists, task layouts, the rank -> node table every
task derives alike, the job script, the keys step, and tasks run with a SLURM-like
environment on loopback."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from slurm_cluster import consecutive_free_ports

from m3tgossip.cli import main
from m3tgossip.engines import (
    SlurmStep,
    collect,
    ensure_keys,
    expand_hostlist,
    layout,
    plan_task,
    tasks_per_node,
)
from m3tgossip.errors import ConfigError
from m3tgossip.topology import load_topology, parse_topology

ROOT = Path(__file__).resolve().parent.parent
TORUS = ROOT / "topology" / "torus-16.toml"
WAIT_S = 120.0


def step_env(rank: int, ntasks: int = 16, nodelist: str = "localhost", **extra: str) -> dict:
    env = {
        "SLURM_PROCID": str(rank),
        "SLURM_NTASKS": str(ntasks),
        "SLURM_STEP_NODELIST": nodelist,
        "SLURM_JOB_ID": "42",
    }
    env.update(extra)
    return env


def test_host_lists_expand_as_scontrol_does() -> None:
    assert expand_hostlist("node[01-03,7],gpu1") == ["node01", "node02", "node03", "node7", "gpu1"]
    assert expand_hostlist("localhost") == ["localhost"]
    assert expand_hostlist("r[1-2]n[8-9]") == ["r1n8", "r1n9", "r2n8", "r2n9"]
    assert expand_hostlist("a[9-11]") == ["a9", "a10", "a11"]
    for bad in ("node[1-3", "node]1[", "node[3-1]", "node[x]", "a,,b", ""):
        with pytest.raises(ConfigError):
            expand_hostlist(bad)


def test_tasks_per_node_and_layouts() -> None:
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert tasks_per_node("16") == [16]
    with pytest.raises(ConfigError, match="bad tasks-per-node"):
        tasks_per_node("2(3)")
    nodes = ["a", "b", "c"]
    assert layout(nodes, [2, 2, 1], "block") == ["a", "a", "b", "b", "c"]
    assert layout(nodes, [2, 2, 1], "cyclic:block") == ["a", "b", "c", "a", "b"]
    assert layout(nodes, [3, 2, 1], "plane=2") == ["a", "a", "b", "b", "c", "a"]
    assert layout(["x"], [3], "arbitrary") == ["x", "x", "x"]
    with pytest.raises(ConfigError, match="--distribution=block"):
        layout(nodes, [1, 1, 1], "arbitrary")


def test_the_step_comes_from_the_task_environment() -> None:
    env = step_env(
        5,
        8,
        "node[1-4]",
        SLURM_STEP_TASKS_PER_NODE="2(x4)",
        SLURMD_NODENAME="node3",
        SLURM_DISTRIBUTION="block",
    )
    step = SlurmStep.from_env(env, hostnames=expand_hostlist)
    assert step.rank == 5 and step.ntasks == 8 and step.job_id == "42"
    assert step.hosts == ("node1",) * 2 + ("node2",) * 2 + ("node3",) * 2 + ("node4",) * 2
    # the task is not where the table puts it: the layout was misread, refuse
    with pytest.raises(ConfigError, match="SLURMD_NODENAME: task 5 runs on node1"):
        SlurmStep.from_env({**env, "SLURMD_NODENAME": "node1"}, hostnames=expand_hostlist)
    missing = dict(env)
    del missing["SLURM_PROCID"]
    with pytest.raises(ConfigError, match="SLURM_PROCID: not set"):
        SlurmStep.from_env(missing, hostnames=expand_hostlist)
    with pytest.raises(ConfigError, match="6 tasks placed"):
        SlurmStep.from_env(
            {**env, "SLURM_STEP_TASKS_PER_NODE": "2(x3)", "SLURM_STEP_NODELIST": "node[1-3]"},
            hostnames=expand_hostlist,
        )


def test_every_task_derives_the_same_spec_with_its_own_row(tmp_path: Path) -> None:
    keys = ensure_keys(tmp_path / "job" / "keys", load_topology(TORUS).ids())
    texts, plans = set(), []
    for rank in range(16):
        env = step_env(
            rank,
            16,
            "cn[1-2]",
            SLURM_STEP_TASKS_PER_NODE="8(x2)",
            SLURMD_NODENAME=f"cn{1 + rank // 8}",
        )
        step = SlurmStep.from_env(env, hostnames=expand_hostlist)
        plan = plan_task(TORUS, tmp_path / "job", step, base_port=7100)
        plans.append(plan)
        texts.add(plan.topology.read_text())
    assert len(texts) == 1  # the same resolved spec on every task
    shared = (tmp_path / "job" / "topology.toml").read_text()
    assert texts == {shared}
    spec = parse_topology(tomllib.loads(shared), "resolved")
    ids = load_topology(TORUS).ids()
    for rank, plan in enumerate(plans):
        node = spec.node(ids[rank])
        assert plan.node == ids[rank] and plan.rank == rank
        assert (node.host, node.port) == (f"cn{1 + rank // 8}", 7100 + rank)
        assert node.public_key == keys[ids[rank]]
        assert plan.endpoints[ids[0]] == "tcp://cn1:7100"
        overrides = plan.overrides()
        assert overrides["id"] == ids[rank] and overrides["key_dir"] == str(tmp_path / "job/keys")
        assert overrides["status_keys"].endswith("operator.key")


def test_a_task_refuses_what_the_job_cannot_run(tmp_path: Path) -> None:
    job = tmp_path / "job"
    step8 = SlurmStep.from_env(step_env(0, 8), hostnames=expand_hostlist)
    ensure_keys(job / "keys", load_topology(TORUS).ids())
    with pytest.raises(ConfigError, match="8 tasks for 16 nodes.*--ntasks=16"):
        plan_task(TORUS, job, step8)
    step = SlurmStep.from_env(step_env(0, 16), hostnames=expand_hostlist)
    with pytest.raises(ConfigError, match="not all in 1..65535"):
        plan_task(TORUS, job, step, base_port=65530)
    with pytest.raises(ConfigError, match="no such public key.*slurm keys"):
        plan_task(TORUS, job, step, keys_dir=tmp_path / "elsewhere")
    remote = SlurmStep.from_env(step_env(0, 16, "cn1"), hostnames=expand_hostlist)
    with pytest.raises(ConfigError, match="plaintext only when every task runs on loopback"):
        plan_task(TORUS, job, remote, insecure=True)
    plan = plan_task(TORUS, job, step, insecure=True)
    assert plan.insecure and plan.key_dir is None and plan.overrides()["insecure"] is True


def test_the_keys_step_writes_once_and_keeps_what_is_there(tmp_path: Path, capsys) -> None:
    out = tmp_path / "keys"
    assert main(["slurm", "keys", "--topology", str(TORUS), "--out", str(out)]) == 0
    assert "16 node keypairs and an operator keypair" in capsys.readouterr().out
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    secrets = sorted(out.glob("*.key_secret"))
    assert len(secrets) == 17
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in secrets)
    before = {p.name: p.read_text() for p in out.iterdir()}
    assert main(["slurm", "keys", "--topology", str(TORUS), "--out", str(out)]) == 0
    assert {p.name: p.read_text() for p in out.iterdir()} == before
    (out / "n3.key").unlink()
    assert main(["slurm", "keys", "--topology", str(TORUS), "--out", str(out)]) == 2
    assert "half a keypair" in capsys.readouterr().err


def test_the_job_script_runs_keys_then_one_task_per_node(tmp_path: Path, capsys) -> None:
    out = tmp_path / "slurm"
    argv = ["slurm", "sbatch", "--topology", str(TORUS), "--out", str(out), "--rounds", "80"]
    argv += ["--overcommit", "--base-port", "7300", "--set", "gossip.startup_grace_s=60"]
    argv += ["-o", "size=256", "--time", "00:10:00", "--sbatch-option=--account=edu"]
    assert main(argv) == 0
    assert "submit with: sbatch" in capsys.readouterr().out
    script = (out / "job.sbatch").read_text()
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for option in ("--ntasks=16", "--overcommit", "--time=00:10:00", "--account=edu"):
        assert f"#SBATCH {option}" in lines
    assert f"#SBATCH --output={out}/slurm-%j.out" in lines
    keys_at = script.index("slurm keys")
    srun_at = script.index("srun --ntasks=16 --distribution=block --kill-on-bad-exit=1")
    assert keys_at < srun_at < script.index("slurm collect")
    task = script[srun_at:].split("\n    ", 1)[1].split("\n")[0]
    for part in ("--base-port 7300", "--rounds 80", "--set gossip.startup_grace_s=60"):
        assert part in task
    assert "-o size=256" in task and '--keys "$JOB_DIR/keys"' in task
    assert load_topology(out / "topology.toml").ids() == load_topology(TORUS).ids()
    assert subprocess.run(["bash", "-n", str(out / "job.sbatch")], check=False).returncode == 0
    bad = ["slurm", "sbatch", "--topology", str(TORUS), "--out", str(out), "--set", "x.y=1"]
    assert main(bad) == 2


def test_collect_reads_every_nodes_last_record(tmp_path: Path) -> None:
    job = tmp_path / "job"
    step = SlurmStep.from_env(step_env(0, 16), hostnames=expand_hostlist)
    plan_task(TORUS, job, step, insecure=True)
    ids = load_topology(TORUS).ids()
    for i, nid in enumerate(ids[:-1]):
        folder = job / "nodes" / nid
        folder.mkdir(parents=True, exist_ok=True)
        lines = [
            {"round": r, "error_to_mean": 10.0 ** -(r + i % 3), "bytes_out": r} for r in range(8)
        ]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    report = collect(job, target=1e-6)
    assert report["missing"] == [ids[-1]]
    assert report["nodes"][ids[0]]["rounds"] == 8
    assert report["max_error"] == pytest.approx(1e-7)


@pytest.mark.multiprocess
def test_tasks_with_a_slurm_environment_run_a_federation(tmp_path: Path) -> None:
    """Four `m3tgossip slurm task` processes given what srun gives its tasks (no SLURM here):
    each finds its node, writes the same spec, and the daemons converge over CURVE."""
    spec = tmp_path / "ring4.toml"
    spec.write_text('name = "ring-4"\n[generator]\nkind = "cycle"\nn = 4\n')
    job = tmp_path / "job"
    assert main(["slurm", "keys", "--topology", str(spec), "--out", str(job / "keys")]) == 0
    base = consecutive_free_ports(4)
    procs = []
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        for rank in range(4):
            task_env = dict(env, **step_env(rank, 4, "localhost"), SLURMD_NODENAME="localhost")
            cmd = [sys.executable, "-m", "m3tgossip", "slurm", "task", "--topology", str(spec)]
            cmd += ["--job-dir", str(job), "--base-port", str(base), "--workload", "consensus"]
            cmd += ["--rounds", "40", "-o", "size=64", "--startup-grace", "60"]
            log = open(tmp_path / f"task{rank}.log", "wb")
            procs.append(subprocess.Popen(cmd, env=task_env, stdout=log, stderr=subprocess.STDOUT))
            log.close()
        codes = [p.wait(timeout=WAIT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=WAIT_S)
    logs = {r: (tmp_path / f"task{r}.log").read_text() for r in range(4)}
    assert codes == [0, 0, 0, 0], logs
    for rank in range(4):
        assert f"slurm task {rank}/4: node n{rank} on localhost:{base + rank}" in logs[rank]
    report = collect(job)
    assert report["missing"] == [] and report["max_error"] <= 1e-6
    assert all(e["rounds"] == 40 for e in report["nodes"].values())


def test_a_plaintext_job_has_no_keys_step(tmp_path: Path) -> None:
    out = tmp_path / "plain"
    argv = ["slurm", "sbatch", "--topology", str(TORUS), "--out", str(out), "--insecure"]
    assert main(argv) == 0
    script = (out / "job.sbatch").read_text()
    assert "slurm keys" not in script and "--keys" not in script
    assert "slurm task" in script and "--insecure" in script
    assert "#SBATCH --overcommit" not in script and "srun --ntasks=16" in script

"""SLURM: a batch job that runs one node daemon per task, and the launcher each task runs.

    m3tgossip slurm sbatch --topology SPEC --out DIR --rounds 60      # writes DIR/job.sbatch
    sbatch DIR/job.sbatch

The job has three steps, all on the shared filesystem under `DIR/job-<SLURM_JOB_ID>`:

1. On the batch host, before any task starts, `m3tgossip slurm keys` writes one CURVE keypair
   per node and an operator keypair into `keys/` (secrets mode 600, folder mode 700). Keys are
   never derived from anything a task could recompute: they are random, written once, and
   read by the tasks.
2. `srun` starts one task per node of the spec; each runs `m3tgossip slurm task`, which maps
   itself to a node and runs that node's daemon in its own process.
3. `m3tgossip slurm collect` reads every node's metrics and prints one line per node.

Mapping. Task rank `r` (`SLURM_PROCID`) runs the spec's node at position `r` (its `index`).
Its host is the SLURM node the step put rank `r` on: the step's node list
(`SLURM_STEP_NODELIST`, else `SLURM_JOB_NODELIST`, expanded by `scontrol show hostnames`) with
the step's tasks per node (`SLURM_STEP_TASKS_PER_NODE`) laid out in the step's distribution
(`block`, `cyclic` or `plane=N`; the template asks srun for `block`). Its port is the base port
plus `r`. Every task computes the whole table from the same environment, so every task writes
the same resolved spec (hosts, ports, public keys) without asking anyone, and each checks that
the host the table gives its own rank is the node it runs on (`SLURMD_NODENAME`).
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m3tgossip.engines.common import OPERATOR, write_atomic
from m3tgossip.engines.slurm_step import SlurmStep
from m3tgossip.errors import ConfigError
from m3tgossip.net import PUBLIC_SUFFIX, is_loopback, load_public
from m3tgossip.topology import Topology, load_topology

#: default first port; task r listens on BASE_PORT + r
BASE_PORT = 5701


def resolve(
    topology: Topology,
    hosts: Sequence[str],
    base_port: int,
    keys: Mapping[str, str] | None = None,
) -> Topology:
    """The spec with node `i` on `hosts[i]:base_port + i` and these public keys."""
    if len(hosts) != len(topology.nodes):
        raise ConfigError(
            topology.source,
            "nodes",
            f"{len(hosts)} tasks for {len(topology.nodes)} nodes: run one task per node "
            f"(sbatch --ntasks={len(topology.nodes)})",
        )
    last = base_port + len(hosts) - 1
    if base_port < 1 or last > 65535:
        raise ConfigError(
            "--base-port", str(base_port), f"ports {base_port}..{last} are not all in 1..65535"
        )
    by_host: dict[str, dict[str, int]] = {}
    for i, (node, host) in enumerate(zip(topology.ids(), hosts, strict=True)):
        by_host.setdefault(host, {})[node] = base_port + i
    out = topology
    for host, ports in by_host.items():
        out = out.with_ports(ports, host)
    return out.with_keys(keys) if keys else out


# ----------------------------------------------------------------------------- one task


@dataclass(frozen=True)
class TaskPlan:
    """What one task runs: its node, where it listens, and its files."""

    rank: int
    node: str
    host: str
    port: int
    #: the resolved spec the daemon reads (the same text on every task)
    topology: Path
    state_dir: Path
    key_dir: Path | None
    status_keys: Path | None
    insecure: bool
    bind: str = ""
    endpoints: dict[str, str] = field(default_factory=dict)

    def overrides(self) -> dict[str, Any]:
        """The node config keys this plan fixes (`load_node_config` overrides)."""
        out: dict[str, Any] = {
            "id": self.node,
            "topology": str(self.topology),
            "state_dir": str(self.state_dir),
            "insecure": True if self.insecure else None,
            "key_dir": str(self.key_dir) if self.key_dir else None,
            "status_keys": str(self.status_keys) if self.status_keys else None,
        }
        if self.bind:
            out["bind"] = self.bind
        return out

    def describe(self, ntasks: int) -> str:
        return (
            f"slurm task {self.rank}/{ntasks}: node {self.node} on {self.host}:{self.port} "
            f"({'plaintext' if self.insecure else 'CURVE'}), state {self.state_dir}"
        )


def read_keys(folder: Path, ids: Sequence[str]) -> dict[str, str]:
    """node id -> public key from `folder/<id>.key`; ConfigError saying how to make them."""
    keys = {}
    for nid in ids:
        path = folder / f"{nid}{PUBLIC_SUFFIX}"
        if not path.exists():
            raise ConfigError(
                str(path),
                "",
                "no such public key: the job's first step, `m3tgossip slurm keys --topology "
                f"SPEC --out {folder}`, writes them before srun (the template does)",
            )
        keys[nid] = load_public(path)
    return keys


def plan_task(
    topology_path: str | os.PathLike[str],
    job_dir: str | os.PathLike[str],
    step: SlurmStep,
    *,
    base_port: int = BASE_PORT,
    keys_dir: str | os.PathLike[str] | None = None,
    insecure: bool = False,
    host_suffix: str = "",
    bind_all: bool = False,
) -> TaskPlan:
    """Map the task to its node, write the resolved spec and return the plan.

    The resolved spec goes to `JOB_DIR/nodes/<id>/topology.toml` (the copy this task's daemon
    reads) and `JOB_DIR/topology.toml` (for operators; every task writes the same text, each
    through its own temporary file and a rename).
    """
    topology = load_topology(topology_path)
    job = Path(job_dir).absolute()
    hosts = [h + host_suffix for h in step.hosts]
    ids = topology.ids()
    keys_folder = Path(keys_dir).absolute() if keys_dir else job / "keys"
    keys: dict[str, str] | None = None
    if insecure:
        off = [h for h in hosts if not is_loopback(f"tcp://{h}:1")]
        if off:
            raise ConfigError(
                "--insecure",
                off[0],
                "plaintext only when every task runs on loopback; this host is not "
                "(drop --insecure: the job's keys step gives every node a keypair)",
            )
    else:
        keys = read_keys(keys_folder, ids)
    resolved = resolve(topology, hosts, base_port, keys)
    text = resolved.to_toml()
    node = ids[step.rank]
    own = job / "nodes" / node / "topology.toml"
    write_atomic(own, text, f".{step.rank}")
    write_atomic(job / "topology.toml", text, f".{step.rank}")
    operator = keys_folder / f"{OPERATOR}{PUBLIC_SUFFIX}"
    spec = resolved.node(node)
    assert spec.port is not None
    return TaskPlan(
        rank=step.rank,
        node=node,
        host=spec.host,
        port=spec.port,
        topology=own,
        state_dir=own.parent,
        key_dir=None if insecure else keys_folder,
        status_keys=operator if not insecure and operator.exists() else None,
        insecure=insecure,
        bind=f"tcp://0.0.0.0:{spec.port}" if bind_all else "",
        endpoints={n.id: n.endpoint for n in resolved.nodes},
    )


# ----------------------------------------------------------------------------- the template


@dataclass(frozen=True)
class SbatchOptions:
    """What `m3tgossip slurm sbatch` writes into the job script."""

    #: the command that runs m3tgossip on the cluster's nodes
    command: tuple[str, ...]
    #: arguments every task passes to `m3tgossip slurm task` after the fixed ones
    task_args: tuple[str, ...] = ()
    base_port: int = BASE_PORT
    insecure: bool = False
    overcommit: bool = False
    job_name: str = ""
    time: str = ""
    partition: str = ""
    #: further `#SBATCH` options, e.g. `--account=edu`
    sbatch: tuple[str, ...] = ()


def sbatch_script(topology: Topology, out: Path, opts: SbatchOptions) -> str:
    """The job script for `topology` (copied to `out/topology.toml`), output under `out`."""
    n = len(topology.nodes)
    name = opts.job_name or re.sub(r"[^A-Za-z0-9._-]", "-", f"m3t-{topology.name}")
    q = shlex.quote
    head = [f"--job-name={name}", f"--ntasks={n}", f"--output={out}/slurm-%j.out"]
    head += ["--overcommit"] if opts.overcommit else []
    head += [f"--time={opts.time}"] if opts.time else []
    head += [f"--partition={opts.partition}"] if opts.partition else []
    head += list(opts.sbatch)
    for option in head:
        if "\n" in option or not option.startswith("-"):
            raise ConfigError("--sbatch-option", option, "one sbatch option, starting with -")
    srun = ["srun", f"--ntasks={n}", "--distribution=block", "--kill-on-bad-exit=1", "--label"]
    srun += ["--overcommit"] if opts.overcommit else []
    task = ["slurm", "task", "--topology", '"$OUT/topology.toml"', "--job-dir", '"$JOB_DIR"']
    task += ["--base-port", str(opts.base_port)]
    task += ["--insecure"] if opts.insecure else ["--keys", '"$JOB_DIR/keys"']
    task += [q(a) for a in opts.task_args]
    lines = ["#!/bin/bash"] + [f"#SBATCH {option}" for option in head]
    lines += [
        "#",
        f"# {n} m3tgossip node daemons of topology {topology.name!r}, one per SLURM task: task",
        f"# rank r runs node r of {out}/topology.toml on the host SLURM places the task on,",
        f"# listening on port {opts.base_port} + r. Submit with: sbatch {out}/job.sbatch",
        "set -euo pipefail",
        f"M3T=({' '.join(q(c) for c in opts.command)})",
        f"OUT={q(str(out))}",
        'JOB_DIR="$OUT/job-$SLURM_JOB_ID"',
        'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONUNBUFFERED=1',
        'mkdir -p "$JOB_DIR"',
        "",
    ]
    if not opts.insecure:
        lines += [
            "# 1. a CURVE keypair per node and an operator key on the shared filesystem, before",
            "#    any task starts (random keys, written once; secrets mode 600)",
            '"${M3T[@]}" slurm keys --topology "$OUT/topology.toml" --out "$JOB_DIR/keys"',
            "",
        ]
    lines += [
        "# 2. one daemon per task; every task derives the same hosts, ports and keys table",
        "status=0",
        " ".join(srun) + ' \\\n    "${M3T[@]}" ' + " ".join(task) + " || status=$?",
        "",
        "# 3. every node's last metrics",
        "collected=0",
        '"${M3T[@]}" slurm collect --job-dir "$JOB_DIR" || collected=$?',
        'if [ "$status" -eq 0 ]; then status=$collected; fi',
        'exit "$status"',
    ]
    return "\n".join(lines) + "\n"


def write_sbatch(
    topology_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], opts: SbatchOptions
) -> Path:
    """Write `OUT/topology.toml` (the spec in explicit form) and `OUT/job.sbatch`."""
    topology = load_topology(topology_path)
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    (out / "topology.toml").write_text(topology.to_toml())
    script = out / "job.sbatch"
    script.write_text(sbatch_script(topology, out, opts))
    script.chmod(0o755)
    return script


# ----------------------------------------------------------------------------- the results


def collect(job_dir: str | os.PathLike[str], target: float = 1e-6) -> dict[str, Any]:
    """Every node's last metrics record of a job (`JOB_DIR/nodes/<id>/metrics.jsonl`).

    Returns `{"topology", "target", "nodes": {id: {...}}, "missing", "max_error"}`; a node's
    entry has its `rounds` recorded, `last_round`, `bytes_out`, `bytes_in` and, as its
    workload records them, `error_to_mean` (consensus) or `mean_acc` (edu).
    """
    from m3tgossip.daemon.metrics import read_metrics

    job = Path(job_dir)
    spec = job / "topology.toml"
    if not spec.exists():
        raise ConfigError(str(job), "topology.toml", "missing: no task of this job started")
    topology = load_topology(spec)
    nodes: dict[str, dict[str, Any]] = {}
    missing = []
    for node in topology.nodes:
        records = read_metrics(job / "nodes" / node.id / "metrics.jsonl")
        if not records:
            missing.append(node.id)
            continue
        last = records[-1]
        entry: dict[str, Any] = {
            "endpoint": node.endpoint,
            "rounds": len({int(r["round"]) for r in records}),
            "last_round": int(last["round"]),
            "bytes_out": last.get("bytes_out"),
            "bytes_in": last.get("bytes_in"),
        }
        for key in ("error_to_mean", "mean_acc"):
            if key in last:
                entry[key] = last[key]
        nodes[node.id] = entry
    errors = [e["error_to_mean"] for e in nodes.values() if e.get("error_to_mean") is not None]
    return {
        "topology": topology.name,
        "target": target,
        "nodes": nodes,
        "missing": missing,
        "max_error": max(errors) if errors else None,
    }


def format_collect(report: Mapping[str, Any]) -> str:
    """The table `m3tgossip slurm collect` prints."""
    lines = [f"topology {report['topology']}: {len(report['nodes'])} nodes recorded rounds"]
    lines.append(f"{'node':<14}{'endpoint':<28}{'rounds':>7}{'error/acc':>12}")
    for node, e in report["nodes"].items():
        value = e.get("error_to_mean", e.get("mean_acc"))
        shown = f"{value:>12.3e}" if isinstance(value, float) else f"{'-':>12}"
        lines.append(f"{node:<14}{e['endpoint']:<28}{e['rounds']:>7}{shown}")
    if report["missing"]:
        lines.append(f"NO METRICS from: {', '.join(report['missing'])}")
    worst = report["max_error"]
    if worst is not None:
        verdict = "reached" if worst <= report["target"] else "not reached"
        lines.append(
            f"largest error to the mean {worst:.3e}: target {report['target']:g} {verdict}"
        )
    return "\n".join(lines)

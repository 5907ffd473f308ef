"""The `m3tgossip slurm ...` and `m3tgossip kube ...` subcommands: parsing, then a module call.

m3tgossip slurm sbatch --topology SPEC --out DIR [--rounds 100] [--overcommit] ...
m3tgossip slurm keys --topology SPEC --out DIR          (the job's first step)
m3tgossip slurm task --topology SPEC --job-dir DIR ...  (each srun task)
m3tgossip slurm collect --job-dir DIR [--json]
m3tgossip kube manifests --topology SPEC --out DIR [--name m3t] [--namespace default] ...
m3tgossip kube keys --name NAME --topology FILE --from DIR --to DIR   (init container)
m3tgossip kube node --name NAME --topology FILE --config FILE          (daemon container)
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

from m3tgossip.engines import kubernetes, slurm
from m3tgossip.engines.common import ensure_keys, node_overrides
from m3tgossip.engines.slurm_step import SlurmStep
from m3tgossip.errors import ConfigError


def _raw_option(text: str) -> str:
    """`key=value`, kept as written (the sbatch template passes it on to every task)."""
    key, sep, _ = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return text


def parse_option(text: str) -> tuple[str, Any]:
    """`key=value` with a TOML value (`size=4096`, `mode="separate"`); a bare word is a string."""
    key, _, value = text.partition("=")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key.strip(), parsed


def _node_options(p: argparse.ArgumentParser, workload: str | None, rounds: int | None) -> None:
    p.add_argument("--workload", default=workload, help=f"consensus | edu (default {workload})")
    p.add_argument("--rounds", type=int, default=rounds, help="rounds to run (0: until stopped)")
    p.add_argument("--seed", type=int, help="federation seed (default 0)")
    p.add_argument(
        "--deadline", dest="gossip.round_deadline_s", type=float, help="round deadline (s)"
    )
    p.add_argument(
        "--startup-grace",
        dest="gossip.startup_grace_s",
        type=float,
        help="seconds to wait for neighbours at start",
    )
    p.add_argument(
        "--set",
        action="append",
        type=_raw_option,
        default=[],
        dest="settings",
        metavar="TABLE.KEY=VALUE",
        help="a gossip, transport, faults or privacy setting of every node (repeatable)",
    )
    p.add_argument(
        "--option",
        "-o",
        action="append",
        type=_raw_option,
        default=[],
        dest="options",
        metavar="KEY=VALUE",
        help="workload option of every node (repeatable)",
    )


_NODE_KEYS = ("workload", "rounds", "seed", "gossip.round_deadline_s", "gossip.startup_grace_s")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {k: getattr(args, k) for k in _NODE_KEYS}
    settings = [parse_option(s) for s in args.settings]
    out.update(node_overrides(settings, [parse_option(o) for o in args.options]))
    return {k: v for k, v in out.items() if v is not None}


def _placement(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--base-port",
        type=int,
        default=slurm.BASE_PORT,
        help=f"task r listens on BASE_PORT + r (default {slurm.BASE_PORT})",
    )
    p.add_argument(
        "--host-suffix", default="", help="appended to SLURM node names, e.g. .ib.cluster"
    )
    p.add_argument(
        "--bind-all", action="store_true", help="listen on 0.0.0.0 instead of the node's host"
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext links (only when every task runs on one host's loopback)",
    )


def _slurm_parsers(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("slurm", help="run a federation as a SLURM job, one daemon per task")
    cmds = group.add_subparsers(dest="engine_command", required=True)
    p = cmds.add_parser("sbatch", help="write DIR/job.sbatch (submit it with sbatch)")
    p.add_argument("--topology", required=True, help="the shared spec")
    p.add_argument("--out", required=True, metavar="DIR", help="job folder on a shared filesystem")
    p.add_argument("--config", help="node config file every task reads (no id or topology)")
    _node_options(p, "consensus", 100)
    _placement(p)
    p.add_argument("--job-name", default="", help="default m3t-<topology name>")
    p.add_argument("--time", default="", help="sbatch --time, e.g. 01:00:00")
    p.add_argument("--partition", default="", help="sbatch --partition")
    p.add_argument(
        "--overcommit",
        action="store_true",
        help="allow more tasks than CPUs (sbatch and srun --overcommit)",
    )
    p.add_argument(
        "--sbatch-option",
        action="append",
        default=[],
        dest="sbatch",
        metavar="OPTION",
        help="a further #SBATCH line, e.g. --sbatch-option=--account=edu (repeatable)",
    )
    p.add_argument(
        "--python", default=sys.executable, help=f"python on the nodes (default {sys.executable})"
    )
    p = cmds.add_parser("keys", help="write a CURVE keypair per node and an operator key")
    p.add_argument("--topology", required=True)
    p.add_argument("--out", required=True, metavar="DIR", help="key folder (created, mode 700)")
    p = cmds.add_parser("task", help="run this srun task's node daemon")
    p.add_argument("--topology", required=True, help="the shared spec (hosts, ports, keys filled)")
    p.add_argument("--job-dir", required=True, metavar="DIR", help="the job's shared folder")
    p.add_argument("--keys", metavar="DIR", help="key folder (default JOB_DIR/keys)")
    p.add_argument("--config", help="node config file (no id or topology)")
    _node_options(p, None, None)
    _placement(p)
    p = cmds.add_parser("collect", help="every node's last metrics of a job")
    p.add_argument("--job-dir", required=True, metavar="DIR")
    p.add_argument("--target", type=float, default=1e-6, help="consensus target (1e-6)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _kube_parsers(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("kube", help="run a federation on Kubernetes as a StatefulSet")
    cmds = group.add_subparsers(dest="engine_command", required=True)
    d = kubernetes.KubeOptions()
    p = cmds.add_parser("manifests", help="write DIR/manifests/*.json and DIR/keys")
    p.add_argument("--topology", required=True)
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--name", default=d.name, help=f"StatefulSet and Service name ({d.name})")
    p.add_argument("--namespace", default=d.namespace, help=f"({d.namespace})")
    p.add_argument("--image", default=d.image, help=f"container image ({d.image})")
    p.add_argument("--port", type=int, default=d.port, help=f"gossip port ({d.port})")
    p.add_argument("--cluster-domain", default="", help="e.g. cluster.local (default: none)")
    p.add_argument("--storage", default=d.storage, help=f"state volume size ({d.storage})")
    p.add_argument("--storage-class", default="", help="storage class of the state volumes")
    p.add_argument("--cpu", default=d.cpu, help=f"CPU request per pod ({d.cpu})")
    p.add_argument("--memory", default=d.memory, help=f"memory request and limit ({d.memory})")
    _node_options(p, "edu", 0)
    p = cmds.add_parser("keys", help="(init container) install this pod's node key")
    p.add_argument("--name", required=True)
    p.add_argument("--topology", required=True)
    p.add_argument("--from", dest="src", required=True, metavar="DIR")
    p.add_argument("--to", dest="dst", required=True, metavar="DIR")
    p = cmds.add_parser("node", help="(daemon container) run this pod's node daemon")
    p.add_argument("--name", required=True)
    p.add_argument("--topology", required=True)
    p.add_argument("--config", required=True)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the `slurm` and `kube` subcommand groups."""
    _slurm_parsers(sub)
    _kube_parsers(sub)


def _run_daemon(config_path: str | None, overrides: dict[str, Any]) -> int:
    from m3tgossip.daemon.config import load_node_config
    from m3tgossip.daemon.node import run_node

    return run_node(load_node_config(config_path, overrides))


def _sbatch(args: argparse.Namespace) -> int:
    _overrides(args)  # bad --set / -o stop here, not in every task
    task: list[str] = []
    for flag, value in (
        ("--workload", args.workload),
        ("--rounds", args.rounds),
        ("--seed", args.seed),
        ("--deadline", getattr(args, "gossip.round_deadline_s")),
        ("--startup-grace", getattr(args, "gossip.startup_grace_s")),
        ("--host-suffix", args.host_suffix or None),
        ("--config", str(Path(args.config).absolute()) if args.config else None),
    ):
        if value is not None:
            task += [flag, str(value)]
    task += ["--bind-all"] if args.bind_all else []
    for s in args.settings:
        task += ["--set", s]
    for o in args.options:
        task += ["-o", o]
    opts = slurm.SbatchOptions(
        command=(args.python, "-m", "m3tgossip"),
        task_args=tuple(task),
        base_port=args.base_port,
        insecure=args.insecure,
        overcommit=args.overcommit,
        job_name=args.job_name,
        time=args.time,
        partition=args.partition,
        sbatch=tuple(args.sbatch),
    )
    script = slurm.write_sbatch(args.topology, args.out, opts)
    print(f"wrote {script} and {script.parent / 'topology.toml'}; submit with: sbatch {script}")
    return 0


def _slurm_task(args: argparse.Namespace) -> int:
    step = SlurmStep.from_env()
    plan = slurm.plan_task(
        args.topology,
        args.job_dir,
        step,
        base_port=args.base_port,
        keys_dir=args.keys,
        insecure=args.insecure,
        host_suffix=args.host_suffix,
        bind_all=args.bind_all,
    )
    print(plan.describe(step.ntasks), flush=True)
    return _run_daemon(args.config, {**_overrides(args), **plan.overrides()})


def _slurm(args: argparse.Namespace) -> int:
    if args.engine_command == "sbatch":
        return _sbatch(args)
    if args.engine_command == "keys":
        from m3tgossip.topology import load_topology

        keys = ensure_keys(args.out, load_topology(args.topology).ids())
        print(f"{args.out}: {len(keys) - 1} node keypairs and an operator keypair")
        return 0
    if args.engine_command == "task":
        return _slurm_task(args)
    report = slurm.collect(args.job_dir, args.target)
    (Path(args.job_dir) / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2) if args.json else slurm.format_collect(report))
    return 1 if report["missing"] else 0


def _kube(args: argparse.Namespace) -> int:
    if args.engine_command == "manifests":
        node = {k: getattr(args, k) for k in ("workload", "rounds", "seed")}
        overrides = {k: v for k, v in _overrides(args).items() if "." in k}
        opts = kubernetes.KubeOptions(
            name=args.name,
            namespace=args.namespace,
            image=args.image,
            port=args.port,
            cluster_domain=args.cluster_domain,
            storage=args.storage,
            storage_class=args.storage_class,
            cpu=args.cpu,
            memory=args.memory,
            node={k: v for k, v in node.items() if v is not None},
            overrides=overrides,
        )
        paths = kubernetes.write_manifests(args.topology, args.out, opts)
        folder = paths[0].parent
        print(f"wrote {len(paths)} manifests to {folder}; apply with: kubectl apply -f {folder}")
        return 0
    from m3tgossip.topology import load_topology

    topology = load_topology(args.topology)
    pod = kubernetes.pod_name()
    if args.engine_command == "keys":
        path = kubernetes.install_key(args.topology, args.name, pod, args.src, args.dst)
        print(f"pod {pod}: installed {path}")
        return 0
    node_id = kubernetes.pod_node(topology, args.name, pod)
    print(f"pod {pod}: node {node_id}", flush=True)
    return _run_daemon(args.config, {"id": node_id, "topology": args.topology})


def run(args: argparse.Namespace) -> int:
    """Run the parsed `slurm` or `kube` subcommand."""
    if args.command == "slurm":
        return _slurm(args)
    if args.command == "kube":
        return _kube(args)
    raise ConfigError("m3tgossip", args.command, "not an engine subcommand")

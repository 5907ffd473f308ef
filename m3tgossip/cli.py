"""Command line: argument parsing only; every subcommand calls into a module.

m3tgossip node --topology FILE --id NODE [--config FILE] [options]
m3tgossip topology check FILE [--target 1e-6] [--json]
m3tgossip status ENDPOINT --key DIR/ID --server-key KEY [--timeout 3]
m3tgossip status --topology FILE --id NODE --key DIR/ID
m3tgossip status ENDPOINT --insecure
m3tgossip keys generate --out DIR --id NODE [--force]
m3tgossip forget --learner ID | --node ID [--mode exact] --state-dir DIR --key DIR/ID
m3tgossip testbed --topology FILE --workload consensus --rounds 60 --out DIR
m3tgossip slurm sbatch|keys|task|collect ...   (m3tgossip.engines.commands)
m3tgossip kube manifests|keys|node ...
m3tgossip report RUN_DIR [STATE_DIR ...] [--out FILE]
m3tgossip deploy bundle --topology FILE --hosts HOSTS --out DIR [--workload edu] [--prefix DIR]
m3tgossip data check DIR [--json]
m3tgossip data example --topology FILE --out DIR
m3tgossip data from-oulad OULAD_DIR --topology FILE --out DIR
m3tgossip predict --state-dir DIR --data DIR2 --out FILE
m3tgossip export --state-dir DIR --out DIR2
m3tgossip explain --state-dir DIR --data DIR2 --out OUT [--record ID] [--max-records N]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from m3tgossip import __version__
from m3tgossip.errors import ConfigError


def _option(text: str) -> tuple[str, Any]:
    """Parse `key=value` with a TOML value (`size=4096`, `mode="separate"`, `lr=1e-3`)."""
    import tomllib

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value  # a bare word is a string
    return key.strip(), parsed


def _node_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("node", help="run one node daemon", description="Run one node daemon.")
    p.add_argument("--config", help="node config file (TOML); command-line options override it")
    p.add_argument("--topology", help="topology spec (TOML) shared by the federation")
    p.add_argument("--id", help="this node's id in the topology")
    p.add_argument("--workload", help="consensus | edu")
    p.add_argument("--rounds", type=int, help="rounds to run (0: until stopped)")
    p.add_argument("--seed", type=int, help="federation seed")
    p.add_argument("--state-dir", dest="state_dir", help="folder for checkpoint and metrics")
    p.add_argument("--metrics", help="metrics file (JSON lines)")
    p.add_argument(
        "--data", help="the node's own data folder (m3tgossip/docs/data.md; edu workload)"
    )
    p.add_argument("--bind", help="endpoint to bind, e.g. tcp://0.0.0.0:5701")
    p.add_argument(
        "--fresh", action="store_true", default=None, help="ignore an existing checkpoint"
    )
    p.add_argument(
        "--key-dir", dest="key_dir", help="folder holding this node's ID.key_secret (CURVE)"
    )
    p.add_argument(
        "--status-key",
        dest="status_keys",
        metavar="FILE",
        help="operator public keys allowed to query status",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="plaintext links, no encryption or authentication (loopback only)",
    )
    p.add_argument(
        "--prometheus",
        metavar="HOST:PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics (loopback unless "
        "--prometheus-public)",
    )
    p.add_argument(
        "--prometheus-public",
        dest="prometheus_public",
        action="store_true",
        default=None,
        help="allow a non-loopback --prometheus address",
    )
    p.add_argument("--mode", dest="gossip.mode", help="sync | push-sum")
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
        "--option",
        "-o",
        action="append",
        type=_option,
        default=[],
        metavar="KEY=VALUE",
        help="workload option (repeatable), e.g. -o size=100000",
    )
    p.add_argument(
        "--set",
        action="append",
        type=_option,
        default=[],
        metavar="TABLE.KEY=VALUE",
        dest="settings",
        help="any config key of the gossip, transport, faults or privacy table (repeatable), "
        "e.g. --set gossip.aggregator=clip --set faults.drop=0.1",
    )


def _cmd_node(args: argparse.Namespace) -> int:
    from m3tgossip.daemon.config import load_node_config
    from m3tgossip.daemon.node import run_node

    keys = (
        "topology",
        "id",
        "workload",
        "rounds",
        "seed",
        "state_dir",
        "metrics",
        "bind",
        "fresh",
        "key_dir",
        "status_keys",
        "insecure",
        "prometheus",
        "prometheus_public",
        "gossip.mode",
        "gossip.round_deadline_s",
        "gossip.startup_grace_s",
    )
    overrides: dict[str, Any] = {k: getattr(args, k) for k in keys}
    for key, value in args.option:
        overrides[f"workload.{key}"] = value
    if args.data:
        from pathlib import Path

        overrides["workload.data"] = str(Path(args.data).resolve())
    for key, value in args.settings:
        table = key.partition(".")[0]
        if table not in ("gossip", "transport", "faults", "privacy") or "." not in key:
            raise ConfigError(
                "--set",
                key,
                "expected TABLE.KEY with TABLE one of gossip, transport, faults, privacy",
            )
        overrides[key] = value
    config = load_node_config(args.config, overrides)
    return run_node(config)


def _cmd_topology_check(args: argparse.Namespace) -> int:
    from m3tgossip.topology import check_report, format_report, load_topology

    if not args.target > 0.0:
        raise ConfigError("topology check", "--target", f"must be positive, got {args.target}")
    topo = load_topology(args.file)
    report = check_report(topo, target_error=args.target, seed=args.seed)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report.get("connected", False) else 1


def _cmd_status(args: argparse.Namespace) -> int:
    from pathlib import Path

    from m3tgossip.net import load_keypair, load_public, query_status

    endpoint, server_key = args.endpoint, args.server_key
    if args.topology or args.id:
        if not (args.topology and args.id):
            raise ConfigError("status", "--topology/--id", "give both, or neither")
        from m3tgossip.topology import load_topology

        spec = load_topology(args.topology).node(args.id)
        endpoint = endpoint or spec.endpoint
        server_key = server_key or spec.public_key
    if not endpoint:
        raise ConfigError("status", "ENDPOINT", "give the node's endpoint, or --topology and --id")
    if args.insecure:
        state = query_status(endpoint, timeout_s=args.timeout)
    else:
        if not args.key:
            raise ConfigError(
                "status",
                "--key",
                "missing: pass --key DIR/ID (an operator keypair the node allows, see "
                "--status-key of m3tgossip node), or --insecure for a plaintext node",
            )
        if not server_key:
            raise ConfigError(
                "status", "--server-key", "missing: the node's public key (or --topology and --id)"
            )
        if Path(server_key).is_file():
            server_key = load_public(server_key)
        state = query_status(
            endpoint, timeout_s=args.timeout, key=load_keypair(args.key), server_key=server_key
        )
    print(json.dumps(state, indent=2, sort_keys=True))
    return 0


def _cmd_keys_generate(args: argparse.Namespace) -> int:
    from m3tgossip.net import PUBLIC_SUFFIX, SECRET_SUFFIX, generate_keys

    for node_id in args.id:
        try:
            pair = generate_keys(args.out, node_id, force=args.force)
        except FileExistsError as exc:
            raise ConfigError(args.out, node_id, str(exc)) from None
        except ValueError as exc:
            raise ConfigError("--id", node_id, str(exc)) from None
        print(
            f'{node_id}: public_key = "{pair.public}"  '
            f"(wrote {args.out}/{node_id}{PUBLIC_SUFFIX}, {node_id}{SECRET_SUFFIX} mode 600)"
        )
    return 0


def _engine_parsers(sub: argparse._SubParsersAction) -> None:
    from m3tgossip.engines import add_parsers

    add_parsers(sub)


def _cmd_engine(args: argparse.Namespace) -> int:
    from m3tgossip.engines import run

    return run(args)


def _report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="write an HTML report with plots of a run",
        description="Write one self-contained HTML report (plots and a table) from a testbed "
        "run folder or from the state folders of deployed nodes (folders holding "
        "metrics.jsonl). Needs matplotlib: pip install -e '.[plot]'.",
    )
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR",
        help="a testbed run folder (summary.json, nodes/*/metrics.jsonl), a node's state "
        "folder, or a folder of state folders (repeatable)",
    )
    p.add_argument("--out", metavar="FILE", help="HTML file to write (default RUN_DIR/report.html)")
    p.add_argument("--title", help="title of the report (default: from the run)")


def _cmd_report(args: argparse.Namespace) -> int:
    from m3tgossip.report import write_report

    path, run = write_report(args.runs, args.out, title=args.title)
    print(f"report: wrote {path} ({len(run.nodes)} nodes, {run.rounds} rounds)")
    return 0


def _deploy_parser(sub: argparse._SubParsersAction) -> None:
    deploy = sub.add_parser("deploy", help="deploy a federation on campus machines")
    deploy_sub = deploy.add_subparsers(dest="deploy_command", required=True)
    p = deploy_sub.add_parser(
        "bundle",
        help="write one folder per node: config, keys, filled spec, systemd unit, start.sh",
        description="Fill hosts, ports and CURVE public keys into the shared spec and write one "
        "folder per node (OUT/nodes/ID): node.toml, keys/, topology.toml, operators.keys, "
        "m3tgossip-ID.service and start.sh, plus the operator key in OUT/operator. Existing "
        "keys are kept.",
    )
    p.add_argument("--topology", required=True, help="topology spec (TOML) shared by the nodes")
    p.add_argument(
        "--hosts",
        required=True,
        metavar="HOSTS",
        help='TOML file with one NODE_ID = "HOST:PORT" line per node of the spec',
    )
    p.add_argument("--out", required=True, metavar="DIR", help="bundle folder (created)")
    p.add_argument("--workload", default="edu", help="consensus | edu (default edu)")
    p.add_argument("--rounds", type=int, default=0, help="rounds to run (default 0: until stopped)")
    p.add_argument("--seed", type=int, default=0, help="federation seed (default 0)")
    p.add_argument(
        "--prefix",
        default="/opt/m3tgossip",
        metavar="DIR",
        help="where each node's folder is installed on its machine, as PREFIX/ID "
        "(default /opt/m3tgossip; written into the systemd unit)",
    )
    p.add_argument(
        "--python",
        default=sys.executable or "python3",
        help="the Python with m3tgossip installed on the nodes' machines "
        "(default: the one running this command)",
    )
    p.add_argument(
        "--operator", default="ops", metavar="NAME", help="operator key name (default ops)"
    )
    p.add_argument(
        "--bind-all",
        action="store_true",
        help="bind every address of the machine (for hosts behind NAT), not the HOST given",
    )
    p.add_argument(
        "--watchdog",
        type=int,
        metavar="S",
        help="WatchdogSec= of the units (default: 4 x round_deadline_s x max_wait_factor)",
    )
    p.add_argument(
        "--option",
        "-o",
        action="append",
        type=_option,
        default=[],
        metavar="KEY=VALUE",
        help="workload option for every node (repeatable)",
    )
    p.add_argument(
        "--set",
        action="append",
        type=_option,
        default=[],
        metavar="TABLE.KEY=VALUE",
        dest="settings",
        help="node setting of the gossip, transport, faults or privacy table for every node "
        "(repeatable)",
    )


def _cmd_deploy(args: argparse.Namespace) -> int:
    from m3tgossip.deploy import BundleOptions, write_bundle

    settings: dict[str, Any] = dict(args.settings)
    for key, value in args.option:
        settings[f"workload.{key}"] = value
    if args.watchdog is not None and args.watchdog < 1:
        raise ConfigError("deploy bundle", "--watchdog", f"must be >= 1 s, got {args.watchdog}")
    options = BundleOptions(
        workload=args.workload,
        rounds=args.rounds,
        seed=args.seed,
        prefix=args.prefix,
        python=args.python,
        operator=args.operator,
        bind_all=args.bind_all,
        watchdog_s=args.watchdog,
        settings=settings,
    )
    result = write_bundle(args.topology, args.hosts, args.out, options, say=print)
    report = result.report
    rounds = report["predicted_rounds"]
    print(
        f"topology {report['name']}: {len(report['nodes'])} nodes, {report['edges']} edges, "
        f"connected; predicted rounds to {report['target_error']:g}: {rounds}"
    )
    for warning in report["warnings"]:
        print(f"warning: {warning}")
    print(
        f"Copy {result.out}/nodes/ID to {options.prefix.rstrip('/')}/ID on each node's machine "
        "and run its start.sh, or install its m3tgossip-ID.service."
    )
    return 0


def _data_parsers(sub: argparse._SubParsersAction) -> None:
    from m3tgossip.edu.commands import add_parsers

    add_parsers(sub)


def _cmd_data(args: argparse.Namespace) -> int:
    from m3tgossip.edu.commands import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="m3tgossip",
        description="Decentralized gossip learning of multi-modal multi-task models for education.",
    )
    parser.add_argument("--version", action="version", version=f"m3tgossip {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _node_parser(sub)
    topo = sub.add_parser("topology", help="inspect topology specs")
    topo_sub = topo.add_subparsers(dest="topology_command", required=True)
    check = topo_sub.add_parser("check", help="validate a spec and predict consensus speed")
    check.add_argument("file")
    check.add_argument(
        "--target", type=float, default=1e-6, help="relative consensus error (default 1e-6)"
    )
    check.add_argument(
        "--seed",
        type=int,
        default=0,
        help="federation seed the s-out peer draws come from (default 0, the node default)",
    )
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    status = sub.add_parser("status", help="query a running node")
    status.add_argument(
        "endpoint", nargs="?", help="the node's endpoint, e.g. tcp://127.0.0.1:5701"
    )
    status.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    status.add_argument(
        "--key", metavar="DIR/ID", help="operator keypair (reads DIR/ID.key_secret)"
    )
    status.add_argument(
        "--server-key", metavar="KEY", help="the node's public key (Z85 text or a .key file)"
    )
    status.add_argument("--topology", help="take endpoint and node key from this spec ...")
    status.add_argument("--id", help="... for this node")
    status.add_argument(
        "--insecure", action="store_true", help="plaintext query (a node started with --insecure)"
    )
    keys = sub.add_parser("keys", help="manage CURVE keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    gen = keys_sub.add_parser(
        "generate", help="write a keypair: DIR/ID.key (public), DIR/ID.key_secret (mode 600)"
    )
    gen.add_argument(
        "--out", required=True, metavar="DIR", help="folder for the key files (created)"
    )
    gen.add_argument(
        "--id",
        required=True,
        action="append",
        metavar="NODE",
        help="node or operator id (repeatable)",
    )
    gen.add_argument("--force", action="store_true", help="replace existing key files")
    sub.add_parser("testbed", help="run a multi-process testbed on this machine", add_help=False)
    _engine_parsers(sub)
    _data_parsers(sub)
    _report_parser(sub)
    _deploy_parser(sub)
    from m3tgossip.net import forget_cli

    forget_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["testbed"]:
        from m3tgossip.harness.testbed import main as testbed_main

        return testbed_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "node":
            return _cmd_node(args)
        if args.command == "topology":
            return _cmd_topology_check(args)
        if args.command == "status":
            return _cmd_status(args)
        if args.command == "keys":
            return _cmd_keys_generate(args)
        if args.command in ("slurm", "kube"):
            return _cmd_engine(args)
        if args.command in ("data", "predict", "export", "explain"):
            return _cmd_data(args)
        if args.command == "report":
            return _cmd_report(args)
        if args.command == "forget":
            from m3tgossip.net.forget_cli import cmd_forget

            return cmd_forget(args)
        if args.command == "deploy":
            return _cmd_deploy(args)
    except ConfigError as exc:
        print(f"m3tgossip: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError, TimeoutError) as exc:
        print(f"m3tgossip: error: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())

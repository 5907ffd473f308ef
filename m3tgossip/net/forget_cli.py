"""`m3tgossip forget`: ask a running node to erase learners it holds, or itself, from the
federation (`docs/protocol.md`, `forget_request`).

    m3tgossip forget --learner 17 --learner 42 --state-dir /var/lib/m3tgossip/uni-a --key ops
    m3tgossip forget --node stu-a3 --mode exact --topology campus.toml --id stu-a3 --key ops
    m3tgossip forget --learner 17 tcp://127.0.0.1:5701 --insecure

The node is found by its state folder (`node.json`, written when the daemon started), by the
spec and its id, or by its endpoint. The command prints the node's answer as JSON and exits 0
if the erasure started, 1 if the node refused it (the reason is in the answer and the node's
log); the erasure report is `erasure-<request>.json` in every node's state folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from m3tgossip.errors import ConfigError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("forget", help="erase learners, or a node, from the federation")
    p.add_argument("endpoint", nargs="?", help="the node's endpoint, e.g. tcp://127.0.0.1:5701")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--learner", action="append", metavar="ID", help="a learner of this node (repeatable)"
    )
    what.add_argument("--node", metavar="ID", help="the node that leaves for good (itself)")
    p.add_argument(
        "--mode",
        choices=("approximate", "exact"),
        default="approximate",
        help="approximate (ascent at the owner, gossip repairs) or exact (every node returns "
        "to its stage checkpoint and replays); default approximate",
    )
    p.add_argument("--state-dir", help="the node's state folder (endpoint and key from node.json)")
    p.add_argument("--topology", help="take endpoint and node key from this spec ...")
    p.add_argument("--id", help="... for this node")
    p.add_argument("--key", metavar="DIR/ID", help="operator keypair (reads DIR/ID.key_secret)")
    p.add_argument("--server-key", metavar="KEY", help="the node's public key (Z85 or .key file)")
    p.add_argument("--insecure", action="store_true", help="plaintext (a node on --insecure)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the answer")


def _target(args: argparse.Namespace) -> tuple[str | None, str | None, str | None]:
    """The node's id, endpoint and public key from what the command line gives."""
    from m3tgossip.topology import load_topology

    node_id, endpoint, server_key = args.id, args.endpoint, args.server_key
    if args.state_dir:
        import tomllib

        from m3tgossip.daemon.nodeinfo import read_node_info
        from m3tgossip.topology.load import parse_topology

        info = read_node_info(args.state_dir)
        node_id = node_id or info["node"]
        spec = parse_topology(tomllib.loads(info["topology"]), str(Path(args.state_dir)))
        node = spec.node(node_id)
        endpoint = endpoint or info.get("endpoint") or node.endpoint
        server_key = server_key or node.public_key
    elif args.topology or args.id:
        if not (args.topology and args.id):
            raise ConfigError("forget", "--topology/--id", "give both, or neither")
        node = load_topology(args.topology).node(args.id)
        endpoint = endpoint or node.endpoint
        server_key = server_key or node.public_key
    return node_id, endpoint, server_key


def cmd_forget(args: argparse.Namespace) -> int:
    from m3tgossip.net.security import load_keypair, load_public
    from m3tgossip.net.status import request_forget

    node_id, endpoint, server_key = _target(args)
    if not endpoint:
        raise ConfigError(
            "forget", "ENDPOINT", "give the node's endpoint, --state-dir, or --topology and --id"
        )
    target, ids = ("learner", list(args.learner)) if args.learner else ("node", [args.node])
    if target == "node" and node_id is not None and args.node != node_id:
        raise ConfigError(
            "forget",
            "--node",
            f"a node erases only itself: {args.node!r} is not the node asked ({node_id!r})",
        )
    key = None
    if not args.insecure:
        if not args.key:
            raise ConfigError("forget", "--key", "missing: an operator keypair the node allows")
        if not server_key:
            raise ConfigError("forget", "--server-key", "missing: the node's public key")
        if Path(server_key).is_file():
            server_key = load_public(server_key)
        key = load_keypair(args.key)
    reply = request_forget(
        endpoint,
        target,
        ids,
        args.mode,
        timeout_s=args.timeout,
        key=key,
        server_key=server_key if key is not None else None,
    )
    print(json.dumps(reply, indent=2, sort_keys=True))
    return 0 if reply.get("accepted") else 1

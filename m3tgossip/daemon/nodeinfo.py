"""`node.json` in a node's state folder: who the node is, so its trained state can be used later.

The daemon writes it when it starts (atomically: write, rename). It holds the node id, the
workload and its options, the federation seed, the gossip mode and the whole topology spec the
node ran with, which is what `m3tgossip predict` and `m3tgossip export` need to rebuild the
node's model around its checkpoint, and what the model card names as holders.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from m3tgossip.daemon.config import NodeConfig
from m3tgossip.errors import ConfigError
from m3tgossip.topology import Topology

FILENAME = "node.json"
VERSION = 1


def write_node_info(config: NodeConfig, topology: Topology) -> Path:
    """Write `<state dir>/node.json` for this node; returns its path."""
    folder = config.state_path
    folder.mkdir(parents=True, exist_ok=True)
    info = {
        "version": VERSION,
        "node": config.id,
        "workload": config.workload,
        "workload_options": config.workload_options,
        "seed": config.seed,
        "mode": config.gossip.mode,
        "rounds": config.rounds,
        "privacy": topology.node(config.id).privacy,
        "endpoint": config.bind or _endpoint(topology, config.id),
        "topology_file": str(Path(config.topology).resolve()),
        "topology": topology.to_toml(),
        "started": time.time(),
    }
    path = folder / FILENAME
    tmp = folder / f".{FILENAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_node_info(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The `node.json` of a state folder; ConfigError naming the file if it is missing or bad."""
    path = Path(folder) / FILENAME
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            str(path), "", "missing: not the state folder of a node started by m3tgossip node"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(str(path), "", f"unreadable: {exc}") from None
    if not isinstance(info, dict) or info.get("version") != VERSION:
        raise ConfigError(str(path), "version", f"expected {VERSION}")
    for key in ("node", "workload", "seed", "topology"):
        if key not in info:
            raise ConfigError(str(path), key, "missing")
    return info


def _endpoint(topology: Topology, node_id: str) -> str | None:
    try:
        return topology.node(node_id).endpoint
    except ValueError:  # no port in the spec
        return None

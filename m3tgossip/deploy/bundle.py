"""Deployment bundles: everything each machine of a federation needs, from one spec and one hosts
file.

`write_bundle` fills every node's host, port and CURVE public key into the shared spec and
writes

    OUT/topology.toml                 the filled shared spec (the same in every node folder)
    OUT/operator/NAME.key, .key_secret  the operator keypair `m3tgossip status` queries with
    OUT/nodes/ID/node.toml            the node config (paths relative to the folder)
    OUT/nodes/ID/topology.toml        the filled shared spec
    OUT/nodes/ID/keys/ID.key, ID.key_secret   the node's keypair (secret mode 600)
    OUT/nodes/ID/operators.keys       the operator public key the node answers status queries of
    OUT/nodes/ID/m3tgossip-ID.service its systemd unit (for the folder installed at PREFIX/ID)
    OUT/nodes/ID/start.sh             the one command that starts the node

Keys are never overwritten: a second run keeps every key it finds (and says so), so a bundle can
be rewritten after a host moves without re-keying anyone. The spec is checked as
`m3tgossip topology check` checks it, and refused, before anything is written, if its graph is
not connected.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from m3tgossip.daemon.config import NodeConfig, load_node_config
from m3tgossip.deploy import units
from m3tgossip.deploy.hosts import load_hosts
from m3tgossip.deploy.tomlw import toml_value
from m3tgossip.errors import ConfigError
from m3tgossip.net import (
    PUBLIC_SUFFIX,
    SECRET_SUFFIX,
    generate_keys,
    load_public,
    load_secret,
)
from m3tgossip.topology import Topology, check_report, load_topology

#: tables of the node config a bundle setting (`TABLE.KEY`) may name
SETTING_TABLES = ("gossip", "transport", "faults", "privacy", "workload")
#: what a key name looks like (the node ids of a spec do)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class BundleOptions:
    """How the nodes of a bundle run (the same for every node)."""

    workload: str = "edu"
    #: rounds to run; 0 runs until stopped (a service)
    rounds: int = 0
    #: federation seed
    seed: int = 0
    #: where each node's folder is installed on its machine: PREFIX/ID (written into the unit)
    prefix: str = "/opt/m3tgossip"
    #: the Python that has m3tgossip installed, on the nodes' machines
    python: str = field(default_factory=lambda: sys.executable or "python3")
    #: name of the operator key allowed to query every node's status
    operator: str = "ops"
    #: bind every address of the machine (0.0.0.0 / [::]) instead of the host in the hosts file
    bind_all: bool = False
    #: WatchdogSec= of the units (default: from the round deadline, see units.watchdog_seconds)
    watchdog_s: int | None = None
    #: node settings `TABLE.KEY` -> value (tables: SETTING_TABLES)
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class BundleResult:
    """What `write_bundle` wrote: the filled spec, and per key whether it was new."""

    topology: Topology
    out: Path
    report: dict[str, Any]
    #: node id (or "operator NAME") -> True if its key was generated now, False if kept
    new_keys: dict[str, bool] = field(default_factory=dict)

    def node_dir(self, node_id: str) -> Path:
        return self.out / "nodes" / node_id


def write_bundle(
    topology_path: str | os.PathLike[str],
    hosts_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    options: BundleOptions | None = None,
    say: Callable[[str], None] = lambda _line: None,
) -> BundleResult:
    """Write the bundle of the spec at `topology_path` placed by the hosts file into `out`.

    ConfigError (naming the file and entry) for a bad spec, hosts file, setting, existing key or
    an unconnected graph; nothing is written then.
    """
    options = options or BundleOptions()
    out = Path(out)
    topo = load_topology(topology_path)
    hosts = load_hosts(hosts_path, topo.ids())
    placed = replace(
        topo,
        nodes=tuple(replace(n, host=hosts[n.id][0], port=hosts[n.id][1]) for n in topo.nodes),
    )
    report = check_report(placed, seed=options.seed)
    if not report["connected"]:
        raise ConfigError(
            str(topology_path),
            "edges",
            "the graph is not connected, so its parts never agree; "
            f"see: m3tgossip topology check {topology_path}",
        )
    try:
        prefix = units.check_unit_path("--prefix", options.prefix).rstrip("/")
    except ValueError as exc:
        raise ConfigError("deploy bundle", "--prefix", str(exc)) from None
    configs = {n.id: _node_config(n.id, options) for n in topo.nodes}
    _check_keys(topo, out, options.operator, topology_path)
    result = BundleResult(placed, out, report)
    keys: dict[str, str] = {}
    for node in topo.nodes:
        key_dir = out / "nodes" / node.id / "keys"
        keys[node.id], result.new_keys[node.id] = ensure_key(key_dir, node.id)
    operator_public, result.new_keys[f"operator {options.operator}"] = ensure_key(
        out / "operator", options.operator
    )
    result.topology = filled = placed.with_keys(keys)
    spec_text = (
        f"# filled by `m3tgossip deploy bundle` from {Path(topology_path).name} and "
        f"{Path(hosts_path).name}: hosts, ports and public keys of every node\n" + filled.to_toml()
    )
    _write(out / "topology.toml", spec_text)
    for node in filled.nodes:
        folder = result.node_dir(node.id)
        gossip = configs[node.id].gossip
        _write(folder / "topology.toml", spec_text)
        _write(folder / "node.toml", node_config_text(node.id, node.host, node.port, options))
        _write(folder / "operators.keys", f"{operator_public} {options.operator}\n")
        unit = units.service_unit(
            node.id,
            filled.name,
            f"{prefix}/{node.id}",
            gossip,
            port=node.port or 0,
            python=options.python,
            watchdog_s=options.watchdog_s,
        )
        _write(folder / units.unit_name(node.id), unit)
        _write(folder / "start.sh", units.start_script(node.id, options.python), mode=0o755)
        os.chmod(folder, 0o755)
        say(
            f"{node.id}: {node.endpoint}, "
            + ("new key" if result.new_keys[node.id] else "kept its existing key")
            + f" -> {folder}"
        )
    os.chmod(out / "nodes", 0o755)
    new = result.new_keys[f"operator {options.operator}"]
    say(
        f"operator {options.operator}: "
        + ("new key" if new else "kept its existing key")
        + f" -> {out / 'operator' / options.operator}{SECRET_SUFFIX} (keep it private)"
    )
    return result


def existing_key(folder: Path, name: str) -> str | None:
    """The public key of `folder/name.key_secret` if there is one (checked: mode 600, its
    `.key` next to it matching), None if there is no key; ConfigError for a half or broken
    pair. Writes nothing."""
    secret_path = folder / f"{name}{SECRET_SUFFIX}"
    public_path = folder / f"{name}{PUBLIC_SUFFIX}"
    if secret_path.exists():
        public = load_secret(secret_path).public
        if public_path.exists() and load_public(public_path) != public:
            raise ConfigError(
                str(public_path),
                "",
                f"is not the public key of {secret_path.name} next to it; remove the wrong one",
            )
        return public
    if public_path.exists():
        raise ConfigError(
            str(public_path),
            "",
            f"a public key without its secret {secret_path.name}; remove it to generate a new pair",
        )
    return None


def ensure_key(folder: Path, name: str) -> tuple[str, bool]:
    """(public key, whether it was generated now) of `folder/name.key_secret`: an existing
    secret is kept (its `.key` is rewritten if missing), else a new pair is generated."""
    public = existing_key(folder, name)
    if public is not None:
        public_path = folder / f"{name}{PUBLIC_SUFFIX}"
        if not public_path.exists():
            _write(public_path, f"{public}\n")
        return public, False
    try:
        pair = generate_keys(folder, name)
    except ValueError as exc:
        raise ConfigError("deploy bundle", name, str(exc)) from None
    os.chmod(folder, 0o700)
    return pair.public, True


def _check_keys(topo: Topology, out: Path, operator: str, source: Any) -> None:
    """Every key already in the bundle is whole, and every key the spec names is one of them."""
    if _NAME.fullmatch(operator) is None:
        raise ConfigError("deploy bundle", "--operator", f"not a valid key name: {operator!r}")
    existing_key(out / "operator", operator)
    for node in topo.nodes:
        secret_path = out / "nodes" / node.id / "keys" / f"{node.id}{SECRET_SUFFIX}"
        public = existing_key(secret_path.parent, node.id)
        if node.public_key is None:
            continue
        if public is None:
            raise ConfigError(
                str(source),
                f'node "{node.id}" public_key',
                f"the spec names a key but {secret_path} does not exist; remove public_key to "
                "generate a new pair, or put the node's secret key there",
            )
        if public != node.public_key:
            raise ConfigError(
                str(source),
                f'node "{node.id}" public_key',
                f"is not the public key of {secret_path}",
            )


def _tables(options: BundleOptions) -> dict[str, dict[str, Any]]:
    tables: dict[str, dict[str, Any]] = {}
    for key, value in options.settings.items():
        table, _, name = key.partition(".")
        if table not in SETTING_TABLES or not name or "." in name:
            raise ConfigError(
                "deploy bundle",
                key,
                f"expected TABLE.KEY with TABLE one of {', '.join(SETTING_TABLES)}",
            )
        tables.setdefault(table, {})[name] = value
    return tables


def _node_config(node_id: str, options: BundleOptions) -> NodeConfig:
    """The node's config as the daemon will read it (checks every setting of the bundle)."""
    overrides: dict[str, Any] = {
        "id": node_id,
        "topology": "topology.toml",
        "workload": options.workload,
        "rounds": options.rounds,
        "seed": options.seed,
    }
    for table, values in _tables(options).items():
        overrides.update({f"{table}.{k}": v for k, v in values.items()})
    config = load_node_config(None, overrides)
    return config


def node_config_text(node_id: str, host: str, port: int | None, options: BundleOptions) -> str:
    """`node.toml` of a bundle: every path relative to the node's folder."""
    node: dict[str, Any] = {
        "id": node_id,
        "topology": "topology.toml",
        "workload": options.workload,
        "rounds": options.rounds,
        "seed": options.seed,
        "state_dir": "state",
        "key_dir": "keys",
        "status_keys": "operators.keys",
    }
    if options.bind_all:
        node["bind"] = f"tcp://{'[::]' if ':' in host else '0.0.0.0'}:{port}"
    lines = [
        f"# m3tgossip node config of {node_id}, from `m3tgossip deploy bundle`.",
        "# Paths are relative to this file; start.sh passes the state folder and key folder",
        "# systemd gives the service.",
        "[node]",
    ]
    lines += [f"{k} = {toml_value(v)}" for k, v in node.items()]
    for table, values in _tables(options).items():
        lines += ["", f"[{table}]"]
        lines += [f"{toml_value(k)} = {toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    """Replace `path` with `text` atomically (a temporary file renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)

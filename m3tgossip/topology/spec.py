"""Topology specs: loading and validating the TOML graph files, and what follows from the graph.

This module owns the shared picture every node has of the federation: the nodes with their
attributes (role, modalities, tasks, compute tier, privacy profile, endpoint, key), the edges,
which components each node holds and shares, the per-component holder subgraphs that mixing
runs on, and the `topology check` report (spectral gap, predicted rounds, warnings). The format
is documented in `m3tgossip/docs/topology.md`.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import networkx as nx

from m3tgossip.consensus import metropolis_hastings, predicted_rounds, slem
from m3tgossip.errors import ConfigError

MODALITIES = ("text", "image", "signal", "clickstream", "tabular")
KNOWN_TASKS = ("at_risk", "engagement", "stress", "handwriting", "next_response")
#: the modality a known task cannot do without (`topology check` warns when it is missing)
TASK_NEEDS = {"stress": "signal", "handwriting": "image", "next_response": "clickstream"}
ROLES = ("institution", "instructor", "student")
COMPUTE_TIERS = ("full", "lite")
PRIVACY_PROFILES = ("open", "ferpa", "gdpr", "custom")
GENERATORS = (
    "cycle",
    "path",
    "star",
    "complete",
    "torus",
    "watts_strogatz",
    "erdos_renyi",
    "random_regular",
)
#: largest node count a spec may have
MAX_NODES = 10_000

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_TASK = re.compile(r"[a-z][a-z0-9_]*")
_Z85 = frozenset(
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
)
_TOP_KEYS = ("name", "description", "edges", "generator", "defaults", "nodes", "dynamics")
#: how the communication graph changes from round to round
DYNAMICS = ("static", "one-peer-exponential", "s-out")
_NODE_KEYS = (
    "id",
    "role",
    "institution",
    "modalities",
    "tasks",
    "host",
    "port",
    "compute",
    "privacy",
    "public_key",
    "local",
)
#: attributes that must be set per node, never in [defaults]
_PER_NODE_KEYS = ("id", "port", "public_key")
_BUILTIN_DEFAULTS: dict[str, Any] = {
    "role": "student",
    "institution": None,
    "modalities": ["clickstream", "tabular"],
    "tasks": ["at_risk"],
    "host": "127.0.0.1",
    "port": None,
    "compute": "full",
    "privacy": "open",
    "public_key": None,
    "local": [],
}


@dataclass(frozen=True)
class NodeSpec:
    """One participant as the shared spec describes it."""

    id: str
    index: int
    role: str
    institution: str | None
    modalities: tuple[str, ...]
    tasks: tuple[str, ...]
    host: str
    port: int | None
    compute: str
    privacy: str
    public_key: str | None
    local: tuple[str, ...]

    @property
    def components(self) -> tuple[str, ...]:
        """Every component the node holds, shared or local, sorted."""
        names = ["backbone", "fusion"]
        names += [f"encoder.{m}" for m in self.modalities]
        names += [f"{kind}.{t}" for t in self.tasks for kind in ("head", "prompt")]
        return tuple(sorted(names))

    @property
    def shared_components(self) -> tuple[str, ...]:
        """The components the node gossips with the other holders, sorted.

        All but `local` ones; a `lite` node trains only heads and prompts, so it shares only
        those (it runs the base encoders, fusion and backbone as they are).
        """
        return tuple(
            c
            for c in self.components
            if c not in self.local
            and (self.compute != "lite" or c.startswith(("head.", "prompt.")))
        )

    @property
    def endpoint(self) -> str:
        """The ZeroMQ address the node binds, `tcp://host:port`."""
        if self.port is None:
            raise ValueError(
                f'node "{self.id}" has no port; assign one (Topology.with_ports) first'
            )
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


@dataclass(frozen=True)
class Topology:
    """A validated spec: nodes in spec order and edges (each pair sorted, the list sorted)."""

    name: str
    source: str
    description: str
    nodes: tuple[NodeSpec, ...]
    edges: tuple[tuple[str, str], ...]
    #: "static" (the edges), "one-peer-exponential" (round t: each node sends to the node
    #: 2^(t mod log2 n) places after it) or "s-out" (each node sends to `sample` peers drawn
    #: anew every round from the federation seed); the edges of a time-varying spec are
    #: every link any round may use
    dynamics: str = "static"
    sample: int = 1
    _cache: dict[str, Any] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def node(self, node_id: str) -> NodeSpec:
        """The node with this id; KeyError naming the topology if there is none."""
        by_id = self._cached("by_id", lambda: {n.id: n for n in self.nodes})
        if node_id not in by_id:
            raise KeyError(f'no node "{node_id}" in topology "{self.name}" ({self.source})')
        return by_id[node_id]

    def ids(self) -> list[str]:
        """Node ids in spec order."""
        return [n.id for n in self.nodes]

    def neighbours(self, node_id: str) -> list[str]:
        """The node's neighbours in the full graph, sorted."""
        self.node(node_id)
        return sorted(self.graph().neighbors(node_id))

    def graph(self) -> nx.Graph:
        """The whole graph (frozen, nodes in spec order)."""

        def build() -> nx.Graph:
            graph = nx.Graph()
            graph.add_nodes_from(self.ids())
            graph.add_edges_from(self.edges)
            return nx.freeze(graph)

        return self._cached("graph", build)

    def holders(self, component: str) -> list[str]:
        """Ids of the nodes that hold `component` shared, in spec order (empty if none)."""
        return [n.id for n in self.nodes if component in n.shared_components]

    def components(self) -> list[str]:
        """Every component that at least one node holds shared, sorted."""
        return sorted({c for n in self.nodes for c in n.shared_components})

    def component_graph(self, component: str) -> nx.Graph:
        """The subgraph induced by the holders of `component` (frozen); KeyError if none."""

        def build() -> nx.Graph:
            holders = self.holders(component)
            if not holders:
                raise KeyError(
                    f'no node of topology "{self.name}" holds component "{component}" shared'
                )
            return nx.freeze(self.graph().subgraph(holders).copy())

        return self._cached(f"component:{component}", build)

    def component_neighbours(self, node_id: str, component: str) -> list[str]:
        """The node's neighbours among the holders of `component`, sorted."""
        self.node(node_id)
        graph = self.component_graph(component)
        if node_id not in graph:
            raise KeyError(f'node "{node_id}" does not hold component "{component}" shared')
        return sorted(graph.neighbors(node_id))

    def with_ports(self, ports: Mapping[str, int], host: str = "127.0.0.1") -> Topology:
        """A copy with these nodes bound to `host:port` (testbeds assign free ports)."""
        for node_id, port in ports.items():
            self.node(node_id)
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise ValueError(f'port for "{node_id}" must be an integer 1..65535, got {port!r}')
        nodes = tuple(
            replace(n, host=host, port=ports[n.id]) if n.id in ports else n for n in self.nodes
        )
        clash = _endpoint_clash(nodes)
        if clash is not None:
            first, second = clash
            raise ValueError(
                f'nodes "{first.id}" and "{second.id}" would both bind {second.host}:{second.port}'
            )
        return replace(self, nodes=nodes)

    def with_keys(self, keys: Mapping[str, str]) -> Topology:
        """A copy with these nodes' CURVE public keys (Z85, 40 characters) set."""
        for node_id, key in keys.items():
            self.node(node_id)
            if not isinstance(key, str) or len(key) != 40 or not set(key) <= _Z85:
                raise ValueError(f'public key for "{node_id}" must be 40 characters of Z85 text')
        nodes = tuple(replace(n, public_key=keys[n.id]) if n.id in keys else n for n in self.nodes)
        owners: dict[str, str] = {}
        for n in nodes:
            if n.public_key is not None and owners.setdefault(n.public_key, n.id) != n.id:
                raise ValueError(f'nodes "{owners[n.public_key]}" and "{n.id}" have the same key')
        return replace(self, nodes=nodes)

    def to_toml(self) -> str:
        """The spec in explicit-edges form, every attribute spelled out; loads back equal."""
        lines = [f"name = {_toml_str(self.name)}"]
        lines.append(f"description = {_toml_str(self.description)}")
        lines.append("edges = [")
        lines += [f"    [{_toml_str(u)}, {_toml_str(v)}]," for u, v in self.edges]
        lines.append("]")
        if self.dynamics != "static":
            lines += [
                "",
                "[dynamics]",
                f"kind = {_toml_str(self.dynamics)}",
                f"sample = {self.sample}",
            ]
        for n in self.nodes:
            lines += ["", "[[nodes]]", f"id = {_toml_str(n.id)}", f"role = {_toml_str(n.role)}"]
            if n.institution is not None:
                lines.append(f"institution = {_toml_str(n.institution)}")
            lines.append(f"modalities = {_toml_list(n.modalities)}")
            lines.append(f"tasks = {_toml_list(n.tasks)}")
            lines.append(f"host = {_toml_str(n.host)}")
            if n.port is not None:
                lines.append(f"port = {n.port}")
            lines.append(f"compute = {_toml_str(n.compute)}")
            lines.append(f"privacy = {_toml_str(n.privacy)}")
            if n.public_key is not None:
                lines.append(f"public_key = {_toml_str(n.public_key)}")
            lines.append(f"local = {_toml_list(n.local)}")
        return "\n".join(lines) + "\n"

    def _cached(self, key: str, build: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]


# ----------------------------------------------------------------------------- loading


def load_topology(path: str | os.PathLike[str]) -> Topology:
    """Read and validate a topology spec file; ConfigError naming the file and entry if bad."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, "", "no such topology file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, "", f"cannot read topology file: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "TOML syntax", str(exc)) from None
    return parse_topology(data, source)


def parse_topology(data: Mapping[str, Any], source: str) -> Topology:
    """Validate a parsed spec (the dict tomllib returns); `source` names it in errors."""
    _reject_unknown(data, _TOP_KEYS, source, "", "top-level key")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(source, "name", "a topology needs a non-empty string name")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(source, "description", "must be a string")
    defaults = _parse_defaults(data.get("defaults", {}), source)
    node_tables = data.get("nodes", [])
    if not isinstance(node_tables, list) or not all(isinstance(t, dict) for t in node_tables):
        raise ConfigError(source, "nodes", "must be an array of tables ([[nodes]])")

    has_edges, has_generator = "edges" in data, "generator" in data
    if has_edges == has_generator:
        which = "both" if has_edges else "neither"
        problem = f"give exactly one of edges = [...] or [generator], got {which}"
        raise ConfigError(source, "edges/generator", problem)
    if has_generator:
        graph = _generate(data["generator"], source)
        ids = list(graph.nodes)
        edges = list(graph.edges)
        given = _index_node_tables(node_tables, source, known=ids)
    else:
        given = _index_node_tables(node_tables, source, known=None)
        if not given:
            raise ConfigError(source, "nodes", "a spec with explicit edges must list its [[nodes]]")
        ids = list(given)
        edges = _parse_edges(data["edges"], set(ids), source)
    if len(ids) > MAX_NODES:
        raise ConfigError(source, "nodes", f"{len(ids)} nodes; at most {MAX_NODES} are supported")

    nodes = []
    for index, node_id in enumerate(ids):
        position, table = given.get(node_id, (None, {}))
        entry = _node_entry(node_id, position)
        nodes.append(_parse_node(node_id, index, table, defaults, source, entry))
    _check_clashes(nodes, given, source)

    dynamics, sample = _parse_dynamics(data.get("dynamics"), source)
    if dynamics != "static":
        layouts = {n.shared_components for n in nodes}
        if len(layouts) > 1:
            raise ConfigError(
                source,
                "dynamics",
                "a time-varying topology needs every node to share the same components",
            )
        edges = _dynamic_links(ids, dynamics)
    graph = nx.Graph()
    graph.add_nodes_from(ids)
    graph.add_edges_from(edges)
    if not nx.is_connected(graph):
        where = "generator" if has_generator else "edges"
        raise ConfigError(
            source, where, f"the graph is disconnected: {_describe_parts(graph, ids)}"
        )
    return Topology(
        name=name,
        source=source,
        description=description,
        nodes=tuple(nodes),
        edges=tuple(sorted(tuple(sorted(e)) for e in edges)),
        dynamics=dynamics,
        sample=sample,
    )


def _parse_dynamics(table: Any, source: str) -> tuple[str, int]:
    if table is None:
        return "static", 1
    if not isinstance(table, dict):
        raise ConfigError(source, "dynamics", "must be a table ([dynamics])")
    _reject_unknown(table, ("kind", "sample"), source, "dynamics.", "key")
    kind = table.get("kind", "static")
    if kind not in DYNAMICS:
        raise ConfigError(source, "dynamics.kind", f"one of {', '.join(DYNAMICS)}, got {kind!r}")
    sample = table.get("sample", 1)
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 1:
        raise ConfigError(source, "dynamics.sample", f"an integer >= 1, got {sample!r}")
    return kind, sample


def _dynamic_links(ids: list[str], kind: str) -> list[tuple[str, str]]:
    """Every link a time-varying topology may use in some round."""
    n = len(ids)
    if kind == "s-out":
        return [(ids[i], ids[j]) for i in range(n) for j in range(i + 1, n)]
    hops = {2**k % n for k in range(max(1, math.ceil(math.log2(n))))} - {0}
    return sorted({tuple(sorted((ids[i], ids[(i + h) % n]))) for i in range(n) for h in hops})


def _reject_unknown(
    table: Mapping[str, Any], allowed: tuple[str, ...], source: str, prefix: str, what: str
) -> None:
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f'; did you mean "{close[0]}"?' if close else f"; expected {', '.join(allowed)}"
            raise ConfigError(source, f"{prefix}{key}", f"unknown {what}{hint}")


def _node_entry(node_id: str, position: int | None) -> str:
    """How errors name a node: by its [[nodes]] table if it has one, else by id."""
    if position is None:
        return f'node "{node_id}"'
    return f'nodes[{position}] (id "{node_id}")'


def _parse_defaults(table: Any, source: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(source, "defaults", "must be a table ([defaults])")
    _reject_unknown(table, _NODE_KEYS, source, "defaults.", "node attribute")
    for key in _PER_NODE_KEYS:
        if key in table:
            raise ConfigError(source, f"defaults.{key}", "must be set per node, not in [defaults]")
    return {**_BUILTIN_DEFAULTS, **table}


def _index_node_tables(
    tables: list[dict[str, Any]], source: str, known: list[str] | None
) -> dict[str, tuple[int, dict[str, Any]]]:
    """Map id -> (position in [[nodes]], table), checking ids are present, valid and unique."""
    given: dict[str, tuple[int, dict[str, Any]]] = {}
    known_ids = set(known) if known is not None else None
    for position, table in enumerate(tables):
        node_id = table.get("id")
        if not isinstance(node_id, str):
            raise ConfigError(source, f"nodes[{position}]", "needs a string `id`")
        entry = _node_entry(node_id, position)
        if not _ID.fullmatch(node_id):
            raise ConfigError(
                source,
                entry,
                "an id is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
            )
        if node_id in given:
            raise ConfigError(source, entry, f"duplicate node id (also nodes[{given[node_id][0]}])")
        if known is not None and known_ids is not None and node_id not in known_ids:
            listed = _abbreviate(known)
            raise ConfigError(
                source, entry, f"no such node in the generated graph (its ids are {listed})"
            )
        given[node_id] = (position, table)
    return given


def _parse_edges(raw: Any, ids: set[str], source: str) -> list[tuple[str, str]]:
    if not isinstance(raw, list):
        raise ConfigError(source, "edges", "must be an array of [id, id] pairs")
    seen: dict[frozenset[str], int] = {}
    edges = []
    for position, pair in enumerate(raw):
        entry = f"edges[{position}] {json.dumps(pair, default=str)}"
        is_pair = isinstance(pair, list) and len(pair) == 2
        if not is_pair or not all(isinstance(p, str) for p in pair):
            raise ConfigError(source, entry, "an edge is a pair of node ids")
        u, v = pair
        for end in (u, v):
            if end not in ids:
                raise ConfigError(source, entry, f'unknown node id "{end}"')
        if u == v:
            raise ConfigError(source, entry, "self-loop: an edge must join two different nodes")
        key = frozenset(pair)
        if key in seen:
            raise ConfigError(source, entry, f"duplicate edge (also edges[{seen[key]}])")
        seen[key] = position
        edges.append((u, v))
    return edges


def _parse_node(
    node_id: str,
    index: int,
    table: dict[str, Any],
    defaults: dict[str, Any],
    source: str,
    entry: str,
) -> NodeSpec:
    """Validate one node: its own table over the defaults; errors name where a value came from."""
    _reject_unknown(table, _NODE_KEYS, source, f"{entry}.", "node attribute")
    attrs = {**defaults, **table}

    def fail(key: str, problem: str) -> ConfigError:
        where = f"{entry}.{key}" if key in table else f"defaults.{key} (for {entry})"
        return ConfigError(source, where, problem)

    def choice(key: str, allowed: tuple[str, ...]) -> str:
        value = attrs[key]
        if value not in allowed:
            raise fail(key, f"{value!r} is not one of {', '.join(allowed)}")
        return value

    def names(key: str, check: Callable[[str], str | None]) -> tuple[str, ...]:
        value = attrs[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise fail(key, "must be an array of strings")
        for v in value:
            problem = check(v)
            if problem:
                raise fail(key, problem)
        duplicates = sorted({v for v in value if value.count(v) > 1})
        if duplicates:
            raise fail(key, f"listed twice: {', '.join(duplicates)}")
        return tuple(sorted(value))

    role = choice("role", ROLES)
    institution = attrs["institution"]
    if institution is not None and (not isinstance(institution, str) or not institution):
        raise fail("institution", "must be a non-empty string")
    modalities = names("modalities", _modality_problem)
    tasks = names("tasks", _task_problem)
    if not modalities:
        raise fail("modalities", "a node needs at least one modality")
    if not tasks:
        raise fail("tasks", "a node needs at least one task")
    host = attrs["host"]
    if not isinstance(host, str) or not host or re.search(r"[\s/]", host):
        raise fail("host", f"{host!r} is not a host name or address")
    port = attrs["port"]
    if port is not None and (isinstance(port, bool) or not isinstance(port, int)):
        raise fail("port", f"must be an integer, got {port!r}")
    if port is not None and not 1 <= port <= 65535:
        raise fail("port", f"{port} is outside 1..65535")
    compute = choice("compute", COMPUTE_TIERS)
    privacy = choice("privacy", PRIVACY_PROFILES)
    public_key = attrs["public_key"]
    if public_key is not None and (
        not isinstance(public_key, str) or len(public_key) != 40 or not set(public_key) <= _Z85
    ):
        raise fail("public_key", "a CURVE public key is 40 characters of Z85 text")
    node = NodeSpec(
        id=node_id,
        index=index,
        role=role,
        institution=institution,
        modalities=modalities,
        tasks=tasks,
        host=host,
        port=port,
        compute=compute,
        privacy=privacy,
        public_key=public_key,
        local=(),
    )
    held = node.components

    def not_held(component: str) -> str | None:
        if component in held:
            return None
        return f'"{component}" is not a component this node holds (it holds {", ".join(held)})'

    return replace(node, local=names("local", not_held))


def _modality_problem(modality: str) -> str | None:
    if modality in MODALITIES:
        return None
    return f'unknown modality "{modality}" (known: {", ".join(MODALITIES)})'


def _task_problem(task: str) -> str | None:
    if _TASK.fullmatch(task):
        return None
    return f'task "{task}" is not an identifier [a-z][a-z0-9_]*'


def _check_clashes(
    nodes: list[NodeSpec], given: dict[str, tuple[int, dict[str, Any]]], source: str
) -> None:
    """Port clashes and shared public keys are copy-paste mistakes; name both nodes."""

    def entry(node: NodeSpec) -> str:
        return _node_entry(node.id, given[node.id][0] if node.id in given else None)

    clash = _endpoint_clash(nodes)
    if clash is not None:
        first, second = clash
        raise ConfigError(
            source,
            entry(second),
            f"{second.host}:{second.port} is already used by {entry(first)}",
        )
    owners: dict[str, NodeSpec] = {}
    for node in nodes:
        if node.public_key is None:
            continue
        if node.public_key in owners:
            raise ConfigError(
                source,
                f"{entry(node)}.public_key",
                f"same key as {entry(owners[node.public_key])}; every node needs its own keypair",
            )
        owners[node.public_key] = node


def _endpoint_clash(nodes: Sequence[NodeSpec]) -> tuple[NodeSpec, NodeSpec] | None:
    bound: dict[tuple[str, int], NodeSpec] = {}
    for node in nodes:
        if node.port is None:
            continue
        key = (node.host, node.port)
        if key in bound:
            return bound[key], node
        bound[key] = node
    return None


# ----------------------------------------------------------------------------- generators

_GENERATOR_KEYS = {
    "cycle": ("n",),
    "path": ("n",),
    "star": ("n",),
    "complete": ("n",),
    "torus": ("rows", "cols"),
    "watts_strogatz": ("n", "k", "p", "seed"),
    "erdos_renyi": ("n", "p", "seed"),
    "random_regular": ("n", "d", "seed"),
}
_MIN_N = {"cycle": 3, "path": 2, "star": 2, "complete": 2}


def _generate(table: Any, source: str) -> nx.Graph:
    """Build the graph a [generator] table names; node ids are prefix + 0..N-1."""
    if not isinstance(table, dict):
        raise ConfigError(source, "generator", "must be a table ([generator])")
    kind = table.get("kind")
    if kind not in _GENERATOR_KEYS:
        raise ConfigError(
            source, "generator.kind", f"{kind!r} is not one of {', '.join(GENERATORS)}"
        )
    params = _GENERATOR_KEYS[kind]
    _reject_unknown(table, ("kind", "prefix", *params), source, "generator.", f"key for {kind}")
    for key in params:
        if key not in table:
            raise ConfigError(source, f"generator.{key}", f"{kind} needs `{key}`")
    prefix = table.get("prefix", "n")
    if not isinstance(prefix, str) or not _ID.fullmatch(prefix + "0"):
        raise ConfigError(source, "generator.prefix", f"{prefix!r} cannot start a node id")

    def integer(key: str, low: int, high: int = MAX_NODES) -> int:
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(
                source, f"generator.{key}", f"must be an integer in {low}..{high}, got {value!r}"
            )
        return value

    def probability() -> float:
        value = table["p"]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise ConfigError(source, "generator.p", f"must be a number in [0, 1], got {value!r}")
        return float(value)

    seed = integer("seed", 0, 2**32 - 1) if "seed" in params else None
    if kind == "torus":
        rows, cols = integer("rows", 3), integer("cols", 3)
        grid = nx.grid_2d_graph(rows, cols, periodic=True)
        graph = nx.relabel_nodes(grid, {(r, c): r * cols + c for r, c in grid.nodes})
    elif kind in _MIN_N:
        n = integer("n", _MIN_N[kind])
        make = {
            "cycle": nx.cycle_graph,
            "path": nx.path_graph,
            "star": lambda n: nx.star_graph(n - 1),
            "complete": nx.complete_graph,
        }[kind]
        graph = make(n)
    elif kind == "watts_strogatz":
        n = integer("n", 3)
        k = integer("k", 2, n - 1)
        if k % 2:
            raise ConfigError(source, "generator.k", f"must be even (k/2 a side), got {k}")
        p = probability()
        try:
            graph = nx.connected_watts_strogatz_graph(n, k, p, tries=100, seed=seed)
        except nx.NetworkXError:
            raise ConfigError(
                source, "generator.seed", f"no connected graph in 100 tries with seed {seed}"
            ) from None
    elif kind == "erdos_renyi":
        n = integer("n", 2)
        graph = nx.gnp_random_graph(n, probability(), seed=seed)
    else:
        n = integer("n", 2)
        d = integer("d", 1, n - 1)
        if n * d % 2:
            raise ConfigError(source, "generator.d", f"n*d must be even, got {n}*{d}")
        graph = nx.random_regular_graph(d, n, seed=seed)
    ids = {i: f"{prefix}{i}" for i in sorted(graph.nodes)}
    ordered = nx.Graph()
    ordered.add_nodes_from(ids[i] for i in sorted(graph.nodes))
    ordered.add_edges_from((ids[u], ids[v]) for u, v in graph.edges)
    if not nx.is_connected(ordered):
        shown = ", ".join(f"{k}={table[k]}" for k in params)
        raise ConfigError(
            source,
            "generator.seed" if seed is not None else "generator",
            f"{kind} with {shown} is disconnected: {_describe_parts(ordered, list(ordered))}; "
            "choose another seed or a denser graph",
        )
    return ordered


def _describe_parts(graph: nx.Graph, order: list[str]) -> str:
    rank = {node: i for i, node in enumerate(order)}
    parts = sorted(
        (sorted(part, key=rank.__getitem__) for part in nx.connected_components(graph)),
        key=lambda part: rank[part[0]],
    )
    return f"{len(parts)} parts: " + " | ".join(_abbreviate(part) for part in parts)


def _abbreviate(ids: list[str], limit: int = 8) -> str:
    shown = ", ".join(ids[:limit])
    return shown if len(ids) <= limit else f"{shown}, ... (+{len(ids) - limit} more)"


# ----------------------------------------------------------------------------- TOML writing


def _toml_str(value: str) -> str:
    out = []
    for ch in value:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(_toml_str(v) for v in values) + "]"


# ----------------------------------------------------------------------------- check report


def check_report(topology: Topology, target_error: float = 1e-6) -> dict[str, Any]:
    """Structure and predicted mixing speed of a topology, as a JSON-able dict.

    `predicted_rounds` is the number of synchronous Metropolis-Hastings rounds that shrink a
    relative consensus error of 1 to `target_error`, from the SLEM (worst case). The same is
    given for every shared component's holder subgraph. `warnings` lists what will not work as
    an operator might expect (split holder subgraphs, lone holders, tasks without their data).
    """
    graph = topology.graph()
    connected = nx.is_connected(graph)
    mh_slem = slem(metropolis_hastings(graph))
    warnings = []
    components = {}
    for component in topology.components():
        sub = topology.component_graph(component)
        holders = list(sub.nodes)
        sub_connected = nx.is_connected(sub)
        sub_slem = slem(metropolis_hastings(sub))
        # a lone holder has nothing to agree with: it is at consensus from the start
        rounds = 0 if len(holders) == 1 else predicted_rounds(sub_slem, target_error)
        components[component] = {
            "holders": holders,
            "connected": sub_connected,
            "slem": sub_slem,
            "predicted_rounds": rounds,
        }
        if not sub_connected:
            warnings.append(
                f"component {component}: its holders form {_describe_parts(sub, holders)}; "
                "mixing for it only reaches consensus within each part"
            )
        elif len(holders) == 1:
            warnings.append(
                f"component {component}: only {holders[0]} holds it shared; it is never exchanged"
            )
    for node in topology.nodes:
        for task in node.tasks:
            needed = TASK_NEEDS.get(task)
            if needed is not None and needed not in node.modalities:
                warnings.append(f"node {node.id}: task {task} needs {needed} data, which it lacks")
    return {
        "name": topology.name,
        "source": topology.source,
        "description": topology.description,
        "nodes": [
            {
                "id": n.id,
                "role": n.role,
                "institution": n.institution,
                "compute": n.compute,
                "privacy": n.privacy,
                "modalities": list(n.modalities),
                "tasks": list(n.tasks),
                "degree": graph.degree(n.id),
                "components": list(n.components),
                "local": list(n.local),
            }
            for n in topology.nodes
        ],
        "edges": graph.number_of_edges(),
        "connected": connected,
        "diameter": nx.diameter(graph) if connected else None,
        "mh_slem": mh_slem,
        "spectral_gap": 1.0 - mh_slem,
        "target_error": target_error,
        "predicted_rounds": predicted_rounds(mh_slem, target_error),
        "components": components,
        "warnings": warnings,
    }


def format_report(report: Mapping[str, Any]) -> str:
    """Readable text of a `check_report` result (what `m3tgossip topology check` prints)."""

    def rounds(value: int | None) -> str:
        return "never" if value is None else str(value)

    def listed(values: list[str]) -> str:
        return ",".join(values) or "-"

    def table(header: list[str], rows: list[list[str]]) -> list[str]:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        return [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in [header, *rows]
        ]

    diameter = report["diameter"]
    lines = [
        f"topology {report['name']} ({report['source']})",
        *([report["description"]] if report["description"] else []),
        f"{len(report['nodes'])} nodes, {report['edges']} edges, "
        + ("connected" if report["connected"] else "DISCONNECTED")
        + (f", diameter {diameter}" if diameter is not None else ""),
        (
            f"Metropolis-Hastings mixing: SLEM {report['mh_slem']:.4f}, "
            f"spectral gap {report['spectral_gap']:.4f}, "
            f"rounds to relative error {report['target_error']:g}: "
            f"{rounds(report['predicted_rounds'])}"
        ),
        "",
    ]
    node_rows = [
        [
            n["id"],
            n["role"],
            n["institution"] or "-",
            n["compute"],
            n["privacy"],
            str(n["degree"]),
            listed(n["modalities"]),
            listed(n["tasks"]),
            listed(n["local"]),
        ]
        for n in report["nodes"]
    ]
    header = ["node", "role", "institution", "compute", "privacy", "degree", "modalities"]
    lines += table([*header, "tasks", "local"], node_rows)
    lines.append("")
    component_rows = [
        [
            name,
            str(len(c["holders"])),
            "yes" if c["connected"] else "NO",
            f"{c['slem']:.4f}",
            rounds(c["predicted_rounds"]),
        ]
        for name, c in report["components"].items()
    ]
    lines += table(["component", "holders", "connected", "SLEM", "rounds"], component_rows)
    if report["warnings"]:
        lines += ["", "warnings:"]
        lines += [f"  - {w}" for w in report["warnings"]]
    return "\n".join(lines) + "\n"

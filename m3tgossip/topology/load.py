"""Loading a topology spec: reading the TOML file and validating every entry of it.

Bad input raises `ConfigError` naming the file, the entry (top-level key, `nodes[i] (id "x")`
with its attribute, `edges[i]`, `generator.key`, `dynamics.key`, a default and the node it
reaches) and what is wrong with it.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from m3tgossip.errors import ConfigError
from m3tgossip.topology.generators import generate
from m3tgossip.topology.plans import dynamic_links
from m3tgossip.topology.problems import abbreviate, describe_parts, reject_unknown
from m3tgossip.topology.spec import (
    COMPUTE_TIERS,
    DYNAMICS,
    MAX_NODES,
    MODALITIES,
    NODE_ID,
    PACE_KEYS,
    PRIVACY_PROFILES,
    ROLES,
    SINGLE_LEARNER,
    Z85_CHARS,
    NodeSpec,
    Topology,
    endpoint_clash,
)
from m3tgossip.topology.stages import check_joins, parse_stages

_TASK = re.compile(r"[a-z][a-z0-9_]*")
_TOP_KEYS = (
    "name",
    "description",
    "edges",
    "generator",
    "defaults",
    "nodes",
    "dynamics",
    "stages",
)
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
    "single_learner",
    "speed",
    "bandwidth",
    "records",
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
    "single_learner": None,
    "speed": 1.0,
    "bandwidth": 1.0,
    "records": None,
}


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
    reject_unknown(data, _TOP_KEYS, source, "", "top-level key")
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
        graph = generate(data["generator"], source)
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
        slow = [n for n in nodes if n.straggler]
        if slow:
            entry = _given_entry(slow[0].id, given)
            key = "speed" if slow[0].speed < 1.0 else "bandwidth"
            raise ConfigError(
                source,
                f"{entry}.{key}",
                "a time-varying topology ([dynamics]) runs every node in the round plan's "
                "lockstep; a node declared slow needs a static graph",
            )
        edges = dynamic_links(ids, dynamics)
    else:
        _cancel_beside_straggler(nodes, edges, given, source)
        nodes = _cancel_needs_two(nodes, edges)
    if not _connected(ids, edges):
        import networkx as nx  # only to say which parts the graph falls into

        graph = nx.Graph()
        graph.add_nodes_from(ids)
        graph.add_edges_from(edges)
        where = "generator" if has_generator else "edges"
        raise ConfigError(source, where, f"the graph is disconnected: {describe_parts(graph, ids)}")
    stages = parse_stages(data.get("stages", []), nodes, source, MODALITIES)
    if stages and dynamics != "static":
        raise ConfigError(source, "stages", "a time-varying topology ([dynamics]) has no stages")
    cancelling = [n.id for s in stages for n in nodes if n.single_learner and n.id in s.nodes]
    if cancelling:
        problem = f'node "{cancelling[0]}" has single_learner set; a stage adds nothing to one'
        raise ConfigError(source, "stages", problem)
    topology = Topology(
        name=name,
        source=source,
        description=description,
        nodes=tuple(nodes),
        edges=tuple(sorted(tuple(sorted(e)) for e in edges)),
        dynamics=dynamics,
        sample=sample,
        stages=stages,
    )
    if any(s.add_nodes for s in stages):
        check_joins(topology, source)
    return topology


def _cancel_beside_straggler(
    nodes: list[NodeSpec],
    edges: Any,
    given: dict[str, tuple[int, dict[str, Any]]],
    source: str,
) -> None:
    """A node with `single_learner = "cancel"` next to a node declared slow: refused, since
    its masks cancel only if every neighbour mixes the same round of them, and no round is kept
    in step with a straggler."""
    by_id = {n.id: n for n in nodes}
    for u, v in edges:
        for me, other in ((by_id[u], by_id[v]), (by_id[v], by_id[u])):
            if me.single_learner == "cancel" and other.straggler:
                entry = _given_entry(me.id, given)
                raise ConfigError(
                    source,
                    f"{entry}.single_learner",
                    f'"cancel" next to {other.id}, which is declared slow (speed or bandwidth '
                    "below 1): the masks cancel only in lockstep rounds, and no neighbour "
                    "keeps lockstep with a straggler",
                )


def _cancel_needs_two(nodes: list[NodeSpec], edges: Any) -> list[NodeSpec]:
    """A node with `single_learner = "cancel"` shares a component only with two or more
    neighbours that share it too (one neighbour could take its cancelling noise off): the
    others join its `local` ones. Repeated until nothing changes, since a component one
    cancelling node keeps can leave a cancelling neighbour of it with one holder less."""
    by_id = {n.id: n for n in nodes}
    adjacency: dict[str, list[str]] = {n.id: [] for n in nodes}
    for u, v in edges:
        adjacency[u].append(v)
        adjacency[v].append(u)
    changed = True
    while changed:
        changed = False
        for node in list(by_id.values()):
            if node.single_learner != "cancel":
                continue
            alone = [
                c
                for c in node.shared_components
                if sum(c in by_id[j].shared_components for j in adjacency[node.id]) < 2
            ]
            if alone:
                by_id[node.id] = replace(node, local=tuple(sorted({*node.local, *alone})))
                changed = True
    return [by_id[n.id] for n in nodes]


def _connected(ids: list[str], edges: Any) -> bool:
    """Whether the graph of `ids` and `edges` (pairs of ids) is connected (breadth first)."""
    adjacency: dict[str, list[str]] = {i: [] for i in ids}
    for u, v in edges:
        adjacency[u].append(v)
        adjacency[v].append(u)
    seen = {ids[0]} if ids else set()
    frontier = list(seen)
    while frontier:
        node = frontier.pop()
        for other in adjacency[node]:
            if other not in seen:
                seen.add(other)
                frontier.append(other)
    return len(seen) == len(ids)


def _parse_dynamics(table: Any, source: str) -> tuple[str, int]:
    if table is None:
        return "static", 1
    if not isinstance(table, dict):
        raise ConfigError(source, "dynamics", "must be a table ([dynamics])")
    reject_unknown(table, ("kind", "sample"), source, "dynamics.", "key")
    kind = table.get("kind", "static")
    if kind not in DYNAMICS:
        raise ConfigError(source, "dynamics.kind", f"one of {', '.join(DYNAMICS)}, got {kind!r}")
    sample = table.get("sample", 1)
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 1:
        raise ConfigError(source, "dynamics.sample", f"an integer >= 1, got {sample!r}")
    return kind, sample


def _node_entry(node_id: str, position: int | None) -> str:
    """How errors name a node: by its [[nodes]] table if it has one, else by id."""
    if position is None:
        return f'node "{node_id}"'
    return f'nodes[{position}] (id "{node_id}")'


def _given_entry(node_id: str, given: dict[str, tuple[int, dict[str, Any]]]) -> str:
    """How errors name a node of the spec, its [[nodes]] table known or not."""
    return _node_entry(node_id, given[node_id][0] if node_id in given else None)


def _parse_defaults(table: Any, source: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(source, "defaults", "must be a table ([defaults])")
    reject_unknown(table, _NODE_KEYS, source, "defaults.", "node attribute")
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
        if not NODE_ID.fullmatch(node_id):
            raise ConfigError(
                source,
                entry,
                "an id is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
            )
        if node_id in given:
            raise ConfigError(source, entry, f"duplicate node id (also nodes[{given[node_id][0]}])")
        if known is not None and known_ids is not None and node_id not in known_ids:
            listed = abbreviate(known)
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
    reject_unknown(table, _NODE_KEYS, source, f"{entry}.", "node attribute")
    attrs = {**defaults, **table}

    def fail(key: str, problem: str) -> ConfigError:
        where = f"{entry}.{key}" if key in table else f"defaults.{key} (for {entry})"
        return ConfigError(source, where, problem)

    def choice(key: str, allowed: tuple[str, ...]) -> str:
        value = attrs[key]
        if value not in allowed:
            raise fail(key, f"{value!r} is not one of {', '.join(allowed)}")
        return value

    def fraction(key: str) -> float:
        value = attrs[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(key, f"must be a number in (0, 1] (1 = full speed), got {value!r}")
        if not 0.0 < value <= 1.0:  # NaN fails too
            raise fail(key, f"{value!r} is outside (0, 1] (a fraction of full speed; 1 = full)")
        return float(value)

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
    single_learner = attrs["single_learner"]
    if single_learner is not None:
        single_learner = choice("single_learner", SINGLE_LEARNER)
    pace = {key: fraction(key) for key in PACE_KEYS}
    if single_learner == "cancel" and any(v < 1.0 for v in pace.values()):
        key = next(k for k in PACE_KEYS if pace[k] < 1.0)
        raise fail(
            key,
            f'{key} = {pace[key]:g} with single_learner = "cancel": its noise cancels only in '
            "lockstep rounds, and no neighbour keeps lockstep with a node declared slow",
        )
    if (records := attrs["records"]) is not None and (type(records) is not int or records < 1):
        bad = "is not a positive number of records" if type(records) is int else "is not whole"
        raise fail("records", f"{records!r} {bad}: a whole number of records")
    public_key = attrs["public_key"]
    if public_key is not None and (
        not isinstance(public_key, str) or len(public_key) != 40 or not set(public_key) <= Z85_CHARS
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
        single_learner=single_learner,
        records=records,
        **pace,
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

    clash = endpoint_clash(nodes)
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

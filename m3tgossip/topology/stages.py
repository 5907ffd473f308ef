"""A semester as stages: the `[[stages]]` of a spec, validated, and the spec version of a round.

A spec's `[[nodes]]` say what every node holds from round 0. Each `[[stages]]` entry begins at
a round and adds tasks and modalities to some nodes (every node present by default), or nodes
to the federation:

    [[stages]]
    name = "essays"
    round = 10
    nodes = ["uni-a", "inst-a"]
    tasks = ["engagement"]
    modalities = ["text"]

    [[stages]]
    name = "new-course"
    round = 18
    add_nodes = ["uni-c", "inst-c"]

A node listed in a stage's `add_nodes` is a `[[nodes]]` entry like any other (its tasks,
modalities, keys and endpoint are in the spec from the start), but it joins at that stage:
before it, it and its edges are absent from the spec's version, so no node has it as a
neighbour, waits for it or gives it weight. Every version's graph of the nodes present must
be connected, and a joining node needs an edge to a node present before its stage.

Stage 0 is the spec as its nodes give it; stage k (k >= 1) is the k-th entry, from its round
on, with every earlier stage's additions. `Topology.version(k)` is that version of the spec:
the nodes present in stage k and the edges between them, each node with the tasks and
modalities it holds in stage k, so its components, the holders of each component and their
subgraphs (and so the mixing weights) follow from it. Bad entries raise `ConfigError` naming
the file and `stages[i] ("name").key`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from m3tgossip.errors import ConfigError
from m3tgossip.topology.problems import abbreviate, describe_parts, reject_unknown

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_TASK = re.compile(r"[a-z][a-z0-9_]*")
STAGE_KEYS = ("name", "round", "nodes", "tasks", "modalities", "add_nodes")


@dataclass(frozen=True)
class Stage:
    """One `[[stages]]` entry: from `round` on, `nodes` also hold `tasks` and `modalities`,
    and the nodes `add_nodes` take part."""

    name: str
    round: int
    nodes: tuple[str, ...]
    tasks: tuple[str, ...]
    modalities: tuple[str, ...]
    add_nodes: tuple[str, ...] = ()


def joining(stages: Sequence[Stage]) -> dict[str, int]:
    """Node id -> the stage (1..len(stages)) it joins at, for every node a stage adds."""
    return {n: k for k, s in enumerate(stages, start=1) for n in s.add_nodes}


def parse_stages(
    raw: Any, nodes: Sequence[Any], source: str, modalities: tuple[str, ...]
) -> tuple[Stage, ...]:
    """Validate the `[[stages]]` array against the spec's `nodes` (NodeSpec, in order); returns
    the stages in order. ConfigError naming the file, the stage and its key."""
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise ConfigError(source, "stages", "must be an array of tables ([[stages]])")
    ids = [n.id for n in nodes]
    #: every node a stage adds, and where (filled stage by stage: the later ones are absent)
    joins: dict[str, int] = {}
    for position, table in enumerate(raw):
        for node_id in table.get("add_nodes", []) if isinstance(table, dict) else []:
            if isinstance(node_id, str):
                joins.setdefault(node_id, position)
    held = {n.id: (set(n.tasks), set(n.modalities)) for n in nodes}
    names: dict[str, int] = {}
    stages: list[Stage] = []
    last_round = 0
    for position, table in enumerate(raw):
        name = table.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError(
                source,
                f"stages[{position}].name",
                "a stage needs a name: 1-64 letters, digits, '.', '_' or '-'",
            )
        entry = f'stages[{position}] ("{name}")'
        reject_unknown(table, STAGE_KEYS, source, f"{entry}.", "stage key")
        if name in names:
            raise ConfigError(
                source, f"{entry}.name", f"duplicate stage (also stages[{names[name]}])"
            )
        names[name] = position
        start = table.get("round")
        if isinstance(start, bool) or not isinstance(start, int) or start < 1:
            raise ConfigError(
                source,
                f"{entry}.round",
                f"the round the stage begins at, an integer >= 1, got {start!r}",
            )
        if start <= last_round:
            raise ConfigError(
                source,
                f"{entry}.round",
                f"{start} is not after the previous stage's round {last_round}: stages are "
                "listed in the order they begin",
            )
        last_round = start
        added = _strings(table, "add_nodes", entry, source, [])
        for node_id in added:
            if node_id not in held:
                raise ConfigError(
                    source,
                    f"{entry}.add_nodes",
                    f'unknown node id "{node_id}": a node a stage adds is a [[nodes]] entry '
                    f"(the spec has {abbreviate(ids)})",
                )
            if joins[node_id] != position:
                raise ConfigError(
                    source,
                    f"{entry}.add_nodes",
                    f'node "{node_id}" is already added by stages[{joins[node_id]}]',
                )
        present = [i for i in ids if joins.get(i, -1) <= position]
        who = _strings(table, "nodes", entry, source, present)
        for node_id in who:
            if node_id not in held:
                raise ConfigError(
                    source,
                    f"{entry}.nodes",
                    f'unknown node id "{node_id}" (the spec has {abbreviate(ids)})',
                )
            if node_id not in present:
                later = raw[joins[node_id]].get("name")
                raise ConfigError(
                    source,
                    f"{entry}.nodes",
                    f'node "{node_id}" joins at a later stage ("{later}"): it holds nothing '
                    "before it",
                )
        tasks = _strings(table, "tasks", entry, source, [])
        for task in tasks:
            if not _TASK.fullmatch(task):
                raise ConfigError(
                    source, f"{entry}.tasks", f'task "{task}" is not an identifier [a-z][a-z0-9_]*'
                )
        mods = _strings(table, "modalities", entry, source, [])
        for m in mods:
            if m not in modalities:
                raise ConfigError(
                    source,
                    f"{entry}.modalities",
                    f'unknown modality "{m}" (known: {", ".join(modalities)})',
                )
        if not tasks and not mods and not added:
            raise ConfigError(source, entry, "a stage adds at least one task, modality or node")
        for node_id in who:
            have_tasks, have_mods = held[node_id]
            for key, adds, have in (("tasks", tasks, have_tasks), ("modalities", mods, have_mods)):
                already = sorted(set(adds) & have)
                if already:
                    raise ConfigError(
                        source,
                        f"{entry}.{key}",
                        f'node "{node_id}" already holds {", ".join(already)} before this stage',
                    )
            have_tasks |= set(tasks)
            have_mods |= set(mods)
        if not tasks and not mods:
            who = []
        stages.append(
            Stage(
                name,
                start,
                tuple(who),
                tuple(sorted(tasks)),
                tuple(sorted(mods)),
                tuple(added),
            )
        )
    return tuple(stages)


def _strings(
    table: dict[str, Any], key: str, entry: str, source: str, default: list[str]
) -> list[str]:
    value = table.get(key, default)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(source, f"{entry}.{key}", "must be an array of strings")
    twice = sorted({v for v in value if value.count(v) > 1})
    if twice:
        raise ConfigError(source, f"{entry}.{key}", f"listed twice: {', '.join(twice)}")
    return list(value)


def stage_nodes(base: Sequence[Any], stages: Sequence[Stage], k: int) -> tuple[Any, ...]:
    """The nodes (NodeSpec) of stage `k`: `base` with the additions of stages 1..k."""
    if not 0 <= k <= len(stages):
        raise ValueError(f"stage {k} is not one of 0..{len(stages)}")
    nodes = list(base)
    for stage in stages[:k]:
        for i, node in enumerate(nodes):
            if node.id in stage.nodes:
                nodes[i] = replace(
                    node,
                    tasks=tuple(sorted({*node.tasks, *stage.tasks})),
                    modalities=tuple(sorted({*node.modalities, *stage.modalities})),
                )
    return tuple(nodes)


def stages_toml(stages: Sequence[Stage], quote: Any) -> list[str]:
    """The `[[stages]]` tables of `stages` as TOML lines (`quote` writes a TOML string)."""
    lines: list[str] = []
    for s in stages:
        lines += ["", "[[stages]]", f"name = {quote(s.name)}", f"round = {s.round}"]
        lines.append("nodes = [" + ", ".join(quote(n) for n in s.nodes) + "]")
        lines.append("tasks = [" + ", ".join(quote(t) for t in s.tasks) + "]")
        lines.append("modalities = [" + ", ".join(quote(m) for m in s.modalities) + "]")
        if s.add_nodes:
            lines.append("add_nodes = [" + ", ".join(quote(n) for n in s.add_nodes) + "]")
    return lines


def check_rounds(stages: Sequence[Stage], rounds: int, source: str) -> None:
    """A run of `rounds` rounds (0: until stopped) reaches every stage that adds nodes:
    ConfigError naming the file and `stages[i] ("name").round` if one begins at or after its
    last round (the node it adds would never take part)."""
    if rounds <= 0:
        return
    for position, stage in enumerate(stages):
        if stage.add_nodes and stage.round >= rounds:
            raise ConfigError(
                source,
                f'stages[{position}] ("{stage.name}").round',
                f"{stage.round} is beyond the run's last round {rounds - 1} ({rounds} rounds): "
                f"{', '.join(stage.add_nodes)} would never join",
            )


def check_joins(topology: Any, source: str) -> None:
    """Every version of `topology` (a Topology) has a connected graph of the nodes present: a
    node a stage adds has an edge to a node present when it joins, and no node present is
    reachable only through one that joins later; and a node a stage adds has an edge to a node
    present before that stage (it starts from their values, and learns from them that the
    stage began). ConfigError naming the stage whose `add_nodes` breaks this."""
    import networkx as nx

    for k in range(len(topology.stages) + 1):
        version = topology.version(k)
        present = version.present()
        graph = version.graph()
        if not present or nx.is_connected(graph):
            continue
        parts = describe_parts(graph, present)
        if k == 0:
            later = [n for n in topology.ids() if n not in present]
            raise ConfigError(
                source,
                "edges",
                f"before any stage adds {abbreviate(later)}, the graph of the nodes present is "
                f"disconnected: {parts}",
            )
        stage = topology.stages[k - 1]
        raise ConfigError(
            source,
            f'stages[{k - 1}] ("{stage.name}").add_nodes',
            f"from round {stage.round} the graph of the nodes present is disconnected: {parts} "
            "(a node a stage adds needs an edge to a node present by then)",
        )
    for k, stage in enumerate(topology.stages, start=1):
        before = set(topology.version(k - 1).present())
        for node_id in stage.add_nodes:
            if not before & set(topology.version(k).neighbours(node_id)):
                raise ConfigError(
                    source,
                    f'stages[{k - 1}] ("{stage.name}").add_nodes',
                    f'node "{node_id}" has no edge to a node present before round {stage.round} '
                    "(a node a stage adds starts from such neighbours' values)",
                )

"""A semester as stages: the `[[stages]]` of a spec, validated, and the spec version of a round.

A spec's `[[nodes]]` say what every node holds from round 0. Each `[[stages]]` entry begins at
a round and adds tasks and modalities to some nodes (every node by default):

    [[stages]]
    name = "essays"
    round = 10
    nodes = ["uni-a", "inst-a"]
    tasks = ["engagement"]
    modalities = ["text"]

Stage 0 is the spec as its nodes give it; stage k (k >= 1) is the k-th entry, from its round
on, with every earlier stage's additions. `Topology.version(k)` is that version of the spec:
the same nodes and edges, each node with the tasks and modalities it holds in stage k, so its
components, the holders of each component and their subgraphs (and so the mixing weights)
follow from it. Bad entries raise `ConfigError` naming the file and `stages[i] ("name").key`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from m3tgossip.errors import ConfigError
from m3tgossip.topology.problems import abbreviate, reject_unknown

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_TASK = re.compile(r"[a-z][a-z0-9_]*")
STAGE_KEYS = ("name", "round", "nodes", "tasks", "modalities")


@dataclass(frozen=True)
class Stage:
    """One `[[stages]]` entry: from `round` on, `nodes` also hold `tasks` and `modalities`."""

    name: str
    round: int
    nodes: tuple[str, ...]
    tasks: tuple[str, ...]
    modalities: tuple[str, ...]


def parse_stages(
    raw: Any, nodes: Sequence[Any], source: str, modalities: tuple[str, ...]
) -> tuple[Stage, ...]:
    """Validate the `[[stages]]` array against the spec's `nodes` (NodeSpec, in order); returns
    the stages in order. ConfigError naming the file, the stage and its key."""
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise ConfigError(source, "stages", "must be an array of tables ([[stages]])")
    ids = [n.id for n in nodes]
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
        who = _strings(table, "nodes", entry, source, ids)
        for node_id in who:
            if node_id not in held:
                raise ConfigError(
                    source,
                    f"{entry}.nodes",
                    f'unknown node id "{node_id}" (the spec has {abbreviate(ids)})',
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
        if not tasks and not mods:
            raise ConfigError(source, entry, "a stage adds at least one task or modality")
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
        stages.append(Stage(name, start, tuple(who), tuple(sorted(tasks)), tuple(sorted(mods))))
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
    return lines

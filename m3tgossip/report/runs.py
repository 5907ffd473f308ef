"""What a report is made from: the nodes' metrics files of a testbed run or of deployed nodes.

`load_run` accepts, for each path given:

- a testbed run folder: `summary.json` and `nodes/<id>/metrics.jsonl`;
- a node's state folder: `metrics.jsonl` (or the file itself);
- a folder of state folders: `<any>/metrics.jsonl` one level down (what an operator gets by
  copying each deployed node's state folder next to the others).

Each node's records are read as the daemon wrote them (`read_metrics` skips a torn last
line); a node restarted during the run has several sessions, whose byte counters each start at
zero and are added up here, and whose repeated rounds count once (the last record wins).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m3tgossip.daemon.metrics import read_metrics
from m3tgossip.errors import ConfigError

METRICS = "metrics.jsonl"


@dataclass
class NodeRun:
    """One node's records, file order, and the last record of each round."""

    node: str
    folder: Path
    records: list[dict[str, Any]] = field(repr=False)
    by_round: dict[int, dict[str, Any]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for rec in self.records:
            if isinstance(rec.get("round"), int):
                self.by_round[rec["round"]] = rec

    @property
    def rounds(self) -> list[int]:
        return sorted(self.by_round)

    @property
    def sessions(self) -> int:
        return len({rec.get("session") for rec in self.records})

    def series(self, value: Callable[[dict[str, Any]], Any]) -> tuple[list[int], list[float]]:
        """(rounds, values) of the rounds whose record gives a finite number for `value`."""
        xs: list[int] = []
        ys: list[float] = []
        for r in self.rounds:
            try:
                y = value(self.by_round[r])
            except (KeyError, TypeError, AttributeError):
                continue
            if isinstance(y, bool) or not isinstance(y, (int, float)) or not math.isfinite(y):
                continue
            xs.append(r)
            ys.append(float(y))
        return xs, ys

    def cumulative(self, key: str) -> tuple[list[int], list[float]]:
        """(rounds, total of counter `key` up to each round) over every session."""
        done = 0.0  # the last values of the sessions before the current one
        session: Any = object()
        last = 0.0
        at_round: dict[int, float] = {}
        for rec in self.records:
            value = rec.get(key)
            if not isinstance(value, (int, float)) or not isinstance(rec.get("round"), int):
                continue
            if rec.get("session") != session:
                done += last
                session, last = rec.get("session"), 0.0
            last = float(value)
            at_round[rec["round"]] = done + last
        rounds = sorted(at_round)
        return rounds, [at_round[r] for r in rounds]

    def evaluations(self) -> list[tuple[int, dict[str, Any]]]:
        """(round, record) of every round with a workload evaluation of tasks."""
        return [(r, rec) for r, rec in sorted(self.by_round.items()) if "tasks" in rec]

    def last(self, key: str) -> Any:
        """The value of `key` in the latest round that has it (None if none does)."""
        for r in reversed(self.rounds):
            if self.by_round[r].get(key) is not None:
                return self.by_round[r][key]
        return None


@dataclass
class Run:
    """Everything a report shows: the nodes, in order, and the testbed's summary if any."""

    title: str
    sources: list[Path]
    nodes: dict[str, NodeRun]
    summary: dict[str, Any] | None
    workload: str

    @property
    def rounds(self) -> int:
        """Rounds recorded by the node that got furthest."""
        return max((max(n.by_round) + 1 for n in self.nodes.values() if n.by_round), default=0)

    @property
    def evaluated(self) -> bool:
        return any(n.evaluations() for n in self.nodes.values())

    @property
    def private(self) -> bool:
        return any("privacy" in rec for n in self.nodes.values() for rec in n.records)


def node_folders(path: Path) -> list[Path]:
    """The folders holding a metrics file under `path` (see the module's docstring)."""
    if path.is_file() and path.name == METRICS:
        return [path.parent]
    if not path.is_dir():
        raise ConfigError(str(path), "", "no such folder")
    if (path / METRICS).is_file():
        return [path]
    base = path / "nodes" if (path / "nodes").is_dir() else path
    found = sorted(p.parent for p in base.glob(f"*/{METRICS}"))
    if not found:
        raise ConfigError(
            str(path),
            "",
            f"no {METRICS} here, in nodes/*/ (a testbed run) or in a subfolder (state folders)",
        )
    return found


def _summary(path: Path) -> dict[str, Any] | None:
    file = path / "summary.json"
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(str(file), "", f"not a readable summary: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(str(file), "", "not a JSON object")
    return data


def _workload(summary: dict[str, Any] | None, nodes: Iterable[NodeRun]) -> str:
    if summary and isinstance(summary.get("workload"), str):
        return str(summary["workload"])
    records = [rec for n in nodes for rec in n.records]
    if any("tasks" in rec for rec in records):
        return "edu"
    if any("error_to_mean" in rec for rec in records):
        return "consensus"
    return "unknown"


def load_run(paths: Iterable[str | Path], title: str | None = None) -> Run:
    """The nodes under `paths`; ConfigError naming the folder if one has no metrics, or if
    two folders hold the same node."""
    sources = [Path(p) for p in paths]
    if not sources:
        raise ConfigError("report", "RUN_DIR", "give at least one folder")
    nodes: dict[str, NodeRun] = {}
    summary = _summary(sources[0]) if len(sources) == 1 and sources[0].is_dir() else None
    for source in sources:
        for folder in node_folders(source):
            records = read_metrics(folder / METRICS)
            named = next((r["node"] for r in records if isinstance(r.get("node"), str)), None)
            nid = named or folder.name
            if nid in nodes:
                raise ConfigError(
                    str(folder / METRICS),
                    "node",
                    f"node {nid!r} also in {nodes[nid].folder / METRICS}: give each node once",
                )
            nodes[nid] = NodeRun(nid, folder, records)
    order = [n for n in (summary or {}).get("nodes", []) if n in nodes]
    order += sorted(n for n in nodes if n not in order)
    nodes = {n: nodes[n] for n in order}
    if title is None:
        topology = (summary or {}).get("topology")
        title = f"m3tgossip run: {topology}" if topology else f"m3tgossip run: {sources[0]}"
    return Run(title, sources, nodes, summary, _workload(summary, nodes.values()))

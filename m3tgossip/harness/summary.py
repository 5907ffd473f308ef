"""What a testbed run measured: `Summary` from the nodes' metrics files, its JSON and its table."""

from __future__ import annotations

import json
import math
import signal
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from m3tgossip.consensus import metropolis_hastings, predicted_rounds, slem
from m3tgossip.daemon.metrics import read_metrics
from m3tgossip.harness.testbed_spec import TestbedSpec
from m3tgossip.topology import Topology

#: rounds at the start of a daemon's session left out of `round_breakdown_after_start_s`
START_ROUNDS = 2
#: keys of summary.json for the consensus workload, and for the others
CONSENSUS_KEYS = (
    "target_error",
    "initial_error",
    "consensus_error",
    "final_consensus_error",
    "predicted_rounds",
    "measured_rounds",
)
EVAL_KEYS = ("per_node", "final_mean_acc")


@dataclass(frozen=True)
class Summary:
    """The result of a run, field for field the keys of `DIR/summary.json`.

    The round breakdowns are None when no node recorded timings; the consensus fields are
    None unless the workload is `consensus`, the evaluation fields (`per_node`,
    `final_mean_acc`) None if it is.
    """

    topology: str
    nodes: list[str]
    edges: int
    rounds: int
    workload: str
    mode: str
    seed: int
    wall_seconds: float
    crashed: list[str]
    byzantine: list[str]
    killed: list[str]
    hung: list[str]
    exit_codes: dict[str, list[int]]
    rounds_done: dict[str, int]
    bytes_sent: dict[str, int]
    bytes_received: dict[str, int]
    slem: float | None
    slem_per_component: dict[str, float]
    bytes_per_round_per_node: list[float | None]
    #: mean seconds per round phase over every record with timings
    round_breakdown_s: dict[str, float] | None = None
    #: the same without each session's first START_ROUNDS rounds
    round_breakdown_after_start_s: dict[str, float] | None = None
    target_error: float | None = None
    initial_error: float | None = None
    #: per round, the largest relative error to the exact mean over the honest nodes
    consensus_error: list[float | None] | None = None
    final_consensus_error: float | None = None
    predicted_rounds: int | None = None
    measured_rounds: int | None = None
    #: node -> evaluations over rounds, last per-group metrics and final per-task metrics
    per_node: dict[str, dict[str, Any]] | None = None
    final_mean_acc: float | None = None

    @property
    def exit_code(self) -> int:
        """The testbed's exit code for this run: 1 if a daemon crashed or hung, else 0."""
        return 1 if self.crashed or self.hung else 0

    def to_dict(self) -> dict[str, Any]:
        """The content of summary.json, keys in its order."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in CONSENSUS_KEYS:
                keep = self.workload == "consensus"
            elif f.name in EVAL_KEYS:
                keep = self.workload != "consensus"
            else:
                keep = value is not None or not f.name.startswith("round_breakdown")
            if keep:
                out[f.name] = value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def write(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Summary:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def read(cls, path: str | Path) -> Summary:
        """The summary a run wrote to `path` (summary.json)."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def _by_round(records: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Last record per round (a restarted node may repeat rounds)."""
    out: dict[int, dict[str, Any]] = {}
    for rec in records:
        out[int(rec["round"])] = rec
    return out


def _cumulative(records: list[dict[str, Any]], key: str) -> int:
    """Counters restart at zero with each session: add the last value of every session."""
    last: dict[str, int] = {}
    for rec in records:
        last[rec.get("session", "")] = int(rec.get(key, 0))
    return sum(last.values())


def _mean_timings(timings: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(t[k] for t in timings) / len(timings) for k in timings[0]}


def summarise(
    spec: TestbedSpec,
    topology: Topology,
    folders: Mapping[str, Path],
    exit_codes: Mapping[str, list[int]],
    killed: list[str],
    wall: float,
    hung: list[str],
) -> Summary:
    """The summary of a run from each node's folder (its metrics file) and exit codes;
    `killed` are the nodes the testbed SIGKILLed, `hung` those still running at the timeout."""
    metrics = {nid: read_metrics(folder / "metrics.jsonl") for nid, folder in folders.items()}
    per_round = {nid: _by_round(recs) for nid, recs in metrics.items()}
    killed = sorted(set(killed))
    crashed = sorted(
        nid
        for nid, codes in exit_codes.items()
        if any(code not in (0, -signal.SIGKILL) for code in codes)
        or (nid not in killed and any(code != 0 for code in codes))
    )
    slems = {}
    for comp in topology.components():
        g = topology.component_graph(comp)
        if g.number_of_nodes() > 1:
            slems[comp] = slem(metropolis_hastings(g))
    worst_slem: float | None = max(slems.values(), default=0.0)
    if topology.dynamics != "static":
        slems, worst_slem = {}, None  # the spectral prediction is for static graphs
    byzantine = spec.byzantine
    n_rounds = max((max(r) + 1 for r in per_round.values() if r), default=0)
    bytes_per_round: list[float | None] = []
    for r in range(n_rounds):
        sent = [
            per_round[n][r].get("bytes_out", 0) - per_round[n].get(r - 1, {}).get("bytes_out", 0)
            for n in per_round
            if r in per_round[n] and (r - 1 in per_round[n] or r == 0)
        ]
        bytes_per_round.append(sum(sent) / len(sent) if sent else None)
    timings = [rec["timings"] for recs in metrics.values() for rec in recs if "timings" in rec]
    # without each session's first START_ROUNDS rounds, where nodes wait for the last
    # daemons of the run to come up
    later = [
        rec["timings"]
        for recs in metrics.values()
        for i, rec in enumerate(recs)
        if "timings" in rec
        and i >= START_ROUNDS
        and recs[i - START_ROUNDS].get("session") == rec.get("session")
    ]
    honest = {nid: recs for nid, recs in per_round.items() if nid not in byzantine}
    if spec.workload == "consensus":
        result = _consensus_summary(honest, n_rounds, worst_slem, spec.target)
    else:
        result = _eval_summary(per_round, byzantine)
    return Summary(
        topology=topology.name,
        nodes=topology.ids(),
        edges=len(topology.edges),
        rounds=spec.rounds,
        workload=spec.workload,
        mode=spec.mode,
        seed=spec.seed,
        wall_seconds=round(wall, 3),
        crashed=crashed,
        byzantine=byzantine,
        killed=killed,
        hung=sorted(hung),
        exit_codes={nid: list(codes) for nid, codes in exit_codes.items()},
        rounds_done={nid: (max(r) + 1 if r else 0) for nid, r in per_round.items()},
        bytes_sent={nid: _cumulative(recs, "bytes_out") for nid, recs in metrics.items()},
        bytes_received={nid: _cumulative(recs, "bytes_in") for nid, recs in metrics.items()},
        slem=worst_slem,
        slem_per_component=slems,
        bytes_per_round_per_node=bytes_per_round,
        round_breakdown_s=_mean_timings(timings) if timings else None,
        round_breakdown_after_start_s=_mean_timings(later) if timings and later else None,
        **result,
    )


def _consensus_summary(
    per_round: dict[str, dict[int, dict[str, Any]]],
    n_rounds: int,
    worst_slem: float | None,
    target: float,
) -> dict[str, Any]:
    errors: list[float | None] = []
    for r in range(n_rounds):
        found = [recs[r].get("error_to_mean") for recs in per_round.values() if r in recs]
        vals: list[float] = [v for v in found if v is not None]
        errors.append(max(vals) if vals else None)
    initial = [
        recs[0]["initial_error"]
        for recs in per_round.values()
        if 0 in recs and "initial_error" in recs[0]
    ]
    e0 = math.sqrt(sum(e * e for e in initial)) if initial else 1.0
    measured = next((r + 1 for r, e in enumerate(errors) if e is not None and e <= target), None)
    return {
        "target_error": target,
        "initial_error": e0,
        "consensus_error": errors,
        "final_consensus_error": errors[-1] if errors else None,
        "predicted_rounds": predicted_rounds(worst_slem, target, e0)
        if worst_slem is not None
        else None,
        "measured_rounds": measured,
    }


def _eval_summary(
    per_round: dict[str, dict[int, dict[str, Any]]], byzantine: list[str]
) -> dict[str, Any]:
    """Per-node, per-task metrics over rounds, last per-group metrics, and means."""
    per_node: dict[str, Any] = {}
    for nid, recs in per_round.items():
        evals = [(r, rec) for r, rec in sorted(recs.items()) if "tasks" in rec]
        per_node[nid] = {
            "rounds": [r for r, _ in evals],
            "mean_acc": [rec.get("mean_acc") for _, rec in evals],
            "unseen_acc": [rec.get("unseen", {}).get("mean_acc") for _, rec in evals],
            "tasks": {
                task: [rec["tasks"].get(task) for _, rec in evals]
                for task in (evals[-1][1]["tasks"] if evals else {})
            },
            "groups": evals[-1][1].get("groups", {}) if evals else {},
            "final": evals[-1][1]["tasks"] if evals else {},
        }
    finals = [
        v["mean_acc"][-1]
        for nid, v in per_node.items()
        if nid not in byzantine and v["mean_acc"] and v["mean_acc"][-1] is not None
    ]
    return {"per_node": per_node, "final_mean_acc": sum(finals) / len(finals) if finals else None}


def _eval_table(s: Summary) -> list[str]:
    """Per-node, per-task accuracy at the last evaluation, and the mean from first to last."""
    per_node = s.per_node or {}
    tasks = sorted({t for v in per_node.values() for t in v["final"]})
    short = {t: t[:11] for t in tasks}
    lines = [
        "",
        "held-out accuracy per task (last evaluation); mean accuracy first -> last evaluation,"
        " on the node's held-out records and on unseen learners of its institution",
    ]
    unseen = any(a is not None for v in per_node.values() for a in v.get("unseen_acc", []))
    lines.append(
        f"{'node':<14}"
        + "".join(f"{short[t]:>12}" for t in tasks)
        + f"{'mean':>16}"
        + (f"{'unseen learners':>22}" if unseen else "")
    )
    for nid in s.nodes:
        v = per_node.get(nid, {})
        if not v or not v["final"]:
            lines.append(f"{nid:<14}  (no evaluation recorded)")
            continue
        cells = "".join(
            f"{v['final'][t]['acc']:>12.3f}" if t in v["final"] else f"{'-':>12}" for t in tasks
        )
        accs = v["mean_acc"]
        line = f"{nid:<14}{cells}{accs[0]:>8.3f} -> {accs[-1]:.3f}"
        new = v.get("unseen_acc") or []
        if unseen and new and new[0] is not None and new[-1] is not None:
            line += f"{new[0]:>13.3f} -> {new[-1]:.3f}"
        lines.append(line)
    if s.final_mean_acc is not None:
        lines.append(f"mean over nodes of final mean accuracy: {s.final_mean_acc:.3f}")
    ends = [
        (v["unseen_acc"][0], v["unseen_acc"][-1])
        for v in per_node.values()
        if v.get("unseen_acc") and None not in (v["unseen_acc"][0], v["unseen_acc"][-1])
    ]
    if ends:
        first, last = (sum(e[i] for e in ends) / len(ends) for i in (0, 1))
        lines.append(f"mean over nodes on unseen learners: {first:.3f} -> {last:.3f}")
    per_round = [b for b in s.bytes_per_round_per_node if b is not None]
    if per_round:
        lines.append(
            f"bytes sent per round per node: {sum(per_round) / len(per_round) / 1e3:.1f} kB"
        )
    return lines


def format_summary(s: Summary) -> str:
    """The table the testbed prints at the end of a run."""
    lines = [
        f"topology {s.topology}  workload {s.workload}  nodes {len(s.nodes)}  "
        f"rounds {s.rounds}  wall {s.wall_seconds:.1f} s",
        f"{'node':<14}{'rounds':>7}{'sent MB':>10}{'recv MB':>10}  exit",
    ]
    for nid in s.nodes:
        lines.append(
            f"{nid:<14}{s.rounds_done[nid]:>7}{s.bytes_sent[nid] / 1e6:>10.3f}"
            f"{s.bytes_received[nid] / 1e6:>10.3f}  {s.exit_codes[nid]}"
        )
    if s.workload == "consensus":
        fe = s.final_consensus_error
        lines.append(
            f"final consensus error {fe:.3e}"
            if fe is not None
            else "final consensus error: none recorded"
        )
        lines.append(
            f"rounds to {s.target_error:g}: measured {s.measured_rounds}, "
            + (
                f"predicted {s.predicted_rounds} (SLEM {s.slem:.4f})"
                if s.slem is not None
                else "(time-varying topology: no spectral prediction)"
            )
        )
    else:
        lines.extend(_eval_table(s))
    if s.killed:
        lines.append(f"killed by the testbed: {', '.join(s.killed)}")
    if s.crashed:
        lines.append(f"CRASHED: {', '.join(s.crashed)}")
    if s.hung:
        lines.append(f"HUNG (stopped after the timeout): {', '.join(s.hung)}")
    return "\n".join(lines)

"""The `topology check` report: a spec's structure, how fast it mixes, and what will not work.

A static graph mixes with its Metropolis-Hastings matrix, and its speed follows from the SLEM.
A time-varying graph (`[dynamics]`) mixes with a different matrix every round, built from the
round plans every node computes; its speed is exact for one-peer exponential graphs of 2^k
nodes and measured by applying the round plans otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from m3tgossip.consensus import metropolis_hastings, predicted_rounds, slem
from m3tgossip.topology.plans import one_peer_period, round_plans
from m3tgossip.topology.problems import describe_parts
from m3tgossip.topology.spec import TASK_NEEDS, Topology

#: how many seeded random vectors the measured rounds of a time-varying graph are taken over
MEASURE_VECTORS = 8


def check_report(
    topology: Topology, target_error: float = 1e-6, *, seed: int = 0, max_rounds: int = 1000
) -> dict[str, Any]:
    """Structure and predicted mixing speed of a topology, as a JSON-able dict.

    Static graph: `predicted_rounds` is the number of synchronous Metropolis-Hastings rounds
    that shrink a relative consensus error of 1 to `target_error`, from the SLEM (worst case).
    The same is given for every shared component's holder subgraph.

    Time-varying graph: `dynamics` says what changes from round to round (see
    `time_varying_rounds`; `seed` is the federation seed the s-out draws come from, at most
    `max_rounds` rounds are applied), `predicted_rounds` and every component's rounds are its
    rounds to `target_error`, and the SLEM entries are None (no single matrix mixes).

    `warnings` lists what will not work as an operator might expect (split holder subgraphs,
    lone holders, tasks without their data).
    """
    import networkx as nx

    if not target_error > 0.0:
        raise ValueError(f"target_error must be positive, got {target_error}")
    graph = topology.graph()
    connected = nx.is_connected(graph)
    dynamics = None
    if topology.dynamics != "static":
        dynamics = time_varying_rounds(topology, target_error, seed=seed, max_rounds=max_rounds)
    warnings = []
    components = {}
    for component in topology.components():
        sub = topology.component_graph(component)
        holders = list(sub.nodes)
        sub_connected = nx.is_connected(sub)
        if dynamics is not None:
            # every node shares the same components, so each mixes as the whole graph does
            sub_slem, rounds = None, dynamics["rounds"]
        else:
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
                f"component {component}: its holders form {describe_parts(sub, holders)}; "
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
        if node.straggler:
            warnings.append(
                f"node {node.id}: declared a straggler (speed {node.speed:g}, bandwidth "
                f"{node.bandwidth:g}): its links are loose, nobody waits for it, and the network "
                "mean is kept only approximately (m3tgossip/docs/protocol.md, stragglers)"
            )
    mh_slem: float | None = None
    if dynamics is None:
        mh_slem = slem(metropolis_hastings(graph))
        rounds_total = predicted_rounds(mh_slem, target_error)
    else:
        rounds_total = dynamics["rounds"]
    report = {
        "name": topology.name,
        "source": topology.source,
        "description": topology.description,
        "nodes": [
            {
                "id": n.id,
                "role": n.role,
                "institution": n.institution,
                "compute": n.compute,
                "speed": n.speed,
                "bandwidth": n.bandwidth,
                "privacy": n.privacy,
                "modalities": list(n.modalities),
                "tasks": list(n.tasks),
                "degree": graph.degree(n.id) if n.id in graph else 0,
                "joins_at_stage": topology.joins_at(n.id),
                "components": list(n.components),
                "local": list(n.local),
            }
            for n in topology.nodes
        ],
        "edges": graph.number_of_edges(),
        "connected": connected,
        "diameter": nx.diameter(graph) if connected else None,
        "mh_slem": mh_slem,
        "spectral_gap": None if mh_slem is None else 1.0 - mh_slem,
        "target_error": target_error,
        "predicted_rounds": rounds_total,
        "components": components,
        "warnings": warnings,
    }
    if dynamics is not None:
        report["dynamics"] = dynamics
    if topology.stages and topology.stage == 0:
        report["stages"] = _stages(topology, target_error, warnings)
    return report


def _stages(topology: Topology, target_error: float, warnings: list[str]) -> list[dict[str, Any]]:
    """Each later stage: what it adds, the components it brings, and its version's warnings
    (added to `warnings`, named by the stage); the report above is stage 0's."""
    out = []
    for k, stage in enumerate(topology.stages, start=1):
        version = topology.version(k)
        sub = check_report(version, target_error)
        before = set(topology.version(k - 1).components())
        brings = [c for c in version.components() if c not in before]
        seen = set(warnings)
        warnings += [f"stage {stage.name}: {w}" for w in sub["warnings"] if w not in seen]
        out.append(
            {
                "name": stage.name,
                "round": stage.round,
                "nodes": list(stage.nodes),
                "tasks": list(stage.tasks),
                "modalities": list(stage.modalities),
                "add_nodes": list(stage.add_nodes),
                "components": {c: sub["components"][c] for c in brings},
            }
        )
    return out


def time_varying_rounds(
    topology: Topology, target_error: float, *, seed: int = 0, max_rounds: int = 1000
) -> dict[str, Any]:
    """Rounds a time-varying topology takes to shrink the relative consensus error to a target.

    The relative consensus error after round t is the largest, over the start vectors x_0, of
    ||x_t - mean(x_t)|| / ||x_0 - mean(x_0)|| (how far the nodes are from agreeing).

    One-peer exponential with n = 2^k nodes: exact, the worst case over all start vectors. Round
    t averages each node with the one 2^t places before it, a circulant matrix, so after r < k
    rounds the worst error is max over m = 1..n-1 of prod_{j<r} |cos(pi m 2^j / n)| (at least
    2/pi), and after k rounds every node holds the mean: k rounds for any target below 2/pi.

    Otherwise (s-out, one-peer exponential with other n): measured, by applying round t's
    mixing matrix W_t (row i: `round_plan` of node i) to `MEASURE_VECTORS` random vectors
    seeded from `seed`, for t = 0, 1, ... until the error is at most the target, for at most
    `max_rounds` rounds (`rounds` is None if it is not reached; `error` is the error reached).
    s-out does not keep the mean: `mean_drift` is the largest
    sqrt(n) |mean(x_t) - mean(x_0)| / ||x_0 - mean(x_0)||, how far the value the nodes agree on
    is from the initial mean, relative to the initial spread.
    """
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
        raise ValueError(f"max_rounds must be an integer >= 1, got {max_rounds!r}")
    n = len(topology.nodes)
    info: dict[str, Any] = {"kind": topology.dynamics}
    if topology.dynamics == "s-out":
        info |= {"sample": topology.sample, "peers": min(topology.sample, n - 1), "seed": seed}
    else:
        info["period"] = one_peer_period(n)
    if topology.dynamics == "one-peer-exponential" and n & (n - 1) == 0:
        worst = _one_peer_worst_errors(n)
        exact = next(r for r, error in enumerate(worst) if error <= target_error)
        return info | {"method": "exact", "rounds": exact, "error": worst[exact]}
    info |= {"method": "measured", "max_rounds": max_rounds}
    rng = np.random.default_rng([seed & 0xFFFFFFFF, 0xC4EC4])
    x = rng.standard_normal((n, MEASURE_VECTORS))
    initial_mean = x.mean(axis=0)
    spread = np.linalg.norm(x - initial_mean, axis=0)
    if n == 1 or target_error >= 1.0:  # at the target before the first round
        return info | {"rounds": 0, "error": 0.0 if n == 1 else 1.0}
    rounds, error = None, 1.0
    for t in range(max_rounds):
        x = _mix_round(topology, t, seed, x)
        error = float(np.max(np.linalg.norm(x - x.mean(axis=0), axis=0) / spread))
        if error <= target_error:
            rounds = t + 1
            break
    info |= {"rounds": rounds, "error": error}
    if topology.dynamics == "s-out":
        drift = np.abs(x.mean(axis=0) - initial_mean) * math.sqrt(n) / spread
        info["mean_drift"] = float(np.max(drift))
    return info


def _one_peer_worst_errors(n: int) -> list[float]:
    """Worst relative consensus error after r = 0..log2 n one-peer exponential rounds, n = 2^k.

    Round j multiplies Fourier mode m by (1 + e^(-2 pi i m 2^j / n)) / 2, of modulus
    |cos(pi m 2^j / n)|; the worst error is the largest modulus over the modes m != 0.
    """
    modes = np.arange(1, n)
    factor = np.ones(n - 1)
    worst = [1.0 if n > 1 else 0.0]
    for j in range(n.bit_length() - 1):
        factor *= np.abs(np.cos(np.pi * modes * 2**j / n))
        worst.append(float(factor.max()))
    worst[-1] = 0.0  # the last round's cos(pi m / 2) or an earlier factor is 0 for every mode
    return worst


def _mix_round(topology: Topology, round_: int, seed: int, x: np.ndarray) -> np.ndarray:
    """W_t x for round t, W_t's row i being node i's `round_plan` row."""
    index = {node_id: i for i, node_id in enumerate(topology.ids())}
    rows, cols, weights = [], [], []
    for node_id, (_, row) in round_plans(topology, round_, seed).items():
        for peer, weight in row.items():
            rows.append(index[node_id])
            cols.append(index[peer])
            weights.append(weight)
    out = np.zeros_like(x)
    np.add.at(out, np.array(rows), np.array(weights)[:, None] * x[np.array(cols)])
    return out


def format_report(report: Mapping[str, Any]) -> str:
    """Readable text of a `check_report` result (what `m3tgossip topology check` prints)."""
    dynamics = report.get("dynamics")

    def rounds(value: int | None) -> str:
        if value is not None:
            return str(value)
        # a time-varying graph that did not get there in the rounds applied; else disconnected
        return "never" if dynamics is None else f"> {dynamics['max_rounds']}"

    def listed(values: list[str]) -> str:
        return ",".join(values) or "-"

    def table(header: list[str], rows: list[list[str]]) -> list[str]:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        return [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in [header, *rows]
        ]

    diameter = report["diameter"]
    edges = f"{report['edges']} edges" + (
        " (every link some round may use)" if dynamics is not None else ""
    )
    lines = [
        f"topology {report['name']} ({report['source']})",
        *([report["description"]] if report["description"] else []),
        f"{len(report['nodes'])} nodes"
        + (f" ({later} join at later stages)" if (later := _later(report)) else "")
        + f", {edges}, "
        + ("connected" if report["connected"] else "DISCONNECTED")
        + (f", diameter {diameter}" if diameter is not None else ""),
    ]
    if dynamics is None:
        lines.append(
            f"Metropolis-Hastings mixing: SLEM {report['mh_slem']:.4f}, "
            f"spectral gap {report['spectral_gap']:.4f}, "
            f"rounds to relative error {report['target_error']:g}: "
            f"{rounds(report['predicted_rounds'])}"
        )
    else:
        lines += _dynamics_lines(dynamics, len(report["nodes"]), report["target_error"])
    lines.append("")
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
            "-" if c["slem"] is None else f"{c['slem']:.4f}",
            rounds(c["predicted_rounds"]),
        ]
        for name, c in report["components"].items()
    ]
    lines += table(["component", "holders", "connected", "SLEM", "rounds"], component_rows)
    if report.get("stages"):
        lines += ["", "stages (the tables above are stage 0's, from round 0):"]
        for st in report["stages"]:
            adds = ", ".join(f"+{x}" for x in [*st["tasks"], *st["modalities"]])
            if st.get("add_nodes"):
                joins = f"{', '.join(st['add_nodes'])} join with their edges"
                adds = f"{adds}; {joins}" if adds else joins
            brings = ", ".join(
                f"{c} ({len(v['holders'])} holders, {rounds(v['predicted_rounds'])} rounds)"
                for c, v in st["components"].items()
            )
            where = f" on {len(st['nodes'])} nodes" if st["nodes"] else ""
            lines.append(
                f"  {st['name']} from round {st['round']}: {adds}{where}; "
                f"brings {brings or 'no shared component'}"
            )
    if report["warnings"]:
        lines += ["", "warnings:"]
        lines += [f"  - {w}" for w in report["warnings"]]
    return "\n".join(lines) + "\n"


def _dynamics_lines(dynamics: Mapping[str, Any], n: int, target: float) -> list[str]:
    """What a time-varying graph does each round and how many rounds it takes to the target."""
    if dynamics["kind"] == "s-out":
        peers = dynamics["peers"]
        sample = f"{peers}" if peers == dynamics["sample"] else f"{dynamics['sample']} (so n - 1)"
        lines = [
            f"time-varying graph: s-out with sample {sample}: every round each node sends to "
            f"{peers} peer{'s' if peers != 1 else ''} drawn anew from the federation seed "
            f"({dynamics['seed']}) and averages with whatever it receives"
        ]
    else:
        lines = [
            "time-varying graph: one-peer exponential: in round t each node sends to the node "
            f"2^(t mod {dynamics['period']}) places after it and averages with the one as far "
            "before it"
        ]
    head = f"rounds to relative error {target:g}: "
    if dynamics["method"] == "exact":
        k = n.bit_length() - 1
        lines.append(
            f"{head}{dynamics['rounds']} (exact, the worst case over all starts: with "
            f"{n} = 2^{k} nodes every node holds the mean after {k} rounds)"
        )
        return lines
    how = f"the round plans applied to {MEASURE_VECTORS} seeded random vectors"
    if dynamics["rounds"] is None:
        lines.append(
            f"{head}not reached in {dynamics['max_rounds']} rounds "
            f"(relative error {dynamics['error']:.3g} left; measured: {how})"
        )
    else:
        lines.append(f"{head}{dynamics['rounds']} (measured: {how})")
    if "mean_drift" in dynamics:
        lines.append(
            "s-out keeps the mean only in expectation: the nodes' mean moved "
            f"{dynamics['mean_drift']:.3g} of the initial spread from the initial mean"
        )
    return lines


def _later(report: Mapping[str, Any]) -> int:
    """How many of the report's nodes a later stage adds."""
    return sum(1 for n in report["nodes"] if n.get("joins_at_stage"))

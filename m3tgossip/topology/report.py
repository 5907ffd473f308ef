"""The `topology check` report: a spec's structure, how fast it mixes, and what will not work."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import networkx as nx

from m3tgossip.consensus import metropolis_hastings, predicted_rounds, slem
from m3tgossip.topology.problems import describe_parts
from m3tgossip.topology.spec import TASK_NEEDS, Topology


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

#!/usr/bin/env python3
"""Single-learner student nodes: cancelling noise against keeping their components local.

Testbed runs of the edu workload on a topology (default campus), lockstep rounds, one per
setting and seed of `--seeds`:

  dp-sgd   the topology as written: every private node, students included, trains with
           per-learner DP-SGD over its records (the built-in generator draws one learner per
           record, so a student node here holds many learners; the reference, not a
           single-learner setting);
  cancel   every student node has `single_learner = "cancel"`: it trains without DP-SGD and
           sends each neighbour its value plus a per-edge mask of std >= `--noise` that
           cancels in the neighbours' mix (components fewer than two neighbours share with it
           stay local); no epsilon is claimed;
  local    every student node has `single_learner = "local"`: it shares nothing and trains
           alone.

Each run also counts the node-rounds in which a live neighbour was not heard by the deadline:
the cancellation is exact only in rounds where every neighbour's message is mixed.
Utility is the held-out accuracy at a node's last evaluation (mean over its tasks), averaged
over the student nodes, and separately over the other nodes (the masks reach their states
too), on the node's own held-out records and on its institution's unseen learners. Every
run's load average before and after is recorded: the daemons share the machine.
Writes DIR/single_learner.json; each run keeps its folder DIR/runs/NAME, and running again
into the same DIR reuses the runs that completed with the same command line.

    python benchmarks/single_learner.py --out runs/bench-single --seeds 0
    python benchmarks/single_learner.py --out runs/bench-single --seeds 0,1,2 --noise 0.01
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from _common import ROOT, loadavg, parser, run_testbed, setup, write_json

from m3tgossip.daemon.metrics import read_metrics
from m3tgossip.harness import Summary, TestbedSpec
from m3tgossip.harness.testbed_spec import parse_assignment
from m3tgossip.topology import Topology, load_topology

SETTINGS = ("dp-sgd", "cancel", "local")


def with_mode(topology: Topology, students: list[str], mode: str | None) -> Topology:
    nodes = tuple(
        dataclasses.replace(n, single_learner=mode) if n.id in students else n
        for n in topology.nodes
    )
    return dataclasses.replace(topology, nodes=nodes)


def mean(xs: list[float | None]) -> float | None:
    ys = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(ys) / len(ys) if ys else None


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def node_results(folder: Path, summary: Any, ids: list[str]) -> dict[str, Any]:
    out = {}
    per_node = summary.per_node or {}
    for nid in ids:
        recs = read_metrics(folder / "nodes" / nid / "metrics.jsonl")
        priv = next((r["privacy"] for r in reversed(recs) if "privacy" in r), None)
        v = per_node.get(nid, {})
        accs = v.get("mean_acc", [])
        new = [a for a in v.get("unseen_acc", []) if a is not None]
        out[nid] = {
            "final_acc": accs[-1] if accs else None,
            "unseen_final_acc": new[-1] if new else None,
            "first_acc": accs[0] if accs else None,
            "tasks": {t: m["acc"] for t, m in v.get("final", {}).items()},
            "mechanism": priv.get("mechanism") if priv else None,
            "node_epsilon": priv.get("node_epsilon") if priv else None,
            "bytes_out": recs[-1].get("bytes_out") if recs else None,
        }
    return out


def completed(folder: Path, spec: TestbedSpec) -> tuple[Summary, float, Any, Any] | None:
    """A finished run of the same command line in `folder` (summary, wall, loads), else None."""
    try:
        record = json.loads((folder / "bench-run.json").read_text())
        summary = Summary.read(folder / "summary.json")
    except (OSError, ValueError, TypeError):
        return None
    if record.get("argv") != spec.argv() or summary.exit_code != 0:
        return None
    before, after = record.get("load", [None, None])
    return summary, float(record.get("wall_s", summary.wall_seconds)), before, after


def missed(folder: Path, ids: list[str]) -> dict[str, int]:
    """Node-rounds in which a live neighbour was not heard by the deadline (a busy machine):
    those rounds mix without its message, so its masks do not cancel in them."""
    total = short = 0
    for nid in ids:
        for rec in read_metrics(folder / "nodes" / nid / "metrics.jsonl"):
            total += 1
            short += len(rec.get("heard", [])) < rec.get("neighbours", 0)
    return {"node_rounds": total, "missing": short}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, None)
    p.add_argument("--topology", default=str(ROOT / "topology" / "campus.toml"))
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--seeds", default="0", help="comma-separated federation seeds")
    p.add_argument("--deadline", type=float, default=5.0)
    p.add_argument("--noise", type=float, default=0.01, help="cancel_noise of the students")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    settings = [s for s in args.settings.split(",") if s]
    base = load_topology(args.topology)
    students = [n.id for n in base.nodes if n.role == "student"]
    others = [n.id for n in base.nodes if n.role != "student"]
    options = dict(parse_assignment(o) for o in args.option)
    out = setup(
        args.out,
        f"single-learner benchmark: topology {base.name}, students {' '.join(students)}, "
        f"rounds {args.rounds}, seeds {seeds}, cancel_noise {args.noise:g}, "
        f"options {options or 'defaults'}",
    )
    topo_dir = out / "topologies"
    topo_dir.mkdir(exist_ok=True)
    paths = {}
    for setting in settings:
        mode = None if setting == "dp-sgd" else setting
        path = topo_dir / f"{setting}.toml"
        path.write_text(with_mode(base, students, mode).to_toml())
        back = load_topology(path)
        if setting != "dp-sgd":
            shared = {n.id: n.shared_components for n in back.nodes if n.id in students}
            print(
                f"  {setting}: students share "
                + "; ".join(f"{k}: {len(v)}" for k, v in shared.items())
            )
        paths[setting] = path
    runs: list[dict[str, Any]] = []
    started = time.monotonic()
    for seed in seeds:
        for setting in settings:
            name = f"{setting}-s{seed}"
            folder = out / "runs" / name
            node_settings = (
                {nid: {"privacy.cancel_noise": args.noise} for nid in students}
                if setting == "cancel"
                else {}
            )
            spec = TestbedSpec(
                topology=paths[setting],
                out=folder,
                workload="edu",
                rounds=args.rounds,
                seed=seed,
                deadline=args.deadline,
                quiet=True,
                options=options,
                node_settings=node_settings,
            )
            before = loadavg()
            done = completed(folder, spec)
            if done is not None:
                print(f"[{name}] reusing the completed run in {folder}", flush=True)
                summary, wall, before, after = done
            else:
                print(f"[{name}] testbed {' '.join(spec.argv())}", flush=True)
                summary, wall = run_testbed(spec)
                after = loadavg()
                if summary.exit_code == 0:
                    record = {"argv": spec.argv(), "wall_s": wall, "load": [before, after]}
                    (folder / "bench-run.json").write_text(json.dumps(record))
            nodes = node_results(folder, summary, students + others)
            run = {
                "name": name,
                "setting": setting,
                "seed": seed,
                "exit": summary.exit_code,
                "wall_s": round(wall, 1),
                "load_before": before,
                "load_after": after,
                "students_acc": mean([nodes[i]["final_acc"] for i in students]),
                "others_acc": mean([nodes[i]["final_acc"] for i in others]),
                "all_acc": summary.final_mean_acc,
                "students_unseen_acc": mean([nodes[i]["unseen_final_acc"] for i in students]),
                "others_unseen_acc": mean([nodes[i]["unseen_final_acc"] for i in others]),
                "rounds_missing_a_neighbour": missed(folder, students + others),
                "nodes": nodes,
            }
            runs.append(run)
            print(
                f"[{name}] exit {run['exit']}, {wall:.0f} s, load {before} -> {after}: "
                f"students {fmt(run['students_acc'])}, others {fmt(run['others_acc'])}; "
                f"unseen learners: students {fmt(run['students_unseen_acc'])}, "
                f"others {fmt(run['others_unseen_acc'])}",
                flush=True,
            )
    table: dict[str, Any] = {}
    for setting in settings:
        mine = [r for r in runs if r["setting"] == setting]
        table[setting] = {
            "students_acc": mean([r["students_acc"] for r in mine]),
            "others_acc": mean([r["others_acc"] for r in mine]),
            "per_seed_students": [r["students_acc"] for r in mine],
            "students_unseen_acc": mean([r["students_unseen_acc"] for r in mine]),
            "others_unseen_acc": mean([r["others_unseen_acc"] for r in mine]),
            "per_seed_students_unseen": [r["students_unseen_acc"] for r in mine],
            "student_mechanisms": sorted(
                {str(r["nodes"][i]["mechanism"]) for r in mine for i in students}
            ),
        }
    print(
        f"\n{'setting':8} {'students':>9} {'others':>9} {'unseen: students':>17} {'others':>9}"
        "  student mechanisms"
    )
    for setting, row in table.items():
        print(
            f"{setting:8} {fmt(row['students_acc']):>9} {fmt(row['others_acc']):>9} "
            f"{fmt(row['students_unseen_acc']):>17} {fmt(row['others_unseen_acc']):>9}  "
            + ", ".join(row["student_mechanisms"])
        )
    path = write_json(
        out,
        "single_learner",
        {
            "argv": sys.argv if argv is None else argv,
            "topology": str(args.topology),
            "students": students,
            "rounds": args.rounds,
            "seeds": seeds,
            "cancel_noise": args.noise,
            "options": options,
            "table": table,
            "runs": runs,
            "wall_s": round(time.monotonic() - started, 1),
            "load_end": loadavg(),
        },
    )
    print(f"wrote {path}")
    return 0 if all(r["exit"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())

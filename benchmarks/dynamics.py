#!/usr/bin/env python3
"""Time-varying graphs: rounds and bytes to a target error against a static ring and torus.

Runs the consensus workload with real daemons on 16 nodes over a static ring (a 16-cycle spec
written into the output folder), the 4x4 torus (topology/torus-16.toml), the one-peer
exponential graph (topology/one-peer-exp-16.toml) and s-out peer sampling with s = 1 (a spec
written into the output folder) and s = 2 (topology/s-out-16.toml). For each it reports the
rounds and the bytes (all nodes, headers and control messages included) until

- the max relative error to the exact initial mean reaches the target, and
- the spread among the nodes reaches the target: from the `digest` of each node's metrics
  (16 fixed random projections of every component), spread = max_i ||d_i - mean d|| / ||mean d||.

s-out mixing is not doubly stochastic, so the nodes agree on a value near, not at, the initial
mean: their error to the mean levels off while the spread keeps shrinking. Optionally
(`--edu`) it also compares held-out accuracy of the education workload on ring-8 and on a
one-peer exponential graph of 8 nodes.

    python benchmarks/dynamics.py --out runs/bench-dynamics [--edu]

Prints the setup and tables, writes dynamics.json and, when matplotlib is installed,
dynamics.png.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    ROOT,
    each_run,
    loadavg,
    machine,
    parser,
    pyplot,
    run_testbed,
    save_png,
    setup,
    wait_for_load,
    write_json,
)

from m3tgossip.consensus import metropolis_hastings, predicted_rounds, slem
from m3tgossip.daemon.metrics import read_metrics
from m3tgossip.harness import TestbedSpec
from m3tgossip.topology import load_topology


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2e}"


def mb(v: float | None) -> str:
    return "-" if v is None else f"{v / 1e6:.3f}"


def per_round_records(run_dir: Path) -> dict[str, dict[int, dict[str, Any]]]:
    out = {}
    for path in sorted((run_dir / "nodes").glob("*/metrics.jsonl")):
        recs = read_metrics(path)
        if recs:
            out[recs[0]["node"]] = {int(r["round"]): r for r in recs}
    return out


def spread_and_bytes(
    records: dict[str, dict[int, dict[str, Any]]],
) -> tuple[list[float | None], list[int]]:
    """Per round: the digest spread among nodes, and the bytes sent by all nodes so far."""
    n_rounds = max((max(d) + 1 for d in records.values() if d), default=0)
    spreads: list[float | None] = []
    cum: list[int] = []
    for r in range(n_rounds):
        digests = []
        total = 0
        for d in records.values():
            rec = d.get(r)
            if rec is not None and "digest" in rec:
                digests.append(
                    np.concatenate(
                        [
                            np.asarray(rec["digest"][c], dtype=np.float64)
                            for c in sorted(rec["digest"])
                        ]
                    )
                )
            done = [k for k in d if k <= r]
            total += int(d[max(done)].get("bytes_out", 0)) if done else 0
        cum.append(total)
        if len(digests) < len(records):
            spreads.append(None)
            continue
        D = np.stack(digests)
        mean = D.mean(axis=0)
        norm = float(np.linalg.norm(mean))
        spreads.append(float(np.max(np.linalg.norm(D - mean, axis=1)) / norm) if norm > 0 else None)
    return spreads, cum


def first_round_at(values: list[float | None], target: float) -> int | None:
    """1-based round at which the value first reaches the target (None if never)."""
    return next((i + 1 for i, v in enumerate(values) if v is not None and v <= target), None)


def write_spec(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def main() -> int:
    p = parser(__doc__, "runs/bench-dynamics", load=True)
    p.add_argument("--size", type=int, default=1024, help="floats per component (consensus)")
    p.add_argument("--target", type=float, default=1e-6)
    p.add_argument("--dynamic-rounds", type=int, default=80, help="rounds for time-varying graphs")
    p.add_argument(
        "--margin", type=float, default=1.3, help="static graphs: rounds = prediction x margin"
    )
    p.add_argument(
        "--edu",
        action="store_true",
        help="also compare edu accuracy, ring-8 vs one-peer exponential",
    )
    p.add_argument("--edu-rounds", type=int, default=20)
    args = p.parse_args()
    out = setup(
        Path(args.out).resolve(),
        f"consensus workload, 16 nodes, {args.size} float64 per component, target "
        f"{args.target:g}; static graphs run prediction x {args.margin} rounds, time-varying "
        f"ones {args.dynamic_rounds}",
    )
    ring16 = write_spec(
        out / "ring-16.toml",
        'name = "ring-16"\ndescription = "Sixteen peers on a cycle."\n\n'
        '[generator]\nkind = "cycle"\nn = 16\n',
    )
    sout = (ROOT / "topology" / "s-out-16.toml").read_text()
    sout1 = write_spec(
        out / "s-out-1-16.toml",
        sout.replace('name = "s-out-16"', 'name = "s-out-1-16"')
        .replace("sends to 2 peers", "sends to 1 peer")
        .replace("sample = 2", "sample = 1"),
    )
    specs = [
        ring16,
        ROOT / "topology" / "torus-16.toml",
        ROOT / "topology" / "one-peer-exp-16.toml",
        sout1,
        ROOT / "topology" / "s-out-16.toml",
    ]
    load0 = wait_for_load(args.load_threshold, args.max_wait)
    print(f"load before: {load0}", flush=True)
    rows: list[dict[str, Any]] = []
    for spec in each_run(specs, "specs"):
        topo = load_topology(spec)
        if topo.dynamics == "static":
            s = slem(metropolis_hastings(topo.graph()))
            rounds = math.ceil(
                (predicted_rounds(s, args.target, 10.0 * math.sqrt(len(topo.nodes))) or 10)
                * args.margin
            )
        else:
            s, rounds = None, args.dynamic_rounds
        run_dir = out / topo.name
        load = loadavg()
        summary, wall = run_testbed(
            TestbedSpec(
                topology=spec,
                out=run_dir,
                workload="consensus",
                rounds=rounds,
                target=args.target,
                options={"size": args.size},
                quiet=True,
            )
        )
        records = per_round_records(run_dir)
        spreads, cum = spread_and_bytes(records)
        errors = summary.consensus_error or []
        r_err, r_spread = first_round_at(errors, args.target), first_round_at(spreads, args.target)
        n = len(topo.nodes)
        row = {
            "topology": topo.name,
            "dynamics": topo.dynamics,
            "sample": topo.sample if topo.dynamics == "s-out" else None,
            "nodes": n,
            "slem": s,
            "rounds_run": rounds,
            "rounds_to_target_error": r_err,
            "bytes_to_target_error": cum[r_err - 1] if r_err else None,
            "rounds_to_target_spread": r_spread,
            "bytes_to_target_spread": cum[r_spread - 1] if r_spread else None,
            "final_error": errors[-1] if errors else None,
            "final_spread": spreads[-1] if spreads else None,
            "min_error": min((e for e in errors if e is not None), default=None),
            "bytes_per_round_per_node": cum[-1] / n / len(cum) if cum else None,
            "bytes_sent_total": sum(summary.bytes_sent.values()),
            "consensus_error": errors,
            "spread": spreads,
            "cumulative_bytes": cum,
            "wall_seconds": wall,
            "exit": summary.exit_code,
            "load_before": load,
            "load_after": loadavg(),
        }
        rows.append(row)
        print(
            f"{topo.name:<16} rounds {rounds:>4}  to {args.target:g}: error {r_err} rounds / "
            f"{fmt(row['bytes_to_target_error'])} B, spread {r_spread} rounds / "
            f"{fmt(row['bytes_to_target_spread'])} B  final error {fmt(row['final_error'])} "
            f"spread {fmt(row['final_spread'])}  wall {wall:.1f} s  exit {summary.exit_code}  "
            f"load {row['load_after']}",
            flush=True,
        )
    edu_rows: list[dict[str, Any]] = []
    if args.edu:
        ope8 = write_spec(
            out / "one-peer-exp-8.toml",
            'name = "one-peer-exp-8"\ndescription = "Eight peers on a one-peer '
            'exponential graph."\n\n[generator]\nkind = "cycle"\nn = 8\n\n'
            '[dynamics]\nkind = "one-peer-exponential"\n',
        )
        for spec in each_run((ROOT / "topology" / "ring-8.toml", ope8), "overlap"):
            topo = load_topology(spec)
            load = loadavg()
            summary, wall = run_testbed(
                TestbedSpec(
                    topology=spec,
                    out=out / f"edu-{topo.name}",
                    workload="edu",
                    rounds=args.edu_rounds,
                    quiet=True,
                )
            )
            row = {
                "topology": topo.name,
                "dynamics": topo.dynamics,
                "final_mean_acc": summary.final_mean_acc,
                "bytes_sent_total": sum(summary.bytes_sent.values()),
                "round_breakdown_s": summary.round_breakdown_s,
                "wall_seconds": wall,
                "exit": summary.exit_code,
                "load_before": load,
                "load_after": loadavg(),
            }
            edu_rows.append(row)
            print(
                f"edu {topo.name:<16} acc {row['final_mean_acc']:.4f}  "
                f"bytes {row['bytes_sent_total'] / 1e6:.2f} MB  wall {wall:.1f} s  "
                f"exit {summary.exit_code}  load {row['load_after']}",
                flush=True,
            )
    ring = rows[0]
    verdict = {
        "metric": "bytes to target spread (all nodes)",
        "ring_bytes": ring["bytes_to_target_spread"],
        "faster_time_varying": [
            r["topology"]
            for r in rows
            if r["dynamics"] != "static"
            and r["bytes_to_target_spread"] is not None
            and (
                ring["bytes_to_target_spread"] is None
                or r["bytes_to_target_spread"] < ring["bytes_to_target_spread"]
            )
        ],
    }
    verdict["met"] = bool(verdict["faster_time_varying"])
    m = machine()
    info = {
        "size": args.size,
        "target": args.target,
        "dynamic_rounds": args.dynamic_rounds,
        "margin": args.margin,
        "cpus": m["cpus"],
        "python": m["python"],
        "platform": m["platform"],
    }
    path = write_json(
        out,
        "dynamics",
        {
            "setup": info,
            "load_before": load0,
            "rows": rows,
            "edu": edu_rows,
            "target_verdict": verdict,
        },
    )
    plot(out, path, rows, args.target)
    print(
        f"\n{'topology':<16}{'rounds':>7}{'rnd err':>8}{'MB err':>9}{'rnd spread':>11}"
        f"{'MB spread':>10}{'kB/rnd/node':>12}{'final err':>11}{'final spread':>13}"
    )
    for r in rows:
        print(
            f"{r['topology']:<16}{r['rounds_run']:>7}{r['rounds_to_target_error']!s:>8}"
            f"{mb(r['bytes_to_target_error']):>9}{r['rounds_to_target_spread']!s:>11}"
            f"{mb(r['bytes_to_target_spread']):>10}{r['bytes_per_round_per_node'] / 1e3:>12.1f}"
            f"{r['final_error']:>11.2e}{r['final_spread']:>13.2e}"
        )
    met = ", ".join(verdict["faster_time_varying"])
    print(
        f"target (a time-varying topology reaches {args.target:g} in fewer bytes than the "
        f"static ring): {'met by ' + met if verdict['met'] else 'not met'}"
    )
    return 0 if all(r["exit"] == 0 for r in rows + edu_rows) else 1


def plot(out: Path, json_path: Path, rows: list[dict[str, Any]], target: float) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        sent = [b / 1e6 for b in r["cumulative_bytes"]]
        err = [e if e is not None and e > 0 else np.nan for e in r["consensus_error"]][: len(sent)]
        spread = [v if v is not None and v > 0 else np.nan for v in r["spread"]][: len(sent)]
        line = axes[0].semilogy(sent[: len(err)], err, label=r["topology"])[0]
        axes[1].semilogy(sent[: len(spread)], spread, color=line.get_color(), label=r["topology"])
    for ax, what in zip(
        axes,
        ("max relative error to the exact initial mean", "spread among nodes (digests)"),
        strict=True,
    ):
        ax.axhline(target, color="grey", ls="--", lw=0.8)
        ax.set_xlabel("cumulative bytes sent, all nodes (MB)")
        ax.set_ylabel(what)
        ax.legend(fontsize=8)
    fig.suptitle("16 consensus daemons: static and time-varying graphs")
    print(f"wrote {json_path} and {save_png(fig, out, 'dynamics')}")


if __name__ == "__main__":
    sys.exit(main())

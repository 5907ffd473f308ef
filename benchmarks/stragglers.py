#!/usr/bin/env python3
"""Participation of a slow machine: one node ten times slower, declared as a straggler.

Testbed runs of the edu workload (lockstep rounds, `--privacy` for every node, default
`open`), two per seed of `--seeds` on the same topology, model, data and options:

  full       every node at full speed, the topology as written;
  straggler  the node `--slow` made `--slowdown` times slower (`faults.slowdown`: each of
             its local steps takes that many times as long) and declared so in the spec
             (`speed = 1 / slowdown`): it trains max(1, round(local_steps * speed)) steps a
             round, no neighbour waits for it, each end of its links mixes the other's newest
             value once, and it mixes its neighbours' latest values instead of their queued
             rounds (`m3tgossip/docs/protocol.md`, stragglers).

With `--undeclared` a third run per seed slows the same node without declaring it (the
lockstep rounds of before: its neighbours wait for it up to the deadline every round).

Per seed, then mean and 95% Student-t interval over the seeds:

  slow_vs_own_pts      the slow node's final accuracy (unseen learners of its institution,
                       mean over its tasks, its last evaluation) in `straggler` minus its own
                       in `full`, in points (target: >= -2, at most two points below);
  slow_vs_others_pts   the same minus the mean final accuracy of the full-speed nodes of the
                       same run (target: >= -2; meaningful where the nodes share their tasks,
                       as on ring-8);
  neighbour_ratio      the slow node's neighbours' median round seconds in `straggler` over
                       `full` (a round is the time between two of a node's round records; the
                       first round, start-up, left out); target: within 10% of 1 (at most 1.10
                       is "not held back"; below 0.90 means the others got faster, e.g. from
                       the CPU the sleeping node leaves on a shared machine).

Also reported: the slow node's accuracy at its last evaluation before its neighbours
finished their rounds (`slow_acc_neighbours_done`, with the round it was in): the testbed
runs every node for `--rounds`, so the straggler runs its last rounds alone.

Writes DIR/stragglers.json and DIR/stragglers.png; each run keeps its folder
DIR/runs/ARM-sSEED, and a completed run of the same command line there is reused. Exits
non-zero if a run failed. The numbers mean something on an idle machine only: the daemons
share its cores, and the load average is printed with them.

    python benchmarks/stragglers.py --out runs/bench-stragglers
    python benchmarks/stragglers.py --out /tmp/s --rounds 3 --seeds 0 -o records=60 \\
        -o local_steps=2 --deadline 10    # a smoke test
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _common import (
    ROOT,
    completed_run,
    interval,
    loadavg,
    machine,
    parser,
    pyplot,
    run_testbed,
    save_png,
    setup,
    write_json,
)

from m3tgossip.daemon.metrics import read_metrics
from m3tgossip.harness import TestbedSpec
from m3tgossip.harness.testbed_spec import parse_assignment
from m3tgossip.privacy import profile_for
from m3tgossip.topology import Topology, load_topology

ARMS = ("full", "straggler")
#: figure -> (target, how it is judged)
TARGETS = {
    "slow_vs_own_pts": -2.0,
    "slow_vs_others_pts": -2.0,
    "neighbour_ratio": 0.10,
}


def declared(topology: Topology, node: str, speed: float) -> Topology:
    """The topology with `node` declaring `speed`."""
    nodes = tuple(
        dataclasses.replace(n, speed=speed) if n.id == node else n for n in topology.nodes
    )
    return dataclasses.replace(topology, nodes=nodes)


def round_seconds(records: list[dict[str, Any]]) -> list[float]:
    """Seconds between a node's consecutive round records (its first round left out)."""
    times = [float(r["time"]) for r in sorted(records, key=lambda r: r["round"])]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def final_unseen(records: list[dict[str, Any]]) -> float | None:
    """Accuracy on unseen learners at the node's last evaluation (mean over its tasks)."""
    evals = [r for r in records if (r.get("unseen") or {}).get("mean_acc") is not None]
    return float(evals[-1]["unseen"]["mean_acc"]) if evals else None


def num(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def mean(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.fmean(vals) if vals else None


def run_arm(
    arm: str, seed: int, topo_path: Path, args: Any, out: Path, ids: list[str]
) -> dict[str, Any]:
    """One testbed run (or the completed one in its folder): per node its final accuracy on
    unseen learners, its round seconds, and what its records say of loose links."""
    folder = out / "runs" / f"{arm}-s{seed}"
    slowed = {args.slow: {"faults.slowdown": float(args.slowdown)}} if arm != "full" else {}
    spec = TestbedSpec(
        topology=topo_path,
        out=folder,
        workload="edu",
        rounds=args.rounds,
        seed=seed,
        deadline=args.deadline,
        quiet=True,
        options=dict(parse_assignment(o) for o in args.option),
        settings={"privacy.profile": args.privacy},
        node_settings=slowed,
    )
    before = loadavg()
    summary = completed_run(folder, spec)
    if summary is not None:
        print(f"  [{arm} s{seed}] reusing the completed run in {folder}", flush=True)
        code, wall = 0, summary.wall_seconds
    else:
        if folder.exists():
            shutil.rmtree(folder)  # a leftover checkpoint would resume an old run
        print(f"  [{arm} s{seed}] $ m3tgossip testbed {' '.join(spec.argv())}", flush=True)
        try:
            summary, wall = run_testbed(spec)
            code = summary.exit_code
        except (RuntimeError, TimeoutError) as exc:
            print(f"  [{arm} s{seed}] testbed error: {exc}", file=sys.stderr, flush=True)
            return {"arm": arm, "seed": seed, "exit": 1, "ok": False}
        if code == 0:
            (folder / "bench-run.json").write_text(json.dumps({"argv": spec.argv()}))
    nodes = {}
    for nid in ids:
        recs = read_metrics(folder / "nodes" / nid / "metrics.jsonl")
        secs = round_seconds(recs)
        nodes[nid] = {
            "rounds": len(recs),
            "unseen_acc": final_unseen(recs),
            "end_time": recs[-1]["time"] if recs else None,
            "evals": [
                [r["round"], r["time"], r["unseen"]["mean_acc"]]
                for r in recs
                if (r.get("unseen") or {}).get("mean_acc") is not None
            ],
            "median_round_s": statistics.median(secs) if secs else None,
            "loose_rounds": sum("loose" in r for r in recs),
            "steps": recs[-1].get("train", {}).get("steps") if recs else None,
        }
    return {
        "arm": arm,
        "seed": seed,
        "exit": code,
        "ok": code == 0,
        "wall_s": round(wall, 1),
        "load_before": before,
        "load_after": loadavg(),
        "nodes": nodes,
    }


def per_seed(runs: dict[str, dict[str, Any]], slow: str, neighbours: list[str]) -> dict:
    """The figures of one seed from its runs."""
    full, strag = runs["full"]["nodes"], runs["straggler"]["nodes"]
    others = [n for n in strag if n != slow]

    def pts(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else 100.0 * (a - b)

    slow_acc = strag[slow]["unseen_acc"]
    others_acc = mean([strag[n]["unseen_acc"] for n in others])
    # the slow node's last evaluation while a neighbour still ran (after that it trains alone)
    ends = [strag[n]["end_time"] for n in neighbours if strag[n]["end_time"] is not None]
    before = [e for e in strag[slow]["evals"] if ends and e[1] <= max(ends)]
    ratios = [
        strag[n]["median_round_s"] / full[n]["median_round_s"]
        for n in neighbours
        if strag[n]["median_round_s"] and full[n]["median_round_s"]
    ]
    return {
        "slow_acc_full": full[slow]["unseen_acc"],
        "slow_acc_straggler": slow_acc,
        "others_acc_straggler": others_acc,
        "others_acc_full": mean([full[n]["unseen_acc"] for n in others]),
        "slow_vs_own_pts": pts(slow_acc, full[slow]["unseen_acc"]),
        "slow_vs_others_pts": pts(slow_acc, others_acc),
        "slow_acc_neighbours_done": before[-1][2] if before else None,
        "slow_round_neighbours_done": before[-1][0] if before else None,
        "neighbour_round_s_full": mean([full[n]["median_round_s"] for n in neighbours]),
        "neighbour_round_s_straggler": mean([strag[n]["median_round_s"] for n in neighbours]),
        "slow_round_s_straggler": strag[slow]["median_round_s"],
        "neighbour_ratio": mean(ratios),
        "undeclared_neighbour_ratio": (
            mean(
                [
                    runs["undeclared"]["nodes"][n]["median_round_s"] / full[n]["median_round_s"]
                    for n in neighbours
                    if runs["undeclared"]["nodes"][n]["median_round_s"]
                    and full[n]["median_round_s"]
                ]
            )
            if "undeclared" in runs
            else None
        ),
    }


def verdict(key: str, c: dict[str, Any]) -> str:
    m, half = c["mean"], c["ci95"] or 0.0
    if m is None:
        return f"{key}: no value (NOT met)"
    if key == "neighbour_ratio":
        held = m <= 1.0 + TARGETS[key]
        same = abs(m - 1.0) <= TARGETS[key]
        return (
            f"{key}: {m:.3f} [{m - half:.3f}, {m + half:.3f}] (not held back, mean <= 1.10: "
            f"{'met' if held else 'NOT met'}; unchanged, 0.90..1.10: "
            f"{'met' if same else 'NOT met'})"
        )
    ok = m >= TARGETS[key]
    return (
        f"{key}: {m:+.2f} [{m - half:+.2f}, {m + half:+.2f}] points "
        f"(mean >= {TARGETS[key]:+g}: {'met' if ok else 'NOT met'})"
    )


def plot(seeds: list[dict[str, Any]], out: Path, slow: str) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    bars = [
        (f"{slow}, full speed", "slow_acc_full", "C0"),
        (f"{slow}, straggler", "slow_acc_straggler", "C3"),
        ("others, straggler run", "others_acc_straggler", "C2"),
    ]
    for i, (label, key, color) in enumerate(bars):
        c = interval([s[key] * 100 if s[key] is not None else None for s in seeds])
        if c["mean"] is not None:
            left.bar(i, c["mean"], yerr=c["ci95"] or 0, color=color, capsize=4, label=label)
    left.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    left.set_ylabel("final accuracy on unseen learners (%)")
    left.set_title(f"{len(seeds)} seeds, mean and 95% interval")
    bars = [
        ("neighbours, full", "neighbour_round_s_full", "C0"),
        ("neighbours, straggler", "neighbour_round_s_straggler", "C3"),
        (f"{slow}, straggler", "slow_round_s_straggler", "C1"),
    ]
    for i, (label, key, color) in enumerate(bars):
        c = interval([s[key] for s in seeds])
        if c["mean"] is not None:
            right.bar(i, c["mean"], yerr=c["ci95"] or 0, color=color, capsize=4, label=label)
    right.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    right.set_ylabel("median round seconds")
    right.set_title("round time")
    return save_png(fig, out, "stragglers", dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, None)
    p.add_argument("--topology", default="topology/ring-8.toml")
    p.add_argument("--slow", default=None, help="the node made slow (default: the first)")
    p.add_argument("--slowdown", type=float, default=10.0, help="how many times slower")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated federation seeds (>= 3)")
    p.add_argument("--privacy", default="open", help="the one profile every node runs under")
    p.add_argument(
        "--deadline",
        type=float,
        default=60.0,
        help="round deadline (s): long, so a loaded machine does not drop neighbours' updates",
    )
    p.add_argument(
        "--undeclared",
        action="store_true",
        help="also run the slow node slowed but not declared (its neighbours wait for it)",
    )
    p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.slowdown < 1:
        p.error("--slowdown must be at least 1")
    profile_for(args.privacy)  # an unknown profile stops here, before any run
    topo_path = Path(args.topology) if Path(args.topology).is_absolute() else ROOT / args.topology
    base = load_topology(topo_path)
    slow = args.slow = args.slow or base.ids()[0]
    if slow not in base.ids():
        p.error(f"--slow {slow}: no such node in {topo_path} (nodes: {', '.join(base.ids())})")
    neighbours = base.neighbours(slow)
    speed = 1.0 / args.slowdown
    out = setup(
        args.out,
        f"stragglers: topology {base.name} ({len(base.nodes)} nodes), {slow} {args.slowdown:g}x "
        f"slower and declared speed = {speed:g} (neighbours {', '.join(neighbours)}); "
        f"rounds {args.rounds}; seeds {seeds}; privacy {args.privacy}; deadline "
        f"{args.deadline:g} s; options {args.option or 'defaults'}",
    )
    topo_dir = out / "topologies"
    topo_dir.mkdir(exist_ok=True)
    paths = {"full": topo_path, "undeclared": topo_path}
    paths["straggler"] = topo_dir / f"{base.name}-{slow}-speed.toml"
    paths["straggler"].write_text(declared(base, slow, speed).to_toml())
    arms = (*ARMS, "undeclared") if args.undeclared else ARMS
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    all_ok = True
    for seed in seeds:
        runs = {arm: run_arm(arm, seed, paths[arm], args, out, base.ids()) for arm in arms}
        if not all(r["ok"] for r in runs.values()):
            print(f"  seed {seed}: a run failed", file=sys.stderr, flush=True)
            all_ok = False
            continue
        fig = per_seed(runs, slow, neighbours)
        fig["seed"] = seed
        results.append({"figures": fig, "runs": runs})
        s = runs["straggler"]["nodes"][slow]
        print(
            f"  seed {seed}: {slow} accuracy {num(fig['slow_acc_full'])} at full speed, "
            f"{num(fig['slow_acc_straggler'])} as a straggler ({s['rounds']} rounds of "
            f"{s['steps']} steps, median {num(s['median_round_s'], 2)} s), full-speed nodes "
            f"{num(fig['others_acc_straggler'])}; neighbours' median round "
            f"{num(fig['neighbour_round_s_full'], 2)} s -> "
            f"{num(fig['neighbour_round_s_straggler'], 2)} s (ratio "
            f"{num(fig['neighbour_ratio'], 3)}); load {loadavg()}",
            flush=True,
        )
    figures = [r["figures"] for r in results]
    summary = {
        key: interval([f[key] for f in figures])
        for key in (
            *TARGETS,
            "slow_acc_full",
            "slow_acc_straggler",
            "slow_acc_neighbours_done",
            "slow_round_neighbours_done",
            "others_acc_straggler",
            "neighbour_round_s_full",
            "neighbour_round_s_straggler",
            "slow_round_s_straggler",
            "undeclared_neighbour_ratio",
        )
    }
    print(f"\n=== {len(figures)} seeds, mean and 95% interval")
    for key in TARGETS:
        print("  " + verdict(key, summary[key]))
    done = summary["slow_acc_neighbours_done"]
    if done["mean"] is not None:
        print(
            f"  {slow} accuracy when its neighbours were done (round "
            f"{summary['slow_round_neighbours_done']['mean']:.1f} of {args.rounds}): "
            f"{done['mean']:.4f}; at its end {summary['slow_acc_straggler']['mean']:.4f}"
        )
    und = summary["undeclared_neighbour_ratio"]
    if und["mean"] is not None:
        print(f"  undeclared (neighbours wait for it): neighbour_ratio {und['mean']:.3f}")
    wall = time.monotonic() - started
    print(f"\nwall time {wall:.0f} s, load average {loadavg()}")
    report = {
        "setup": {
            "topology": str(topo_path),
            "slow": slow,
            "neighbours": neighbours,
            "slowdown": args.slowdown,
            "speed": speed,
            "rounds": args.rounds,
            "seeds": seeds,
            "privacy": args.privacy,
            "deadline_s": args.deadline,
            "options": args.option,
            "arms": list(arms),
            "load_average_end": loadavg(),
            **machine(),
        },
        "targets": TARGETS,
        "summary": summary,
        "seeds": results,
        "wall_seconds": round(wall, 1),
    }
    path = write_json(out, "stragglers", report)
    png = plot(figures, out, slow) if figures else None
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    return 0 if all_ok and figures else 1


if __name__ == "__main__":
    sys.exit(main())

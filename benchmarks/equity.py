#!/usr/bin/env python3
"""Equity: group gaps per node and federation-wide, for plain gossip and with a fairness option.

For each seed, two campus testbeds (`--workload edu`, the same data, privacy and budget):

  plain     the workload's defaults;
  fairness  the same with `fairness = --fairness` (group-balanced losses by default, or "dro").

Every node is scored on `--unseen` (2000) unseen learners of its institution (`unseen_data`;
more than the 300 the daemons score, so that group gaps are measured above their noise) with
its final model (read back from its state folder). Per node, task and group attribute: the worst
group's accuracy, true and false positive rate gaps against the majority, ABROCA and its
randomization p-value (`m3tgossip.edu.equity.group_gaps`). Federation-wide: every node turns
its scores into counts per task, group value, label and score bin (`count_vector`), the counts
are averaged by consensus over the spec's graph with its Metropolis-Hastings matrix (the rule
the daemons mix with, here iterated in this process until every node's copy is within 1e-9 of
the mean), and each node computes the same figures from its own copy times the number of nodes
(`gaps_from_counts`): no record leaves a node, only counts.

Headline figures per arm, over the seeds (mean and 95% Student-t interval):

  worst_gap_pts     the federation-wide worst group's accuracy gap (largest over tasks and
                    attributes of the majority's accuracy minus the group's, over groups of
                    at least `--min-group` records)
  node_worst_gap_pts  per node, the best minus the worst group accuracy (groups of >= 5
                    labelled records), averaged over nodes
  mean_acc          mean accuracy on unseen learners over nodes

and `fairness - plain` for each; `groups` holds, per task and group attribute, each arm's
federation-wide acc_gap, tpr_gap, fpr_gap, abroca and p_value over the seeds.

Writes DIR/equity.json and DIR/equity.png; completed runs in
DIR/runs are reused.

    python benchmarks/equity.py --out runs/bench-equity
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import ROOT, interval, parser, pyplot, save_png, setup, write_json
from convergence import testbed_arm

from m3tgossip.consensus.weights import metropolis_hastings
from m3tgossip.edu.data import DataConfig, unseen_data
from m3tgossip.edu.equity import count_vector, gaps_from_counts, group_gaps
from m3tgossip.edu.restore import load_trained_node
from m3tgossip.edu.train import _EvalSet
from m3tgossip.edu.workload import workload_options
from m3tgossip.harness.testbed_spec import parse_assignment
from m3tgossip.topology import Topology, load_topology

ARMS = ("plain", "fairness")
FIGURES = ("worst_gap_pts", "node_worst_gap_pts", "mean_acc")
#: the issue's bar: the option halves the worst gap, losing at most 1 point of mean accuracy
MAX_ACC_COST_PTS = 1.0


def consensus_counts(topo: Topology, vectors: dict[str, np.ndarray], tol: float = 1e-9) -> dict:
    """Every node's copy after averaging `vectors` over the spec's graph (Metropolis-Hastings
    rounds until the copies agree within `tol` of the mean's scale), and the rounds taken."""
    ids = topo.ids()
    w = metropolis_hastings(topo.graph(), ids)
    x = np.stack([vectors[i] for i in ids])
    mean = x.mean(axis=0)
    scale = max(float(np.abs(mean).max()), 1.0)
    rounds = 0
    while float(np.abs(x - mean).max()) > tol * scale and rounds < 100_000:
        x = w @ x
        rounds += 1
    return {"copies": dict(zip(ids, x, strict=True)), "rounds": rounds}


def node_figures(
    folder: Path, topo: Topology, o: dict[str, Any], seed: int, unseen: int
) -> dict[str, Any]:
    """Per node: unseen accuracy, worst group gap, group gaps, and its count vector, on
    `unseen` learners of its institution."""
    config = DataConfig(records=o["records"], alpha=o["alpha"], seed=seed)
    out = {}
    for n in topo.nodes:
        trained = load_trained_node(folder / "nodes" / n.id)
        data = unseen_data(n, config, n=unseen)
        evalset = _EvalSet(trained.model, data, equity=True)
        with torch.no_grad():
            metrics = evalset.metrics(trained.model)
            logits = trained.model(evalset.batch)
        scores = {
            t: torch.softmax(logits[t], dim=1)[:, 1].numpy()
            for t in trained.model.tasks
            if logits[t].shape[1] == 2
        }
        out[n.id] = {
            "mean_acc": metrics["mean_acc"],
            "worst_group_gap": metrics["worst_group_gap"],
            "equity": group_gaps(evalset.labels, scores, evalset.groups, seed=seed),
            "counts": count_vector(evalset.labels, scores, evalset.groups),
        }
    return out


def worst_gap(
    figures: dict[str, dict[str, dict[str, Any]]], min_group: int
) -> tuple[float | None, Any]:
    """The largest accuracy gap over tasks and attributes whose group has at least
    `min_group` records, and where it is."""
    best, where = None, None
    for task, per in figures.items():
        for attribute, g in per.items():
            if g["n_group"] < min_group:
                continue
            if best is None or g["acc_gap"] > best:
                best, where = g["acc_gap"], {"task": task, "attribute": attribute, **g}
    return best, where


def arm_figures(topo: Topology, nodes: dict[str, Any], seed: int, min_group: int) -> dict[str, Any]:
    n = len(topo.nodes)
    gossip = consensus_counts(topo, {i: v["counts"] for i, v in nodes.items()})
    per_copy = {i: gaps_from_counts(c * n, seed=seed) for i, c in gossip["copies"].items()}
    first = per_copy[topo.nodes[0].id]
    agree = all(p == first for p in per_copy.values())
    exact = gaps_from_counts(sum(v["counts"] for v in nodes.values()), seed=seed)
    gap, where = worst_gap(first, min_group)
    accs = [v["mean_acc"] for v in nodes.values() if v["mean_acc"] is not None]
    node_gaps = [v["worst_group_gap"] for v in nodes.values() if v["worst_group_gap"] is not None]
    return {
        "worst_gap_pts": None if gap is None else 100 * gap,
        "worst_group": where,
        "node_worst_gap_pts": 100 * float(np.mean(node_gaps)) if node_gaps else None,
        "mean_acc": 100 * float(np.mean(accs)) if accs else None,
        "federation": first,
        "federation_copies_agree": agree,
        "federation_matches_summed_counts": first == exact,
        "consensus_rounds": gossip["rounds"],
        "nodes": {
            i: {k: v[k] for k in ("mean_acc", "worst_group_gap", "equity")}
            for i, v in nodes.items()
        },
    }


def plot(seeds_figs: list[dict[str, Any]], out: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in zip(
        axes,
        ("worst_gap_pts", "mean_acc"),
        ("federation-wide worst group gap (pts)", "mean accuracy, unseen learners (%)"),
        strict=True,
    ):
        for k, arm in enumerate(ARMS):
            vals = [s[arm][key] for s in seeds_figs if s[arm][key] is not None]
            iv = interval(vals)
            ax.bar(k, iv["mean"] or 0, yerr=iv["ci95"] or 0, capsize=4, color=f"C{k}")
            ax.scatter([k] * len(vals), vals, color="k", s=10, zorder=3)
        ax.set_xticks(range(len(ARMS)), ARMS)
        ax.set_title(label, fontsize=9)
    return save_png(fig, out, "equity")


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, "runs/bench-equity")
    p.add_argument("--topology", default="topology/campus.toml")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated federation seeds (>= 3)")
    p.add_argument("--fairness", default="balanced", help="the fairness option measured")
    p.add_argument("--privacy", default="open", help="the profile both arms run under")
    p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--deadline", type=float, default=60.0, help="round deadline (s)")
    p.add_argument(
        "--unseen", type=int, default=2000, help="unseen learners each node is scored on"
    )
    p.add_argument(
        "--min-group",
        type=int,
        default=100,
        help="smallest federation-wide group (records) the headline worst gap considers",
    )
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    torch.set_num_threads(1)
    o = workload_options(dict(parse_assignment(x) for x in args.option))
    workload_options({"fairness": args.fairness})  # an unknown option stops here
    topo_path = Path(args.topology) if Path(args.topology).is_absolute() else ROOT / args.topology
    topo = load_topology(topo_path)
    t0 = time.monotonic()
    out = setup(
        args.out,
        f"topology {topo.name} ({len(topo.nodes)} nodes); rounds {args.rounds}; seeds {seeds}; "
        f"privacy {args.privacy}; fairness option {args.fairness!r}; options "
        f"{args.option or 'defaults'}; scored on {args.unseen} unseen learners per node; "
        f"headline gap over groups of >= {args.min_group} records",
    )
    seeds_figs, ok = [], True
    for seed in seeds:
        figs = {}
        for arm in ARMS:
            extra = [f"fairness={args.fairness}"] if arm == "fairness" else []
            ns = argparse.Namespace(**{**vars(args), "option": [*args.option, *extra]})
            folder = out / "runs" / f"{arm}-{seed}"
            run = testbed_arm(topo_path, "sync", seed, ns, folder)
            if not run["ok"]:
                print(f"  {arm} seed {seed}: the run failed", file=sys.stderr, flush=True)
                ok = False
                break
            nodes = node_figures(folder, topo, o, seed, args.unseen)
            figs[arm] = arm_figures(topo, nodes, seed, args.min_group)
            f = figs[arm]
            print(
                f"  {arm} seed {seed}: worst gap {f['worst_gap_pts']:.1f} pts "
                f"({f['worst_group']['task']}, {f['worst_group']['attribute']}: "
                f"{f['worst_group']['group']}), node worst gap {f['node_worst_gap_pts']:.1f}, "
                f"mean acc {f['mean_acc']:.1f}, consensus {f['consensus_rounds']} rounds",
                flush=True,
            )
        if len(figs) == len(ARMS):
            seeds_figs.append(figs)
    summary: dict[str, Any] = {}
    for key in FIGURES:
        summary[key] = {arm: interval(s[arm][key] for s in seeds_figs) for arm in ARMS}
        summary[key]["fairness_minus_plain"] = interval(
            s["fairness"][key] - s["plain"][key]
            for s in seeds_figs
            if s["fairness"][key] is not None and s["plain"][key] is not None
        )
    # per task and group attribute, the federation-wide figures over the seeds
    groups: dict[str, Any] = {}
    for arm in ARMS:
        cells = sorted(
            {(t, a) for s in seeds_figs for t, per in s[arm]["federation"].items() for a in per}
        )
        for task, attribute in cells:
            found = [s[arm]["federation"].get(task, {}).get(attribute) for s in seeds_figs]
            groups.setdefault(task, {}).setdefault(attribute, {})[arm] = {
                key: interval(f[key] for f in found if f is not None)
                for key in ("acc_gap", "tpr_gap", "fpr_gap", "abroca", "p_value")
            }
    ratio = interval(
        s["fairness"]["worst_gap_pts"] / s["plain"]["worst_gap_pts"]
        for s in seeds_figs
        if s["plain"]["worst_gap_pts"]
    )
    cost = summary["mean_acc"]["fairness_minus_plain"]["mean"]
    halved = ratio["mean"] is not None and ratio["mean"] <= 0.5
    cheap = cost is not None and cost >= -MAX_ACC_COST_PTS
    result = {
        "topology": topo.name,
        "seeds": seeds[: len(seeds_figs)],
        "rounds": args.rounds,
        "privacy": args.privacy,
        "fairness": args.fairness,
        "unseen_per_node": args.unseen,
        "min_group": args.min_group,
        "summary": summary,
        "groups": groups,
        "worst_gap_ratio": ratio,
        "targets": {
            "worst_gap_halved": halved,
            "acc_cost_at_most_1pt": cheap,
        },
        "per_seed": [{arm: {k: v for k, v in s[arm].items()} for arm in ARMS} for s in seeds_figs],
        "wall_s": time.monotonic() - t0,
    }
    write_json(out, "equity", result, default=float)
    png = plot(seeds_figs, out)
    for key in FIGURES:
        s = summary[key]
        print(
            f"{key}: plain {s['plain']['mean']}, fairness {s['fairness']['mean']}, "
            f"difference {s['fairness_minus_plain']['mean']} +- "
            f"{s['fairness_minus_plain']['ci95']}"
        )
    print(
        f"worst gap ratio fairness/plain {ratio['mean']} (target <= 0.5: {halved}); "
        f"accuracy cost within {MAX_ACC_COST_PTS} pt: {cheap}"
    )
    print(f"wrote {out / 'equity.json'}" + (f" and {png}" if png else ""))
    return 0 if ok and seeds_figs else 1


if __name__ == "__main__":
    sys.exit(main())

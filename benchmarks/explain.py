#!/usr/bin/env python3
"""Modality attribution on trained edu nodes: shares, agreement with permutation, cost.

For every node: exact Shapley shares of its modalities per task (what `m3tgossip explain`
gives), the sum of the shares (1 where the total is meaningful), the permutation check on the
same records (each modality shuffled across them, `--repeats` times) and Spearman(phi, drop)
per node-task, per task over the nodes and pooled over every node and task; the node's final
accuracy on its held-out records and on unseen learners; and the seconds of one per-round
attribution (`m3tgossip.edu.explain.round_attribution`, median of `--timings` runs, one torch
thread as in a daemon) against the node's median round seconds.
Targets: pooled Spearman >= 0.8; attribution <= 5% of the round.

The check runs on `--check` records: `held` (the node's held-out records: 7 for a student at
the default 240 records) or `held+unseen` (default: with the 300 unseen learners of the node's
institution the built-in data scores every node on, records no node trained on). Both sides
average the same quantity over them (`--quantity`: the log-probability of the true label, the
default, or its probability). The pooled Spearman ranks each node-task's modalities within it
and pools the centred ranks (`m3tgossip.edu.explain.pooled_spearman`); the earlier figure, one
Spearman over the raw values of every node, task and modality (`pooled_raw`), is printed
beside it, and so is the whole earlier measurement (`--old-repeats` shuffles on the held-out
records alone), so the change of definition and the model's own change can be told apart.

The nodes are either those of a finished testbed run (`--run DIR`: DIR/nodes/ID or DIR/ID
state folders, restored with their held-out records; round seconds from their metrics, the
`timings.total` of each round), or trained here (default): the nodes of `--topology` train
`--rounds` rounds of local steps in this process without gossip (with `--modality-dropout`),
their round seconds being those local rounds (training and evaluation, no exchange: shorter
than a daemon's rounds, so the fraction is an upper bound).

    python benchmarks/explain.py --out runs/bench-explain-tiny --nodes inst-a,stu-a1 --rounds 3
    python benchmarks/explain.py --out runs/bench-explain                # every campus node
    python benchmarks/explain.py --out runs/bench-explain --modality-dropout 0
    python benchmarks/explain.py --out runs/bench-explain --run runs/campus-own

Prints the setup and a table, writes explain.json and explain.png.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import ROOT, loadavg, machine, parser, pyplot, save_png, setup, write_json

from m3tgossip.daemon import checkpoint
from m3tgossip.edu.explain import (
    QUANTITIES,
    REPEATS,
    ROUND_ROWS,
    Explainer,
    round_attribution,
)
from m3tgossip.edu.explain_ranks import pooled_spearman
from m3tgossip.edu.model.m3t import Batch
from m3tgossip.edu.restore import load_trained_node
from m3tgossip.edu.workload import DEFAULT_DROPOUT, EduWorkload
from m3tgossip.errors import ConfigError
from m3tgossip.topology import load_topology


def state_folders(run: Path) -> list[Path]:
    """The node state folders of a testbed run (DIR/nodes/ID) or of a folder of them."""
    base = run / "nodes" if (run / "nodes").is_dir() else run
    found = sorted(p for p in base.iterdir() if (p / "node.json").is_file())
    if not found:
        raise ConfigError(str(run), "", "no node state folders (ID/node.json) in it")
    return found


def restored(folder: Path) -> tuple[str, EduWorkload, list[float]]:
    """The node of a state folder as its daemon held it, and its rounds' seconds."""
    trained = load_trained_node(folder)
    w = EduWorkload(trained.topology, trained.node.id, int(trained.info["seed"]), trained.options)
    arrays, _ = checkpoint.load(folder)  # load_trained_node checked that there is one
    w.load_state(arrays)
    w.model.eval()
    seconds = [
        float(r["timings"]["total"])
        for r in trained.metrics()
        if isinstance(r.get("timings"), dict) and r["timings"].get("total")
    ]
    return trained.node.id, w, seconds


def trained_here(
    topology: Path, nodes: list[str] | None, rounds: int, options: dict[str, Any], seed: int
) -> list[tuple[str, EduWorkload, list[float]]]:
    """Each node trained `rounds` local rounds here; the seconds of each round."""
    spec = load_topology(topology)
    ids = nodes or [n.id for n in spec.nodes]
    out = []
    for nid in ids:
        w = EduWorkload(spec, nid, seed, options)
        seconds = []
        for r in range(rounds):
            t0 = time.perf_counter()
            w.local_step(r)
            w.evaluate(r)
            seconds.append(time.perf_counter() - t0)
        w.model.eval()
        out.append((nid, w, seconds))
        print(f"  trained {nid}: {rounds} rounds, median {statistics.median(seconds):.3f} s")
    return out


#: the check's record sets (`--check`)
CHECKS = ("held", "held+unseen")
#: shuffles per modality of the check by default, and of the earlier measurement
BENCH_REPEATS = 20
OLD_REPEATS = REPEATS


def check_records(w: EduWorkload, which: str) -> tuple[Batch, dict[str, np.ndarray]]:
    """The records of the check and their labels: the held-out ones, with the unseen learners
    (if the node's data has them) for `held+unseen`."""
    sets = [w.trainer.test_set]
    if which == "held+unseen" and w.trainer.unseen_set is not None:
        sets.append(w.trainer.unseen_set)
    batches = [s.batch for s in sets if len(s.batch)]
    modalities = batches[0].present
    batch = Batch(
        {m: torch.cat([b.inputs[m] for b in batches]) for m in batches[0].inputs},
        {m: torch.cat([b.present[m] for b in batches]) for m in modalities},
    )
    labels = {t: np.concatenate([s.labels[t] for s in sets if len(s.batch)]) for t in w.model.tasks}
    return batch, labels


def attribution(explainer: Explainer, repeats: int) -> dict[str, dict[str, Any]]:
    """Per task the Shapley summary with the permutation check of `explainer`."""
    tasks = explainer.shapley()
    for t, check in explainer.permutation(repeats, seed=0).items():
        tasks[t]["permutation"] = check
    for s in tasks.values():
        s["shares_sum"] = sum(s["shares"].values()) if s["shares"] else None
    return tasks


def measure(
    w: EduWorkload,
    timings: int,
    repeats: int,
    max_rows: int | None,
    check: str,
    quantity: str,
    old_repeats: int,
) -> dict[str, Any]:
    """Shares and the permutation check of one node on the `check` records (and, as it was
    measured before, on the held-out records alone with `old_repeats` shuffles of the
    log-probability), its accuracy, and the seconds of `round_attribution` (on a sample of
    the held-out records, `max_rows`)."""
    held = w.trainer.test_set
    seconds = []
    for _ in range(timings):
        t0 = time.perf_counter()
        round_attribution(w.trainer, max_rows)
        seconds.append(time.perf_counter() - t0)
    batch, labels = check_records(w, check)
    tasks = attribution(Explainer(w.model, batch, labels, quantity=quantity), repeats)
    other = next(q for q in QUANTITIES if q != quantity)
    tasks_other = attribution(Explainer(w.model, batch, labels, quantity=other), repeats)
    old = attribution(Explainer(w.model, held.batch, held.labels), old_repeats)
    metrics = w.trainer.evaluate()
    return {
        "modalities": list(w.model.modalities),
        "records": len(batch),
        "held_records": len(held.batch),
        "tasks": tasks,
        "other_quantity": {"quantity": other, "tasks": tasks_other},
        "old": {"records": len(held.batch), "repeats": old_repeats, "tasks": old},
        "accuracy": {
            "held": metrics.get("mean_acc"),
            "unseen": (metrics.get("unseen") or {}).get("mean_acc"),
            "tasks": {t: m["acc"] for t, m in metrics["tasks"].items()},
        },
        "attribution_records": (
            len(held.batch)
            if max_rows is None
            else min(len(held.batch), max(1, max_rows >> len(w.model.modalities)))
        ),
        "attribution_s": statistics.median(seconds),
        "attribution_s_values": seconds,
    }


def _rho(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def plot(out: Path, nodes: dict[str, dict[str, Any]], target: float) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    ids = list(nodes)
    fractions = [nodes[n]["fraction"] or 0.0 for n in ids]
    left.bar(range(len(ids)), [100 * f for f in fractions], color="tab:blue")
    left.axhline(100 * target, color="tab:red", linestyle="--", label=f"target {target:.0%}")
    left.set_xticks(range(len(ids)), ids, rotation=45, ha="right", fontsize=8)
    left.set_ylabel("attribution / median round (%)")
    left.legend(fontsize=8)
    colours = plt.get_cmap("tab10")
    for k, n in enumerate(ids):
        xs, ys = [], []
        for s in nodes[n]["tasks"].values():
            drop = s["permutation"]["drop"]
            xs += [s["phi"][m] for m in drop]
            ys += list(drop.values())
        right.scatter(xs, ys, s=14, color=colours(k % 10), label=n)
    right.axhline(0, color="grey", linewidth=0.5)
    right.axvline(0, color="grey", linewidth=0.5)
    right.set_xlabel("Shapley phi (nats)")
    right.set_ylabel("permutation drop (nats)")
    right.set_title("per node, task and modality", fontsize=9)
    if len(ids) <= 16:
        right.legend(fontsize=7)
    return save_png(fig, out, "explain")


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, None)
    p.add_argument("--run", help="a finished testbed run (or a folder of node state folders)")
    p.add_argument("--topology", default=str(ROOT / "topology" / "campus.toml"))
    p.add_argument("--nodes", help="comma-separated node ids to train here (all)")
    p.add_argument("--rounds", type=int, default=10, help="local rounds trained here (10)")
    p.add_argument("--records", type=int, default=240, help="built-in records per node (240)")
    p.add_argument("--seed", type=int, default=0, help="federation seed (0)")
    p.add_argument(
        "--modality-dropout",
        type=float,
        default=DEFAULT_DROPOUT,
        help=f"the workload's modality_dropout for the nodes trained here ({DEFAULT_DROPOUT})",
    )
    p.add_argument("--check", choices=CHECKS, default="held+unseen", help="the check's records")
    p.add_argument("--quantity", choices=QUANTITIES, default="log_prob", help="what v averages")
    p.add_argument(
        "--repeats",
        type=int,
        default=BENCH_REPEATS,
        help=f"shuffles per modality ({BENCH_REPEATS})",
    )
    p.add_argument(
        "--old-repeats",
        type=int,
        default=OLD_REPEATS,
        help=f"shuffles of the earlier measurement ({OLD_REPEATS})",
    )
    p.add_argument("--timings", type=int, default=5, help="timed attributions per node (5)")
    p.add_argument(
        "--max-rows",
        type=int,
        default=ROUND_ROWS,
        help=f"rows (records x 2^m) of the timed attribution ({ROUND_ROWS}; 0: every record)",
    )
    p.add_argument("--target-fraction", type=float, default=0.05)
    p.add_argument("--target-spearman", type=float, default=0.8)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # as a daemon runs
    if args.run:
        what = f"the nodes of the run {args.run}, round seconds from their metrics"
    else:
        what = (
            f"{Path(args.topology).name} nodes {args.nodes or 'all'} trained here: "
            f"{args.rounds} local rounds, {args.records} records, seed {args.seed}, "
            f"modality_dropout {args.modality_dropout:g}"
        )
    out = setup(
        args.out,
        f"{what}; check on {args.check} records of {args.quantity}, {args.repeats} shuffles "
        f"per modality (earlier: held, log_prob, {args.old_repeats}); {args.timings} timed "
        f"attributions of {args.max_rows or 'all'} rows, one torch thread",
    )
    load_before = loadavg()
    if args.run:
        nodes = [restored(f) for f in state_folders(Path(args.run))]
        source = "metrics timings.total"
    else:
        options = {"records": args.records, "eval_every": 5}
        options["modality_dropout"] = args.modality_dropout
        ids = args.nodes.split(",") if args.nodes else None
        nodes = trained_here(Path(args.topology), ids, args.rounds, options, args.seed)
        source = "local rounds in this process (train + evaluate, no exchange)"
    load_trained = loadavg()
    results: dict[str, dict[str, Any]] = {}
    for nid, w, seconds in nodes:
        if not len(w.trainer.test_set.batch):
            print(f"  {nid}: no held-out records, left out")
            continue
        r = measure(
            w,
            args.timings,
            args.repeats,
            args.max_rows or None,
            args.check,
            args.quantity,
            args.old_repeats,
        )
        r["round_s_median"] = statistics.median(seconds) if seconds else None
        r["rounds"] = len(seconds)
        r["fraction"] = r["attribution_s"] / r["round_s_median"] if r["round_s_median"] else None
        results[nid] = r
    load_after = loadavg()
    pooled = pooled_spearman(results.values())
    loo = pooled_spearman(results.values(), key="leave_one_out")
    other = pooled_spearman(r["other_quantity"] for r in results.values())
    other_quantity = next(q for q in QUANTITIES if q != args.quantity)
    old = pooled_spearman(r["old"] for r in results.values())
    sums = [
        s["shares_sum"]
        for r in results.values()
        for s in r["tasks"].values()
        if s["shares_sum"] is not None
    ]
    fractions = [r["fraction"] for r in results.values() if r["fraction"] is not None]
    held_acc = [
        r["accuracy"]["held"] for r in results.values() if r["accuracy"]["held"] is not None
    ]
    unseen_acc = [
        r["accuracy"]["unseen"] for r in results.values() if r["accuracy"]["unseen"] is not None
    ]
    summary = {
        "node_tasks": sum(len(r["tasks"]) for r in results.values()),
        "with_shares": len(sums),
        "max_shares_sum_error": max((abs(x - 1) for x in sums), default=None),
        "spearman": pooled,
        "spearman_leave_one_out": loo,
        "spearman_other_quantity": {"quantity": other_quantity, **other},
        "spearman_old_measurement": old,
        "mean_accuracy_held": statistics.fmean(held_acc) if held_acc else None,
        "mean_accuracy_unseen": statistics.fmean(unseen_acc) if unseen_acc else None,
        "max_fraction": max(fractions, default=None),
        "median_fraction": statistics.median(fractions) if fractions else None,
        "load_average": {"start": load_before, "trained": load_trained, "end": load_after},
        "spearman_ok": pooled["pooled"] is not None and pooled["pooled"] >= args.target_spearman,
        "fraction_ok": bool(fractions) and max(fractions) <= args.target_fraction,
    }
    print(
        f"\n{'node':<12}{'mods':>5}{'recs':>6}{'timed':>6}{'attrib s':>10}{'round s':>9}"
        f"{'frac':>7}{'acc':>7}  task: shares sum/Spearman"
    )
    for nid, r in results.items():
        cells = ", ".join(
            f"{t} {s['shares_sum']:.6f}/{_rho(s['permutation']['spearman'])}"
            if s["shares_sum"] is not None
            else f"{t} -/{_rho(s['permutation']['spearman'])}"
            for t, s in r["tasks"].items()
        )
        fraction = f"{r['fraction']:.3f}" if r["fraction"] is not None else "-"
        round_s = f"{r['round_s_median']:.3f}" if r["round_s_median"] is not None else "-"
        acc = r["accuracy"]["held"]
        print(
            f"{nid:<12}{len(r['modalities']):>5}{r['records']:>6}{r['attribution_records']:>6}"
            f"{r['attribution_s']:>10.4f}{round_s:>9}{fraction:>7}"
            f"{'-' if acc is None else f'{acc:.3f}':>7}  {cells}"
        )
    print(
        f"pooled Spearman(phi, permutation drop), within-node-task ranks, over "
        f"{pooled['points']} points of {pooled['node_tasks']} node-tasks: "
        f"{_rho(pooled['pooled'])} (mean per node-task {_rho(pooled['mean'])}, raw values "
        f"pooled {_rho(pooled['pooled_raw'])}); target >= {args.target_spearman}"
    )
    print(
        f"  over the {pooled['with_shares']} node-tasks with shares (total > 0): "
        f"{_rho(pooled['pooled_with_shares'])}; of {other_quantity}: "
        f"{_rho(other['pooled_with_shares'])}"
    )
    print("  per task: " + ", ".join(f"{t} {_rho(v)}" for t, v in pooled["per_task"].items()))
    print(
        f"  the same of {other_quantity}: {_rho(other['pooled'])}; "
        f"leave-one-out masking v(all) - v(all without m) against the drop: {_rho(loo['pooled'])}"
    )
    print(
        f"  the earlier measurement (held-out records only, {args.old_repeats} shuffles): raw "
        f"values pooled {_rho(old['pooled_raw'])}, within-node-task ranks {_rho(old['pooled'])}"
    )
    print(
        f"shares sum to 1 within {summary['max_shares_sum_error']} on {len(sums)} of "
        f"{summary['node_tasks']} node-tasks (the others have no meaningful total)"
    )
    print(
        f"mean final accuracy: held-out {summary['mean_accuracy_held']}, unseen learners "
        f"{summary['mean_accuracy_unseen']}"
    )
    print(
        f"attribution / median round: max {summary['max_fraction']}, median "
        f"{summary['median_fraction']}; target <= {args.target_fraction}; load average at "
        f"start {load_before}, after training {load_trained}, at the end {load_after}"
    )
    info = {
        "run": args.run,
        "topology": None if args.run else args.topology,
        "nodes": args.nodes,
        "rounds": None if args.run else args.rounds,
        "records": None if args.run else args.records,
        "seed": args.seed,
        "modality_dropout": None if args.run else args.modality_dropout,
        "check": args.check,
        "quantity": args.quantity,
        "repeats": args.repeats,
        "old_repeats": args.old_repeats,
        "timings": args.timings,
        "max_rows": args.max_rows or None,
        "round_seconds": source,
        "targets": {"fraction": args.target_fraction, "spearman": args.target_spearman},
        **machine(),
    }
    path = write_json(out, "explain", {"setup": info, "summary": summary, "nodes": results})
    png = plot(out, results, args.target_fraction)
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Robustness: consensus error and education metrics under message loss, churn and Byzantine nodes.

Every scenario is one run of the multi-process testbed (real daemons on 127.0.0.1, CURVE links):

- loss: 0, 10 and 30 percent of all outgoing messages dropped (`faults.drop`);
- churn: a quarter of the nodes SIGKILLed at different rounds and restarted from their
  checkpoints two seconds later (`--kill NODE@ROUND --restart-after 2`);
- Byzantine: 1 and 2 of 16 nodes attack (`faults.attack`), for plain mean, self-centred
  clipping and trimmed mean (`gossip.aggregator`), each against its attack-free run.

Consensus workload (torus-16): reported are the spread among honest nodes (max over honest i of
||d_i - mean(d)|| / ||mean(d)|| on the nodes' digests, 16 random projections per component)
and the error of the honest nodes' mean to the exact mean of the honest nodes' initial vectors
(projected the same way), at the last round. Education workload: the honest nodes' mean held-out
accuracy at the last evaluation (loss and churn on ring-8, Byzantine on torus-16 with the
Byzantine nodes n0 and n10, whose neighbourhoods are disjoint, so no node has more than one
Byzantine neighbour and trimmed mean with trim 1 applies).

    python benchmarks/robustness.py --out runs/bench-robustness            # everything
    python benchmarks/robustness.py --parts consensus --out runs/bench-robustness

Attacked runs are compared with the attack-free run on the same 14 nodes (n0 and n10
excluded). Prints the setup and tables, writes `OUT/robustness.json` and `OUT/robustness.png`.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import ROOT, each_run, machine, parser, pyplot, save_png, setup, write_json

from m3tgossip.daemon.metrics import read_metrics
from m3tgossip.harness import Summary, Testbed, TestbedSpec, digest_spread
from m3tgossip.topology import load_topology
from m3tgossip.workloads.consensus import ConsensusWorkload, initial_vector

TORUS = ROOT / "topology" / "torus-16.toml"
RING8 = ROOT / "topology" / "ring-8.toml"
#: Byzantine nodes on torus-16: no node has both as neighbours
BYZANTINE = ("n0", "n10")
AGGREGATORS = ("mean", "clip", "trimmed")


def honest_error(
    run_dir: Path, spec: Path, seed: int, size: int, honest: list[str]
) -> dict[str, Any]:
    """Spread among honest nodes and error of their mean to the honest initial mean (digests)."""
    topo = load_topology(spec)
    last = {}
    for nid in honest:
        recs = read_metrics(run_dir / "nodes" / nid / "metrics.jsonl")
        if recs:
            last[nid] = recs[-1]
    spread = digest_spread(last)
    ref = ConsensusWorkload(topo, honest[0], seed, {"size": size})
    target = []
    for comp in spread.get("components") or sorted(ref.sizes):
        holders = [n for n in topo.holders(comp) if n in honest]
        mean = np.mean([initial_vector(seed, n, comp, size, "float64") for n in holders], axis=0)
        target.append(ref.project(comp, mean))
    target_vec = np.concatenate(target)
    comps = spread.get("components") or []
    digests = [
        np.concatenate([np.asarray(r["digest"][c]) for c in comps])
        for r in last.values()
        if r.get("digest")
    ]
    err = None
    if digests and comps:
        mean_d = np.mean(digests, axis=0)
        err = float(np.linalg.norm(mean_d - target_vec) / np.linalg.norm(target_vec))
        worst = max(
            float(np.linalg.norm(d - target_vec) / np.linalg.norm(target_vec)) for d in digests
        )
    else:
        worst = None
    finite = all(np.all(np.isfinite(d)) for d in digests)
    return {
        "spread": spread["spread"] if finite else float("inf"),
        "error_to_honest_mean": err if finite else float("inf"),
        "worst_node_error_to_honest_mean": worst if finite else float("inf"),
        "rounds": {n: int(r["round"]) + 1 for n, r in last.items()},
    }


#: one scenario: name, aggregator, Byzantine nodes, and its changes to the base spec's fields
#: (`settings` are added to the base's)
Scenario = tuple[str, str, list[str], dict[str, Any]]


def run(
    out: Path, name: str, base: dict[str, Any], aggregator: str, changes: dict[str, Any]
) -> tuple[Summary | None, int, Path, float]:
    """One scenario in OUT/runs/NAME: its summary (None if the daemons did not come up), the
    testbed's exit code, the folder and the wall seconds."""
    run_dir = out / "runs" / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    changes = dict(changes)
    settings = {**base["settings"], "gossip.aggregator": aggregator, **changes.pop("settings", {})}
    spec = TestbedSpec(**{**base, **changes, "out": run_dir, "settings": settings, "quiet": True})
    t = time.monotonic()
    try:
        summary: Summary | None = Testbed(spec).run()
    except (RuntimeError, TimeoutError) as exc:
        print(f"testbed: error: {exc}", file=sys.stderr, flush=True)
        summary = None
    wall = time.monotonic() - t
    return summary, 1 if summary is None else summary.exit_code, run_dir, wall


def attackers(byzantine: list[str], attack: str) -> dict[str, Any]:
    """The spec changes that make `byzantine` attack with `attack`."""
    return {"node_settings": {b: {"faults.attack": attack} for b in byzantine}}


def consensus_part(a: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    rows = []
    nodes = load_topology(TORUS).ids()
    base = {
        "topology": TORUS,
        "workload": "consensus",
        "rounds": a.rounds,
        "seed": a.seed,
        "options": {"size": a.size},
        "deadline": 2,
        "timeout": 600,
        "settings": {"faults.seed": a.seed},
    }
    scenarios: list[Scenario] = []
    for p in (0.0, 0.1, 0.3):
        scenarios.append((f"loss-{int(p * 100)}", "mean", [], {"settings": {"faults.drop": p}}))
    churn = {nid: 8 + 4 * i for i, nid in enumerate(("n1", "n6", "n11", "n12"))}
    scenarios.append(("churn-4of16", "mean", [], {"kills": churn, "restart_after": 2}))
    for agg in AGGREGATORS:
        scenarios.append((f"clean-{agg}", agg, [], {}))
        for attack in a.attacks:
            for k in (1, 2):
                byz = list(BYZANTINE[:k])
                scenarios.append((f"{attack}-{k}of16-{agg}", agg, byz, attackers(byz, attack)))
    for name, agg, byz, changes in each_run(scenarios, "consensus scenarios"):
        summary, code, run_dir, wall = run(out / "consensus", name, base, agg, changes)
        honest = [n for n in nodes if n not in byz]
        m = honest_error(run_dir, TORUS, a.seed, a.size, honest)
        row = {
            "workload": "consensus",
            "scenario": name,
            "aggregator": agg,
            "byzantine": byz,
            "wall_s": round(wall, 1),
            "exit_code": code,
            "crashed": summary.crashed if summary else None,
            "hung": summary.hung if summary else None,
            **m,
        }
        rows.append(row)
        print(
            f"  consensus {name:<22} spread {m['spread']:.3e}  err-to-honest-mean "
            f"{m['error_to_honest_mean']:.3e}  ({wall:.0f} s)",
            flush=True,
        )
    return rows


def edu_part(a: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    rows = []
    small = {
        "topology": RING8,
        "workload": "edu",
        "rounds": a.edu_rounds,
        "seed": a.seed,
        "deadline": 8,
        "timeout": 1500,
        "settings": {"faults.seed": a.seed},
        "options": {"eval_every": a.edu_eval_every},
    }
    big = {**small, "topology": TORUS}
    scenarios: list[tuple[str, str, list[str], dict[str, Any], dict[str, Any]]] = []
    if "edu-loss" in a.parts:
        for p in (0.0, 0.1, 0.3):
            changes = {"settings": {"faults.drop": p}}
            scenarios.append((f"ring8-loss-{int(p * 100)}", "mean", [], small, changes))
        k = max(2, a.edu_rounds // 3)
        churn = {"kills": {"n2": k, "n5": k + 2}, "restart_after": 2}
        scenarios.append(("ring8-churn-2of8", "mean", [], small, churn))
    if "edu-byz" in a.parts:
        for agg in a.edu_clean:
            scenarios.append((f"torus16-clean-{agg}", agg, [], big, {}))
        for agg in AGGREGATORS:
            byz = list(BYZANTINE)
            name = f"torus16-{a.edu_attack}-2of16-{agg}"
            scenarios.append((name, agg, byz, big, attackers(byz, a.edu_attack)))
    for name, agg, byz, base, changes in each_run(scenarios, "edu scenarios"):
        summary, code, _, wall = run(out / "edu", name, base, agg, changes)
        per_node = (summary.per_node if summary else None) or {}
        honest_final = {
            n: v["mean_acc"][-1]
            for n, v in per_node.items()
            if n not in byz and v.get("mean_acc") and v["mean_acc"][-1] is not None
        }
        acc = float(np.mean(list(honest_final.values()))) if honest_final else None
        # the nodes that are honest in the attacked runs, for a like-for-like comparison
        same = [v for n, v in honest_final.items() if n not in BYZANTINE]
        acc_same = float(np.mean(same)) if same else None
        row = {
            "workload": "edu",
            "scenario": name,
            "aggregator": agg,
            "byzantine": byz,
            "wall_s": round(wall, 1),
            "exit_code": code,
            "crashed": summary.crashed if summary else None,
            "hung": summary.hung if summary else None,
            "honest_mean_acc": acc,
            "honest_nodes_evaluated": len(honest_final),
            "mean_acc_without_n0_n10": acc_same,
            "rounds_done": summary.rounds_done if summary else None,
        }
        rows.append(row)
        shown = acc if acc is None else round(acc, 4)
        print(f"  edu {name:<30} honest mean accuracy {shown}  ({wall:.0f} s)", flush=True)
    return rows


def tables(rows: list[dict[str, Any]], attacks: list[str]) -> list[str]:
    lines = []
    cons = {r["scenario"]: r for r in rows if r["workload"] == "consensus"}
    if cons:
        lines += [
            "",
            "consensus (torus-16): spread among honest nodes / error of their mean to the honest "
            "initial mean",
        ]
        lines.append(f"{'scenario':<24}{'spread':>12}{'err->mean':>12}")
        for n in ("loss-0", "loss-10", "loss-30", "churn-4of16"):
            if n in cons:
                lines.append(
                    f"{n:<24}{cons[n]['spread']:>12.3e}{cons[n]['error_to_honest_mean']:>12.3e}"
                )
        lines += ["", "consensus, Byzantine: error of honest mean to honest initial mean (spread)"]
        cols = ["clean"] + [f"{at}-{k}of16" for at in attacks for k in (1, 2)]
        lines.append(f"{'aggregator':<12}" + "".join(f"{c:>24}" for c in cols))
        for agg in AGGREGATORS:
            cells = []
            for c in cols:
                r = cons.get(f"{c}-{agg}")
                cells.append(f"{r['error_to_honest_mean']:.2e} ({r['spread']:.1e})" if r else "-")
            lines.append(f"{agg:<12}" + "".join(f"{x:>24}" for x in cells))
    edu = [r for r in rows if r["workload"] == "edu"]
    if edu:
        lines += ["", "edu: honest nodes' mean held-out accuracy at the last evaluation"]
        by = {r["scenario"]: r for r in edu}
        for r in edu:
            acc = r["honest_mean_acc"]
            notes = []
            if "-2of16-" in r["scenario"]:
                clean = by.get(f"torus16-clean-{r['aggregator']}")
                clean_mean = by.get("torus16-clean-mean")
                if (
                    clean
                    and r["aggregator"] != "mean"
                    and acc is not None
                    and clean.get("mean_acc_without_n0_n10") is not None
                ):
                    delta = 100 * (acc - clean["mean_acc_without_n0_n10"])
                    notes.append(f"vs attack-free same aggregator {delta:+.1f} points")
                if (
                    clean_mean
                    and acc is not None
                    and clean_mean.get("mean_acc_without_n0_n10") is not None
                ):
                    delta = 100 * (acc - clean_mean["mean_acc_without_n0_n10"])
                    notes.append(f"vs attack-free mean {delta:+.1f} points")
            note = ("  " + ", ".join(notes)) if notes else ""
            same = r.get("mean_acc_without_n0_n10")
            if not r["byzantine"] and same is not None and "torus16" in r["scenario"]:
                note = f"  (without n0, n10: {same:.4f}, the attacked runs' honest nodes)" + note
            lines.append(f"{r['scenario']:<34}{acc if acc is None else f'{acc:.4f}':>8}{note}")
    return lines


def plot(rows: list[dict[str, Any]], out: Path) -> Path | None:
    """OUT/robustness.png (None if matplotlib is not installed)."""
    plt = pyplot()
    if plt is None:
        return None
    cons = [r for r in rows if r["workload"] == "consensus"]
    edu = [r for r in rows if r["workload"] == "edu"]
    panels = [p for p in (cons, edu) if p]
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 4.5 * len(panels)), squeeze=False)
    i = 0
    if cons:
        ax = axes[i][0]
        i += 1
        x = np.arange(len(cons))
        floor = 1e-17
        ax.bar(
            x - 0.2,
            [max(floor, min(r["spread"], 1e6)) for r in cons],
            0.4,
            label="spread among honest nodes",
        )
        ax.bar(
            x + 0.2,
            [max(floor, min(r["error_to_honest_mean"], 1e6)) for r in cons],
            0.4,
            label="error to honest mean",
        )
        ax.set_yscale("log")
        ax.set_xticks(x, [r["scenario"] for r in cons], rotation=60, ha="right", fontsize=8)
        ax.set_title("consensus, torus-16: relative error at the last round")
        ax.legend()
    if edu:
        ax = axes[i][0]
        x = np.arange(len(edu))
        ax.bar(
            x,
            [r["honest_mean_acc"] or 0.0 for r in edu],
            color=["tab:red" if r["byzantine"] else "tab:blue" for r in edu],
        )
        ax.set_xticks(x, [r["scenario"] for r in edu], rotation=40, ha="right", fontsize=8)
        ax.set_ylabel("honest mean accuracy")
        ax.set_title("edu: honest nodes' mean held-out accuracy (red: with Byzantine nodes)")
    return save_png(fig, out, "robustness", dpi=110)


def main() -> int:
    p = parser(__doc__, "runs/bench-robustness")
    p.add_argument(
        "--parts",
        nargs="*",
        default=["consensus", "edu-loss", "edu-byz"],
        help="consensus, edu-loss (ring-8), edu-byz (torus-16)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=80, help="consensus rounds")
    p.add_argument("--size", type=int, default=1024, help="consensus floats per component")
    p.add_argument("--attacks", nargs="*", default=["alie", "huge"], help="consensus attack modes")
    p.add_argument("--edu-rounds", type=int, default=15)
    p.add_argument("--edu-eval-every", type=int, default=5)
    p.add_argument("--edu-attack", default="huge")
    p.add_argument(
        "--edu-clean",
        nargs="*",
        default=["mean"],
        choices=AGGREGATORS,
        help="aggregators of the attack-free edu runs on torus-16 (each is one 16-daemon run)",
    )
    a = p.parse_args()
    info = {
        "python": machine()["python"],
        "machine": platform.machine(),
        "seed": a.seed,
        "consensus": {
            "topology": "torus-16",
            "rounds": a.rounds,
            "size": a.size,
            "deadline_s": 2,
            "attacks": a.attacks,
        },
        "edu": {
            "rounds": a.edu_rounds,
            "eval_every": a.edu_eval_every,
            "attack": a.edu_attack,
            "loss_churn_topology": "ring-8",
            "byzantine_topology": "torus-16",
            "deadline_s": 8,
        },
        "byzantine_nodes": list(BYZANTINE),
        "parts": a.parts,
    }
    out = setup(a.out, json.dumps(info))
    t = time.monotonic()
    rows: list[dict[str, Any]] = []

    def save() -> Path:
        wall = round(time.monotonic() - t, 1)
        return write_json(out, "robustness", {"setup": info, "rows": rows, "wall_s": wall})

    path = out / "robustness.json"
    if "consensus" in a.parts:
        rows += consensus_part(a, out)
        path = save()
    if "edu-loss" in a.parts or "edu-byz" in a.parts:
        rows += edu_part(a, out)
        path = save()
    print("\n".join(tables(rows, a.attacks)))
    png = plot(rows, out)
    print(f"wrote {path} and {png}" if png else f"wrote {path} (no PNG)")
    print(f"total wall time {time.monotonic() - t:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""A semester as stages: does gossip keep earlier tasks while later ones arrive?

The spec (default `topology/semester.toml`: two institutions and their instructors; quizzes,
then essays, then clickstream, then prosody) declares `[[stages]]`; every daemon runs them
in one process (`m3tgossip.daemon.node.StageRunner`) and keeps the checkpoint each stage ends
with. Four testbed arms per seed, each `--rounds` rounds of the same model, data and options:

  continual  the staged spec with `continual = "replay"` (the default: per-task prompts and
             heads, a local replay buffer of `replay` records per earlier task, an L2 pull to
             the previous stage's weights);
  naive      the staged spec with `continual = "naive"`: plain sequential fine-tuning on the
             stage's new tasks;
  joint      every node holds its last stage's tasks and modalities from round 0 (the spec's
             last version without stages): joint training on all stages at once;
  single     every node holds its first stage's one task for the whole run: single-task
             gossip, the reference for bytes.

Every node's model is scored from its checkpoints, in this process, on 300 unseen learners of
its institution (`unseen`, the headline: no node trained on them) and on its own held-out
records (`held_out`), for every task of its last stage: R[k][t] after stage k (k = 0..K) and
b[t] for the untrained model. Per node and overall (the mean over nodes), over the seeds
(mean and 95% Student-t interval), for `continual` and `naive`:

  acc             mean over the node's tasks of R[K][t]: accuracy after the last stage
  joint_acc       the same for the joint arm
  forgetting_pts  mean over tasks before the last stage of max_k R[k][t] - R[K][t] (k from
                  the task's stage on), in points
  bwt_pts         backward transfer: mean of R[K][t] - R[s_t][t] over those tasks (s_t the
                  stage that brought t)
  fwt_pts         forward transfer: mean over tasks after the first stage of
                  R[s_t - 1][t] - b[t] (the earlier stages' model with the task's untrained
                  head, against the untrained model)
  bytes_ratio     bytes the node sent over the run / what it sent in the single arm

A node that a stage adds (`add_nodes`, e.g. `--topology topology/semester-course.toml`) has no
model before its stage: R[k] for earlier k is the untrained model's, every task of it counts
from its stage (s_t), so a node joining at the last stage has no forgetting or backward
transfer (left out of those means), and its single-arm bytes (that arm has no stages, the node
is there from round 0) count for the share of rounds it takes part in. The joint and single
arms run every node from round 0.

Targets: acc >= 0.9 x joint_acc, forgetting_pts <= 2, bytes_ratio <= 1.5, and less
forgetting than naive. Writes DIR/continual.json; a completed run in DIR/runs is reused.

    python benchmarks/continual.py --out runs/bench-continual
    python benchmarks/continual.py --out runs/bench-continual-dp --privacy gdpr -o replay=32
    python benchmarks/continual.py --out runs/bench-course --topology topology/semester-course.toml
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import ROOT, completed_run, interval, loadavg, machine, parser, setup, write_json

from m3tgossip.daemon import checkpoint
from m3tgossip.edu.workload import EduWorkload, workload_options
from m3tgossip.harness import Summary, Testbed, TestbedSpec
from m3tgossip.harness.testbed_spec import parse_assignment
from m3tgossip.topology import Topology, load_topology

ARMS = ("continual", "naive", "joint", "single")
METHODS = ("continual", "naive")
FIGURES = ("acc", "joint_acc", "forgetting_pts", "bwt_pts", "fwt_pts", "bytes_ratio")
SETS = ("unseen", "held_out")


def arm_specs(topo: Topology, out: Path, staged: Path) -> dict[str, Path]:
    """The spec file of every arm: the staged one, its last version and its first, both
    without stages (written to OUT/specs)."""
    folder = out / "specs"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"continual": staged, "naive": staged}
    for arm, k in (("joint", len(topo.stages)), ("single", 0)):
        flat = replace(topo.version(k), stages=(), stage=0, name=f"{topo.name}-{arm}")
        path = folder / f"{arm}.toml"
        path.write_text(flat.to_toml())
        paths[arm] = path
    return paths


def run_arm(
    arm: str, spec_path: Path, seed: int, args: argparse.Namespace, folder: Path
) -> Summary | None:
    """One testbed run of an arm (reused if a completed one is in `folder`)."""
    options = dict(parse_assignment(o) for o in args.option)
    if arm == "naive":
        options["continual"] = "naive"
    settings = {"privacy.profile": args.privacy} if args.privacy else {}
    spec = TestbedSpec(
        topology=spec_path,
        out=folder,
        workload="edu",
        rounds=args.rounds,
        seed=seed,
        options=options,
        settings=settings,
        deadline=args.deadline,
        quiet=True,
    )
    summary = completed_run(folder, spec)
    if summary is not None:
        print(f"  {arm} seed {seed}: reusing the completed run in {folder}", flush=True)
        return summary
    if folder.exists():
        shutil.rmtree(folder)  # a leftover checkpoint would resume an old run
    print("  $ m3tgossip testbed " + " ".join(spec.argv()), flush=True)
    t0, before = time.monotonic(), loadavg()
    try:
        summary = Testbed(spec).run()
    except (RuntimeError, TimeoutError) as exc:
        print(f"  testbed error: {exc}", file=sys.stderr, flush=True)
        return None
    wall = time.monotonic() - t0
    code = summary.exit_code
    print(f"  {arm} seed {seed}: exit {code}, {wall:.0f} s, load {before} -> {loadavg()}")
    if code != 0:
        return None
    (folder / "bench-run.json").write_text(json.dumps({"argv": spec.argv()}))
    return summary


class Scorer:
    """A node's model of its last stage, scored from any checkpoint of it: the components a
    checkpoint lacks keep their seeded start (a task's head before its stage)."""

    def __init__(self, topo: Topology, node_id: str, seed: int, options: dict[str, Any]) -> None:
        self.workload = EduWorkload(topo.version(len(topo.stages)), node_id, seed, options)
        self.start = {c: x.copy() for c, x in self.workload.model.vectors().items()}
        self.tasks = self.workload.model.tasks

    def score(self, arrays: dict[str, np.ndarray] | None) -> dict[str, dict[str, float]]:
        """Per set (unseen, held_out), task -> accuracy of the model in `arrays` (None: the
        untrained model)."""
        for c, x in self.workload.model.vectors().items():
            saved = (arrays or {}).get(f"param/{c}")
            x[...] = saved if saved is not None else self.start[c]
        ev = self.workload.trainer.evaluate()
        return {
            "unseen": {t: m["acc"] for t, m in ev["unseen"]["tasks"].items()},
            "held_out": {t: m["acc"] for t, m in ev["tasks"].items()},
        }


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    found = checkpoint.load_file(path)
    if found is None:
        raise FileNotFoundError(f"{path}: no checkpoint (did the run finish?)")
    return found[0]


def node_figures(
    stage_acc: list[dict[str, float]],
    base: dict[str, float],
    intro: dict[str, int],
    joint: dict[str, float],
) -> dict[str, float | None]:
    """acc, joint_acc, forgetting, backward and forward transfer of one node, one set."""
    last = len(stage_acc) - 1
    tasks = sorted(intro)
    final = stage_acc[last]
    earlier = [t for t in tasks if intro[t] < last]
    later = [t for t in tasks if intro[t] > 0]

    def mean(values: list[float]) -> float | None:
        return float(np.mean(values)) if values else None

    forgetting = [
        max(stage_acc[k][t] for k in range(intro[t], last + 1)) - final[t] for t in earlier
    ]
    bwt = [final[t] - stage_acc[intro[t]][t] for t in earlier]
    fwt = [stage_acc[intro[t] - 1][t] - base[t] for t in later]
    pts = {
        k: None if v is None else 100 * v
        for k, v in (
            ("forgetting_pts", mean(forgetting)),
            ("bwt_pts", mean(bwt)),
            ("fwt_pts", mean(fwt)),
        )
    }
    return {
        "acc": mean([final[t] for t in tasks]),
        "joint_acc": mean([joint[t] for t in tasks]),
        **pts,
    }


def seed_figures(
    topo: Topology, runs: dict[str, Path], summaries: dict[str, Summary], seed: int, o: dict
) -> dict[str, Any]:
    """Per set, method and node: the figures of one seed, and the accuracy matrices."""
    last = len(topo.stages)
    final_topo = topo.version(last)
    out: dict[str, Any] = {s: {m: {} for m in METHODS} for s in SETS}
    matrices: dict[str, Any] = {m: {} for m in METHODS}
    for node in topo.nodes:
        nid = node.id
        scorer = Scorer(topo, nid, seed, o)
        joins = topo.joins_at(nid)  # a node a stage adds has no model before it
        intro = {
            t: max(joins, next(k for k in range(last + 1) if t in topo.version(k).node(nid).tasks))
            for t in final_topo.node(nid).tasks
        }
        base = scorer.score(None)
        rounds = summaries["single"].rounds
        joined = topo.stages[joins - 1].round if joins else 0
        taking_part = (rounds - joined) / rounds if rounds > joined else 1.0
        joint = scorer.score(load_arrays(runs["joint"] / "nodes" / nid / checkpoint.FILENAME))
        for method in METHODS:
            folder = runs[method] / "nodes" / nid
            stages = [
                scorer.score(load_arrays(folder / f"stage-{k}.npz") if k >= joins else None)
                for k in range(last + 1)
            ]
            matrices[method][nid] = [s["unseen"] for s in stages]
            sent = summaries[method].bytes_sent[nid]
            # the single-task arm has no stages: a node a stage adds sends there from round 0,
            # so its bytes count for the rounds the node takes part in here
            single = summaries["single"].bytes_sent[nid] * taking_part
            ratio = sent / max(single, 1)
            for s in SETS:
                fig = node_figures([x[s] for x in stages], base[s], intro, joint[s])
                out[s][method][nid] = {**fig, "bytes_ratio": ratio}
    return {"figures": out, "unseen_by_stage": matrices}


def summarise(topo: Topology, per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Per set: overall and per node, per method, each figure over the seeds."""
    ids = topo.ids()
    result: dict[str, Any] = {}
    for s in SETS:
        overall: dict[str, Any] = {}
        nodes: dict[str, Any] = {nid: {} for nid in ids}
        for method in METHODS:
            rows = [seed["figures"][s][method] for seed in per_seed]
            overall[method] = {
                f: interval(
                    [
                        float(np.mean(vals))
                        if (vals := [r[n][f] for n in ids if r[n][f] is not None])
                        else None
                        for r in rows
                    ]
                )
                for f in FIGURES
            }
            for nid in ids:
                nodes[nid][method] = {f: interval([r[nid][f] for r in rows]) for f in FIGURES}
        diffs = []
        for seed in per_seed:
            c, n = (seed["figures"][s][m] for m in METHODS)
            # a node that joins at the last stage has no earlier task to forget
            both = [i for i in ids if None not in (n[i]["forgetting_pts"], c[i]["forgetting_pts"])]
            diffs.append(
                float(np.mean([n[i]["forgetting_pts"] - c[i]["forgetting_pts"] for i in both]))
            )
        overall["naive_minus_continual_forgetting_pts"] = interval(diffs)
        result[s] = {"overall": overall, "per_node": nodes}
    return result


def verdicts(overall: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Whether each target is met (on the means over seeds)."""
    c, n = overall["continual"], overall["naive"]
    m = {f: c[f]["mean"] for f in FIGURES}
    diff = overall["naive_minus_continual_forgetting_pts"]
    return {
        "acc_vs_joint": {
            "value": m["acc"] / m["joint_acc"] if m["acc"] and m["joint_acc"] else None,
            "target": ">= 0.9",
            "met": bool(m["acc"] and m["joint_acc"] and m["acc"] >= 0.9 * m["joint_acc"]),
        },
        "forgetting_pts": {
            "value": m["forgetting_pts"],
            "target": "<= 2",
            "met": m["forgetting_pts"] is not None and m["forgetting_pts"] <= 2.0,
        },
        "bytes_ratio": {
            "value": m["bytes_ratio"],
            "target": "<= 1.5",
            "met": m["bytes_ratio"] is not None and m["bytes_ratio"] <= 1.5,
        },
        "forgetting_vs_naive": {
            "value": diff["mean"],
            "ci95": diff["ci95"],
            "naive_forgetting_pts": n["forgetting_pts"]["mean"],
            "target": "naive - continual > 0",
            "met": diff["mean"] is not None and diff["mean"] > 0,
            # the interval over seeds above zero as well, not only the mean
            "interval_above_zero": diff["mean"] is not None
            and diff["ci95"] is not None
            and diff["mean"] - diff["ci95"] > 0,
        },
    }


def show(name: str, c: dict[str, Any]) -> str:
    if c["mean"] is None:
        return f"{name} -"
    half = c["ci95"] or 0.0
    return f"{name} {c['mean']:.3f} +- {half:.3f}"


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, None)
    p.add_argument("--topology", default="topology/semester.toml", help="a spec with [[stages]]")
    p.add_argument("--rounds", type=int, default=24)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated federation seeds (>= 3)")
    p.add_argument("--privacy", default="", help="one profile for every node (default: the spec's)")
    p.add_argument(
        "-o",
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="edu workload option for every run",
    )
    p.add_argument("--deadline", type=float, default=60.0, help="round deadline (s)")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    torch.set_num_threads(1)
    staged = Path(args.topology) if Path(args.topology).is_absolute() else ROOT / args.topology
    topo = load_topology(staged)
    if not topo.stages:
        p.error(f"{staged}: the spec has no [[stages]]")
    o = workload_options(dict(parse_assignment(x) for x in args.option))
    t_start = time.monotonic()
    out = setup(
        args.out,
        f"topology {args.topology} ({len(topo.nodes)} nodes; stages "
        + ", ".join(f"{s.name}@{s.round}" for s in topo.stages)
        + f"); rounds {args.rounds}; seeds {seeds}; privacy {args.privacy or 'the spec'}; "
        f"options {args.option or 'defaults'}; replay {o['replay']}, anchor {o['anchor']}",
    )
    specs = arm_specs(topo, out, staged)
    per_seed, ok = [], True
    for seed in seeds:
        runs = {arm: out / "runs" / f"{arm}-{seed}" for arm in ARMS}
        summaries = {arm: run_arm(arm, specs[arm], seed, args, runs[arm]) for arm in ARMS}
        if any(s is None for s in summaries.values()):
            print(f"  seed {seed}: a run failed", file=sys.stderr, flush=True)
            ok = False
            continue
        figures = seed_figures(topo, runs, summaries, seed, o)  # type: ignore[arg-type]
        per_seed.append({"seed": seed, **figures})
        for method in METHODS:
            rows = figures["figures"]["unseen"][method].values()
            print(
                f"  seed {seed} {method}: "
                + ", ".join(
                    f"{f} {np.mean([r[f] for r in rows if r[f] is not None]):.3f}" for f in FIGURES
                ),
                flush=True,
            )
    if not per_seed:
        print("no seed completed", file=sys.stderr)
        return 1
    result = summarise(topo, per_seed)
    checks = verdicts(result["unseen"]["overall"])
    print("\n=== after the last stage, unseen learners, mean over nodes (95% interval over seeds)")
    for method in METHODS:
        c = result["unseen"]["overall"][method]
        print(f"  {method:<10}" + "; ".join(show(f, c[f]) for f in FIGURES))
    print("  held-out records:")
    for method in METHODS:
        c = result["held_out"]["overall"][method]
        print(f"  {method:<10}" + "; ".join(show(f, c[f]) for f in FIGURES))
    print("\n=== targets (unseen learners)")
    for name, v in checks.items():
        value = "-" if v["value"] is None else f"{v['value']:.3f}"
        if v.get("ci95") is not None:
            value += f" +- {v['ci95']:.3f}"
        line = f"  {name}: {value} ({v['target']}: {'met' if v['met'] else 'NOT met'}"
        if "interval_above_zero" in v:
            line += "; interval above 0" if v["interval_above_zero"] else "; interval includes 0"
        print(line + ")")
    wall = time.monotonic() - t_start
    print(f"\nwall time {wall:.0f} s, load average {loadavg()}")
    report = {
        "setup": {
            "topology": args.topology,
            "stages": [
                {
                    "name": s.name,
                    "round": s.round,
                    "nodes": list(s.nodes),
                    "tasks": list(s.tasks),
                    "modalities": list(s.modalities),
                }
                for s in topo.stages
            ],
            "rounds": args.rounds,
            "seeds": [s["seed"] for s in per_seed],
            "privacy": args.privacy or "the spec's",
            "deadline_s": args.deadline,
            "options": args.option,
            "workload": o,
            "single_task_reference": "every node with its first stage's task(s) for all rounds",
            **machine(),
        },
        "overall": result["unseen"]["overall"],
        "per_node": result["unseen"]["per_node"],
        "held_out": result["held_out"],
        "targets": checks,
        "unseen_by_stage": {str(s["seed"]): s["unseen_by_stage"] for s in per_seed},
        "wall_seconds": wall,
    }
    path = write_json(out, "continual", report)
    print(f"wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

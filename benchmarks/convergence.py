#!/usr/bin/env python3
"""Does collaboration pay? Gossip against local-only and pooled training, on unseen learners.

For each topology and seed, three arms on the same model, data, privacy and training budget
per node (rounds x local_steps steps of batch_size records):

  gossip   the multi-process testbed, `--workload edu` (one daemon per node, sync rounds),
           with `weighting = --weighting` (records: every record counts once in the network
           mean, as it does in the pooled arm);
  local    the same testbed with `--mode local` (the daemons train and never exchange);
  pooled   in this process, one model holding every modality and task of the topology, trained
           on the pooled train records of all nodes for rounds x local_steps steps of
           batch_size x nodes records (the same number of samples), the centralized reference
           the privacy law rules out.

Every arm runs under the one privacy profile `--privacy` (default `open`: no noise for any arm;
a DP profile makes every daemon and the pooled trainer use per-learner DP-SGD at that
profile's budget). Every node is scored on 300 unseen learners of its institution's population
(`m3tgossip.edu.data.unseen_data`: no node trained on them, no label skew) and on its own
held-out records; the pooled model is scored on the same records, restricted to each node's
tasks. Scarce nodes are the students (role "student", few labelled records).

Per topology, over the seeds (mean and 95% Student-t interval):

  scarce_gain_pts    gossip minus local-only on the scarce nodes' unseen learners (final round)
  gap_to_pooled_pts  pooled minus gossip, mean over all nodes, unseen learners
  gossip_rise_pts    last minus first evaluation under gossip, mean over nodes, unseen learners

Writes DIR/convergence.json and DIR/convergence.png (accuracy on unseen learners per round per
arm, mean over nodes with the interval over seeds); a completed run in DIR/runs is reused. Exits
non-zero if a run failed.

    python benchmarks/convergence.py --out runs/bench-convergence
    python benchmarks/convergence.py --topologies topology/ring-8.toml --seeds 0,1,2,3,4
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import (
    ROOT,
    completed_run,
    interval,
    loadavg,
    machine,
    parser,
    pyplot,
    save_png,
    setup,
    write_json,
)

from m3tgossip.daemon.metrics import read_metrics
from m3tgossip.edu.data import MODALITIES, TASKS, DataConfig, EduData, node_data, unseen_data
from m3tgossip.edu.model import DEFAULT_CHECKPOINT, LoraSpec, build_node_model
from m3tgossip.edu.model.components import component_seed
from m3tgossip.edu.train import Trainer
from m3tgossip.edu.workload import WEIGHTING, workload_options
from m3tgossip.harness import Testbed, TestbedSpec
from m3tgossip.harness.testbed_spec import parse_assignment
from m3tgossip.privacy import TrainingPlan, profile_for
from m3tgossip.privacy.training import training_noise
from m3tgossip.topology import Topology, load_topology

DEFAULT_TOPOLOGIES = ["topology/campus.toml", "topology/ring-8.toml"]
SCARCE_ROLE = "student"
ARMS = ("gossip", "local", "pooled")
TARGETS = {"scarce_gain_pts": 5.0, "gap_to_pooled_pts": 2.0, "gossip_rise_pts": 5.0}
FIGURES = (*TARGETS, "gossip_minus_local_pts")


@dataclass(frozen=True)
class PooledSpec:
    """The pooled model's entry: every modality and task of the topology (NodeSpec's protocol)."""

    id: str
    modalities: tuple[str, ...]
    tasks: tuple[str, ...]
    role: str = "institution"
    institution: str | None = None
    compute: str = "full"
    local: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- the arms


def testbed_arm(
    topo_path: Path,
    mode: str,
    seed: int,
    args: argparse.Namespace,
    folder: Path,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One testbed run; per node its evaluations (round, own held-out, unseen) in order
    (`extra`: workload options of this arm on top of `args.option`)."""
    spec = TestbedSpec(
        topology=topo_path,
        out=folder,
        workload="edu",
        rounds=args.rounds,
        seed=seed,
        mode=mode,
        options={**dict(parse_assignment(o) for o in args.option), **(extra or {})},
        settings={"privacy.profile": args.privacy},
        deadline=args.deadline,
        quiet=True,
    )
    summary = completed_run(folder, spec)
    if summary is not None:
        print(f"  {mode} seed {seed}: reusing the completed run in {folder}", flush=True)
        wall, code = summary.wall_seconds, 0
    else:
        if folder.exists():
            shutil.rmtree(folder)  # a leftover checkpoint would resume an old run
        print("  $ m3tgossip testbed " + " ".join(spec.argv()), flush=True)
        t0, before = time.monotonic(), loadavg()
        try:
            summary = Testbed(spec).run()
            code = summary.exit_code
        except (RuntimeError, TimeoutError) as exc:
            print(f"  testbed error: {exc}", file=sys.stderr, flush=True)
            code = 1
        wall = time.monotonic() - t0
        print(f"  {mode} seed {seed}: exit {code}, {wall:.0f} s, load {before} -> {loadavg()}")
        if code == 0:
            (folder / "bench-run.json").write_text(json.dumps({"argv": spec.argv()}))
    evals: dict[str, list[dict[str, Any]]] = {}
    for nid in summary.nodes if summary else []:
        rows = [r for r in read_metrics(folder / "nodes" / nid / "metrics.jsonl") if "tasks" in r]
        evals[nid] = [
            {
                "round": r["round"],
                "own": r.get("mean_acc"),
                "unseen": (r.get("unseen") or {}).get("mean_acc"),
                "unseen_tasks": {
                    t: m["acc"] for t, m in (r.get("unseen") or {}).get("tasks", {}).items()
                },
            }
            for r in rows
        ]
    return {"exit": code, "wall_s": wall, "evals": evals, "ok": code == 0 and bool(evals)}


def _restricted(ev: dict[str, Any], tasks: tuple[str, ...]) -> tuple[float | None, dict]:
    accs = {t: m["acc"] for t, m in ev["tasks"].items() if t in tasks}
    return (float(np.mean(list(accs.values()))) if accs else None), accs


def pooled_arm(topo: Topology, o: dict[str, Any], seed: int, args: argparse.Namespace) -> dict:
    """Centralized training on every node's pooled train records, scored per node at the rounds
    the daemons evaluate, under the same privacy profile (DP-SGD over the pooled learners)."""
    mods = tuple(m for m in MODALITIES if any(m in n.modalities for n in topo.nodes))
    tasks = tuple(t for t in TASKS if any(t in n.tasks for n in topo.nodes))
    config = DataConfig(records=o["records"], alpha=o["alpha"], seed=seed)
    t0 = time.monotonic()
    lora = LoraSpec(rank=o["lora_rank"], mode=o["lora_mode"], alpha=float(o["lora_alpha"]))
    model = build_node_model(
        PooledSpec("pooled", mods, tasks), seed=seed, lora=lora, checkpoint=DEFAULT_CHECKPOINT
    )
    parts = [node_data(n, config) for n in topo.nodes]
    # learner ids are per node: keep them apart in the pool, so DP-SGD clips per person
    offset = 0
    for part in parts:
        part[0].learner = np.asarray(part[0].learner) + offset
        offset += int(np.max(part[0].learner, initial=-1)) + 1
    train = EduData.concat([part[0] for part in parts])
    batch = o["batch_size"] * len(topo.nodes)
    trainer = Trainer(
        model,
        train,
        parts[0][1],
        loss_weights={t: w for t, w in o["loss_weights"].items() if t in tasks},
        lr=float(o["lr"]),
        batch_size=batch,
        seed=component_seed("batches/pooled", seed),
    )
    steps = args.rounds * o["local_steps"]
    profile = profile_for(args.privacy)
    noise = None
    if not profile.is_open:
        plan = TrainingPlan(trainer.private_sampling_rate(), o["local_steps"])
        noise = training_noise(profile, plan, args.rounds, model.vectors())
        trainer.use_private(noise, lr=float(o["dp_lr"]))
    scorers = {}
    for n, (_, own) in zip(topo.nodes, parts, strict=True):
        new = unseen_data(n, config)
        scorers[n.id] = (n.tasks, Trainer(model, own, own), Trainer(model, new, new))
    eval_rounds = [0] + [r for r in range(args.rounds) if r and (r + 1) % o["eval_every"] == 0]
    if args.rounds - 1 not in eval_rounds:
        eval_rounds.append(args.rounds - 1)
    evals: dict[str, list[dict[str, Any]]] = {n.id: [] for n in topo.nodes}
    done = 0
    for r in eval_rounds:
        k = (r + 1) * o["local_steps"] - done
        trainer.train_steps(k)
        done += k
        for nid, (node_tasks, own, new) in scorers.items():
            own_acc, _ = _restricted(own.evaluate(), node_tasks)
            new_acc, new_tasks = _restricted(new.evaluate(), node_tasks)
            evals[nid].append(
                {"round": r, "own": own_acc, "unseen": new_acc, "unseen_tasks": new_tasks}
            )
    return {
        "exit": 0,
        "ok": True,
        "wall_s": time.monotonic() - t0,
        "evals": evals,
        "train_records": len(train),
        "batch_size": batch,
        "steps": steps,
        "noise_multiplier": noise.noise_multiplier if noise is not None else 0.0,
    }


def lora_check(seed: int, n_models: int = 3, steps: int = 10) -> dict[str, Any]:
    """Train n models of one federation differently, average their shared vectors in place,
    and compare each model's delta-W after averaging with the mean of the delta-Ws before."""
    out = {}
    for mode in ("frozen_a", "separate"):
        lora = LoraSpec(rank=4, mode=mode, alpha=8.0)
        models, deltas = [], []
        for i in range(n_models):
            spec = PooledSpec(
                f"lora-{i}",
                ("signal", "clickstream", "tabular"),
                ("at_risk", "stress"),
                role="instructor",
                institution=f"inst-{i}",
            )
            model = build_node_model(spec, seed=seed, lora=lora, checkpoint=DEFAULT_CHECKPOINT)
            train, test = node_data(spec, DataConfig(records=120, seed=seed))
            Trainer(model, train, test, lr=1e-2, seed=i).train_steps(steps)
            models.append(model)
            deltas.append({k: v.detach().clone() for k, v in model.delta_weights().items()})
        target = {k: sum(d[k] for d in deltas) / n_models for k in deltas[0]}
        vecs = [m.shared_vectors() for m in models]
        avg = {c: sum(v[c] for v in vecs) / n_models for c in vecs[0]}
        spread = max(
            float(np.linalg.norm(vecs[i][c] - avg[c]) / max(np.linalg.norm(avg[c]), 1e-30))
            for i in range(n_models)
            for c in avg
        )
        for m in models:
            m.load_shared_vectors(avg)
        errors = []
        for m in models:
            got = m.delta_weights()
            num = sum(float((got[k] - target[k]).norm() ** 2) for k in target)
            den = sum(float(target[k].norm() ** 2) for k in target)
            errors.append((num / den) ** 0.5)
        out[mode] = {
            "relative_error": max(errors),
            "per_model": errors,
            "layers": len(target),
            "max_vector_spread_before_mixing": spread,
        }
    return out


# ----------------------------------------------------------------------------- the figures


def final(run: dict[str, Any], nid: str, key: str = "unseen") -> float | None:
    evals = run["evals"].get(nid) or []
    return evals[-1][key] if evals else None


def per_seed_figures(topo: Topology, runs: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """The three headline differences of one seed, in accuracy points."""
    ids = [n.id for n in topo.nodes]
    scarce = [n.id for n in topo.nodes if n.role == SCARCE_ROLE]

    def avg(values: list[float | None]) -> float | None:
        vals = [v for v in values if v is not None]
        return float(np.mean(vals)) if vals else None

    def diff(a: str, b: str, which: list[str]) -> float | None:
        d = avg(
            [
                final(runs[a], i) - final(runs[b], i)  # type: ignore[operator]
                for i in which
                if final(runs[a], i) is not None and final(runs[b], i) is not None
            ]
        )
        return None if d is None else 100 * d

    rises = [
        e[-1]["unseen"] - e[0]["unseen"]
        for e in (runs["gossip"]["evals"].get(i) or [] for i in ids)
        if len(e) >= 2 and e[0]["unseen"] is not None and e[-1]["unseen"] is not None
    ]
    return {
        "scarce_gain_pts": diff("gossip", "local", scarce),
        "gap_to_pooled_pts": diff("pooled", "gossip", ids),
        "gossip_rise_pts": 100 * float(np.mean(rises)) if rises else None,
        "gossip_minus_local_pts": diff("gossip", "local", ids),
    }


def arm_summary(topo: Topology, seeds_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arm over seeds: final unseen and own accuracy (all nodes, scarce), per node, curve."""
    ids = [n.id for n in topo.nodes]
    scarce = [n.id for n in topo.nodes if n.role == SCARCE_ROLE]
    out: dict[str, Any] = {}
    for arm in ARMS:
        runs = [s[arm] for s in seeds_runs]

        def over(which: list[str], key: str, runs: list[dict[str, Any]] = runs) -> dict:
            vals = []
            for run in runs:
                v = [final(run, i, key) for i in which]
                v = [x for x in v if x is not None]
                vals.append(float(np.mean(v)) if v else None)
            return interval(vals)

        rounds = sorted({e["round"] for run in runs for ev in run["evals"].values() for e in ev})
        curve = []
        for r in rounds:
            vals = []
            for run in runs:
                v = [e["unseen"] for ev in run["evals"].values() for e in ev if e["round"] == r]
                v = [x for x in v if x is not None]
                vals.append(float(np.mean(v)) if v else None)
            curve.append({"round": r, **interval(vals)})
        out[arm] = {
            "unseen_acc": over(ids, "unseen"),
            "unseen_acc_scarce": over(scarce, "unseen"),
            "own_acc": over(ids, "own"),
            "per_node_unseen": {i: interval([final(run, i) for run in runs]) for i in ids},
            "curve_unseen": curve,
            "wall_s": [run["wall_s"] for run in runs],
        }
    return out


def verdict(name: str, key: str, value: dict[str, Any]) -> str:
    target = TARGETS[key]
    m, ci = value["mean"], value["ci95"]
    if m is None:
        return f"{name} {key}: no value (NOT met)"
    lo, hi = ci if ci else (m, m)
    if key == "gap_to_pooled_pts":
        ok = m <= target
        want = f"mean <= {target:g}"
    elif key == "scarce_gain_pts":
        ok = m >= target and lo > 0
        want = f"mean >= +{target:g} and ci95[0] > 0"
    else:
        ok = m >= target
        want = f"mean >= +{target:g}"
    return f"{name} {key}: {m:+.1f} [{lo:+.1f}, {hi:+.1f}] ({want}: {'met' if ok else 'NOT met'})"


def with_bounds(values: list[float | None]) -> dict[str, Any]:
    """`interval` with ci95 as [lo, hi] (the JSON's form)."""
    c = interval(values)
    half = c["ci95"]
    if c["mean"] is not None:
        c["ci95"] = [c["mean"] - half, c["mean"] + half] if half is not None else None
    return c


def plot(results: dict[str, Any], out: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    names = [n for n, r in results.items() if "arms" in r]
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.2), squeeze=False)
    styles = {"gossip": ("-o", "C0"), "local": ("-s", "C1"), "pooled": ("--^", "k")}
    for ax, name in zip(axes[0], names, strict=True):
        for arm, (style, color) in styles.items():
            curve = [c for c in results[name]["arms"][arm]["curve_unseen"] if c["mean"] is not None]
            x = [c["round"] + 1 for c in curve]
            y = np.array([100 * c["mean"] for c in curve])
            h = np.array([100 * (c["ci95"] or 0.0) for c in curve])
            ax.plot(x, y, style, color=color, label={"local": "local-only"}.get(arm, arm))
            ax.fill_between(x, y - h, y + h, color=color, alpha=0.15)
        seeds = len(results[name]["seeds"])
        ax.set_title(f"{name}: {seeds} seeds, mean and 95% interval")
        ax.set_xlabel("round")
        ax.set_ylabel("accuracy on unseen learners (%), mean over nodes")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_png(fig, out, "convergence", dpi=110)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, "runs/bench-convergence")
    p.add_argument("--topologies", nargs="+", default=DEFAULT_TOPOLOGIES)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated federation seeds (>= 3)")
    p.add_argument("--privacy", default="open", help="the one profile every arm runs under")
    p.add_argument(
        "-o",
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="edu workload option for every run (and the pooled reference)",
    )
    p.add_argument(
        "--deadline",
        type=float,
        default=60.0,
        help="round deadline (s): long, so a loaded machine does not drop neighbours' updates",
    )
    p.add_argument(
        "--weighting",
        default="records",
        choices=WEIGHTING,
        help="the gossip arm's `weighting` (records: each record counts once in the network "
        "mean, as in the pooled arm; local-only runs average with nobody)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads of the pooled arm")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    torch.set_num_threads(args.threads)
    profile_for(args.privacy)  # an unknown profile stops here, before any run
    o = workload_options(dict(parse_assignment(x) for x in args.option))
    t_start = time.monotonic()
    out = setup(
        args.out,
        f"topologies {', '.join(args.topologies)}; rounds {args.rounds}; seeds {seeds}; "
        f"privacy {args.privacy} for every arm; options {args.option or 'defaults'}; "
        f"gossip weighting {args.weighting}; "
        f"torch {torch.__version__}",
    )
    print(
        f"  workload: local_steps {o['local_steps']}, batch_size {o['batch_size']}, lr {o['lr']}, "
        f"records {o['records']}, alpha {o['alpha']}, lora {o['lora_mode']} rank "
        f"{o['lora_rank']}, eval_every {o['eval_every']}",
        flush=True,
    )
    results: dict[str, Any] = {}
    all_ok = True
    for tp in args.topologies:
        topo_path = Path(tp) if Path(tp).is_absolute() else ROOT / tp
        topo = load_topology(topo_path)
        scarce = [n.id for n in topo.nodes if n.role == SCARCE_ROLE]
        print(f"\n--- {topo.name}: {len(topo.nodes)} nodes, scarce {scarce}", flush=True)
        seeds_runs, figures = [], []
        for seed in seeds:
            runs = {
                "gossip": testbed_arm(
                    topo_path,
                    "sync",
                    seed,
                    args,
                    out / "runs" / topo.name / f"gossip-{seed}",
                    # the default is left off the command line, so earlier runs are reused
                    {"weighting": args.weighting} if args.weighting != "uniform" else {},
                ),
                "local": testbed_arm(
                    topo_path, "local", seed, args, out / "runs" / topo.name / f"local-{seed}"
                ),
            }
            if not all(r["ok"] for r in runs.values()):
                print(f"  {topo.name} seed {seed}: a run failed", file=sys.stderr, flush=True)
                all_ok = False
                continue
            runs["pooled"] = pooled_arm(topo, o, seed, args)
            fig = per_seed_figures(topo, runs)
            print(
                f"  seed {seed}: "
                + ", ".join(f"{k} {v:+.1f}" for k, v in fig.items() if v is not None),
                flush=True,
            )
            seeds_runs.append(runs)
            figures.append(fig)
        if not seeds_runs:
            results[topo.name] = {"failed": True}
            continue
        results[topo.name] = {
            "seeds": seeds[: len(seeds_runs)],
            "nodes": len(topo.nodes),
            "scarce_nodes": scarce,
            "arms": arm_summary(topo, seeds_runs),
            **{
                k: with_bounds([f[k] for f in figures])
                for k in (*TARGETS, "gossip_minus_local_pts")
            },
        }
    print("\n=== accuracy on unseen learners, final round (mean over seeds, 95% interval)")
    print(f"{'topology':<12}{'arm':<8}{'all nodes':>18}{'scarce':>18}{'own held-out':>18}")
    for name, r in results.items():
        for arm in ARMS if "arms" in r else ():
            a = r["arms"][arm]
            cells = "".join(
                f"{100 * c['mean']:>11.1f} +-{100 * (c['ci95'] or 0):4.1f}"
                if c["mean"] is not None
                else f"{'-':>18}"
                for c in (a["unseen_acc"], a["unseen_acc_scarce"], a["own_acc"])
            )
            print(f"{name:<12}{arm:<8}{cells}")
    print("\n=== targets")
    for name, r in results.items():
        for key in TARGETS if "arms" in r else ():
            print("  " + verdict(name, key, r[key]))
    print("\n=== exact LoRA averaging (3 models, 10 steps each on different records)")
    lora = lora_check(seeds[0])
    for mode, r in lora.items():
        print(
            f"  {mode:<9} relative error of delta-W after averaging vs mean of delta-Ws: "
            f"{r['relative_error']:.2e} ({r['layers']} adapted layers)"
        )
    wall = time.monotonic() - t_start
    print(f"\nwall time {wall:.0f} s, load average {loadavg()}")
    info = {
        "topologies": args.topologies,
        "rounds": args.rounds,
        "seeds": seeds,
        "privacy": args.privacy,
        "deadline_s": args.deadline,
        "options": args.option,
        "gossip_weighting": args.weighting,
        "workload": o,
        "checkpoint": str(DEFAULT_CHECKPOINT.name),
        "load_average_end": loadavg(),
        **machine(),
    }
    report = {"setup": info, "topologies": results, "lora": lora, "wall_seconds": wall}
    path = write_json(out, "convergence", report)
    png = plot(results, out)
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    return 0 if all_ok and not any(r.get("failed") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

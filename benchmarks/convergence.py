#!/usr/bin/env python3
"""Gossip learning vs local-only vs centralized training of the M3T model on the edu workload.

For each topology, on the same model, data and training budget per node (rounds x local_steps
steps of batch_size records):

  (a) gossip: the multi-process testbed, `--workload edu`, sync mode (one daemon per node);
  (b) local-only: the same testbed with `--mode local` (daemons train, never exchange);
  (c) centralized: in this process, one model holding every modality and task of the topology,
      trained on the pooled train records of all nodes for rounds x local_steps steps at
      batch_size x nodes records per step (the same number of samples), then evaluated on each
      node's own held-out records, the same records (a) and (b) are scored on.

Reports per-node per-task final accuracy, gaps between the three, the scarce nodes (role
"student") separately, worst-group gaps, accuracy against rounds and against bytes sent, bytes
per round per node against the whole model size, and an exact-LoRA check (frozen_a vs separate:
does averaging the shared vectors average the effective weight changes?). Writes
DIR/convergence.json and DIR/convergence.png; exits non-zero if a run failed.

    python benchmarks/convergence.py --out runs/bench-convergence
    python benchmarks/convergence.py --topologies topology/ring-8.toml --rounds 60 -o alpha=0.1
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import ROOT, each_run, machine, parser, pyplot, save_png, setup, write_json

from m3tgossip.daemon.metrics import read_metrics
from m3tgossip.edu.data import MODALITIES, TASKS, DataConfig, node_data, pooled_data
from m3tgossip.edu.model import DEFAULT_CHECKPOINT, LoraSpec, build_node_model
from m3tgossip.edu.model.components import component_seed
from m3tgossip.edu.train import Trainer
from m3tgossip.edu.workload import _options as edu_options
from m3tgossip.harness import Summary, Testbed, TestbedSpec
from m3tgossip.harness.testbed_spec import parse_assignment
from m3tgossip.topology import Topology, load_topology

DEFAULT_TOPOLOGIES = ["topology/campus.toml", "topology/ring-8.toml"]
SCARCE_ROLE = "student"


@dataclass(frozen=True)
class Spec:
    """A node entry with what the data and the model read (fits NodeSpec's protocol)."""

    id: str
    role: str
    institution: str | None
    modalities: tuple[str, ...]
    tasks: tuple[str, ...]
    compute: str = "full"
    local: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- helpers


def mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def pts(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}"


def acc(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def lora_spec(o: dict[str, Any]) -> LoraSpec:
    return LoraSpec(rank=o["lora_rank"], mode=o["lora_mode"], alpha=float(o["lora_alpha"]))


def run_testbed(topo_path: Path, mode: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One testbed run (fresh folder: a leftover checkpoint would resume an old run)."""
    if out.exists():
        shutil.rmtree(out)
    spec = TestbedSpec(
        topology=topo_path,
        out=out,
        workload="edu",
        rounds=args.rounds,
        seed=args.seed,
        mode=mode,
        options=dict(parse_assignment(o) for o in args.option),
        quiet=True,
    )
    print("  $ m3tgossip testbed " + " ".join(spec.argv()), flush=True)
    t = time.monotonic()
    summary: Summary | None
    try:
        summary = Testbed(spec).run()
        code = summary.exit_code
    except (RuntimeError, TimeoutError) as exc:
        print(f"  testbed error: {exc}", file=sys.stderr, flush=True)
        summary, code = None, 1
    wall = time.monotonic() - t
    last_eval = {}
    for nid in summary.nodes if summary else []:
        evals = [r for r in read_metrics(out / "nodes" / nid / "metrics.jsonl") if "tasks" in r]
        last_eval[nid] = evals[-1] if evals else {}
    ok = code == 0 and summary is not None
    print(f"  {mode}: exit {code}, wall {wall:.1f} s", flush=True)
    return {"summary": summary, "last_eval": last_eval, "exit": code, "ok": ok, "wall": wall}


def node_view(run: dict[str, Any], nid: str) -> dict[str, Any]:
    """Final per-task accuracy, task mean and worst-group gap of one node in a testbed run."""
    ev = run["last_eval"].get(nid, {})
    tasks = {t: m["acc"] for t, m in ev.get("tasks", {}).items()}
    return {
        "tasks": tasks,
        "mean": mean(list(tasks.values())),
        "worst_group_gap": ev.get("worst_group_gap"),
    }


def centralized(topo: Topology, o: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One model for the union of modalities and tasks, trained on the pooled records."""
    mods = tuple(m for m in MODALITIES if any(m in n.modalities for n in topo.nodes))
    tasks = tuple(t for t in TASKS if any(t in n.tasks for n in topo.nodes))
    spec = Spec("pooled", "institution", None, mods, tasks)
    cfg = DataConfig(records=o["records"], alpha=o["alpha"], seed=args.seed)
    t0 = time.monotonic()
    model = build_node_model(spec, seed=args.seed, lora=lora_spec(o), checkpoint=DEFAULT_CHECKPOINT)
    train, test = pooled_data(topo, cfg)
    steps = args.rounds * o["local_steps"]
    batch = o["batch_size"] * len(topo.nodes)
    trainer = Trainer(
        model,
        train,
        test,
        loss_weights={t: w for t, w in o["loss_weights"].items() if t in tasks},
        lr=float(o["lr"]),
        batch_size=batch,
        seed=component_seed("batches/pooled", args.seed),
    )
    curve = []
    every = o["local_steps"] * o["eval_every"]
    done = 0
    while done < steps:
        k = min(every, steps - done)
        trainer.train_steps(k)
        done += k
        curve.append(
            {
                "round": done // o["local_steps"] - 1,
                "pooled_mean_acc": trainer.evaluate()["mean_acc"],
            }
        )
    per_node = {}
    for node in topo.nodes:
        _, node_test = node_data(node, cfg)
        ev = Trainer(model, node_test, node_test).evaluate()  # the node's own held-out records
        tasks_acc = {t: m["acc"] for t, m in ev["tasks"].items()}
        per_node[node.id] = {
            "tasks": tasks_acc,
            "mean": mean(list(tasks_acc.values())),
            "worst_group_gap": ev["worst_group_gap"],
        }
    return {
        "modalities": list(mods),
        "tasks": list(tasks),
        "steps": steps,
        "batch_size": batch,
        "train_records": len(train),
        "per_node": per_node,
        "curve": curve,
        "wall": time.monotonic() - t0,
    }


def model_sizes(topo: Topology, o: dict[str, Any], seed: int) -> dict[str, dict[str, int]]:
    """Whole model (every component incl. frozen MiniLM) and shared part, in float32 bytes."""
    cache: dict[tuple, dict[str, int]] = {}
    out = {}
    for node in topo.nodes:
        key = (node.modalities, node.tasks, node.compute, node.local)
        if key not in cache:
            m = build_node_model(node, seed=seed, lora=lora_spec(o), checkpoint=DEFAULT_CHECKPOINT)
            comps = m.components()
            cache[key] = {
                "whole_bytes": 4 * sum(c.params for c in comps),
                "trainable_bytes": 4 * sum(c.trainable for c in comps),
                "shared_bytes": 4 * sum(v.size for v in m.shared_vectors().values()),
            }
        out[node.id] = cache[key]
    return out


def curves(run: dict[str, Any]) -> dict[str, list[float]]:
    """Mean over nodes of mean accuracy at each evaluation round; cumulative MB sent per node."""
    s: Summary = run["summary"]
    per_round_bytes = [b or 0.0 for b in s.bytes_per_round_per_node]
    cum = np.cumsum(per_round_bytes) if per_round_bytes else np.zeros(0)
    by_round: dict[int, list[float]] = {}
    for v in (s.per_node or {}).values():
        for r, a in zip(v["rounds"], v["mean_acc"], strict=True):
            if a is not None:
                by_round.setdefault(r, []).append(a)
    rounds = sorted(by_round)
    return {
        "rounds": rounds,
        "mean_acc": [float(np.mean(by_round[r])) for r in rounds],
        "mb_sent_per_node": [float(cum[r]) / 1e6 if r < len(cum) else None for r in rounds],
    }


# ----------------------------------------------------------------------------- exact LoRA


def lora_check(seed: int, n_models: int = 3, steps: int = 10) -> dict[str, Any]:
    """Train n models of one federation differently, average their shared vectors in place,
    and compare each model's delta-W after averaging with the mean of the delta-Ws before."""
    out = {}
    for mode in ("frozen_a", "separate"):
        lora = LoraSpec(rank=4, mode=mode, alpha=8.0)
        models, deltas = [], []
        for i in range(n_models):
            spec = Spec(
                f"lora-{i}",
                "instructor",
                f"inst-{i}",
                ("signal", "clickstream", "tabular"),
                ("at_risk", "stress"),
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


# ----------------------------------------------------------------------------- report


def analyse(topo: Topology, gossip: dict, local: dict, central: dict, sizes: dict, o: dict) -> dict:
    rows = {}
    for node in topo.nodes:
        g, lo, c = (
            node_view(gossip, node.id),
            node_view(local, node.id),
            central["per_node"][node.id],
        )
        rows[node.id] = {"role": node.role, "gossip": g, "local": lo, "central": c, "records": None}
    ids = [n.id for n in topo.nodes]
    scarce = [n.id for n in topo.nodes if n.role == SCARCE_ROLE]

    def avg(kind: str, which: list[str], field: str = "mean") -> float | None:
        return mean([rows[i][kind][field] for i in which])

    def diff(a: str, b: str, which: list[str]) -> float | None:
        d = [
            rows[i][a]["mean"] - rows[i][b]["mean"]
            for i in which
            if rows[i][a]["mean"] is not None and rows[i][b]["mean"] is not None
        ]
        return mean(d)

    g_sum: Summary = gossip["summary"]
    bpr = [b for b in g_sum.bytes_per_round_per_node if b is not None]
    bpr_local = [b for b in local["summary"].bytes_per_round_per_node if b is not None]
    whole = mean([sizes[i]["whole_bytes"] for i in ids])
    per_round = mean(bpr)
    return {
        "rows": rows,
        "scarce_nodes": scarce,
        "mean": {k: avg(k, ids) for k in ("gossip", "local", "central")},
        "mean_scarce": {k: avg(k, scarce) for k in ("gossip", "local", "central")},
        "gossip_minus_central": diff("gossip", "central", ids),
        "gossip_minus_local": diff("gossip", "local", ids),
        "gossip_minus_local_scarce": diff("gossip", "local", scarce),
        "gossip_minus_central_scarce": diff("gossip", "central", scarce),
        "worst_group_gap": {
            k: avg(k, ids, "worst_group_gap") for k in ("gossip", "local", "central")
        },
        "bytes_per_round_per_node": per_round,
        "bytes_per_round_per_node_local": mean(bpr_local),
        "whole_model_bytes_mean": whole,
        "shared_bytes_mean": mean([sizes[i]["shared_bytes"] for i in ids]),
        "model_over_round_bytes": whole / per_round if whole and per_round else None,
        "per_node_bytes": {
            i: {**sizes[i], "sent_per_round": g_sum.bytes_sent[i] / g_sum.rounds}
            for i in ids
            if i in g_sum.bytes_sent
        },
        "curves": {
            "gossip": curves(gossip),
            "local": curves(local),
            "central_level": avg("central", ids),
            "central_pooled": central["curve"],
        },
    }


def print_report(name: str, a: dict, tasks: list[str]) -> None:
    short = {t: t[:10] for t in tasks}
    print(
        f"\n=== {name}: final held-out accuracy per node and task "
        "(gossip / local-only / centralized)"
    )
    head = (
        f"{'node':<11}{'role':<12}"
        + "".join(f"{short[t]:>20}" for t in tasks)
        + f"{'mean over tasks':>22}"
    )
    print(head)
    for nid, r in a["rows"].items():
        cells = ""
        for t in tasks:
            vals = [r[k]["tasks"].get(t) for k in ("gossip", "local", "central")]
            cells += (
                f"{'-':>20}"
                if all(v is None for v in vals)
                else f"{'/'.join(acc(v) for v in vals):>20}"
            )
        means = "/".join(acc(r[k]["mean"]) for k in ("gossip", "local", "central"))
        print(f"{nid:<11}{r['role']:<12}{cells}{means:>22}")
    m, ms = a["mean"], a["mean_scarce"]
    print(f"\n{'':<34}{'gossip':>10}{'local':>10}{'central':>10}")
    w = a["worst_group_gap"]
    for label, v in (
        ("mean over nodes (task means)", m),
        (f"mean over scarce (students, {len(a['scarce_nodes'])})", ms),
        ("worst-group gap (mean over nodes)", w),
    ):
        print(f"{label:<34}{acc(v['gossip']):>10}{acc(v['local']):>10}{acc(v['central']):>10}")
    print(
        f"gossip - centralized: {pts(a['gossip_minus_central'])} points (all nodes), "
        f"{pts(a['gossip_minus_central_scarce'])} (scarce)"
    )
    print(
        f"gossip - local-only:  {pts(a['gossip_minus_local'])} points (all nodes), "
        f"{pts(a['gossip_minus_local_scarce'])} (scarce)"
    )
    print("\naccuracy (mean over nodes) against rounds and cumulative MB sent per node")
    g, lo = a["curves"]["gossip"], a["curves"]["local"]
    print(f"{'round':>6}{'gossip':>9}{'MB':>9}{'local':>9}{'MB':>9}")
    lo_by = dict(
        zip(lo["rounds"], zip(lo["mean_acc"], lo["mb_sent_per_node"], strict=True), strict=True)
    )
    for r, ga, gm in zip(g["rounds"], g["mean_acc"], g["mb_sent_per_node"], strict=True):
        la, lm = lo_by.get(r, (None, None))
        print(f"{r + 1:>6}{acc(ga):>9}{gm or 0:>9.2f}{acc(la):>9}{lm or 0:>9.3f}")
    print(f"centralized level (mean over nodes): {acc(a['curves']['central_level'])}")
    print(
        "\nbytes: per round per node vs whole model (all components incl. frozen MiniLM, float32)"
    )
    print(f"{'node':<11}{'sent/round kB':>14}{'shared kB':>11}{'whole MB':>10}{'whole/round':>13}")
    for nid, b in a["per_node_bytes"].items():
        ratio = b["whole_bytes"] / b["sent_per_round"] if b["sent_per_round"] else float("inf")
        print(
            f"{nid:<11}{b['sent_per_round'] / 1e3:>14.1f}{b['shared_bytes'] / 1e3:>11.1f}"
            f"{b['whole_bytes'] / 1e6:>10.2f}{ratio:>13.1f}"
        )
    bpr = a["bytes_per_round_per_node"]
    print(
        f"mean: {(bpr or 0) / 1e3:.1f} kB per round per node (local-only "
        f"{(a['bytes_per_round_per_node_local'] or 0) / 1e3:.2f} kB) vs whole model "
        f"{a['whole_model_bytes_mean'] / 1e6:.2f} MB: "
        f"ratio {a['model_over_round_bytes'] or float('nan'):.1f}x"
    )


def plot(results: list[dict], out: Path) -> Path | None:
    """OUT/convergence.png (None if matplotlib is not installed)."""
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(len(results), 2, figsize=(11, 4 * len(results)), squeeze=False)
    for row, res in zip(axes, results, strict=True):
        c = res["analysis"]["curves"]
        for kind, style in (("gossip", "-o"), ("local", "-s")):
            cv = c[kind]
            rounds = [r + 1 for r in cv["rounds"]]
            row[0].plot(
                rounds, cv["mean_acc"], style, label=kind if kind == "gossip" else "local-only"
            )
            row[1].plot(
                [m or 0 for m in cv["mb_sent_per_node"]],
                cv["mean_acc"],
                style,
                label=kind if kind == "gossip" else "local-only",
            )
        for ax in row:
            if c["central_level"] is not None:
                ax.axhline(
                    c["central_level"], color="k", ls="--", lw=1, label="centralized (final)"
                )
            ax.set_ylabel("held-out accuracy (mean over tasks, nodes)")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        row[0].set_xlabel("round")
        row[1].set_xlabel("cumulative MB sent per node")
        row[0].set_title(f"{res['topology']}: accuracy vs rounds")
        row[1].set_title(f"{res['topology']}: accuracy vs bytes sent")
    return save_png(fig, out, "convergence", dpi=110)


# ----------------------------------------------------------------------------- main


def main() -> int:
    p = parser(__doc__, "runs/bench-convergence")
    p.add_argument("--topologies", nargs="+", default=DEFAULT_TOPOLOGIES)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "-o",
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="edu workload option for every run (and the centralized reference)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads in this process")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    o = edu_options(dict(parse_assignment(x) for x in args.option))
    t_start = time.monotonic()
    out = setup(
        args.out,
        f"topologies {', '.join(args.topologies)}; rounds {args.rounds}; seed {args.seed}; "
        f"options {args.option or 'defaults'}; torch {torch.__version__}",
    )
    print(
        f"  workload: local_steps {o['local_steps']}, batch_size {o['batch_size']}, "
        f"lr {o['lr']}, records {o['records']}, alpha {o['alpha']}, lora {o['lora_mode']} "
        f"rank {o['lora_rank']}, eval_every {o['eval_every']}",
        flush=True,
    )
    results, all_ok = [], True
    for tp in each_run(args.topologies, "topologies"):
        topo_path = (ROOT / tp) if not Path(tp).is_absolute() else Path(tp)
        topo = load_topology(topo_path)
        print(f"\n--- {topo.name}: {len(topo.nodes)} nodes, {len(topo.edges)} edges", flush=True)
        gossip = run_testbed(topo_path, "sync", args, out / topo.name / "gossip")
        local = run_testbed(topo_path, "local", args, out / topo.name / "local")
        all_ok &= gossip["ok"] and local["ok"]
        if not (gossip["ok"] and local["ok"]):
            print(f"  {topo.name}: a run failed; see {out / topo.name}", file=sys.stderr)
            results.append({"topology": topo.name, "failed": True})
            continue
        central = centralized(topo, o, args)
        print(
            f"  centralized: {central['steps']} steps x {central['batch_size']} records on "
            f"{central['train_records']} pooled train records, wall {central['wall']:.1f} s",
            flush=True,
        )
        sizes = model_sizes(topo, o, args.seed)
        a = analyse(topo, gossip, local, central, sizes, o)
        tasks = [t for t in TASKS if any(t in n.tasks for n in topo.nodes)]
        print_report(topo.name, a, tasks)
        results.append(
            {
                "topology": topo.name,
                "nodes": len(topo.nodes),
                "edges": len(topo.edges),
                "wall": {
                    "gossip": gossip["wall"],
                    "local": local["wall"],
                    "central": central["wall"],
                },
                "exit": {"gossip": gossip["exit"], "local": local["exit"]},
                "centralized": {k: v for k, v in central.items() if k != "per_node"},
                "analysis": a,
            }
        )
    print(
        "\n=== exact LoRA averaging (3 models, same federation seed, 10 steps each on different "
        "records)"
    )
    lora = lora_check(args.seed)
    for mode, r in lora.items():
        print(
            f"  {mode:<9} relative error of delta-W after averaging vs mean of delta-Ws: "
            f"{r['relative_error']:.2e}  ({r['layers']} adapted layers; shared vectors differed by "
            f"up to {r['max_vector_spread_before_mixing']:.2e} relative before mixing)"
        )
    wall = time.monotonic() - t_start
    ok_results = [r for r in results if not r.get("failed")]
    print("\n=== targets")
    for r in ok_results:
        a = r["analysis"]
        gc, gl = a["gossip_minus_central"], a["gossip_minus_local_scarce"]
        ratio = a["model_over_round_bytes"]
        print(
            f"  {r['topology']}: gossip vs centralized {pts(gc)} points (target >= -2.0: "
            f"{'met' if gc is not None and gc >= -0.02 else 'NOT met'}); "
            f"gossip vs local-only on scarce nodes {pts(gl)} points (target >= +5.0: "
            f"{'met' if gl is not None and gl >= 0.05 else 'NOT met'}); "
            f"whole model / bytes per round {ratio:.1f}x (target >= 50: "
            f"{'met' if ratio and ratio >= 50 else 'NOT met'})"
        )
    fa, sep = lora["frozen_a"]["relative_error"], lora["separate"]["relative_error"]
    print(
        f"  exact LoRA: frozen_a {fa:.2e} (target <= 1e-5: {'met' if fa <= 1e-5 else 'NOT met'}), "
        f"separate {sep:.2e} (cross-term error {'shown' if sep > 1e-3 else 'NOT shown'})"
    )
    print(f"\nwall time {wall:.1f} s")
    info = {
        "topologies": args.topologies,
        "rounds": args.rounds,
        "seed": args.seed,
        "options": args.option,
        "workload": o,
        **machine(),
    }
    path = write_json(
        out,
        "convergence",
        {"setup": info, "results": results, "lora": lora, "wall_seconds": wall},
        default=str,
    )
    png = plot(ok_results, out) if ok_results else None
    print(f"wrote {path} and {png}" if png else f"wrote {path}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Utility against privacy on a topology with mixed privacy profiles, node-level epsilon against
its budget, and membership inference, over several seeds.

Testbed runs (multi-process, `--workload edu`, lockstep rounds, same rounds and options), each
for every seed of `--seeds`:

  profiles   the topology's profiles as written (campus: uni-a gdpr, uni-b ferpa, college-c
             open): every private node trains with per-learner DP-SGD calibrated to its one
             budget over the planned rounds, and each node is held to its own regulation;
  strictest  every node on the strictest profile present (gdpr): a rewritten topology copy;
  open       every node open (no DP): the reference;
  sweep-E    (optional, `--sweep E1,E2`, first seed) the strict nodes on a custom profile over
             the strict base with budget epsilon E: a utility-vs-epsilon curve for them.

Utility is the held-out accuracy at a node's last evaluation (mean over its tasks), averaged
over the nodes, then over the seeds with a 95% confidence interval (Student t over seeds);
"learns" is the mean over nodes of (last minus first evaluation). Both are also reported on
the unseen learners of each node's institution (`unseen` in the metrics: 300 learners no node
trained on, without the node's label skew), the better test where a student holds few records.
Every private node's node-level epsilon comes from its last metrics record
(`privacy.node_epsilon`, everything it released, all components composed) and is checked
against its profile's budget at its delta.
Regulation-aware against strictest-for-all is the strict nodes' accuracy under `profiles`
(their neighbours on their own, more lenient, profiles) against under `strictest`.

Membership inference (loss threshold, Yeom et al.) on every node: its final checkpoint of a
run is loaded into the node's model (`EduWorkload.load_state`) and the per-record loss on its
training records (members) is compared with non-members: 500 learners drawn as the node's own
are, with its label skew and from the same digit images, whom it never trained on
(`m3tgossip.edu.data.nonmember_data`). The node's held-out records draw their digits from
images no training record uses, so a gap in loss against them can come from the images rather
than the training; their AUC is kept as `auc_vs_test`. Reported: AUC of minus the loss, its
standard error and the membership advantage, for the `profiles` and `open` runs of every seed;
and the same attack on the node's records under each neighbour's final model, which holds what
the neighbour received from the node mixed with the rest (`neighbours`, and the highest as
`neighbour_auc_max`). The targets are judged on each node's mean over the seeds.
With `--overfit` (default records=60,local_steps=20; '' to skip) the same pair of runs is
repeated for the first seed in an overfit-prone setting, so the attack has
something to find without DP.

Canary audit (`--canaries`, default 200; `--canary-node`, default the first strict node): that
node's local training for the same rounds, once with DP-SGD at its profile and once without,
with canaries each put in with probability 1/2; the one-run lower bound on epsilon
(`m3tgossip.edu.canary`) next to the accountant's epsilon.

Writes DIR/privacy.json and DIR/privacy.png; every testbed run keeps its own folder DIR/runs/*.
Running again into the same DIR reuses the runs that completed (same arguments) and redoes the
rest; a failed run is moved aside (DIR/runs/NAME.failed-K) and retried once (`--retries`).
Exits non-zero if a testbed run failed.

    python benchmarks/privacy.py --out runs/bench-privacy
    python benchmarks/privacy.py --out runs/bench-privacy --rounds 30 --seeds 0,1,2 --sweep 1,10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    ROOT,
    completed_run,
    each_run,
    interval,
    loadavg,
    parser,
    save_png,
    setup,
    write_json,
)

from m3tgossip.daemon import checkpoint
from m3tgossip.daemon.metrics import read_metrics
from m3tgossip.edu.canary import canary_audit
from m3tgossip.edu.data import DataConfig, node_data, nonmember_data
from m3tgossip.edu.mia import loss_threshold_attack, record_losses
from m3tgossip.edu.workload import EduWorkload, workload_options
from m3tgossip.harness import Summary, Testbed, TestbedSpec
from m3tgossip.harness.testbed_spec import parse_assignment
from m3tgossip.privacy import PROFILES
from m3tgossip.topology import Topology, load_topology

#: strictest first: the order profiles are ranked in (custom counts as its own name)
STRICTNESS = ("gdpr", "ferpa", "open")
MAIN_SETTINGS = ("profiles", "strictest", "open")
#: two-sided 95% Student t quantiles by degrees of freedom


# ----------------------------------------------------------------------------- helpers


def mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(xs)) if xs else None


def fmt(x: float | None, spec: str = ".3f") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, spec)


def fmt_ci(c: dict[str, Any]) -> str:
    if c["mean"] is None:
        return "-"
    return f"{c['mean']:.3f}" + (f" +-{c['ci95']:.3f}" if c["ci95"] is not None else "")


def with_profiles(topology: Topology, profiles: dict[str, str]) -> Topology:
    """The topology with node `id`'s privacy attribute replaced by `profiles[id]`."""
    nodes = tuple(
        dataclasses.replace(n, privacy=profiles.get(n.id, n.privacy)) for n in topology.nodes
    )
    return dataclasses.replace(topology, nodes=nodes)


def write_topology(topology: Topology, path: Path, expected: dict[str, str]) -> Path:
    """Write `topology` to `path` and check that it loads back with the expected profiles."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(topology.to_toml())
    back = load_topology(path)
    got = {n.id: n.privacy for n in back.nodes}
    if got != expected or back.edges != topology.edges:
        raise RuntimeError(f"{path}: rewritten topology does not load back as written: {got}")
    return path


def run_testbed(
    name: str,
    out: Path,
    topology: Path,
    args: argparse.Namespace,
    changes: dict[str, Any],
    options: dict[str, Any],
    seed: int,
) -> dict[str, Any]:
    """One testbed run in DIR/runs/NAME (`changes` to the spec's fields); a completed run there
    of the same spec is reused, a failed one is moved aside and the run retried (`--retries`)."""
    folder = out / "runs" / name
    spec = TestbedSpec(
        topology=topology,
        out=folder,
        workload="edu",
        rounds=args.rounds,
        seed=seed,
        deadline=args.deadline,
        quiet=True,
        options=options,
        **changes,
    )
    argv = spec.argv()
    done = completed_run(folder, spec)
    if done is not None:
        print(f"[{name}] reusing the completed run in {folder}", flush=True)
        return {
            "name": name,
            "folder": str(folder),
            "argv": argv,
            "exit": 0,
            "wall_s": done.wall_seconds,
            "load_before": None,
            "load_after": None,
            "reused": True,
            "summary": done,
        }
    attempts = []
    summary: Summary | None = None
    for attempt in range(max(0, args.retries) + 1):
        if folder.exists() and any(folder.iterdir()):
            k = 1
            while folder.with_name(f"{name}.failed-{k}").exists():
                k += 1
            folder.rename(folder.with_name(f"{name}.failed-{k}"))
        before = loadavg()
        t0 = time.monotonic()
        print(f"[{name}] testbed {' '.join(argv)}", flush=True)
        try:
            summary = Testbed(spec).run()
            code = summary.exit_code
        except (RuntimeError, TimeoutError) as exc:
            print(f"testbed: error: {exc}", file=sys.stderr, flush=True)
            summary, code = None, 1
        wall = time.monotonic() - t0
        print(f"[{name}] exit {code}, {wall:.0f} s, load {before} -> {loadavg()}", flush=True)
        attempts.append(
            {"exit": code, "wall_s": wall, "load_before": before, "load_after": loadavg()}
        )
        if code == 0 and summary is not None:
            (folder / "bench-run.json").write_text(json.dumps({"argv": argv}))
            break
        if attempt < args.retries:
            print(f"[{name}] failed; retrying ({attempt + 1} of {args.retries})", flush=True)
    return {
        "name": name,
        "folder": str(folder),
        "argv": argv,
        "exit": code,
        "wall_s": wall,
        "load_before": attempts[-1]["load_before"],
        "load_after": attempts[-1]["load_after"],
        "attempts": attempts,
        "summary": summary,
    }


def node_results(run: dict[str, Any], profiles: dict[str, str], rounds: int) -> dict[str, Any]:
    """Per node: profile, node epsilon against its budget, final per-task metrics, first,
    final and late mean accuracy."""
    out: dict[str, Any] = {}
    summary: Summary | None = run["summary"]
    per_node = (summary.per_node if summary else None) or {}
    for nid, profile in profiles.items():
        recs = read_metrics(Path(run["folder"]) / "nodes" / nid / "metrics.jsonl")
        priv = next((r["privacy"] for r in reversed(recs) if "privacy" in r), None)
        v = per_node.get(nid, {})
        accs = v.get("mean_acc", [])
        late = [a for r, a in zip(v.get("rounds", []), accs, strict=True) if r >= rounds // 2]
        new = [a for a in v.get("unseen_acc", []) if a is not None]
        eps = priv["node_epsilon"] if priv else 0.0
        budget = priv.get("budget") if priv else None
        out[nid] = {
            "profile": run["profiles"].get(nid, profile),
            "node_epsilon": eps,
            "budget": budget,
            "delta": priv.get("delta") if priv else None,
            "mechanism": priv.get("mechanism") if priv else None,
            "within_budget": budget is None or eps <= budget * (1 + 1e-6),
            "component_epsilon": priv["epsilon"] if priv else None,
            "retired": priv["retired"] if priv else [],
            "tasks": {t: m["acc"] for t, m in v.get("final", {}).items()},
            "f1": {t: m["f1"] for t, m in v.get("final", {}).items()},
            "first_acc": accs[0] if accs else None,
            "final_acc": accs[-1] if accs else None,
            "gain": accs[-1] - accs[0] if len(accs) > 1 else None,
            "late_acc": mean(late),
            "unseen_final_acc": new[-1] if new else None,
            "unseen_gain": new[-1] - new[0] if len(new) > 1 else None,
        }
    return out


def group_table(nodes: dict[str, Any], groups: dict[str, list[str]]) -> dict[str, Any]:
    """Mean over the nodes of each group (by their profile in the written topology)."""
    out = {}
    for g, ids in groups.items():
        tasks = sorted({t for i in ids for t in nodes[i]["tasks"]})
        out[g] = {
            "final_acc": mean([nodes[i]["final_acc"] for i in ids]),
            "late_acc": mean([nodes[i]["late_acc"] for i in ids]),
            "gain": mean([nodes[i]["gain"] for i in ids]),
            "unseen_final_acc": mean([nodes[i]["unseen_final_acc"] for i in ids]),
            "unseen_gain": mean([nodes[i]["unseen_gain"] for i in ids]),
            "tasks": {t: mean([nodes[i]["tasks"].get(t) for i in ids]) for t in tasks},
            "node_epsilon": mean([nodes[i]["node_epsilon"] for i in ids]),
        }
    return out


def mia_run(
    run_dir: Path, topology: Topology, ids: list[str], seed: int, options: dict[str, Any]
) -> dict[str, Any]:
    """The loss-threshold attack on every node of the run in `run_dir`: per node, its
    training records against its non-members, under its own final model and under each
    neighbour's final model (what the neighbour ended up with after mixing in what it
    received)."""
    o = workload_options(options)
    config = DataConfig(records=o["records"], alpha=o["alpha"], seed=seed)
    last = topology.version(len(topology.stages))
    sets = {
        nid: (node_data(last.node(nid), config)[0], nonmember_data(last.node(nid), config))
        for nid in ids
    }
    out: dict[str, Any] = {nid: {"neighbours": {}} for nid in ids}
    for holder in ids:
        w = EduWorkload(topology, holder, seed, options)
        saved = checkpoint.load(run_dir / "nodes" / holder)
        if saved is None:
            raise RuntimeError(f"{run_dir / 'nodes' / holder}: no checkpoint")
        arrays, meta = saved
        w.load_state(arrays)
        model = w.trainer.model
        for nid in [holder] + [n for n in last.neighbours(holder) if n in sets]:
            members, others = sets[nid]
            m = record_losses(model, model.prepare(members), members.labels)
            n = record_losses(model, model.prepare(others), others.labels)
            if not (np.isfinite(m).any() and np.isfinite(n).any()):
                continue  # no task in common
            result = loss_threshold_attack(m, n)
            if nid != holder:
                out[nid]["neighbours"][holder] = result["auc"]
                continue
            tr = w.trainer
            held_out = record_losses(tr.model, tr.test_set.batch, tr.test_set.labels)
            result["auc_vs_test"] = loss_threshold_attack(m, held_out)["auc"]
            result["round"] = meta.get("round")
            out[nid].update({k: v for k, v in result.items() if k not in ("fpr", "tpr")})
    for nid in ids:
        values = list(out[nid]["neighbours"].values())
        out[nid]["neighbour_auc_max"] = max(values) if values else None
    return out


# ----------------------------------------------------------------------------- plot


def plot(out: Path, report: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    colours = {"profiles": "tab:green", "strictest": "tab:red", "open": "tab:grey"}
    ax = axes[0]
    names = list(report["summary"])
    groups = list(report["groups"]) + ["all"]
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        g = report["summary"][name]["groups"]
        vals = [g[k]["final_acc"]["mean"] or 0.0 for k in groups]
        errs = [g[k]["final_acc"]["ci95"] or 0.0 for k in groups]
        x = np.arange(len(groups)) + i * width
        ax.bar(x, vals, width, yerr=errs, capsize=3, label=name, color=colours.get(name))
    ax.set_xticks(np.arange(len(groups)) + width * (len(names) - 1) / 2)
    ax.set_xticklabels([f"{g} nodes" for g in groups])
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("final held-out mean accuracy (95% CI over seeds)")
    ax.set_title("utility per node group (group = profile as written)")
    ax.legend(fontsize=8)

    ax = axes[1]
    per_node = report["epsilon_vs_budget"]
    ids = [n for n, v in per_node.items() if v["budget"] is not None]
    x = np.arange(len(ids))
    ax.bar(x, [per_node[n]["max_node_epsilon"] for n in ids], 0.6, label="node epsilon (max)")
    ax.scatter(
        x,
        [per_node[n]["budget"] for n in ids],
        color="k",
        marker="_",
        s=400,
        label="budget",
        zorder=3,
    )
    ax.set_xticks(x)
    ax.set_xticklabels(ids, rotation=60, fontsize=8)
    ax.set_ylabel("epsilon at the end (profiles run)")
    ax.set_title("node-level epsilon against the budget")
    ax.legend(fontsize=8)

    ax = axes[2]
    auc = report["mia"]["per_node"]
    ids = list(auc)
    x = np.arange(len(ids))
    for i, variant in enumerate(("profiles", "open")):
        vals = [auc[n][variant]["mean"] or 0.5 for n in ids]
        ax.bar(x + i * 0.4, vals, 0.4, label=variant, color=colours.get(variant))
    ax.axhline(0.55, color="k", ls=":", lw=1)
    ax.set_ylim(0.3, 0.8)
    ax.set_xticks(x + 0.2)
    ax.set_xticklabels(ids, rotation=60, fontsize=8)
    ax.set_ylabel("loss-threshold MIA AUC (mean over seeds)")
    ax.set_title("membership inference per node")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, out, "privacy", dpi=110)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = parser(__doc__, None)
    p.add_argument("--topology", default=str(ROOT / "topology" / "campus.toml"))
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated federation seeds")
    p.add_argument("--deadline", type=float, default=5.0)
    p.add_argument(
        "-o",
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="edu workload option for every run",
    )
    p.add_argument(
        "--overfit",
        default="records=60,local_steps=20",
        help="workload options of the overfit-prone MIA runs, first seed ('' to skip)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=1,
        help="retries of a failed testbed run (a busy machine can miss the start timeout)",
    )
    p.add_argument(
        "--sweep", default="", help="comma-separated budgets for the strict nodes (first seed)"
    )
    p.add_argument(
        "--canary-node", default=None, help="node of the canary audit (default: first strict node)"
    )
    p.add_argument("--canaries", type=int, default=200, help="canaries of the audit (0 to skip)")
    return p.parse_args(argv)


def clean(x: Any) -> Any:
    """JSON has no inf or nan."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    t_start = time.monotonic()
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    if not seeds:
        raise SystemExit("--seeds: at least one seed")
    base = load_topology(args.topology)
    profiles = {n.id: n.privacy for n in base.nodes}
    present = [p for p in STRICTNESS if p in profiles.values()]
    strictest = present[0] if present else "gdpr"
    strict_nodes = [nid for nid, p in profiles.items() if p == strictest]
    groups = {p: [nid for nid, q in profiles.items() if q == p] for p in present}
    options = dict(parse_assignment(o) for o in args.option)
    out = setup(
        args.out,
        f"privacy benchmark on {platform.node()}: topology {base.name} ({len(base.nodes)} "
        f"nodes, {len(base.edges)} edges), workload edu, rounds {args.rounds}, seeds {seeds}, "
        f"options {options or 'defaults'}",
    )
    print("  profiles: " + ", ".join(f"{p}: {' '.join(ids)}" for p, ids in groups.items()))
    for name in present:
        if name == "open":
            continue
        prof = PROFILES[name]
        print(
            f"  {name}: node budget epsilon {prof.epsilon} at delta {prof.delta:g} per learner, "
            f"clip {prof.clip}, encoder shares {prof.modality_factor}"
        )

    topo_dir = out / "topologies"
    written = write_topology(base, topo_dir / "as-written.toml", profiles)
    all_strict = {nid: strictest for nid in profiles}
    strict_path = write_topology(
        with_profiles(base, all_strict), topo_dir / "strictest.toml", all_strict
    )
    all_open = {nid: "open" for nid in profiles}
    open_path = write_topology(with_profiles(base, all_open), topo_dir / "open.toml", all_open)
    as_run = {"profiles": profiles, "strictest": all_strict, "open": all_open}
    paths = {"profiles": written, "strictest": strict_path, "open": open_path}

    # (name, setting, seed, topology, changes to the testbed spec, workload options)
    plan: list[tuple[str, str, int, Path, dict[str, Any], dict[str, Any]]] = []
    for seed in seeds:
        for setting in MAIN_SETTINGS:
            plan.append((f"{setting}-s{seed}", setting, seed, paths[setting], {}, options))
    overfit = dict(parse_assignment(o) for o in args.overfit.split(",") if o)
    if overfit:
        merged = {**options, **overfit}
        for setting in ("profiles", "open"):
            plan.append((f"overfit-{setting}", setting, seeds[0], paths[setting], {}, merged))
    sweep_eps = [float(e) for e in args.sweep.split(",") if e]
    if sweep_eps:
        custom = {nid: ("custom" if nid in strict_nodes else p) for nid, p in profiles.items()}
        custom_path = write_topology(
            with_profiles(base, custom), topo_dir / "custom-strict.toml", custom
        )
        for e in sweep_eps:
            custom_nodes = {
                nid: {"privacy.base": strictest, "privacy.epsilon": e} for nid in strict_nodes
            }
            changes = {"node_settings": custom_nodes}
            plan.append((f"sweep-{e:g}", "sweep", seeds[0], custom_path, changes, options))

    runs: dict[str, dict[str, Any]] = {}
    for name, setting, seed, topo, changes, opts in each_run(plan, "settings"):
        r = run_testbed(name, out, topo, args, changes, opts, seed)
        r.update(setting=setting, seed=seed, options=opts, profiles=as_run.get(setting, profiles))
        runs[name] = r
    failed = [n for n, r in runs.items() if r["exit"] != 0 or r["summary"] is None]

    # --- per run, then per setting over the seeds
    results: dict[str, Any] = {}
    for name, r in runs.items():
        if r["summary"] is None:
            continue
        nodes = node_results(r, profiles, args.rounds)
        results[name] = {
            "setting": r["setting"],
            "seed": r["seed"],
            "nodes": nodes,
            "groups": {**group_table(nodes, groups), **group_table(nodes, {"all": list(profiles)})},
            "wall_s": r["wall_s"],
        }
    summary: dict[str, Any] = {}
    for setting in MAIN_SETTINGS:
        per_seed = [results[f"{setting}-s{s}"] for s in seeds if f"{setting}-s{s}" in results]
        if not per_seed:
            continue
        summary[setting] = {
            "seeds": [x["seed"] for x in per_seed],
            "groups": {
                g: {
                    key: interval([x["groups"][g][key] for x in per_seed])
                    for key in ("final_acc", "late_acc", "gain", "unseen_final_acc", "unseen_gain")
                }
                for g in [*groups, "all"]
            },
            "nodes": {
                nid: {
                    "final_acc": interval([x["nodes"][nid]["final_acc"] for x in per_seed]),
                    "gain": interval([x["nodes"][nid]["gain"] for x in per_seed]),
                    "node_epsilon": [x["nodes"][nid]["node_epsilon"] for x in per_seed],
                    "budget": per_seed[0]["nodes"][nid]["budget"],
                    "within_budget": all(x["nodes"][nid]["within_budget"] for x in per_seed),
                }
                for nid in profiles
            },
        }
    sweep = []
    for e in sweep_eps:
        r = results.get(f"sweep-{e:g}")
        if r is None:
            continue
        g = group_table(r["nodes"], {"strict": strict_nodes, "all": list(profiles)})
        sweep.append(
            {
                "epsilon": e,
                "strict_node_epsilon": g["strict"]["node_epsilon"],
                "strict_final_acc": g["strict"]["final_acc"],
                "strict_late_acc": g["strict"]["late_acc"],
                "all_final_acc": g["all"]["final_acc"],
            }
        )

    # --- membership inference on every node, profiles and open runs of every seed
    print(f"\nmembership inference (loss threshold) on every node; load {loadavg()}", flush=True)
    mia_runs: dict[str, Any] = {}
    pairs = [(f"s{s}", f"profiles-s{s}", f"open-s{s}", s, options) for s in seeds]
    if overfit:
        pairs.append(("overfit", "overfit-profiles", "overfit-open", seeds[0], merged))
    for label, dp_run, open_run, seed, opts in pairs:
        if dp_run not in results or open_run not in results:
            continue
        ids = list(profiles)
        attacks = {
            variant: mia_run(Path(runs[run]["folder"]), base, ids, seed, opts)
            for variant, run in (("profiles", dp_run), ("open", open_run))
        }
        per_node = {nid: {v: attacks[v][nid] for v in attacks} for nid in ids}
        mia_runs[label] = {"options": opts, "seed": seed, "per_node": per_node}
    seed_labels = [f"s{s}" for s in seeds if f"s{s}" in mia_runs]
    mia_per_node = {
        nid: {
            f"{variant}{suffix}": interval(
                [mia_runs[lab]["per_node"][nid][variant][key] for lab in seed_labels]
            )
            for variant in ("profiles", "open")
            for suffix, key in (("", "auc"), ("_neighbours", "neighbour_auc_max"))
        }
        for nid in profiles
    }
    mia_report = {"runs": mia_runs, "per_node": mia_per_node}

    # --- canary audit: one node's private training, against the same training without DP
    canary: dict[str, Any] = {}
    if args.canaries > 0:
        cnode = args.canary_node or (strict_nodes[0] if strict_nodes else next(iter(profiles)))
        node = base.node(cnode)
        o = workload_options(options)
        steps = int(o["local_steps"])
        print(f"\ncanary audit of {cnode}: {args.canaries} canaries; load {loadavg()}", flush=True)
        for variant, prof_name in (("private", profiles[cnode]), ("open", "open")):
            canary[variant] = canary_audit(
                node,
                PROFILES[prof_name],
                seed=seeds[0],
                rounds=args.rounds,
                local_steps=steps,
                canaries=args.canaries,
                records=int(o["records"]),
                batch_size=int(o["batch_size"]),
                lr=float(o["lr"]),
                dp_lr=float(o["dp_lr"]),
                audit_seed=seeds[0],
            )
        canary["node"] = cnode
    wall = time.monotonic() - t_start

    # --- tables
    print(
        "\nutility: final held-out accuracy (mean over a node's tasks), mean over seeds "
        "+- 95% CI; epsilon = node epsilon at the end (max over seeds) / budget"
    )
    print(
        f"{'node':<11}{'profile':<8}" + "".join(f"{s:>22}" for s in summary) + f"{'eps/budget':>16}"
    )
    for nid, prof in profiles.items():
        cells = "".join(f"{fmt_ci(s['nodes'][nid]['final_acc']):>22}" for s in summary.values())
        eps = ""
        if "profiles" in summary:
            n = summary["profiles"]["nodes"][nid]
            if n["budget"] is not None:
                eps = f"{max(n['node_epsilon']):.3f}/{n['budget']:g}"
        print(f"{nid:<11}{prof:<8}{cells}{eps:>16}")
    for label, acc_key, gain_key in (
        ("held-out records", "final_acc", "gain"),
        ("unseen learners", "unseen_final_acc", "unseen_gain"),
    ):
        print(
            f"\nper group, {label}: final accuracy | gain (last - first evaluation), "
            "mean over seeds +- 95% CI"
        )
        print(f"{'group':<10}" + "".join(f"{s:>34}" for s in summary))
        for g in [*groups, "all"]:
            print(
                f"{g:<10}"
                + "".join(
                    f"{fmt_ci(s['groups'][g][acc_key]):>17} |{fmt_ci(s['groups'][g][gain_key]):>15}"
                    for s in summary.values()
                )
            )
    if sweep:
        print(f"\nsweep: strict nodes on a custom profile (base {strictest}), seed {seeds[0]}")
        print(f"{'budget':>8}{'node eps':>10}{'strict acc':>12}{'late':>8}{'all acc':>9}")
        for p in sweep:
            print(
                f"{p['epsilon']:>8g}{fmt(p['strict_node_epsilon'], '.2f'):>10}"
                f"{fmt(p['strict_final_acc']):>12}{fmt(p['strict_late_acc']):>8}"
                f"{fmt(p['all_final_acc']):>9}"
            )
    print(
        "\nmembership inference AUC per node (mean over seeds +- 95% CI), under its own final "
        "model and under its neighbours' (the highest)"
    )
    print(
        f"{'node':<11}{'profile':<8}{'profiles':>18}{'neighbours':>18}{'open':>18}"
        f"{'neighbours':>18}"
        + (f"{'overfit DP':>12}{'overfit open':>14}" if "overfit" in mia_runs else "")
    )
    for nid, prof in profiles.items():
        line = f"{nid:<11}{prof:<8}"
        line += "".join(
            f"{fmt_ci(mia_per_node[nid][k]):>18}"
            for k in ("profiles", "profiles_neighbours", "open", "open_neighbours")
        )
        if "overfit" in mia_runs:
            o = mia_runs["overfit"]["per_node"][nid]
            line += f"{o['profiles']['auc']:>12.3f}{o['open']['auc']:>14.3f}"
        print(line)

    if canary:
        print(f"\ncanary audit of {canary['node']} (one run; lower bound at 95% confidence)")
        for variant in ("private", "open"):
            c = canary[variant]
            print(
                f"  {variant:<8} {c['profile']:<6} right {c['correct']}/{c['guesses']}: epsilon "
                f"lower bound {c['epsilon_lower_bound']:.3f}, accountant "
                f"{fmt(c['epsilon_accountant'])}"
            )

    # --- targets
    targets: dict[str, Any] = {}
    if {"profiles", "open"} <= set(summary):
        pa = summary["profiles"]["groups"]["all"]
        oa = summary["open"]["groups"]["all"]
        # on the nodes' held-out records, and on the institutions' unseen learners
        for suffix, acc, gain in (
            ("", "final_acc", "gain"),
            ("_unseen", "unseen_final_acc", "unseen_gain"),
        ):
            gap = (oa[acc]["mean"] or 0) - (pa[acc]["mean"] or 0)
            targets[f"profiles_within_3_points_of_open{suffix}"] = {
                "profiles": pa[acc],
                "open": oa[acc],
                "gap": gap,
                "met": gap <= 0.03,
            }
            targets[f"profiles_learn_5_points{suffix}"] = {
                "gain": pa[gain],
                "met": (pa[gain]["mean"] or 0) >= 0.05,
            }
    private = {nid: p for nid, p in profiles.items() if p != "open"}
    if "profiles" in summary:
        nodes = summary["profiles"]["nodes"]
        targets["node_epsilon_within_budget"] = {
            "nodes": {
                nid: {
                    "max_node_epsilon": max(nodes[nid]["node_epsilon"]),
                    "budget": nodes[nid]["budget"],
                }
                for nid in private
            },
            "met": all(nodes[nid]["within_budget"] for nid in profiles),
        }
    if seed_labels:
        # judged on each node's mean over the seeds; the largest single seed is kept beside it
        for key, label in (("profiles", ""), ("profiles_neighbours", "_via_neighbours")):
            mean_auc = {nid: mia_per_node[nid][key]["mean"] for nid in profiles}
            worst = {nid: max(mia_per_node[nid][key]["values"], default=None) for nid in profiles}
            for scope, ids in (("every_node", list(profiles)), ("private_nodes", private)):
                known = {nid: mean_auc[nid] for nid in ids if mean_auc[nid] is not None}
                targets[f"mia_auc_at_most_0.55_{scope}{label}"] = {
                    "mean_auc_over_seeds": known,
                    "max_auc_over_seeds": {nid: worst[nid] for nid in ids},
                    "max": max(known.values(), default=None),
                    "met": all(v <= 0.55 for v in known.values()),
                }
    if {"profiles", "strictest"} <= set(summary):
        pa = summary["profiles"]["groups"][strictest]["final_acc"]
        st = summary["strictest"]["groups"][strictest]["final_acc"]
        diff = (pa["mean"] or 0) - (st["mean"] or 0)
        targets["aware_3_points_above_strictest_on_strict_nodes"] = {
            "profiles": pa,
            "strictest": st,
            "difference": diff,
            "met": diff >= 0.03,
        }
    if canary and canary["private"]["epsilon_accountant"] is not None:
        c = canary["private"]
        targets["canary_lower_bound_below_accountant"] = {
            "node": canary["node"],
            "lower_bound": c["epsilon_lower_bound"],
            "accountant": c["epsilon_accountant"],
            "open_lower_bound": canary["open"]["epsilon_lower_bound"],
            "met": c["epsilon_lower_bound"] <= c["epsilon_accountant"],
        }
    print("\ntargets")
    for k, v in targets.items():
        shown = {}
        for x, y in v.items():
            if isinstance(y, dict) and "mean" in y:
                y = y["mean"]
            if x in ("nodes", "max_auc_over_seeds") or isinstance(y, dict):
                continue
            shown[x] = round(y, 4) if isinstance(y, float) else y
        print(f"  {k}: {'MET' if v['met'] else 'MISSED'}  {shown}")
    print(f"\nwall {wall:.0f} s; load average at the end {loadavg()}")
    if failed:
        print(f"FAILED runs: {', '.join(failed)}")

    eps_vs_budget = {}
    if "profiles" in summary:
        for nid, n in summary["profiles"]["nodes"].items():
            eps_vs_budget[nid] = {
                "profile": profiles[nid],
                "node_epsilon": n["node_epsilon"],
                "max_node_epsilon": max(n["node_epsilon"]),
                "budget": n["budget"],
                "within_budget": n["within_budget"],
            }
    report = {
        "topology": base.name,
        "topology_path": args.topology,
        "rounds": args.rounds,
        "seeds": seeds,
        "options": options,
        "profiles": profiles,
        "groups": groups,
        "strictest": strictest,
        "machine": {"host": platform.node(), "cores": os.cpu_count(), "load_end": loadavg()},
        "wall_s": wall,
        "runs": {
            n: {k: v for k, v in r.items() if k not in ("summary", "profiles")}
            for n, r in runs.items()
        },
        "results": results,
        "summary": summary,
        "epsilon_vs_budget": eps_vs_budget,
        "sweep": sweep,
        "mia": mia_report,
        "canary": canary,
        "targets": targets,
        "failed": failed,
    }
    path = write_json(out, "privacy", clean(report))
    try:
        png = plot(out, report)
    except Exception as exc:  # a missing plotting library must not lose the JSON
        print(f"plot failed: {exc}", file=sys.stderr)
        print(f"wrote {path}")
    else:
        print(f"wrote {path} and {png}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

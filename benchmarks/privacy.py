#!/usr/bin/env python3
"""Utility against privacy on a topology with mixed privacy profiles, and membership inference.

Testbed runs (multi-process, `--workload edu`, sync mode, same seed, rounds and options):

  naive      the topology's profiles as written (campus: uni-a gdpr, uni-b ferpa, college-c
             open), plain Metropolis-Hastings mixing (`gossip.noise_strength` 0);
  aware      the same profiles, regulation-aware (noise-aware) mixing: `--set
             gossip.noise_strength=S`, S = 1 / (typical per-element noise variance of a ferpa
             node), computed from `privacy.ReleaseGate` for the representative component
             (`--ref-component`, default backbone) of the first ferpa node at the planned rounds;
  strictest  every node on the strictest profile present (gdpr): a rewritten topology copy;
  open       every node open (no DP): the reference;
  sweep-E    (optional, `--sweep E1,E2`) the strict nodes on a custom profile over the gdpr base
             with component budget epsilon E (`--node-set NODE:privacy.base=gdpr` and
             `privacy.epsilon=E`), naive mixing: a utility-vs-epsilon curve for them.

Utility is the held-out accuracy per task at the last evaluation (and its mean over the node's
tasks); the "late" mean also averages the evaluations of the second half of the run (less
noisy). Epsilons come from each node's last metrics record: `privacy.node_epsilon` (everything
the node released, all components composed) and the largest per-component epsilon; the
calibrated mode spends each component's budget exactly over the planned rounds. Open nodes
have no epsilon (reported as inf).

Membership inference (loss threshold, Yeom et al.): for each strict node, its final checkpoint
of the `open` run (no DP) and of the `naive` run (DP at its profile) is loaded into the node's
model (`EduWorkload.load_state`), and the per-record loss on its training records (members) is
compared with its held-out records (non-members): AUC of minus the loss, its standard error and
the membership advantage. The same pair of runs is repeated in an overfit-prone setting
(`--overfit`, default records=60, local_steps=20: few records, many steps per round), so the
attack has something to find without DP.

Writes DIR/privacy.json and DIR/privacy.png; every testbed run keeps its own folder DIR/runs/*.
Running again into the same DIR reuses the runs that completed (same arguments) and redoes the
rest; a failed run is moved aside (DIR/runs/NAME.failed-K) and retried once (`--retries`).
Exits non-zero if a testbed run failed.

    python benchmarks/privacy.py --out runs/bench-privacy
    python benchmarks/privacy.py --out runs/bench-privacy --rounds 30 --sweep 1,10,30
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
from _common import ROOT, each_run, loadavg, parser, save_png, setup, write_json

from m3tgossip.daemon import checkpoint
from m3tgossip.daemon.metrics import read_metrics
from m3tgossip.edu.mia import loss_threshold_attack, record_losses
from m3tgossip.edu.model import build_node_model
from m3tgossip.edu.workload import EduWorkload
from m3tgossip.errors import ConfigError
from m3tgossip.harness import Summary, Testbed, TestbedSpec
from m3tgossip.harness.testbed_spec import parse_args as testbed_args
from m3tgossip.harness.testbed_spec import parse_assignment
from m3tgossip.privacy import PROFILES, ReleaseGate, profile_for
from m3tgossip.topology import Topology, load_topology

#: strictest first: the order profiles are ranked in (custom counts as its own name)
STRICTNESS = ("gdpr", "ferpa", "open")
MAIN_SETTINGS = ("naive", "aware", "strictest", "open")


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


def noise_strength(topology: Topology, rounds: int, component: str) -> dict[str, Any]:
    """S = 1 / (per-element noise variance of `component` at the first ferpa node)."""
    ferpa = [n for n in topology.nodes if n.privacy == "ferpa"]
    if not ferpa:
        raise ValueError("the topology has no ferpa node to calibrate the noise strength on")
    node = ferpa[0]
    sizes = {c: x.size for c, x in build_node_model(node).shared_vectors().items()}
    privatizer = ReleaseGate(
        profile_for("ferpa"), node.modalities, sizes, rounds_planned=rounds, seed=0
    )
    variances = {c: s.noise_std**2 for c, s in privatizer.components.items()}
    if component not in variances:
        raise ValueError(f"{node.id} does not share {component}; shares {sorted(variances)}")
    gdpr = [n for n in topology.nodes if n.privacy == "gdpr"]
    gdpr_var = None
    if gdpr:
        g = gdpr[0]
        gsizes = {c: x.size for c, x in build_node_model(g).shared_vectors().items()}
        gp = ReleaseGate(profile_for("gdpr"), g.modalities, gsizes, rounds_planned=rounds, seed=0)
        if component in gp.components:
            gdpr_var = {"node": g.id, "variance": gp.components[component].noise_std ** 2}
    var = variances[component]
    return {
        "node": node.id,
        "component": component,
        "ferpa_variance": var,
        "ferpa_variance_median_over_components": float(np.median(list(variances.values()))),
        "ferpa_variances": variances,
        "gdpr_reference": gdpr_var,
        "strength": 1.0 / var,
    }


def _completed(folder: Path, spec: TestbedSpec) -> Summary | None:
    """The summary of a finished, healthy run of `spec` in `folder`, else None."""
    try:
        summary = Summary.read(folder / "summary.json")
    except (OSError, ValueError, TypeError):
        return None
    record = folder / "bench-run.json"
    if record.exists():
        try:
            if testbed_args(json.loads(record.read_text()).get("argv")) != spec:
                return None
        except (SystemExit, ConfigError, TypeError, ValueError):
            return None  # not a testbed command line
    if summary.crashed or summary.hung or summary.rounds != spec.rounds:
        return None
    if summary.seed != spec.seed or min(summary.rounds_done.values(), default=0) < spec.rounds:
        return None
    return summary


def run_testbed(
    name: str,
    out: Path,
    topology: Path,
    args: argparse.Namespace,
    changes: dict[str, Any],
    options: dict[str, Any],
) -> dict[str, Any]:
    """One testbed run in DIR/runs/NAME (`changes` to the spec's fields); a completed run there
    of the same spec is reused, a failed one is moved aside and the run retried (`--retries`)."""
    folder = out / "runs" / name
    spec = TestbedSpec(
        topology=topology,
        out=folder,
        workload="edu",
        rounds=args.rounds,
        seed=args.seed,
        deadline=args.deadline,
        quiet=True,
        options=options,
        **changes,
    )
    argv = spec.argv()
    done = _completed(folder, spec)
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
    """Per node: profile, epsilons, final per-task metrics, final and late mean accuracy."""
    out: dict[str, Any] = {}
    summary: Summary | None = run["summary"]
    per_node = (summary.per_node if summary else None) or {}
    for nid, profile in profiles.items():
        recs = read_metrics(Path(run["folder"]) / "nodes" / nid / "metrics.jsonl")
        priv = next((r["privacy"] for r in reversed(recs) if "privacy" in r), None)
        v = per_node.get(nid, {})
        accs = v.get("mean_acc", [])
        late = [a for r, a in zip(v.get("rounds", []), accs, strict=True) if r >= rounds // 2]
        out[nid] = {
            "profile": profile,
            "node_epsilon": priv["node_epsilon"] if priv else math.inf,
            "max_component_epsilon": max(priv["epsilon"].values()) if priv else math.inf,
            "component_epsilon": priv["epsilon"] if priv else None,
            "retired": priv["retired"] if priv else [],
            "tasks": {t: m["acc"] for t, m in v.get("final", {}).items()},
            "f1": {t: m["f1"] for t, m in v.get("final", {}).items()},
            "final_acc": accs[-1] if accs else None,
            "late_acc": mean(late),
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
            "tasks": {t: mean([nodes[i]["tasks"].get(t) for i in ids]) for t in tasks},
            "node_epsilon": mean([nodes[i]["node_epsilon"] for i in ids]),
            "max_component_epsilon": mean([nodes[i]["max_component_epsilon"] for i in ids]),
        }
    return out


def mia(
    run_dir: Path,
    topology: Topology,
    nid: str,
    seed: int,
    options: dict[str, Any],
    workload_cache: dict[tuple[str, str], EduWorkload],
) -> dict[str, Any]:
    """The loss-threshold attack on node `nid`'s final checkpoint of the run in `run_dir`."""
    key = (nid, json.dumps(options, sort_keys=True))
    if key not in workload_cache:
        workload_cache[key] = EduWorkload(topology, nid, seed, options)
    w = workload_cache[key]
    saved = checkpoint.load(run_dir / "nodes" / nid)
    if saved is None:
        raise RuntimeError(f"{run_dir / 'nodes' / nid}: no checkpoint")
    arrays, meta = saved
    w.load_state(arrays)
    tr = w.trainer
    members = record_losses(
        tr.model, tr.train_batch, {t: y.numpy() for t, y in tr.train_labels.items()}
    )
    nonmembers = record_losses(tr.model, tr.test_batch, tr.test_labels)
    result = loss_threshold_attack(members, nonmembers)
    result["round"] = meta.get("round")
    return result


# ----------------------------------------------------------------------------- plot


def plot(out: Path, report: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    ax = axes[0]
    colours = {
        "naive": "tab:blue",
        "aware": "tab:green",
        "strictest": "tab:red",
        "open": "tab:grey",
    }
    finite = [
        n["node_epsilon"]
        for s in report["settings"].values()
        for n in s["nodes"].values()
        if math.isfinite(n["node_epsilon"]) and n["node_epsilon"] > 0
    ]
    x_inf = (max(finite) if finite else 10.0) * 3.0
    markers = {"gdpr": "o", "ferpa": "s", "open": "^"}
    for name, s in report["settings"].items():
        colour = colours.get(name, None)
        for nid, n in s["nodes"].items():
            x = n["node_epsilon"] if math.isfinite(n["node_epsilon"]) else x_inf
            if n["final_acc"] is None:
                continue
            ax.scatter(
                x,
                n["final_acc"],
                color=colour,
                marker=markers.get(report["profiles"][nid], "o"),
                alpha=0.7,
                s=30,
                label=name if nid == next(iter(s["nodes"])) else None,
            )
    sweep = report.get("sweep", [])
    if sweep:
        xs = [p["strict_node_epsilon"] for p in sweep]
        ys = [p["strict_final_acc"] for p in sweep]
        ax.plot(xs, ys, "k--", marker="x", label="sweep (strict nodes, custom eps)")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.axvline(x_inf / 1.7, color="lightgrey", lw=1, ls=":")
    ax.text(x_inf, ax.get_ylim()[0], "no DP", ha="center", va="bottom", fontsize=8)
    ax.set_xlabel("per-node epsilon (all components composed; right edge = no DP)")
    ax.set_ylabel("final held-out mean accuracy")
    ax.set_title("utility vs epsilon (o gdpr, s ferpa, ^ open nodes)")
    ax.legend(fontsize=8)

    ax = axes[1]
    names = list(report["settings"])
    groups = list(report["groups"]) + ["all"]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        g = report["settings"][name]["groups"]
        vals = [g[k]["final_acc"] or 0.0 for k in groups]
        ax.bar(np.arange(len(groups)) + i * width, vals, width, label=name, color=colours.get(name))
    ax.set_xticks(np.arange(len(groups)) + width * (len(names) - 1) / 2)
    ax.set_xticklabels([f"{g} nodes" for g in groups])
    ax.set_ylabel("final held-out mean accuracy")
    ax.set_title("utility per node group (group = profile as written)")
    ax.legend(fontsize=8)

    ax = axes[2]
    styles = {"no_dp": "-", "dp": "--"}
    for setting, res in report["mia"].items():
        for variant, r in res["target"].items():
            ax.plot(
                r["fpr"],
                r["tpr"],
                styles.get(variant, ":"),
                label=f"{setting} {variant}: AUC {r['auc']:.3f}",
            )
    ax.plot([0, 1], [0, 1], color="lightgrey", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"loss-threshold MIA on {report['mia_node']}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return save_png(fig, out, "privacy", dpi=110)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = parser(__doc__, None)
    p.add_argument("--topology", default=str(ROOT / "topology" / "campus.toml"))
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
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
        "--ref-component",
        default="backbone",
        help="component whose ferpa noise variance sets the noise strength",
    )
    p.add_argument(
        "--strength",
        type=float,
        default=None,
        help="noise strength of the aware run (default: computed, see above)",
    )
    p.add_argument(
        "--mia-node", default=None, help="node whose ROC is plotted (default: first strict node)"
    )
    p.add_argument(
        "--overfit",
        default="records=60,local_steps=20",
        help="workload options of the overfit-prone MIA runs ('' to skip)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=1,
        help="retries of a failed testbed run (a busy machine can miss the start timeout)",
    )
    p.add_argument(
        "--sweep", default="", help="comma-separated component budgets for the strict nodes"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    t_start = time.monotonic()
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
        f"nodes, {len(base.edges)} edges), workload edu, rounds {args.rounds}, seed "
        f"{args.seed}, options {options or 'defaults'}",
    )
    print("  profiles: " + ", ".join(f"{p}: {' '.join(ids)}" for p, ids in groups.items()))
    for name in present:
        prof = PROFILES[name]
        print(
            f"  {name}: component budget epsilon {prof.epsilon} at delta {prof.delta:g}, "
            f"clip {prof.clip}, modality factors {prof.modality_factor}"
        )

    if args.strength is None:
        ns = noise_strength(base, args.rounds, args.ref_component)
        strength = ns["strength"]
        gdpr = ns["gdpr_reference"]
        print(
            f"  noise strength S = 1 / ferpa per-element noise variance of {ns['component']} at "
            f"{ns['node']} over {args.rounds} planned rounds = 1 / {ns['ferpa_variance']:.2f} "
            f"= {strength:.5f}  (median over its components "
            f"{ns['ferpa_variance_median_over_components']:.2f}"
            + (f"; gdpr {gdpr['node']} {ns['component']}: {gdpr['variance']:.1f}" if gdpr else "")
            + ")"
        )
    else:
        ns = {"strength": args.strength, "given": True}
        strength = args.strength
        print(f"  noise strength S = {strength} (given)")

    topo_dir = out / "topologies"
    written = write_topology(base, topo_dir / "as-written.toml", profiles)
    all_strict = {nid: strictest for nid in profiles}
    strict_path = write_topology(
        with_profiles(base, all_strict), topo_dir / "strictest.toml", all_strict
    )
    all_open = {nid: "open" for nid in profiles}
    open_path = write_topology(with_profiles(base, all_open), topo_dir / "open.toml", all_open)

    # (name, topology, changes to the testbed spec, workload options)
    aware = {"settings": {"gossip.noise_strength": strength}}
    plan: list[tuple[str, Path, dict[str, Any], dict[str, Any]]] = [
        ("naive", written, {}, options),
        ("aware", written, aware, options),
        ("strictest", strict_path, {}, options),
        ("open", open_path, {}, options),
    ]
    overfit = dict(parse_assignment(o) for o in args.overfit.split(",") if o)
    if overfit:
        merged = {**options, **overfit}
        plan += [("overfit-naive", written, {}, merged), ("overfit-open", open_path, {}, merged)]
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
            plan.append((f"sweep-{e:g}", custom_path, {"node_settings": custom_nodes}, options))

    runs: dict[str, dict[str, Any]] = {}
    for name, topo, changes, opts in each_run(plan, "settings"):
        runs[name] = run_testbed(name, out, topo, args, changes, opts)
    failed = [n for n, r in runs.items() if r["exit"] != 0 or r["summary"] is None]

    settings: dict[str, Any] = {}
    for name in MAIN_SETTINGS:
        r = runs[name]
        if r["summary"] is None:
            continue
        nodes = node_results(r, profiles, args.rounds)
        settings[name] = {
            "nodes": nodes,
            "groups": {**group_table(nodes, groups), **group_table(nodes, {"all": list(profiles)})},
            "wall_s": r["wall_s"],
        }
    sweep = []
    for e in sweep_eps:
        r = runs[f"sweep-{e:g}"]
        if r["summary"] is None:
            continue
        nodes = node_results(r, profiles, args.rounds)
        g = group_table(nodes, {"strict": strict_nodes, "all": list(profiles)})
        sweep.append(
            {
                "epsilon": e,
                "strict_node_epsilon": g["strict"]["node_epsilon"],
                "strict_max_component_epsilon": g["strict"]["max_component_epsilon"],
                "strict_final_acc": g["strict"]["final_acc"],
                "strict_late_acc": g["strict"]["late_acc"],
                "all_final_acc": g["all"]["final_acc"],
                "nodes": nodes,
            }
        )

    # --- membership inference
    print(
        f"\nmembership inference (loss threshold) on the strict nodes {', '.join(strict_nodes)}; "
        f"load {loadavg()}",
        flush=True,
    )
    mia_node = args.mia_node or strict_nodes[0]
    cache: dict[tuple[str, str], EduWorkload] = {}
    mia_report: dict[str, Any] = {}
    pairs = [("default", "open", "naive", dict(options))]
    if overfit:
        pairs.append(("overfit", "overfit-open", "overfit-naive", {**options, **overfit}))
    for label, no_dp, dp, opts in pairs:
        if runs[no_dp]["summary"] is None or runs[dp]["summary"] is None:
            continue
        per_node = {}
        for nid in strict_nodes:
            per_node[nid] = {
                "no_dp": mia(Path(runs[no_dp]["folder"]), base, nid, args.seed, opts, cache),
                "dp": mia(Path(runs[dp]["folder"]), base, nid, args.seed, opts, cache),
            }
        for key in [k for k in cache if k[1] == json.dumps(opts, sort_keys=True)]:
            del cache[key]  # the models of this setting are no longer needed
        mia_report[label] = {
            "options": opts,
            "no_dp_run": no_dp,
            "dp_run": dp,
            "target": per_node[mia_node],
            "per_node": {
                nid: {
                    v: {k: x for k, x in r.items() if k not in ("fpr", "tpr")}
                    for v, r in res.items()
                }
                for nid, res in per_node.items()
            },
            "mean_auc": {
                v: mean([per_node[n][v]["auc"] for n in strict_nodes]) for v in ("no_dp", "dp")
            },
        }
    wall = time.monotonic() - t_start

    # --- tables
    print(
        "\nutility: final held-out accuracy (mean over a node's tasks), per node; epsilon = node "
        "epsilon (all components composed) / largest component epsilon"
    )
    head = f"{'node':<11}{'profile':<8}" + "".join(f"{s:>22}" for s in settings)
    print(head)
    for nid, prof in profiles.items():
        cells = ""
        for s in settings.values():
            n = s["nodes"][nid]
            eps = f"{fmt(n['node_epsilon'], '.2f')}/{fmt(n['max_component_epsilon'], '.2f')}"
            cells += f"{fmt(n['final_acc']):>11} e{eps:>10}"
        print(f"{nid:<11}{prof:<8}{cells}")
    print(
        "\nutility per group (profile as written): final accuracy / late mean (evaluations in "
        "the 2nd half)"
    )
    print(f"{'group':<10}" + "".join(f"{s:>18}" for s in settings))
    for g in [*groups, "all"]:
        print(
            f"{g:<10}"
            + "".join(
                f"{fmt(s['groups'][g]['final_acc']):>10} /{fmt(s['groups'][g]['late_acc']):>6}"
                for s in settings.values()
            )
        )
    print(f"\nper-task final accuracy of the {strictest} nodes (mean over the nodes with the task)")
    tasks = sorted({t for s in settings.values() for t in s["groups"][strictest]["tasks"]})
    print(f"{'task':<15}" + "".join(f"{s:>11}" for s in settings))
    for t in tasks:
        print(
            f"{t:<15}"
            + "".join(
                f"{fmt(s['groups'][strictest]['tasks'].get(t)):>11}" for s in settings.values()
            )
        )
    print("\nper-task final accuracy over all nodes")
    tasks = sorted({t for s in settings.values() for t in s["groups"]["all"]["tasks"]})
    for t in tasks:
        print(
            f"{t:<15}"
            + "".join(f"{fmt(s['groups']['all']['tasks'].get(t)):>11}" for s in settings.values())
        )
    if sweep:
        print(f"\nsweep: strict nodes on a custom profile (base {strictest}), naive mixing")
        print(
            f"{'budget':>8}{'node eps':>10}{'max comp eps':>14}{'strict acc':>12}{'late':>8}"
            f"{'all acc':>9}"
        )
        for p in sweep:
            print(
                f"{p['epsilon']:>8g}{fmt(p['strict_node_epsilon'], '.2f'):>10}"
                f"{fmt(p['strict_max_component_epsilon'], '.2f'):>14}"
                f"{fmt(p['strict_final_acc']):>12}"
                f"{fmt(p['strict_late_acc']):>8}{fmt(p['all_final_acc']):>9}"
            )
    print(
        "\nmembership inference AUC (members: train records, non-members: held-out records; "
        "+- 1 s.e.)"
    )
    print(
        f"{'setting':<9}{'node':<9}{'no DP AUC':>16}{'adv':>7}{'DP AUC':>16}{'adv':>7}"
        f"{'members/non':>13}{'loss m/n (no DP)':>20}"
    )
    for label, res in mia_report.items():
        for nid, r in res["per_node"].items():
            a, b = r["no_dp"], r["dp"]
            print(
                f"{label:<9}{nid:<9}{a['auc']:>9.3f} +-{a['auc_stderr']:.3f}{a['advantage']:>7.3f}"
                f"{b['auc']:>9.3f} +-{b['auc_stderr']:.3f}{b['advantage']:>7.3f}"
                f"{a['members']:>7}/{a['nonmembers']:<5}{a['member_loss']:>10.3f}/{a['nonmember_loss']:.3f}"
            )
        print(
            f"{label:<9}{'mean':<9}{fmt(res['mean_auc']['no_dp']):>9}{'':>14}{fmt(res['mean_auc']['dp']):>9}"
        )

    # --- targets
    targets: dict[str, Any] = {}
    if {"naive", "aware", "strictest"} <= set(settings):
        nv, aw, st = (settings[k]["groups"] for k in ("naive", "aware", "strictest"))
        targets["aware_beats_naive_on_strict_nodes"] = {
            "aware": aw[strictest]["final_acc"],
            "naive": nv[strictest]["final_acc"],
            "aware_late": aw[strictest]["late_acc"],
            "naive_late": nv[strictest]["late_acc"],
            "met": (aw[strictest]["final_acc"] or 0) > (nv[strictest]["final_acc"] or 0),
        }
        targets["aware_beats_strictest_on_mean_utility"] = {
            "aware": aw["all"]["final_acc"],
            "strictest": st["all"]["final_acc"],
            "aware_late": aw["all"]["late_acc"],
            "strictest_late": st["all"]["late_acc"],
            "met": (aw["all"]["final_acc"] or 0) > (st["all"]["final_acc"] or 0),
            "note": "strict nodes have the same epsilons in both; under 'strictest' the others "
            "have the strict (smaller) epsilons instead of their own",
        }
    if "default" in mia_report:
        dp_auc = mia_report["default"]["target"]["dp"]["auc"]
        targets["mia_auc_with_dp_at_most_0.55"] = {
            "node": mia_node,
            "auc": dp_auc,
            "met": dp_auc <= 0.55,
            "all_strict_nodes": {
                n: r["dp"]["auc"] for n, r in mia_report["default"]["per_node"].items()
            },
            **(
                {
                    "overfit_auc": mia_report["overfit"]["target"]["dp"]["auc"],
                    "overfit_met": mia_report["overfit"]["target"]["dp"]["auc"] <= 0.55,
                }
                if "overfit" in mia_report
                else {}
            ),
        }
    print("\ntargets")
    for k, v in targets.items():
        shown = {
            x: (round(y, 4) if isinstance(y, float) else y)
            for x, y in v.items()
            if x not in ("note", "all_strict_nodes")
        }
        print(f"  {k}: {'MET' if v['met'] else 'MISSED'}  {shown}")
    print(f"\nwall {wall:.0f} s; load average at the end {loadavg()}")
    if failed:
        print(f"FAILED runs: {', '.join(failed)}")

    report = {
        "topology": base.name,
        "topology_path": args.topology,
        "rounds": args.rounds,
        "seed": args.seed,
        "options": options,
        "profiles": profiles,
        "groups": groups,
        "strictest": strictest,
        "noise_strength": ns,
        "machine": {"host": platform.node(), "cores": os.cpu_count(), "load_end": loadavg()},
        "wall_s": wall,
        "runs": {n: {k: v for k, v in r.items() if k != "summary"} for n, r in runs.items()},
        "settings": settings,
        "sweep": sweep,
        "mia_node": mia_node,
        "mia": mia_report,
        "targets": targets,
        "failed": failed,
    }

    def clean(x: Any) -> Any:  # JSON has no inf
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

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

#!/usr/bin/env python3
"""Erasure against retraining from scratch: one learner request and one node leaving, exact and
approximate, verified on every node.

For each seed, one federation of `edu` nodes of the topology (default campus) runs in this
process (`m3tgossip.edu.replay.Federation`: the daemons' lockstep rounds with the mean mixer,
raw values, an open profile), `--rounds` rounds with each node's learners entering its pool
in `--stages` slices and a checkpoint of every node at each stage boundary. Then:

  retrain       from scratch without the erased records (the reference);
  exact         every node back to the checkpoint of the stage before the earliest slice that
                held an erased learner, replay from there without them (a node that leaves
                contributed from round 0: the whole run is replayed);
  approximate   from the final state: the owner takes bounded gradient-ascent steps on the
                forget set and repairs on its retained records (`m3tgossip.edu.unlearning`),
                then `--repair-rounds` rounds of ordinary gossip repair it elsewhere; a node
                that leaves is dropped by its neighbours and gossip repairs without it.

Targets: `learner` is one erasure request naming `--learners` learners of `--owner` who
enrolled together (one slice, drawn at random per seed; in the built-in data every learner
has one record, so one learner's forget accuracy is 0 or 1: the request names several to make
the figure readable); `node` is `--node` leaving for good.
Per node, its model is scored on the forget records (restricted to its tasks), on its retained
train records, on its held-out records, by loss-threshold membership inference of the forget
records against 500 non-members of the forget set's node (learners drawn as its own are, whom
no node trained on: `m3tgossip.edu.data.nonmember_data`), and by its distance to the
retrained model. Over nodes and then over seeds (mean, 95% Student-t interval):

  forget_acc_gap_pts, retain_acc_gap_pts, test_acc_gap_pts   erasure minus retrain, points
  mia_auc        per node (and its maximum over nodes, and the retrained model's own AUC)
  time_ratio     CPU seconds of the erasure over those of the retrain

Writes DIR/unlearning.json keyed by mode (`exact`, `approximate`) then target (`learner`,
`node`). Exits non-zero if a target is missed (`--no-check`: always 0).

    python benchmarks/unlearning.py --out runs/bench-unlearning
    python benchmarks/unlearning.py --out runs/quick --seeds 0 --rounds 8 --stages 2
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
import torch
from _common import ROOT, interval, loadavg, parser, setup, write_json

from m3tgossip.edu.data import DataConfig, node_data, nonmember_data
from m3tgossip.edu.replay import Federation, learner_mask_of
from m3tgossip.edu.unlearning import Probe, ascend, drop_records, verify
from m3tgossip.edu.workload import workload_options
from m3tgossip.harness.testbed_spec import parse_assignment
from m3tgossip.topology import load_topology

MODES = ("exact", "approximate")
TARGETS = ("learner", "node")
GAPS = ("forget_acc_gap_pts", "retain_acc_gap_pts", "test_acc_gap_pts")
#: the issue's targets for approximate erasure of a learner
APPROX_MAX_GAP_PTS = 1.0
APPROX_MAX_AUC = 0.55
APPROX_MAX_TIME_RATIO = 0.2


def evaluate(
    fed: Federation, forget: dict[str, Any], reference: dict[str, dict] | None
) -> dict[str, dict[str, Any]]:
    """Per active node: the verification figures of its model (see `unlearning.verify`)."""
    out = {}
    owner, idx = forget["node"], forget["idx"]
    cache = forget.setdefault("probes", {})
    for nid in fed.active():
        w = fed.nodes[nid]
        t = w.trainer
        if nid not in cache:  # the inputs (text through the frozen encoder) once per node
            keep = ~np.isin(fed.full_pool[nid], idx) if nid == owner else slice(None)
            cache[nid] = {
                "forget": (
                    Probe.train_records(t, idx)
                    if nid == owner
                    else Probe.of(w.model, forget["data"])
                ),
                "retain": Probe.train_records(t, fed.full_pool[nid][keep]),
                "test": Probe(t.test_set.batch, dict(t.test_set.labels)),
                "nonmembers": Probe.of(w.model, forget["nonmembers"]),
            }
        p = cache[nid]
        out[nid] = verify(
            w.model,
            forget=p["forget"],
            retain=p["retain"],
            test=p["test"],
            nonmembers=p["nonmembers"],
            reference=(reference or {}).get(nid),
        )
    return out


def gaps(arm: dict[str, dict], ref: dict[str, dict]) -> dict[str, float | None]:
    """Mean over nodes of arm minus retrain, in points; and the per-node AUCs."""
    out: dict[str, Any] = {}
    for key in ("forget_acc", "retain_acc", "test_acc"):
        d = [
            100 * (arm[n][key] - ref[n][key])
            for n in arm
            if n in ref and arm[n][key] is not None and ref[n][key] is not None
        ]
        out[f"{key}_gap_pts"] = float(np.mean(d)) if d else None
        out[f"{key}_gap_pts_max_abs"] = float(np.max(np.abs(d))) if d else None
    out["mia_auc"] = {n: arm[n]["mia_auc"] for n in arm}
    dist = [arm[n]["distance_to_reference"] for n in arm]
    dist = [x for x in dist if x is not None]
    out["distance_to_retrain"] = float(np.mean(dist)) if dist else None
    return out


def one_seed(topo: Any, seed: int, args: Any, options: dict[str, Any]) -> dict[str, Any]:
    o = workload_options(options)
    config = DataConfig(records=o["records"], alpha=o["alpha"], seed=seed)
    t0 = time.monotonic()
    fed = Federation(topo, args.rounds, seed=seed, options=options, stages=args.stages)
    print(f"  seed {seed}: {len(fed.nodes)} nodes built in {time.monotonic() - t0:.0f} s")
    ckpts: dict[int, Any] = {}
    t_orig = fed.run(checkpoints=ckpts)
    final = fed.snapshot()
    print(f"  seed {seed}: original run {t_orig:.0f} CPU s")
    rng = np.random.default_rng([seed, 15])
    owner = fed.nodes[args.owner]
    # one cohort: learners who enrolled together (one slice), the slice drawn at random
    cohort = int(rng.integers(fed.stages))
    pool = fed.full_pool[args.owner][fed.slice_of[args.owner] == cohort]
    chosen = rng.choice(pool, size=min(args.learners, len(pool)), replace=False)
    learners = sorted({str(owner.trainer.learners[i]) for i in chosen})
    o_train, _ = node_data(topo.node(args.owner), config)
    l_idx = np.flatnonzero(learner_mask_of(owner, learners))
    n_train, _ = node_data(topo.node(args.node), config)
    n_idx = fed.full_pool[args.node]
    forgets = {
        "learner": {
            "node": args.owner,
            "idx": l_idx,
            "data": o_train.subset(l_idx),
            "nonmembers": nonmember_data(topo.node(args.owner), config),
        },
        "node": {
            "node": args.node,
            "idx": n_idx,
            "data": n_train.subset(n_idx),
            "nonmembers": nonmember_data(topo.node(args.node), config),
        },
    }
    result: dict[str, Any] = {
        "learners": learners,
        "cohort_slice": cohort,
        "owner": args.owner,
        "node": args.node,
    }
    for target in TARGETS:
        forget = forgets[target]
        excl = (
            {"learners": {args.owner: learners}} if target == "learner" else {"nodes": [args.node]}
        )
        # retrain from scratch without them
        fed.reset()
        fed.exclude(**excl)
        t_retrain = fed.run()
        ref_vectors = fed.vectors()
        ref = evaluate(fed, forget, None)
        # exact: back to the stage checkpoint before their first contribution, replay
        stage = fed.first_stage(args.owner, learners) if target == "learner" else 0
        start = fed.bounds[stage] if stage < fed.stages else fed.rounds
        fed.reset(ckpts[start] if start < fed.rounds else final)
        fed.exclude(**excl)
        t_exact = fed.run(start=start)
        exact = evaluate(fed, forget, ref_vectors)
        # approximate: ascent at the owner, then gossip repair
        fed.reset(final)
        fed.exclude(**excl)
        c0 = time.process_time()
        steps = None
        if target == "learner":
            t = owner.trainer
            fed.set_pools(fed.stages - 1)
            drop_records(t, learner_mask_of(owner, learners))
            steps = ascend(t, l_idx, ascent_steps=args.ascent_steps, repair_steps=args.repair_steps)
        fed.run(start=fed.rounds, stop=fed.rounds + args.repair_rounds)
        t_approx = time.process_time() - c0
        approx = evaluate(fed, forget, ref_vectors)
        result[target] = {
            "retrain": {"cpu_s": t_retrain, "per_node": ref},
            "exact": {
                "cpu_s": t_exact,
                "replayed_from_round": start,
                "rounds_replayed": fed.rounds - start,
                "per_node": exact,
                **gaps(exact, ref),
                "time_ratio": t_exact / t_retrain,
            },
            "approximate": {
                "cpu_s": t_approx,
                "ascent": steps,
                "repair_rounds": args.repair_rounds,
                "per_node": approx,
                **gaps(approx, ref),
                "time_ratio": t_approx / t_retrain,
            },
        }
        for mode in MODES:
            r = result[target][mode]
            print(
                f"  seed {seed} {mode:11s} {target:7s}: forget {r['forget_acc_gap_pts']:+.2f} "
                f"retain {r['retain_acc_gap_pts']:+.2f} test {r['test_acc_gap_pts']:+.2f} pts, "
                f"max AUC {max(v for v in r['mia_auc'].values() if v is not None):.3f}, "
                f"time ratio {r['time_ratio']:.3f}",
                flush=True,
            )
    return result


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in MODES:
        out[mode] = {}
        for target in TARGETS:
            arms = [r[target][mode] for r in runs]
            refs = [r[target]["retrain"] for r in runs]
            nodes = sorted({n for a in arms for n in a["mia_auc"]})
            entry: dict[str, Any] = {k: interval(a[k] for a in arms) for k in GAPS}
            for k in GAPS:
                entry[k + "_max_abs"] = interval(a[k + "_max_abs"] for a in arms)
            entry["mia_auc"] = {n: interval(a["mia_auc"].get(n) for a in arms) for n in nodes}
            entry["mia_auc_max"] = interval(
                max((v for v in a["mia_auc"].values() if v is not None), default=None) for a in arms
            )
            entry["retrain_mia_auc"] = {
                n: interval(r["per_node"].get(n, {}).get("mia_auc") for r in refs) for n in nodes
            }
            entry["time_ratio"] = interval(a["time_ratio"] for a in arms)
            entry["distance_to_retrain"] = interval(a["distance_to_retrain"] for a in arms)
            if mode == "exact":
                entry["rounds_replayed"] = [a["rounds_replayed"] for a in arms]
            out[mode][target] = entry
    return out


def check(summary: dict[str, Any]) -> list[str]:
    """The issue's targets for approximate erasure of a learner that the means miss."""
    a = summary["approximate"]["learner"]
    missed = []
    for k in GAPS:
        m = a[k]["mean"]
        if m is None or abs(m) > APPROX_MAX_GAP_PTS:
            missed.append(f"approximate learner {k} = {m}")
    for n, v in a["mia_auc"].items():
        if v["mean"] is not None and v["mean"] > APPROX_MAX_AUC:
            missed.append(f"approximate learner mia_auc on {n} = {v['mean']:.3f}")
    if (a["time_ratio"]["mean"] or 0) > APPROX_MAX_TIME_RATIO:
        missed.append(f"approximate learner time_ratio = {a['time_ratio']['mean']:.3f}")
    return missed


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, None)
    p.add_argument("--topology", default=str(ROOT / "topology" / "campus.toml"))
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--stages", type=int, default=4, help="enrollment slices per node")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated federation seeds")
    p.add_argument("--owner", default="uni-a", help="the node holding the erased learners")
    p.add_argument("--learners", type=int, default=32, help="learners in the erasure request")
    p.add_argument("--node", default="inst-c", help="the node that leaves")
    p.add_argument("--ascent-steps", type=int, default=5)
    p.add_argument("--repair-steps", type=int, default=10)
    p.add_argument("--repair-rounds", type=int, default=3)
    p.add_argument("--no-check", action="store_true", help="exit 0 even if a target is missed")
    p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    options = dict(parse_assignment(o) for o in args.option)
    topo = load_topology(args.topology)
    out = setup(
        args.out,
        f"unlearning benchmark: topology {topo.name}, rounds {args.rounds}, stages "
        f"{args.stages}, seeds {seeds}, {args.learners} learners of {args.owner}, node "
        f"{args.node} leaves, ascent {args.ascent_steps} + repair {args.repair_steps} steps, "
        f"{args.repair_rounds} repair rounds, profile open, options {options or 'defaults'}",
    )
    started = time.monotonic()
    runs = [one_seed(topo, seed, args, options) for seed in seeds]
    summary = summarise(runs)
    missed = check(summary)
    data = {
        "setup": {
            "topology": topo.name,
            "rounds": args.rounds,
            "stages": args.stages,
            "seeds": seeds,
            "owner": args.owner,
            "learners": args.learners,
            "node": args.node,
            "ascent_steps": args.ascent_steps,
            "repair_steps": args.repair_steps,
            "repair_rounds": args.repair_rounds,
            "profile": "open",
            "options": options,
            "wall_s": time.monotonic() - started,
            "load_after": loadavg(),
        },
        **summary,
        "targets_missed": missed,
        "runs": runs,
    }
    path = write_json(out, "unlearning", data, default=float)
    for mode in MODES:
        for target in TARGETS:
            e = summary[mode][target]
            line = ", ".join(f"{k} {_fmt(e[k])}" for k in GAPS)
            print(
                f"{mode:11s} {target:7s}: {line}, max AUC {_fmt(e['mia_auc_max'], 3)}, "
                f"time_ratio {_fmt(e['time_ratio'], 3)}"
            )
    print("targets missed: " + ("; ".join(missed) if missed else "none"))
    print(f"wrote {path}")
    return 0 if args.no_check or not missed else 1


def _fmt(iv: dict[str, Any], digits: int = 2) -> str:
    if iv["mean"] is None:
        return "n/a"
    half = f" ± {iv['ci95']:.{digits}f}" if iv["ci95"] is not None else ""
    return f"{iv['mean']:.{digits}f}{half}"


if __name__ == "__main__":
    raise SystemExit(main())

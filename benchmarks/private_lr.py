#!/usr/bin/env python3
"""The learning rate of private training: one node trained alone with per-learner DP-SGD at
its profile's calibrated noise, at several AdamW learning rates, against the same node without
DP at the workload's `lr`.

For each node of `--nodes`, seed of `--seeds` and rate of `--lrs`: the node's `edu` workload
(built-in records of the topology, default campus) is built in this process, its noise is
calibrated as the daemon calibrates it (`training_noise` for `--rounds` rounds of
`local_steps` steps at its sampling rate, the node's own profile unless `--profile` names
another), and it trains `--rounds` x `local_steps` steps alone, no gossip. The figure is the
mean accuracy over its tasks on 300 unseen learners of its institution at the end (and on its
held-out records). The open row trains without DP at `lr`. Mean and 95% Student-t interval
over the seeds per node and rate.

Writes DIR/private_lr.json.

    python benchmarks/private_lr.py --out runs/bench-private-lr
    python benchmarks/private_lr.py --out runs/quick --nodes uni-b --seeds 0 --lrs 3e-3,1e-2
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
from _common import ROOT, interval, loadavg, parser, setup, write_json

from m3tgossip.edu.workload import EduWorkload
from m3tgossip.privacy import PROFILES, profile_for
from m3tgossip.privacy.training import training_noise
from m3tgossip.topology import load_topology


def one(topo: Any, nid: str, seed: int, profile: str, lr: float | None, rounds: int) -> dict:
    """Train node `nid` alone; `lr` None: without DP at the workload's lr."""
    w = EduWorkload(topo, nid, seed, {} if lr is None else {"dp_lr": lr})
    if lr is not None:
        plan = w.private_training_plan()
        if plan is None:
            raise SystemExit(f"node {nid}: nothing to train privately")
        noise = training_noise(PROFILES[profile], plan, rounds, w.trained_components())
        w.use_private_training(noise)
    t0 = time.process_time()
    for _ in range(rounds):
        w.trainer.train_steps(w.steps)
    ev = w.trainer.evaluate()
    return {
        "unseen_acc": ev["unseen"]["mean_acc"],
        "own_acc": ev["mean_acc"],
        "noise_multiplier": noise.noise_multiplier if lr is not None else None,
        "cpu_s": time.process_time() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, None)
    p.add_argument("--topology", default=str(ROOT / "topology" / "campus.toml"))
    p.add_argument("--nodes", default="uni-b,inst-a", help="comma-separated node ids")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--lrs", default="3e-3,1e-2,3e-2", help="DP-SGD learning rates")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--profile", default=None, help="profile for every node (default its own)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    topo = load_topology(args.topology)
    nodes = args.nodes.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    out = setup(
        args.out,
        f"private learning rate: {topo.name}, nodes {nodes}, seeds {seeds}, lrs {lrs}, "
        f"{args.rounds} rounds alone",
    )
    report: dict[str, Any] = {"setup": vars(args), "load_start": loadavg(), "nodes": {}}
    for nid in nodes:
        profile = args.profile or topo.node(nid).privacy
        if profile_for(profile).is_open:
            raise SystemExit(f"node {nid}: profile {profile!r} is open; name a private one")
        rows: dict[str, Any] = {}
        for label, lr in [("open", None)] + [(f"{x:g}", x) for x in lrs]:
            runs = [one(topo, nid, s, profile, lr, args.rounds) for s in seeds]
            rows[label] = {
                "unseen_acc": interval(r["unseen_acc"] for r in runs),
                "own_acc": interval(r["own_acc"] for r in runs),
                "runs": runs,
            }
            u = rows[label]["unseen_acc"]
            half = f" ± {u['ci95']:.3f}" if u["ci95"] is not None else ""
            print(f"{nid:8s} {profile:6s} {label:>6s}: unseen {u['mean']:.3f}{half}", flush=True)
        report["nodes"][nid] = {"profile": profile, "rates": rows}
    report["load_end"] = loadavg()
    write_json(out, "private_lr", report)
    print(f"wrote {out / 'private_lr.json'}; load average {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

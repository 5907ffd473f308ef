#!/usr/bin/env python3
"""Where a round's time goes: local training against everything else, lockstep and overlapped.

Runs the multi-process testbed with the education workload on ring-8 (8 daemons on this
machine) twice: in lockstep (send, wait for the neighbours' round, mix) and with
`gossip.overlap = true` (the previous round's messages arrive while the node trains and are
mixed after it). For each it reports the mean round breakdown over all nodes and rounds (local
training, send, wait, mix, evaluation and checkpoint), the share of the round spent outside
local training, the same without each daemon's first two rounds (where the daemons that came
up first wait for the last ones), and the final mean held-out accuracy.

    python benchmarks/rounds.py --out runs/bench-rounds

Prints the setup and a table, writes rounds.json.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from _common import (
    ROOT,
    each_run,
    loadavg,
    machine,
    parser,
    run_testbed,
    setup,
    wait_for_load,
    write_json,
)

from m3tgossip.harness import TestbedSpec

#: (label, gossip.overlap)
MODES = (("lockstep", False), ("overlap", True))


def outside(breakdown: dict[str, float] | None) -> float | None:
    """Share of the round outside local training."""
    if not breakdown or not breakdown.get("total"):
        return None
    return (breakdown["total"] - breakdown["local"]) / breakdown["total"]


def main() -> int:
    p = parser(__doc__, "runs/bench-rounds", load=True)
    p.add_argument("--topology", default=str(ROOT / "topology" / "ring-8.toml"))
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument(
        "--target",
        type=float,
        default=0.10,
        help="largest share of the round outside local training",
    )
    args = p.parse_args()
    out = setup(
        Path(args.out).resolve(),
        f"{Path(args.topology).name}, education workload (default options), "
        f"{args.rounds} rounds, one daemon per node on {os.cpu_count()} CPUs",
    )
    info = {
        "topology": args.topology,
        "workload": "edu",
        "rounds": args.rounds,
        "target": args.target,
        **machine(),
    }
    load0 = wait_for_load(args.load_threshold, args.max_wait)
    print(f"load before: {load0}", flush=True)
    rows: list[dict[str, Any]] = []
    for label, overlap in each_run(MODES, "schedules"):
        load = loadavg()
        s, wall = run_testbed(
            TestbedSpec(
                topology=args.topology,
                out=out / label,
                workload="edu",
                rounds=args.rounds,
                settings={"gossip.overlap": overlap},
                quiet=True,
            )
        )
        row = {
            "mode": label,
            "overlap": overlap,
            "exit": s.exit_code,
            "wall_seconds": wall,
            "final_mean_acc": s.final_mean_acc,
            "round_breakdown_s": s.round_breakdown_s,
            "round_breakdown_after_start_s": s.round_breakdown_after_start_s,
            "outside_local_fraction": outside(s.round_breakdown_s),
            "outside_local_fraction_after_start": outside(s.round_breakdown_after_start_s),
            "load_before": load,
            "load_after": loadavg(),
        }
        rows.append(row)
        print(
            f"{label:<9} exit {s.exit_code}  acc {row['final_mean_acc']:.4f}  outside local "
            f"training {row['outside_local_fraction']:.3f} (after start "
            f"{row['outside_local_fraction_after_start']:.3f})  wall {wall:.1f} s  "
            f"load {row['load_after']}",
            flush=True,
        )
    path = write_json(out, "rounds", {"setup": info, "load_before": load0, "rows": rows})
    keys = ("local", "send", "wait", "mix", "eval_checkpoint", "total")
    print(
        f"\n{Path(args.topology).stem}, education workload, {args.rounds} rounds: "
        "mean seconds per round"
    )
    print(
        f"{'mode':<10}"
        + "".join(f"{k:>17}" for k in keys)
        + f"{'outside':>9}{'after start':>13}{'acc':>8}"
    )
    for r in rows:
        bd = r["round_breakdown_s"] or {}
        print(
            f"{r['mode']:<10}"
            + "".join(f"{bd.get(k, float('nan')):>17.3f}" for k in keys)
            + f"{r['outside_local_fraction']:>9.3f}{r['outside_local_fraction_after_start']:>13.3f}"
            + f"{r['final_mean_acc']:>8.4f}"
        )
    print(f"target: at most {args.target:.0%} of the round outside local training")
    print(f"wrote {path}")
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

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

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from m3tgossip.harness import testbed  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import loadavg, wait_for_load  # noqa: E402

MODES = (("lockstep", "false"), ("overlap", "true"))


def outside(breakdown: dict[str, float] | None) -> float | None:
    """Share of the round outside local training."""
    if not breakdown or not breakdown.get("total"):
        return None
    return (breakdown["total"] - breakdown["local"]) / breakdown["total"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench-rounds")
    p.add_argument("--topology", default=str(ROOT / "topology" / "ring-8.toml"))
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument(
        "--target",
        type=float,
        default=0.10,
        help="largest share of the round outside local training",
    )
    p.add_argument("--load-threshold", type=float, default=4.0)
    p.add_argument(
        "--max-wait", type=float, default=600.0, help="longest wait for the load to drop (s)"
    )
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    setup = {
        "topology": args.topology,
        "workload": "edu",
        "rounds": args.rounds,
        "target": args.target,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    print(
        f"setup: {Path(args.topology).name}, education workload (default options), {args.rounds} rounds, "
        f"one daemon per node on {os.cpu_count()} CPUs, python {platform.python_version()}",
        flush=True,
    )
    load0 = wait_for_load(args.load_threshold, args.max_wait)
    print(f"load before: {load0}", flush=True)
    rows: list[dict[str, Any]] = []
    for label, overlap in MODES:
        run_dir = out / label
        load = loadavg()
        t0 = time.monotonic()
        code = testbed.main(
            [
                "--topology",
                args.topology,
                "--workload",
                "edu",
                "--rounds",
                str(args.rounds),
                "--set",
                f"gossip.overlap={overlap}",
                "--out",
                str(run_dir),
                "--quiet",
            ]
        )
        wall = time.monotonic() - t0
        s = json.loads((run_dir / "summary.json").read_text())
        row = {
            "mode": label,
            "overlap": overlap == "true",
            "exit": code,
            "wall_seconds": wall,
            "final_mean_acc": s.get("final_mean_acc"),
            "round_breakdown_s": s.get("round_breakdown_s"),
            "round_breakdown_after_start_s": s.get("round_breakdown_after_start_s"),
            "outside_local_fraction": outside(s.get("round_breakdown_s")),
            "outside_local_fraction_after_start": outside(s.get("round_breakdown_after_start_s")),
            "load_before": load,
            "load_after": loadavg(),
        }
        rows.append(row)
        print(
            f"{label:<9} exit {code}  acc {row['final_mean_acc']:.4f}  outside local training "
            f"{row['outside_local_fraction']:.3f} (after start {row['outside_local_fraction_after_start']:.3f})  "
            f"wall {wall:.1f} s  load {row['load_after']}",
            flush=True,
        )
    (out / "rounds.json").write_text(
        json.dumps({"setup": setup, "load_before": load0, "rows": rows}, indent=2)
    )
    keys = ("local", "send", "wait", "mix", "eval_checkpoint", "total")
    print(
        f"\n{Path(args.topology).stem}, education workload, {args.rounds} rounds: mean seconds per round"
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
    print(f"wrote {out / 'rounds.json'}")
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Rounds to consensus on every topology in topology/: measured by real daemons vs predicted.

For each spec, runs the multi-process testbed with the consensus workload (one daemon per node
on 127.0.0.1) long enough to reach the target relative error, and compares the measured rounds
with the spectral prediction (SLEM of the Metropolis-Hastings matrix). Prints a table, writes
JSON and, when matplotlib is installed, a PNG of error against rounds.

    python benchmarks/consensus.py --out runs/bench-consensus
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

from _common import ROOT, each_run, parser, pyplot, run_testbed, save_png, setup, write_json

from m3tgossip.consensus import metropolis_hastings, predicted_rounds, slem
from m3tgossip.harness import TestbedSpec
from m3tgossip.topology import load_topology


def main() -> int:
    p = parser(__doc__, "runs/bench-consensus")
    p.add_argument("--target", type=float, default=1e-6)
    p.add_argument("--size", type=int, default=1024, help="floats per component")
    p.add_argument(
        "--specs", nargs="*", default=None, help="topology files (default: all in topology/)"
    )
    args = p.parse_args()
    out = setup(
        args.out,
        f"consensus workload, {args.size} float64 per component, target {args.target:g}",
    )
    specs = (
        [Path(s) for s in args.specs] if args.specs else sorted((ROOT / "topology").glob("*.toml"))
    )
    rows = []
    for spec in each_run(specs, "specs"):
        topo = load_topology(spec)
        if topo.dynamics != "static":
            print(
                f"{topo.name:<16} time-varying: no spectral prediction; see benchmarks/dynamics.py"
            )
            continue
        worst = max(
            slem(metropolis_hastings(topo.component_graph(c)))
            for c in topo.components()
            if len(topo.holders(c)) > 1
        )
        # rounds: enough for an initial relative error up to ~sqrt(n) * 10, plus margin
        guess = predicted_rounds(worst, args.target, 10.0 * math.sqrt(len(topo.nodes))) or 10
        rounds = int(guess * 1.3) + 5
        run_dir = Path(tempfile.mkdtemp(prefix=f"{topo.name}-", dir=out))
        s, _ = run_testbed(
            TestbedSpec(
                topology=spec,
                out=run_dir,
                workload="consensus",
                rounds=rounds,
                target=args.target,
                options={"size": args.size},
                quiet=True,
            )
        )
        measured, predicted = s.measured_rounds, s.predicted_rounds
        ratio = measured / predicted if measured and predicted else None
        rows.append(
            {
                "topology": topo.name,
                "nodes": len(topo.nodes),
                "edges": len(topo.edges),
                "slem": s.slem,
                "initial_error": s.initial_error,
                "predicted_rounds": predicted,
                "measured_rounds": measured,
                "ratio": ratio,
                "final_error": s.final_consensus_error,
                "rounds_run": rounds,
                "wall_seconds": s.wall_seconds,
                "exit": s.exit_code,
                "consensus_error": s.consensus_error,
            }
        )
        shown = ratio if ratio is None else round(ratio, 3)
        print(
            f"{topo.name:<16} nodes {len(topo.nodes):>3}  SLEM {s.slem:.4f}  "
            f"predicted {predicted}  measured {measured}  ratio {shown}  "
            f"final {s.final_consensus_error:.2e}  wall {s.wall_seconds:.1f} s",
            flush=True,
        )
    path = write_json(out, "consensus", {"target": args.target, "size": args.size, "rows": rows})
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for row in rows:
            ax.semilogy(
                range(1, len(row["consensus_error"]) + 1),
                row["consensus_error"],
                label=row["topology"],
            )
        ax.axhline(args.target, color="grey", ls="--", lw=0.8)
        ax.set_xlabel("round")
        ax.set_ylabel("max relative error to the exact mean")
        ax.set_title("Consensus by real daemons on loopback")
        ax.legend(fontsize=8)
        print(f"wrote {path} and {save_png(fig, out, 'consensus')}")
    print(f"{'topology':<16}{'predicted':>10}{'measured':>10}{'ratio':>8}")
    for row in rows:
        r = "-" if row["ratio"] is None else f"{row['ratio']:.3f}"
        print(
            f"{row['topology']:<16}{row['predicted_rounds']!s:>10}"
            f"{row['measured_rounds']!s:>10}{r:>8}"
        )
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Rounds to consensus on every topology in topology/: measured by real daemons vs predicted.

For each spec, runs the multi-process testbed with the consensus workload (one daemon per node
on 127.0.0.1) long enough to reach the target relative error, and compares the measured rounds
with the spectral prediction (SLEM of the Metropolis-Hastings matrix). Prints a table, writes
JSON and, when matplotlib is installed, a PNG of error against rounds.

    python benchmarks/consensus.py --out runs/bench-consensus
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from m3tgossip.consensus import metropolis_hastings, predicted_rounds, slem  # noqa: E402
from m3tgossip.harness import testbed  # noqa: E402
from m3tgossip.topology import load_topology  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench-consensus", help="folder for JSON, PNG and runs")
    p.add_argument("--target", type=float, default=1e-6)
    p.add_argument("--size", type=int, default=1024, help="floats per component")
    p.add_argument(
        "--specs", nargs="*", default=None, help="topology files (default: all in topology/)"
    )
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    specs = (
        [Path(s) for s in args.specs] if args.specs else sorted((ROOT / "topology").glob("*.toml"))
    )
    print(
        f"setup: consensus workload, {args.size} float64 per component, target {args.target:g}, "
        f"python {platform.python_version()}, {platform.machine()}"
    )
    rows = []
    for spec in specs:
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
        code = testbed.main(
            [
                "--topology",
                str(spec),
                "--workload",
                "consensus",
                "--rounds",
                str(rounds),
                "--out",
                str(run_dir),
                "--target",
                str(args.target),
                "-o",
                f"size={args.size}",
                "--quiet",
            ]
        )
        s = json.loads((run_dir / "summary.json").read_text())
        measured, predicted = s["measured_rounds"], s["predicted_rounds"]
        ratio = measured / predicted if measured and predicted else None
        rows.append(
            {
                "topology": topo.name,
                "nodes": len(topo.nodes),
                "edges": len(topo.edges),
                "slem": s["slem"],
                "initial_error": s["initial_error"],
                "predicted_rounds": predicted,
                "measured_rounds": measured,
                "ratio": ratio,
                "final_error": s["final_consensus_error"],
                "rounds_run": rounds,
                "wall_seconds": s["wall_seconds"],
                "exit": code,
                "consensus_error": s["consensus_error"],
            }
        )
        print(
            f"{topo.name:<16} nodes {len(topo.nodes):>3}  SLEM {s['slem']:.4f}  "
            f"predicted {predicted}  measured {measured}  ratio {ratio if ratio is None else round(ratio, 3)}  "
            f"final {s['final_consensus_error']:.2e}  wall {s['wall_seconds']:.1f} s",
            flush=True,
        )
    (out / "consensus.json").write_text(
        json.dumps({"target": args.target, "size": args.size, "rows": rows}, indent=2)
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
    else:
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
        fig.tight_layout()
        fig.savefig(out / "consensus.png", dpi=120)
        print(f"wrote {out / 'consensus.json'} and {out / 'consensus.png'}")
    print(f"{'topology':<16}{'predicted':>10}{'measured':>10}{'ratio':>8}")
    for row in rows:
        r = "-" if row["ratio"] is None else f"{row['ratio']:.3f}"
        print(
            f"{row['topology']:<16}{row['predicted_rounds']!s:>10}{row['measured_rounds']!s:>10}{r:>8}"
        )
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Compression: accuracy against bytes (education workload) and error against bytes (consensus).

Runs the multi-process testbed on ring-8 once per codec (raw, fp16, int8, topk:0.1; top-k with
a CHOCO step gamma below 1), first with the education workload (final mean held-out accuracy
and total bytes sent, headers and control messages included, from the nodes' byte counters),
then with the consensus workload in float32 (max relative error to the exact mean per round
against the cumulative bytes sent, and the bytes to reach the target error). What a codec
drops stays in the replica gap and is sent in later rounds (error feedback), so every codec
should still reach consensus; the question is at what cost in bytes and rounds.

    python benchmarks/compression.py --out runs/bench-compression

Prints the setup and tables, writes compression.json and, when matplotlib is installed,
compression.png.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from _common import (
    ROOT,
    each_run,
    loadavg,
    machine,
    parser,
    pyplot,
    run_testbed,
    save_png,
    setup,
    wait_for_load,
    write_json,
)

from m3tgossip.daemon.metrics import read_metrics
from m3tgossip.harness import TestbedSpec

#: (label, codec, gamma) per workload. Top-k keeps a tenth of the values, so CHOCO needs a step
#: below 1; the consensus workload, whose nodes start far apart, diverges with 0.5 and needs 0.2.
EDU_CODECS = [
    ("raw", "raw", 1.0),
    ("fp16", "fp16", 1.0),
    ("int8", "int8", 1.0),
    ("topk:0.1 g0.5", "topk:0.1", 0.5),
]
CONSENSUS_CODECS = [*EDU_CODECS[:-1], ("topk:0.1 g0.2", "topk:0.1", 0.2)]


def cumulative_bytes(run_dir: Path) -> list[int]:
    """Total bytes sent by all nodes up to the end of each round (from the metrics records)."""
    per_node = []
    for path in sorted((run_dir / "nodes").glob("*/metrics.jsonl")):
        per_node.append({int(r["round"]): int(r.get("bytes_out", 0)) for r in read_metrics(path)})
    n_rounds = max((max(d) + 1 for d in per_node if d), default=0)
    out = []
    for r in range(n_rounds):
        total = 0
        for d in per_node:
            done = [k for k in d if k <= r]
            total += d[max(done)] if done else 0
        out.append(total)
    return out


def first_round_at(errors: list[float | None], target: float) -> int | None:
    """1-based round at which the error first reaches the target (None if never)."""
    return next((i + 1 for i, e in enumerate(errors) if e is not None and e <= target), None)


def main() -> int:
    p = parser(__doc__, "runs/bench-compression", load=True)
    p.add_argument("--topology", default=str(ROOT / "topology" / "ring-8.toml"))
    p.add_argument("--edu-rounds", type=int, default=20)
    p.add_argument("--consensus-rounds", type=int, default=200)
    p.add_argument("--size", type=int, default=1024, help="floats per component (consensus)")
    p.add_argument("--target", type=float, default=1e-6)
    p.add_argument("--skip-edu", action="store_true")
    args = p.parse_args()
    info = {
        "topology": args.topology,
        "edu_codecs": EDU_CODECS,
        "consensus_codecs": CONSENSUS_CODECS,
        "edu_rounds": args.edu_rounds,
        "consensus_rounds": args.consensus_rounds,
        "consensus_size": args.size,
        "consensus_dtype": "float32",
        "target": args.target,
        **machine(),
    }
    out = setup(
        Path(args.out).resolve(),
        f"{Path(args.topology).name}, codecs {', '.join(c[0] for c in EDU_CODECS)} "
        f"(consensus: top-k with gamma 0.2); edu {args.edu_rounds} rounds (default workload "
        f"options); consensus {args.consensus_rounds} rounds, {args.size} float32 per "
        f"component, target {args.target:g}",
    )
    load0 = wait_for_load(args.load_threshold, args.max_wait)
    print(f"load before: {load0}", flush=True)
    edu_rows: list[dict[str, Any]] = []
    if not args.skip_edu:
        for label, codec, gamma in each_run(EDU_CODECS, "edu codecs"):
            load = loadavg()
            s, wall = run_testbed(
                TestbedSpec(
                    topology=args.topology,
                    out=out / f"edu-{codec.replace(':', '')}",
                    workload="edu",
                    rounds=args.edu_rounds,
                    settings={"gossip.compression": codec, "gossip.gamma": gamma},
                    quiet=True,
                )
            )
            per_node = s.per_node or {}
            curve = [
                sum(v["mean_acc"][i] for v in per_node.values()) / len(per_node)
                for i in range(min(len(v["mean_acc"]) for v in per_node.values()))
            ]
            row = {
                "codec": label,
                "compression": codec,
                "gamma": gamma,
                "final_mean_acc": s.final_mean_acc,
                "bytes_sent_total": sum(s.bytes_sent.values()),
                "eval_rounds": next(iter(per_node.values()))["rounds"],
                "mean_acc_curve": curve,
                "round_breakdown_s": s.round_breakdown_s,
                "wall_seconds": wall,
                "exit": s.exit_code,
                "load_before": load,
                "load_after": loadavg(),
            }
            edu_rows.append(row)
            print(
                f"edu {label:<14} acc {row['final_mean_acc']:.4f}  "
                f"bytes {row['bytes_sent_total'] / 1e6:.2f} MB  wall {wall:.1f} s  "
                f"exit {s.exit_code}  load {row['load_after']}",
                flush=True,
            )
        raw = edu_rows[0]
        for row in edu_rows:
            row["acc_delta_points"] = 100 * (row["final_mean_acc"] - raw["final_mean_acc"])
            row["bytes_ratio_vs_raw"] = raw["bytes_sent_total"] / row["bytes_sent_total"]
    cons_rows: list[dict[str, Any]] = []
    for label, codec, gamma in each_run(CONSENSUS_CODECS, "consensus codecs"):
        run_dir = out / f"consensus-{codec.replace(':', '')}"
        load = loadavg()
        s, wall = run_testbed(
            TestbedSpec(
                topology=args.topology,
                out=run_dir,
                workload="consensus",
                rounds=args.consensus_rounds,
                target=args.target,
                options={"size": args.size, "dtype": "float32"},
                settings={"gossip.compression": codec, "gossip.gamma": gamma},
                quiet=True,
            )
        )
        cum = cumulative_bytes(run_dir)
        errors = s.consensus_error or []
        row = {
            "codec": label,
            "compression": codec,
            "gamma": gamma,
            "final_error": s.final_consensus_error,
            "rounds_to_target": first_round_at(errors, args.target),
            "rounds_to_1e-3": first_round_at(errors, 1e-3),
            "bytes_sent_total": sum(s.bytes_sent.values()),
            "cumulative_bytes": cum,
            "consensus_error": errors,
            "wall_seconds": wall,
            "exit": s.exit_code,
            "load_before": load,
            "load_after": loadavg(),
        }
        for key in ("rounds_to_target", "rounds_to_1e-3"):
            r = row[key]
            row[key.replace("rounds", "bytes")] = cum[r - 1] if r else None
        cons_rows.append(row)
        print(
            f"consensus {label:<14} rounds to {args.target:g} {row['rounds_to_target']}  "
            f"final {row['final_error']:.2e}  bytes to target {row['bytes_to_target']}  "
            f"wall {wall:.1f} s  exit {s.exit_code}  load {row['load_after']}",
            flush=True,
        )
    verdict = None
    if edu_rows:
        ok = [
            r
            for r in edu_rows
            if r["compression"] in ("int8", "topk:0.1")
            and r["acc_delta_points"] >= -1.0
            and r["bytes_ratio_vs_raw"] >= 4.0
        ]
        verdict = {"met": bool(ok), "by": [r["codec"] for r in ok]}
    path = write_json(
        out,
        "compression",
        {
            "setup": info,
            "load_before": load0,
            "edu": edu_rows,
            "consensus": cons_rows,
            "target_verdict": verdict,
        },
    )
    plot(out, path, edu_rows, cons_rows, args.target)
    if edu_rows:
        print(f"\neducation workload, {Path(args.topology).stem}, {args.edu_rounds} rounds")
        print(
            f"{'codec':<16}{'final acc':>10}{'delta pts':>10}{'MB sent':>10}{'x fewer':>9}"
            f"{'wall s':>8}"
        )
        for r in edu_rows:
            print(
                f"{r['codec']:<16}{r['final_mean_acc']:>10.4f}{r['acc_delta_points']:>10.2f}"
                f"{r['bytes_sent_total'] / 1e6:>10.2f}{r['bytes_ratio_vs_raw']:>9.2f}"
                f"{r['wall_seconds']:>8.1f}"
            )
        print(
            f"target (int8 or top-k within 1 point of raw with >= 4x fewer bytes): "
            f"{'met by ' + ', '.join(verdict['by']) if verdict['met'] else 'not met'}"
        )
    print(f"\nconsensus workload, float32, {args.consensus_rounds} rounds")
    print(
        f"{'codec':<16}{'rnd 1e-3':>9}{'rnd ' + format(args.target, 'g'):>10}{'MB to tgt':>11}"
        f"{'final err':>11}{'MB total':>10}"
    )
    for r in cons_rows:
        mb = f"{r['bytes_to_target'] / 1e6:.3f}" if r["bytes_to_target"] else "-"
        print(
            f"{r['codec']:<16}{r['rounds_to_1e-3']!s:>9}{r['rounds_to_target']!s:>10}{mb:>11}"
            f"{r['final_error']:>11.2e}{r['bytes_sent_total'] / 1e6:>10.3f}"
        )
    return 0 if all(r["exit"] == 0 for r in edu_rows + cons_rows) else 1


def plot(
    out: Path,
    json_path: Path,
    edu_rows: list[dict[str, Any]],
    cons_rows: list[dict[str, Any]],
    target: float,
) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in edu_rows:
        axes[0].scatter(r["bytes_sent_total"] / 1e6, r["final_mean_acc"], label=r["codec"])
    axes[0].set_xlabel("total bytes sent (MB)")
    axes[0].set_ylabel("final mean held-out accuracy")
    axes[0].set_title("Education workload")
    if edu_rows:
        axes[0].legend(fontsize=8)
    for r in cons_rows:
        n = min(len(r["cumulative_bytes"]), len(r["consensus_error"]))
        axes[1].semilogy(
            [b / 1e6 for b in r["cumulative_bytes"][:n]], r["consensus_error"][:n], label=r["codec"]
        )
    axes[1].axhline(target, color="grey", ls="--", lw=0.8)
    axes[1].set_xlabel("cumulative bytes sent, all nodes (MB)")
    axes[1].set_ylabel("max relative error to the exact mean")
    axes[1].set_title("Consensus workload (float32)")
    axes[1].legend(fontsize=8)
    print(f"wrote {json_path} and {save_png(fig, out, 'compression')}")


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Scale: many daemons on one machine; round time, bytes and resident memory per daemon.

Launches 16, 32, 64 and 128 consensus daemons on loopback (random 6-regular graphs: an
expander family whose SLEM stays near 0.6-0.76 as n grows, so the rounds to the target grow
only with log n, unlike a ring or torus) and 4, 8 and 16 education daemons (rings; the 8-node
one is topology/ring-8.toml). While the daemons run, it samples each one's resident memory
(VmRSS from /proc/PID/status) and checks its memory map (/proc/PID/maps) for libtorch: a
consensus daemon must not load torch. Round time is the wall time between a node's
consecutive metrics records; bytes per round per node come from the nodes' counters. For the
education runs it also reports the round breakdown (local training, send, wait, mix,
evaluation and checkpoint) and the share of the round spent outside local training.

    python benchmarks/scale.py --out runs/bench-scale

Prints the setup and a table, writes scale.json and, when matplotlib is installed, scale.png.
"""

from __future__ import annotations

import math
import statistics
import sys
import threading
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    ROOT,
    each_run,
    loadavg,
    machine,
    parser,
    pyplot,
    save_png,
    setup,
    wait_for_load,
    write_json,
)

from m3tgossip.consensus import metropolis_hastings, predicted_rounds, slem
from m3tgossip.daemon.metrics import read_metrics
from m3tgossip.harness import Summary, Testbed, TestbedSpec
from m3tgossip.harness.testbed_spec import parse_assignment
from m3tgossip.topology import load_topology
from m3tgossip.workloads.consensus import initial_vector

#: seconds between memory samples while daemons run
SAMPLE_EVERY_S = 1.0
#: seconds the daemons have to come up: 128 daemons importing numpy, pyzmq and networkx on
#: 2 cores can take longer than the testbed's default
READY_TIMEOUT_S = 900.0


def read_status(pid: int) -> dict[str, int] | None:
    """VmRSS and VmHWM (kB) of a live process, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def maps_torch(pid: int) -> bool | None:
    """Whether the process has libtorch mapped (None if it is gone)."""
    try:
        text = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return None
    return "libtorch" in text


def run_sampled(spec: TestbedSpec) -> tuple[int, Summary, dict[str, Any]]:
    """Run the testbed in a thread and sample the daemons' memory while their rounds run."""
    bed = Testbed(spec)
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["summary"] = bed.run()
        except (RuntimeError, TimeoutError) as exc:
            print(f"  testbed error: {exc}", flush=True)
            bed.stop_all()
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    samples: list[dict[str, Any]] = []
    torch_mapped: dict[str, bool] = {}
    while thread.is_alive():
        thread.join(SAMPLE_EVERY_S)
        if not thread.is_alive() or not all(bed.child(n).ready for n in bed.nodes):
            continue
        rounds = [bed.last_round(n) for n in bed.nodes]
        if max(rounds) >= spec.rounds - 1:
            continue  # some daemon may be finishing
        # mid-run: every daemon past its first round; before that the sample is kept apart
        phase = "mid-run" if min(rounds) >= 1 else "ready"
        rss, hwm = {}, {}
        for n in bed.nodes:
            pid = bed.pid(n)
            if pid is None or not bed.alive(n):
                continue
            st = read_status(pid)
            if st:
                rss[n], hwm[n] = st.get("VmRSS"), st.get("VmHWM")
            if n not in torch_mapped:
                mapped = maps_torch(pid)
                if mapped is not None:
                    torch_mapped[n] = mapped
        if rss:
            samples.append(
                {
                    "phase": phase,
                    "time": time.time(),
                    "min_round": min(rounds),
                    "max_round": max(rounds),
                    "rss_kb": rss,
                    "hwm_kb": hwm,
                }
            )
    if "summary" not in result:
        raise RuntimeError(f"the testbed in {spec.out} did not finish: {result.get('error')}")
    summary: Summary = result["summary"]
    memory = memory_stats(samples)
    memory["torch_mapped"] = {
        "checked": len(torch_mapped),
        "with_libtorch": sorted(n for n, m in torch_mapped.items() if m),
    }
    return summary.exit_code, summary, memory


def memory_stats(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """RSS statistics over the mid-run samples (over the samples after READY if none)."""
    mid = [s for s in samples if s["phase"] == "mid-run"]
    phase = "mid-run" if mid else "ready"
    samples = mid or samples
    values = [v for s in samples for v in s["rss_kb"].values() if v]
    per_node_peak: dict[str, int] = {}
    for s in samples:
        for n, v in s["rss_kb"].items():
            per_node_peak[n] = max(per_node_peak.get(n, 0), v or 0)
    if not values:
        return {"samples": 0}
    totals = [sum(v for v in s["rss_kb"].values() if v) for s in samples]
    return {
        "samples": len(samples),
        "phase": phase,
        "sampled_rounds": [[s["min_round"], s["max_round"]] for s in samples],
        "rss_mib_mean": statistics.fmean(values) / 1024,
        "rss_mib_median": statistics.median(values) / 1024,
        "rss_mib_max": max(values) / 1024,
        "rss_mib_min": min(values) / 1024,
        "rss_total_mib_max": max(totals) / 1024,
        "rss_peak_mib_per_node": {n: v / 1024 for n, v in per_node_peak.items()},
    }


def round_times(run_dir: Path) -> dict[str, Any]:
    """Wall time between consecutive metrics records of each node (round 0 excluded)."""
    gaps: list[float] = []
    spans: list[float] = []
    for path in sorted((run_dir / "nodes").glob("*/metrics.jsonl")):
        recs = {int(r["round"]): r for r in read_metrics(path)}
        rs = sorted(recs)
        gaps += [recs[b]["time"] - recs[a]["time"] for a, b in pairwise(rs) if b == a + 1]
        if len(rs) > 1:
            spans.append((recs[rs[-1]]["time"] - recs[rs[0]]["time"]) / (rs[-1] - rs[0]))
    if not gaps:
        return {}
    return {
        "round_s_median": statistics.median(gaps),
        "round_s_mean": statistics.fmean(gaps),
        "round_s_p90": float(np.percentile(gaps, 90)),
        "round_s_mean_span": statistics.fmean(spans),
    }


def initial_error(topo, seed: int, size: int, dtype: str) -> float:
    """The testbed's initial error: sqrt of the sum over nodes of squared relative errors."""
    comps = topo.components()
    vecs = {
        n: {c: initial_vector(seed, n, c, size, dtype).astype(np.float64) for c in comps}
        for n in topo.ids()
    }
    mean = {c: sum(vecs[n][c] for n in topo.ids()) / len(topo.ids()) for c in comps}
    norm = math.sqrt(sum(float(m @ m) for m in mean.values()))
    errs = [
        math.sqrt(sum(float((vecs[n][c] - mean[c]) @ (vecs[n][c] - mean[c])) for c in comps)) / norm
        for n in topo.ids()
    ]
    return math.sqrt(sum(e * e for e in errs))


def write_spec(path: Path, name: str, description: str, generator: dict[str, Any]) -> Path:
    lines = [f'name = "{name}"', f'description = "{description}"', "", "[generator]"]
    lines += [f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v}" for k, v in generator.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> int:
    p = parser(__doc__, "runs/bench-scale", load=True)
    p.add_argument("--consensus-nodes", type=int, nargs="*", default=[16, 32, 64, 128])
    p.add_argument("--edu-nodes", type=int, nargs="*", default=[4, 8, 16])
    p.add_argument("--size", type=int, default=256, help="floats per component (consensus)")
    p.add_argument("--degree", type=int, default=6, help="degree of the random regular graphs")
    p.add_argument("--target", type=float, default=1e-6)
    p.add_argument(
        "--margin", type=float, default=1.3, help="rounds = spectral prediction * margin"
    )
    p.add_argument("--edu-rounds", type=int, default=20)
    p.add_argument("--deadline", type=float, default=30.0, help="round deadline bound (s)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        dest="settings",
        metavar="TABLE.KEY=VALUE",
        help="node config setting for every consensus daemon (repeatable), "
        "e.g. gossip.silence_s=30",
    )
    p.add_argument(
        "--startup-grace",
        type=float,
        default=300.0,
        help="gossip.startup_grace_s of the consensus daemons: the testbed starts them one "
        "after the other, 128 take over a minute to come up on 2 cores, and a node that starts "
        "its rounds before a neighbour is up mixes without it, which moves the network mean "
        "for good in lockstep rounds",
    )
    p.add_argument(
        "--silence",
        type=float,
        default=30.0,
        help="gossip.silence_s of the consensus daemons: 128 daemons put a load of ~150 on 2 "
        "cores, where a live daemon can go unscheduled for more than the default 3 s and "
        "would be given up as silent",
    )
    p.add_argument(
        "--deadline-min",
        type=float,
        default=10.0,
        help="gossip.deadline_min_s of the consensus daemons: the adaptive deadline learns "
        "~1 s from quiet rounds, and at a load of ~150 a live neighbour can lag by more than "
        "the 3 deadlines a node waits for it; a round closed without it moves the network "
        "mean for good in lockstep rounds",
    )
    args = p.parse_args()
    extra = dict(parse_assignment(kv) for kv in args.settings)
    mem_total = int(Path("/proc/meminfo").read_text().split()[1]) / 1024**2
    m = machine()
    info = {
        "platform": m["platform"],
        "cpus": m["cpus"],
        "mem_gib": round(mem_total, 1),
        "python": m["python"],
        "consensus": {
            "nodes": args.consensus_nodes,
            "size": args.size,
            "dtype": "float64",
            "graph": f"random_regular d={args.degree} seed=1",
            "target": args.target,
            "margin": args.margin,
            "deadline_s": args.deadline,
            "startup_grace_s": args.startup_grace,
            "silence_s": args.silence,
            "deadline_min_s": args.deadline_min,
            "settings": args.settings,
        },
        "edu": {"nodes": args.edu_nodes, "rounds": args.edu_rounds, "graph": "cycle"},
        "sample_every_s": SAMPLE_EVERY_S,
    }
    out = setup(
        Path(args.out).resolve(),
        f"{info['mem_gib']} GiB; consensus on random {args.degree}-regular graphs of "
        f"{args.consensus_nodes} nodes, {args.size} float64 per component, target "
        f"{args.target:g}, rounds = prediction x {args.margin}, deadline {args.deadline:g} s, "
        f"start-up grace {args.startup_grace:g} s, silence {args.silence:g} s, minimum "
        f"deadline {args.deadline_min:g} s, settings {args.settings or 'default'}; edu on "
        f"rings of {args.edu_nodes} nodes, {args.edu_rounds} rounds; RSS sampled every "
        f"{SAMPLE_EVERY_S:g} s",
    )
    rows: list[dict[str, Any]] = []
    for n in each_run(args.consensus_nodes, "consensus sizes"):
        spec = write_spec(
            out / f"rr{args.degree}-{n}.toml",
            f"rr{args.degree}-{n}",
            f"{n} peers on a random {args.degree}-regular graph (seed 1).",
            {"kind": "random_regular", "n": n, "d": args.degree, "seed": 1},
        )
        topo = load_topology(spec)
        s = slem(metropolis_hastings(topo.graph()))
        e0 = initial_error(topo, 0, args.size, "float64")
        predicted = predicted_rounds(s, args.target, e0)
        rounds = math.ceil(predicted * args.margin)
        load = wait_for_load(args.load_threshold, args.max_wait if n >= 64 else 0.0)
        print(
            f"consensus {n:>4} nodes: SLEM {s:.4f}, initial error {e0:.2f}, predicted "
            f"{predicted} rounds, running {rounds}; load {load['after']}",
            flush=True,
        )
        run_dir = out / f"consensus-{n}"
        t0 = time.monotonic()
        code, summary, memory = run_sampled(
            TestbedSpec(
                topology=spec,
                out=run_dir,
                workload="consensus",
                rounds=rounds,
                target=args.target,
                options={"size": args.size},
                deadline=args.deadline,
                timeout=600 + 20 * rounds,
                quiet=True,
                settings={
                    "gossip.startup_grace_s": args.startup_grace,
                    "gossip.silence_s": args.silence,
                    "gossip.deadline_min_s": args.deadline_min,
                    **extra,
                },
                ready_timeout_s=READY_TIMEOUT_S,
            )
        )
        wall = time.monotonic() - t0
        bpr = [b for b in summary.bytes_per_round_per_node if b is not None]
        final = summary.final_consensus_error
        row = {
            "workload": "consensus",
            "nodes": n,
            "graph": topo.name,
            "slem": s,
            "initial_error": e0,
            "predicted_rounds": predicted,
            "rounds_run": rounds,
            "measured_rounds": summary.measured_rounds,
            "final_error": final,
            "converged": final is not None and final <= args.target,
            "bytes_per_round_per_node": statistics.fmean(bpr) if bpr else None,
            "bytes_sent_total": sum(summary.bytes_sent.values()),
            "round_breakdown_s": summary.round_breakdown_s,
            **round_times(run_dir),
            "memory": memory,
            "wall_seconds": wall,
            "testbed_wall_seconds": summary.wall_seconds,
            "exit": code,
            "crashed": summary.crashed,
            "hung": summary.hung,
            "load_before": load,
            "load_after": loadavg(),
            "consensus_error": summary.consensus_error,
        }
        rows.append(row)
        print_row(row)
    for n in each_run(args.edu_nodes, "edu sizes"):
        if n == 8 and (ROOT / "topology" / "ring-8.toml").exists():
            spec = ROOT / "topology" / "ring-8.toml"
        else:
            spec = write_spec(
                out / f"ring-{n}.toml",
                f"ring-{n}",
                f"{n} peers on a cycle.",
                {"kind": "cycle", "n": n},
            )
        topo = load_topology(spec)
        load = wait_for_load(args.load_threshold, args.max_wait if n >= 16 else 0.0)
        print(
            f"edu {n:>4} nodes ({topo.name}), {args.edu_rounds} rounds; load {load['after']}",
            flush=True,
        )
        run_dir = out / f"edu-{n}"
        t0 = time.monotonic()
        code, summary, memory = run_sampled(
            TestbedSpec(
                topology=spec,
                out=run_dir,
                workload="edu",
                rounds=args.edu_rounds,
                deadline=args.deadline,
                timeout=900 + 60 * args.edu_rounds,
                quiet=True,
                ready_timeout_s=READY_TIMEOUT_S,
            )
        )
        wall = time.monotonic() - t0
        bpr = [b for b in summary.bytes_per_round_per_node if b is not None]
        bd = summary.round_breakdown_s or {}
        total = bd.get("total") or float("nan")
        local, wait = bd.get("local", 0.0), bd.get("wait", 0.0)
        row = {
            "workload": "edu",
            "nodes": n,
            "graph": topo.name,
            "rounds_run": args.edu_rounds,
            "final_mean_acc": summary.final_mean_acc,
            "bytes_per_round_per_node": statistics.fmean(bpr) if bpr else None,
            "bytes_sent_total": sum(summary.bytes_sent.values()),
            "round_breakdown_s": bd,
            "outside_local_fraction": (total - local) / total if bd else None,
            "outside_local_excl_wait_fraction": (total - local - wait) / total if bd else None,
            "communication_fraction": (bd.get("send", 0.0) + bd.get("mix", 0.0)) / total
            if bd
            else None,
            **round_times(run_dir),
            "memory": memory,
            "wall_seconds": wall,
            "testbed_wall_seconds": summary.wall_seconds,
            "exit": code,
            "crashed": summary.crashed,
            "hung": summary.hung,
            "load_before": load,
            "load_after": loadavg(),
        }
        rows.append(row)
        print_row(row)
    path = write_json(out, "scale", {"setup": info, "rows": rows})
    plot(out, path, rows, args.target)
    print()
    print(
        f"{'workload':<10}{'nodes':>6}{'rounds':>8}{'to tgt':>8}{'final err/acc':>14}"
        f"{'round s':>9}{'kB/rnd/node':>12}{'RSS MiB':>9}{'max MiB':>9}{'torch':>7}"
        f"{'wall s':>8}{'exit':>5}"
    )
    nan = float("nan")
    for r in rows:
        m = r["memory"]
        fin = (
            f"{r['final_error']:.2e}"
            if r["workload"] == "consensus" and r["final_error"] is not None
            else (f"{r['final_mean_acc']:.3f}" if r.get("final_mean_acc") is not None else "-")
        )
        torch_n = len(m.get("torch_mapped", {}).get("with_libtorch", []))
        checked = m.get("torch_mapped", {}).get("checked", 0)
        print(
            f"{r['workload']:<10}{r['nodes']:>6}{r['rounds_run']:>8}"
            f"{r.get('measured_rounds') or '-'!s:>8}{fin:>14}"
            f"{r.get('round_s_median', nan):>9.3f}"
            f"{(r['bytes_per_round_per_node'] or 0) / 1e3:>12.1f}"
            f"{m.get('rss_mib_mean', nan):>9.1f}{m.get('rss_mib_max', nan):>9.1f}"
            f"{torch_n:>4}/{checked:<2}{r['wall_seconds']:>8.1f}{r['exit']:>5}"
        )
    return 0 if all(r["exit"] == 0 for r in rows) else 1


def print_row(r: dict[str, Any]) -> None:
    m = r["memory"]
    tm = m.get("torch_mapped", {})
    nan = float("nan")
    line = (
        f"  -> exit {r['exit']}  wall {r['wall_seconds']:.1f} s  round median "
        f"{r.get('round_s_median', nan):.3f} s  "
        f"{(r['bytes_per_round_per_node'] or 0) / 1e3:.1f} kB/round/node  "
        f"RSS mean {m.get('rss_mib_mean', nan):.1f} MiB max {m.get('rss_mib_max', nan):.1f} MiB "
        f"(all daemons {m.get('rss_total_mib_max', nan):.0f} MiB, "
        f"{m.get('samples', 0)} {m.get('phase', '')} samples)  libtorch mapped in "
        f"{len(tm.get('with_libtorch', []))}/{tm.get('checked', 0)}"
    )
    if r["workload"] == "consensus":
        line += f"  measured rounds {r['measured_rounds']}  final error {r['final_error']:.2e}"
    else:
        bd = r["round_breakdown_s"]
        line += (
            f"  acc {r['final_mean_acc']}  breakdown "
            + ", ".join(f"{k} {v:.3f}" for k, v in bd.items())
            + f"  outside local {r['outside_local_fraction']:.3f}, "
            f"excl. wait {r['outside_local_excl_wait_fraction']:.3f}"
        )
    print(line + f"  load {r['load_after']}", flush=True)


def plot(out: Path, json_path: Path, rows: list[dict[str, Any]], target: float) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for r in rows:
        if r["workload"] == "consensus":
            errs = [e for e in r["consensus_error"]]
            axes[0].semilogy(range(1, len(errs) + 1), errs, label=f"{r['nodes']} nodes")
    axes[0].axhline(target, color="grey", ls="--", lw=0.8)
    axes[0].set_xlabel("round")
    axes[0].set_ylabel("max relative error to the exact mean")
    axes[0].set_title("Consensus, random regular graphs")
    axes[0].legend(fontsize=8)
    for kind, marker in (("consensus", "o"), ("edu", "s")):
        sub = [r for r in rows if r["workload"] == kind and r["memory"].get("samples")]
        axes[1].plot(
            [r["nodes"] for r in sub],
            [r["memory"]["rss_mib_mean"] for r in sub],
            marker=marker,
            label=kind,
        )
        axes[2].plot(
            [r["nodes"] for r in sub],
            [r.get("round_s_median", float("nan")) for r in sub],
            marker=marker,
            label=kind,
        )
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("daemons")
    axes[1].set_ylabel("mean RSS per daemon (MiB)")
    axes[1].legend(fontsize=8)
    axes[2].set_xscale("log", base=2)
    axes[2].set_xlabel("daemons")
    axes[2].set_ylabel("median round time (s)")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"{machine()['cpus']} CPUs, all daemons on one machine")
    print(f"wrote {json_path} and {save_png(fig, out, 'scale')}")


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Side by side: m3tgossip and hivemind's DecentralizedAverager to the exact average, same machine.

For each peer count (8, 16 and 32 by default) and the same state per peer (4 MB of float32 by
default) it runs, one after the other in one invocation:

- m3tgossip, consensus workload, CURVE on, one daemon per peer on 127.0.0.1, on the `complete`
  graph (exact after one round) and on the one-peer exponential graph (`[dynamics] kind =
  "one-peer-exponential"`: one message per peer and round, exact after log2(n) rounds for n a
  power of two). Each peer's state is split over the six components of a generated node.
- hivemind's `DecentralizedAverager` (when `--hivemind-python` names a Python with hivemind
  installed): one process per peer with its own DHT node (the first one is every other's
  initial peer), target and minimum group size n, `step()` back to back until the peer's
  tensors are the exact mean. The peers run `benchmarks/peers_hivemind.py` in that Python.

Measured the same way for both, from the clocks of the peers themselves:

- `seconds_to_exact`: from the moment the last peer was ready (m3tgossip: its READY line, when
  it listens; hivemind: DHT and averager up) to the moment the last peer held values within
  relative error `--target` (1e-6) of the exact mean, ||x - mean|| / ||mean|| over all its
  values, with the mean of the float32 initial values taken in float64 (float32 rounding of
  the result is far below the target). The moment is when the values were there: for
  m3tgossip the end of the round's mix (its metrics record's time less the evaluation that
  measured them), for hivemind the end of `step()` (before the peer checks its tensors).
- `startup_s`: from the first launch to the last peer ready (`startup_per_peer_s`: each
  peer's own launch to ready); m3tgossip also reports `first_round_s`, from the first launch
  to every peer's first finished round.
- `pss_mb`: the largest proportional set size over the peers, each peer's process and its
  children (hivemind's p2pd) together, from /proc/PID/smaps_rollup, sampled a few times after
  every peer reached the exact mean while all still run (`pss_limit_mb`: 70 MB plus twice the
  state, and `pss_within_limit`).

m3tgossip runs with a round deadline and silence bound of DEADLINE_S (60 s): the largest runs
move more per round than the default 5 s deadline allows on 2 cores, and an exact average
needs every peer in every round; everything else is the daemons' defaults.

Every m3tgossip row gets `speedup_vs_hivemind`: hivemind's `seconds_to_exact` at the same peer
count divided by its own. Without `--hivemind-python`, or if hivemind cannot run there, the
hivemind rows are absent and `hivemind.reason` in the JSON says why.

Making the hivemind environment (CPU torch first, so pip does not pull a CUDA build):

    python3 -m venv /work/hm
    /work/hm/bin/pip install torch==2.13.0
    /work/hm/bin/pip install hivemind==1.1.12

    python benchmarks/peers.py --out runs/bench-peers --hivemind-python /work/hm/bin/python

Prints the setup and a table, writes peers.json and, when matplotlib is installed, peers.png.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import loadavg, machine, parser, pyplot, setup, wait_for_load, write_json

from m3tgossip.harness import Testbed, TestbedSpec
from m3tgossip.topology import load_topology

#: the m3tgossip graphs of the comparison: label -> spec text for n peers
GRAPHS = {
    "complete": lambda n: f'name = "complete-{n}"\n[generator]\nkind = "complete"\nn = {n}\n',
    "one-peer-exponential": lambda n: (
        f'name = "one-peer-exp-{n}"\n[generator]\nkind = "cycle"\nn = {n}\n\n'
        '[dynamics]\nkind = "one-peer-exponential"\n'
    ),
}
#: the helper the hivemind peers run (in the hivemind Python)
HIVEMIND_HELPER = Path(__file__).resolve().parent / "peers_hivemind.py"
#: PSS samples per run after every peer reached the exact mean, and the time between them
PSS_SAMPLES = 5
PSS_EVERY_S = 0.1
#: seconds between looks at the daemons' files
POLL_S = 0.02
#: m3tgossip's round deadline and silence bound (gossip.round_deadline_s, gossip.silence_s)
DEADLINE_S = 60.0


# ------------------------------------------------------------------------------ processes


def children_of(pid: int) -> list[int]:
    """Every live descendant of `pid` (from /proc/*/stat)."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name is in parentheses and may hold spaces; ppid is the 2nd field after
        parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out: list[int] = []
    frontier = [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        frontier += kids
    return out


def pss_kb(pid: int) -> int | None:
    """The proportional set size of one process (kB), None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return None


def tree_pss_mb(pid: int) -> float | None:
    """PSS of `pid` and its descendants together (MB), None if `pid` is gone."""
    own = pss_kb(pid)
    if own is None:
        return None
    return (own + sum(pss_kb(c) or 0 for c in children_of(pid))) / 1000


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM of one process (MB), None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1000
    return None


def sample_pss(pids: dict[str, int]) -> dict[str, float]:
    """Per peer, the largest PSS (MB) over PSS_SAMPLES samples PSS_EVERY_S apart."""
    best: dict[str, float] = {}
    for i in range(PSS_SAMPLES):
        if i:
            time.sleep(PSS_EVERY_S)
        for peer, pid in pids.items():
            value = tree_pss_mb(pid)
            if value is not None:
                best[peer] = max(best.get(peer, 0.0), value)
    return best


def spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "max": max(values), "min": min(values)}


# ------------------------------------------------------------------------------ m3tgossip


def ready_time(bed: Testbed, node: str) -> float | None:
    """When `node`'s daemon printed READY (wall clock): the modification time of its stdout
    log while READY is all it holds (the daemon prints nothing else there), None before."""
    path = bed.child(node).folder / "stdout.log"
    try:
        stat = path.stat()
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return None
    lines = text.splitlines()
    if not any(line.startswith("READY ") for line in lines):
        return None
    return stat.st_mtime_ns / 1e9 if len(lines) == 1 else time.time()


def run_m3tgossip(
    out: Path, graph: str, n: int, state_bytes: int, target: float, timeout_s: float
) -> dict[str, Any]:
    """One m3tgossip run: every daemon up, to the exact mean, PSS sampled, then stopped."""
    spec_path = out / f"{graph}-{n}.toml"
    spec_path.write_text(GRAPHS[graph](n))
    topo = load_topology(spec_path)
    comps = topo.node(topo.ids()[0]).shared_components
    size = state_bytes // (4 * len(comps))
    run_dir = out / f"m3tgossip-{graph}-{n}"
    shutil.rmtree(run_dir, ignore_errors=True)  # logs and metrics are appended to
    spec = TestbedSpec(
        topology=spec_path,
        out=run_dir,
        workload="consensus",
        rounds=0,
        target=target,
        options={"size": size, "dtype": "float32"},
        quiet=True,
        ready_timeout_s=timeout_s,
        # the largest runs (32 peers on the complete graph: 124 MB out per peer and round) take
        # longer than the default deadline on 2 cores, and a neighbour whose heartbeats queue
        # behind its deltas would be given up as silent: an exact average needs every peer
        deadline=DEADLINE_S,
        settings={"gossip.silence_s": DEADLINE_S},
    )
    bed = Testbed(spec)
    row: dict[str, Any] = {
        "system": "m3tgossip",
        "graph": graph,
        "peers": n,
        "state_bytes": size * len(comps) * 4,
        "components": len(comps),
        "dtype": "float32",
        "security": "curve",
    }
    launch: dict[str, float] = {}
    ready: dict[str, float] = {}
    exact: dict[str, tuple[float, int]] = {}
    first_round: dict[str, float] = {}
    try:
        for nid in bed.nodes:
            bed.start(nid)
            launch[nid] = time.time()
        deadline = time.monotonic() + timeout_s
        while len(exact) < n and time.monotonic() < deadline:
            for nid in bed.nodes:
                if nid not in ready:
                    t = ready_time(bed, nid)
                    if t is not None:
                        ready[nid] = t
                if nid in exact:
                    continue
                code = bed.exited(nid)
                if code is not None:
                    raise RuntimeError(f"{nid} exited with {code}; see {bed.child(nid).folder}")
                for rec in bed.records(nid):
                    first_round.setdefault(nid, rec["time"])
                    err = rec.get("error_to_mean")
                    if err is not None and err <= target:
                        exact[nid] = (mixed_at(rec), int(rec["round"]))
                        break
            time.sleep(POLL_S)
        pids = {nid: pid for nid in bed.nodes if (pid := bed.pid(nid)) is not None}
        pss = sample_pss(pids)
        peaks = {nid: peak_rss_mb(pid) for nid, pid in pids.items()}
    finally:
        bed.stop_all()
    codes = {nid: bed.child(nid).exit_codes for nid in bed.nodes}
    records = {nid: bed.records(nid) for nid in bed.nodes}
    all_ready = max(ready.values()) if len(ready) == n else None
    limit = 70 + 2 * size * len(comps) * 4 / 1e6
    row.update(
        {
            "reached": len(exact),
            "seconds_to_exact": max(t for t, _ in exact.values()) - all_ready
            if len(exact) == n and all_ready is not None
            else None,
            "rounds_to_exact": max(r for _, r in exact.values()) + 1 if len(exact) == n else None,
            "startup_s": all_ready - min(launch.values()) if all_ready is not None else None,
            "startup_per_peer_s": spread([ready[p] - launch[p] for p in ready]),
            "first_round_s": max(first_round.values()) - min(launch.values())
            if len(first_round) == n
            else None,
            "pss_mb": max(pss.values()) if pss else None,
            "pss_mb_per_peer": spread(list(pss.values())),
            "pss_limit_mb": limit,
            "pss_within_limit": bool(pss) and max(pss.values()) <= limit,
            "rss_peak_mb": max((v for v in peaks.values() if v is not None), default=None),
            "round_timings_s": round_timings(records),
            "exit_codes": codes,
            "clean_exit": all(c == [0] for c in codes.values()),
        }
    )
    return row


def mixed_at(record: dict[str, Any]) -> float:
    """When the round of a metrics record had its values (wall clock): the record's time
    less its evaluation and checkpoint, which measure the values and do not change them."""
    return float(record["time"]) - float(record.get("timings", {}).get("eval_checkpoint", 0.0))


def round_timings(records: dict[str, list[dict[str, Any]]]) -> dict[str, float] | None:
    """Mean seconds per round phase over every node's rounds up to its exact round."""
    timings = [r["timings"] for recs in records.values() for r in recs[:8] if "timings" in r]
    if not timings:
        return None
    return {k: statistics.fmean(t[k] for t in timings) for k in timings[0]}


# ------------------------------------------------------------------------------ hivemind


def run_hivemind(
    python: str, out: Path, n: int, state_bytes: int, target: float, timeout_s: float
) -> dict[str, Any]:
    """One hivemind run through the helper in the hivemind Python; its peers' PSS is sampled
    here while they all still run. RuntimeError with the helper's own words if it failed."""
    run_dir = out / f"hivemind-{n}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    components = 6
    size = state_bytes // (4 * components)
    cmd = [python, str(HIVEMIND_HELPER), "--peers", str(n), "--size", str(size)]
    cmd += ["--components", str(components), "--target", repr(target), "--out", str(run_dir)]
    cmd += ["--timeout", repr(timeout_s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    pss: dict[str, float] = {}
    lines: list[str] = []
    with open(run_dir / "helper.stderr", "w") as stderr:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env
        )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            # the helper ends by itself within its timeout, so these reads end too
            for line in proc.stdout:
                lines.append(line)
                if line.startswith("EXACT "):
                    pids = json.loads(line[len("EXACT ") :])["pids"]
                    pss = sample_pss({peer: int(pid) for peer, pid in pids.items()})
                    proc.stdin.write("\n")
                    proc.stdin.flush()
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    (run_dir / "helper.stdout").write_text("".join(lines))
    result_path = run_dir / "result.json"
    if proc.returncode != 0 or not result_path.exists():
        tail = (run_dir / "helper.stderr").read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(
            f"hivemind helper exited with {proc.returncode}: {' / '.join(tail) or 'no output'}"
        )
    result: dict[str, Any] = json.loads(result_path.read_text())
    result["pss_mb"] = max(pss.values()) if pss else None
    result["pss_mb_per_peer"] = spread(list(pss.values()))
    return result


#: what `hivemind_version` runs in the hivemind Python
PROBE = "import hivemind, torch; print(hivemind.__version__, torch.__version__)"


def hivemind_version(python: str) -> tuple[str | None, str]:
    """(hivemind's version, "") if `python` imports it, else (None, the reason)."""
    try:
        proc = subprocess.run(
            [python, "-c", PROBE],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"cannot run {python}: {exc}"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"{python} cannot import hivemind: {last}"
    return proc.stdout.strip(), ""


# ------------------------------------------------------------------------------ report


def add_speedups(rows: list[dict[str, Any]]) -> None:
    hm = {r["peers"]: r.get("seconds_to_exact") for r in rows if r["system"] == "hivemind"}
    for r in rows:
        if r["system"] != "m3tgossip":
            continue
        theirs, ours = hm.get(r["peers"]), r.get("seconds_to_exact")
        r["speedup_vs_hivemind"] = theirs / ours if theirs and ours else None


def fmt(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, int | float) else "-"


def print_table(rows: list[dict[str, Any]]) -> None:
    print()
    print(
        f"{'system':<10}{'graph':<22}{'peers':>6}{'MB':>6}{'to exact s':>11}{'rounds':>7}"
        f"{'startup s':>10}{'PSS MB':>8}{'limit':>7}{'speedup':>9}"
    )
    for r in rows:
        print(
            f"{r['system']:<10}{r['graph']:<22}{r['peers']:>6}{r['state_bytes'] / 1e6:>6.1f}"
            f"{fmt(r.get('seconds_to_exact'), '.3f'):>11}"
            f"{fmt(r.get('rounds_to_exact', r.get('steps_to_exact')), 'd'):>7}"
            f"{fmt(r.get('startup_s'), '.2f'):>10}{fmt(r.get('pss_mb'), '.1f'):>8}"
            f"{fmt(r.get('pss_limit_mb'), '.0f'):>7}"
            f"{fmt(r.get('speedup_vs_hivemind'), '.1f'):>9}"
        )


def plot(out: Path, rows: list[dict[str, Any]]) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        series.setdefault(f"{r['system']} {r['graph']}", []).append(r)
    for label, sub in series.items():
        sub = sorted(sub, key=lambda r: r["peers"])
        xs = [r["peers"] for r in sub]
        for ax, key in zip(axes, ("seconds_to_exact", "startup_s", "pss_mb"), strict=True):
            ys = [r.get(key) if r.get(key) is not None else math.nan for r in sub]
            ax.plot(xs, ys, marker="o", label=label)
    titles = (
        "all peers ready -> every peer at the exact mean",
        "first launch -> all peers ready",
        "PSS per peer (largest)",
    )
    labels = ("seconds", "seconds", "MB")
    for ax, title, ylabel in zip(axes, titles, labels, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("peers")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)
    state_mb = rows[0]["state_bytes"] / 1e6 if rows else 0
    fig.suptitle(f"{state_mb:.1f} MB float32 per peer, {machine()['cpus']} CPUs, one machine")
    fig.subplots_adjust(bottom=0.2)
    path = out / "peers.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def main() -> int:
    p = parser(__doc__, None, load=True)
    p.add_argument("--peers", type=int, nargs="*", default=[8, 16, 32])
    p.add_argument("--state-mb", type=float, default=4.0, help="float32 state per peer (MB)")
    p.add_argument("--target", type=float, default=1e-6, help="relative error to the mean")
    p.add_argument("--graphs", nargs="*", default=list(GRAPHS), choices=list(GRAPHS))
    p.add_argument(
        "--hivemind-python", default=None, help="a Python with hivemind and torch installed"
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    args = p.parse_args()
    state_bytes = int(args.state_mb * (1 << 20))
    out = setup(
        Path(args.out).resolve(),
        f"{args.peers} peers, {state_bytes / 1e6:.2f} MB float32 per peer, target "
        f"{args.target:g}; m3tgossip consensus workload with CURVE on {args.graphs}; "
        f"hivemind DecentralizedAverager: {args.hivemind_python or 'not run'}",
    )
    hivemind: dict[str, Any] = {"python": args.hivemind_python}
    if args.hivemind_python is None:
        hivemind["reason"] = "no --hivemind-python given"
    else:
        version, reason = hivemind_version(args.hivemind_python)
        hivemind["versions"] = version
        if reason:
            hivemind["reason"] = reason
    rows: list[dict[str, Any]] = []
    for n in args.peers:
        if "reason" not in hivemind:
            load = wait_for_load(args.load_threshold, args.max_wait)
            print(f"hivemind {n} peers; load {load['after']}", flush=True)
            try:
                row = run_hivemind(
                    args.hivemind_python, out, n, state_bytes, args.target, args.timeout
                )
                row["load_before"] = load
                rows.append(row)
                keys = ("seconds_to_exact", "steps_to_exact", "startup_s", "pss_mb")
                print(f"  -> {json.dumps({k: row.get(k) for k in keys})}", flush=True)
            except RuntimeError as exc:
                print(f"  hivemind failed: {exc}", flush=True)
                hivemind.setdefault("failed", {})[str(n)] = str(exc)
        for graph in args.graphs:
            load = wait_for_load(args.load_threshold, args.max_wait)
            print(f"m3tgossip {graph} {n} peers; load {load['after']}", flush=True)
            try:
                row = run_m3tgossip(out, graph, n, state_bytes, args.target, args.timeout)
            except (RuntimeError, TimeoutError) as exc:
                print(f"  m3tgossip failed: {exc}", flush=True)
                rows.append(
                    {
                        "system": "m3tgossip",
                        "graph": graph,
                        "peers": n,
                        "state_bytes": state_bytes,
                        "seconds_to_exact": None,
                        "error": str(exc),
                    }
                )
                continue
            row["load_before"] = load
            rows.append(row)
            print(
                f"  -> {row['seconds_to_exact']} s to exact in {row['rounds_to_exact']} rounds, "
                f"startup {row['startup_s']} s, PSS {row['pss_mb']} MB",
                flush=True,
            )
    add_speedups(rows)
    setup_info = {
        **machine(),
        "peers": args.peers,
        "state_bytes": state_bytes,
        "target": args.target,
        "graphs": args.graphs,
        "load_after": loadavg(),
    }
    path = write_json(out, "peers", {"setup": setup_info, "hivemind": hivemind, "rows": rows})
    print_table(rows)
    png = plot(out, rows)
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

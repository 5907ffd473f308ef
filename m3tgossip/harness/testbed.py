"""Multi-process testbed: one OS process per node on 127.0.0.1, then a summary.

    python scripts/testbed.py --topology topology/ring-8.toml --workload consensus --rounds 60 --out DIR

The testbed is only a launcher and a reader of files: it picks free ports, generates a CURVE
keypair per node into DIR/keys (plus an operator key, DIR/operator/operator.key, that every node
allows to query status), writes the resolved topology with ports and public keys into DIR,
starts one `m3tgossip node` process per node (each generates its own state or
data from the federation seed, so nothing is handed out centrally), shows progress from the
nodes' metrics files, and writes `DIR/summary.json`. It exits non-zero if a daemon crashed or
hung, and on Ctrl+C (or any error) it stops every child it started. `--insecure` runs the
daemons on plaintext links instead (loopback only), without keys.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m3tgossip.consensus import metropolis_hastings, predicted_rounds, slem
from m3tgossip.daemon.metrics import read_metrics
from m3tgossip.errors import ConfigError
from m3tgossip.net import generate_keys
from m3tgossip.topology import Topology, load_topology

#: seconds a started daemon has to print its READY line
READY_TIMEOUT_S = 300.0
#: seconds between progress lines
PROGRESS_EVERY_S = 2.0
#: seconds children get to stop after SIGTERM before SIGKILL
STOP_GRACE_S = 15.0
#: rounds at the start of a daemon's session left out of `round_breakdown_after_start_s`
START_ROUNDS = 2


@dataclass
class Child:
    node: str
    args: list[str]
    folder: Path
    proc: subprocess.Popen | None = None
    ready: dict[str, Any] | None = None
    starts: int = 0
    killed_at: float | None = None
    exit_codes: list[int] = field(default_factory=list)


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ports free on `host` right now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="m3tgossip testbed", description=__doc__.split("\n\n")[0])
    p.add_argument("--topology", required=True, help="topology spec (TOML)")
    p.add_argument("--workload", default="consensus", help="consensus | edu")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--seed", type=int, default=0, help="federation seed")
    p.add_argument("--target", type=float, default=1e-6, help="relative consensus error target")
    p.add_argument("--deadline", type=float, default=5.0, help="round deadline in seconds")
    p.add_argument("--mode", default="sync", help="sync | push-sum")
    p.add_argument(
        "-o",
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="workload option for every node",
    )
    p.add_argument(
        "--kill",
        action="append",
        default=[],
        metavar="NODE@ROUND",
        help="SIGKILL NODE when it reaches ROUND (repeatable)",
    )
    p.add_argument(
        "--restart-after",
        type=float,
        default=None,
        metavar="S",
        help="restart killed nodes after S seconds",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="give up (and report hung daemons) after this many seconds",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        dest="settings",
        metavar="TABLE.KEY=VALUE",
        help="node config setting for every node (repeatable), e.g. gossip.aggregator=clip",
    )
    p.add_argument(
        "--node-set",
        action="append",
        default=[],
        metavar="NODE:TABLE.KEY=VALUE",
        help="node config setting for one node (repeatable), e.g. n3:faults.attack=alie",
    )
    p.add_argument(
        "--insecure", action="store_true", help="plaintext links between the daemons, no keys"
    )
    return p.parse_args(argv)


class Testbed:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        base = load_topology(args.topology)
        ports = free_ports(len(base.nodes))
        self.topology: Topology = base.with_ports(dict(zip(base.ids(), ports)))
        self.key_dir = self.out / "keys"
        self.operator_key = self.out / "operator" / "operator.key"
        if not args.insecure:
            keys = {nid: generate_keys(self.key_dir, nid, force=True).public for nid in base.ids()}
            self.topology = self.topology.with_keys(keys)
            generate_keys(self.operator_key.parent, "operator", force=True)
        self.topology_path = self.out / "topology.toml"
        self.topology_path.write_text(self.topology.to_toml())
        self.kills: dict[str, int] = {}
        for item in args.kill:
            node, _, rnd = item.partition("@")
            if node not in self.topology.ids() or not rnd.isdigit():
                raise ConfigError(
                    "--kill",
                    item,
                    f"expected NODE@ROUND with NODE one of {', '.join(self.topology.ids())}",
                )
            self.kills[node] = int(rnd)
        self.children = {nid: self._child(nid) for nid in self.topology.ids()}
        self.events: list[dict[str, Any]] = []

    def _child(self, nid: str) -> Child:
        folder = self.out / "nodes" / nid
        folder.mkdir(parents=True, exist_ok=True)
        a = self.args
        cmd = [
            sys.executable,
            "-m",
            "m3tgossip",
            "node",
            "--topology",
            str(self.topology_path),
            "--id",
            nid,
            "--workload",
            a.workload,
            "--rounds",
            str(a.rounds),
            "--seed",
            str(a.seed),
            "--state-dir",
            str(folder),
            "--deadline",
            str(a.deadline),
            "--mode",
            a.mode,
        ]
        if a.insecure:
            cmd += ["--insecure"]
        else:
            cmd += ["--key-dir", str(self.key_dir), "--status-key", str(self.operator_key)]
        for opt in a.option:
            cmd += ["-o", opt]
        for setting in a.settings:
            cmd += ["--set", setting]
        for item in a.node_set:
            node, sep, setting = item.partition(":")
            if not sep or node not in self.topology.ids():
                raise ConfigError(
                    "--node-set",
                    item,
                    f"expected NODE:TABLE.KEY=VALUE with NODE one of {', '.join(self.topology.ids())}",
                )
            if node == nid:
                cmd += ["--set", setting]
        return Child(nid, cmd, folder)

    def start(self, child: Child) -> None:
        env = dict(os.environ)
        env.update(
            OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1"
        )
        stdout = open(child.folder / "stdout.log", "ab")
        stderr = open(child.folder / "stderr.log", "ab")
        child.proc = subprocess.Popen(
            child.args, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, env=env
        )
        stdout.close()
        stderr.close()
        child.starts += 1
        child.ready = None
        self.events.append(
            {"time": time.time(), "event": "start", "node": child.node, "pid": child.proc.pid}
        )

    def _check_ready(self, child: Child) -> None:
        if child.ready is not None:
            return
        try:
            lines = (child.folder / "stdout.log").read_text().splitlines()
        except FileNotFoundError:
            return
        readies = [ln for ln in lines if ln.startswith("READY ")]
        if len(readies) >= child.starts:
            child.ready = json.loads(readies[-1][len("READY ") :])

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until every child printed READY (at most `timeout`, default READY_TIMEOUT_S)."""
        timeout = READY_TIMEOUT_S if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for child in self.children.values():
                self._check_ready(child)
                if child.proc is not None and child.proc.poll() is not None and child.ready is None:
                    raise RuntimeError(
                        f"node {child.node} exited with {child.proc.returncode} before READY; "
                        f"see {child.folder / 'stderr.log'}"
                    )
            if all(c.ready for c in self.children.values()):
                return
            time.sleep(0.05)
        missing = [c.node for c in self.children.values() if not c.ready]
        raise TimeoutError(f"no READY line from {', '.join(missing)} within {timeout:g} s")

    def last_round(self, child: Child) -> int:
        records = read_metrics(child.folder / "metrics.jsonl")
        return int(records[-1]["round"]) if records else -1

    def run(self) -> int:
        a = self.args
        timeout = a.timeout if a.timeout is not None else 300.0 + a.rounds * 4 * a.deadline
        start = time.monotonic()
        hung: list[str] = []
        try:
            for child in self.children.values():
                self.start(child)
            self.wait_ready()
            if not a.quiet:
                print(
                    f"testbed: {len(self.children)} daemons ready on 127.0.0.1 ({a.workload}, {a.rounds} rounds)",
                    flush=True,
                )
            next_progress = time.monotonic()
            while True:
                alive = [
                    c
                    for c in self.children.values()
                    if c.proc is not None and c.proc.poll() is None
                ]
                pending_restart = [c for c in self.children.values() if c.killed_at is not None]
                self._inject_faults()
                if not alive and not pending_restart:
                    break
                if time.monotonic() - start > timeout:
                    hung = [c.node for c in alive]
                    break
                if not a.quiet and time.monotonic() >= next_progress:
                    self._progress()
                    next_progress = time.monotonic() + PROGRESS_EVERY_S
                time.sleep(0.1)
        except KeyboardInterrupt:
            print("testbed: interrupted; stopping every daemon", file=sys.stderr, flush=True)
            self.stop_all()
            return 130
        finally:
            self.stop_all()
        wall = time.monotonic() - start
        summary = self.summarise(wall, hung)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        (self.out / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in self.events))
        if not a.quiet:
            print(format_summary(summary), flush=True)
        return 1 if summary["crashed"] or summary["hung"] else 0

    def _inject_faults(self) -> None:
        for nid, rnd in list(self.kills.items()):
            child = self.children[nid]
            if (
                child.proc is not None
                and child.proc.poll() is None
                and self.last_round(child) >= rnd
            ):
                child.proc.send_signal(signal.SIGKILL)
                child.proc.wait(timeout=10)
                child.exit_codes.append(child.proc.returncode)
                self.events.append(
                    {"time": time.time(), "event": "sigkill", "node": nid, "round": rnd}
                )
                del self.kills[nid]
                if self.args.restart_after is not None:
                    child.killed_at = time.monotonic()
        for child in self.children.values():
            if child.killed_at is not None and time.monotonic() - child.killed_at >= (
                self.args.restart_after or 0
            ):
                child.killed_at = None
                self.start(child)

    def _progress(self) -> None:
        rounds = [self.last_round(c) for c in self.children.values()]
        print(
            f"testbed: rounds done min {min(rounds) + 1} max {max(rounds) + 1} of {self.args.rounds}",
            flush=True,
        )

    def stop_all(self, grace: float | None = None) -> None:
        """SIGTERM every live child, SIGKILL what is left after the grace period (default
        STOP_GRACE_S); reap all."""
        live = [c for c in self.children.values() if c.proc is not None and c.proc.poll() is None]
        for c in live:
            c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + (STOP_GRACE_S if grace is None else grace)
        for c in live:
            try:
                c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait(timeout=10)
        for c in self.children.values():
            if (
                c.proc is not None
                and c.proc.returncode is not None
                and len(c.exit_codes) < c.starts
            ):
                c.exit_codes.append(c.proc.returncode)

    def summarise(self, wall: float, hung: list[str]) -> dict[str, Any]:
        return summarise(self.topology, self.children, self.args, wall, hung, self.events)


def _by_round(records: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Last record per round (a restarted node may repeat rounds)."""
    out: dict[int, dict[str, Any]] = {}
    for rec in records:
        out[int(rec["round"])] = rec
    return out


def _cumulative(records: list[dict[str, Any]], key: str) -> int:
    """Counters restart at zero with each session: add the last value of every session."""
    last: dict[str, int] = {}
    for rec in records:
        last[rec.get("session", "")] = int(rec.get(key, 0))
    return sum(last.values())


def summarise(
    topology: Topology,
    children: dict[str, Child],
    args: argparse.Namespace,
    wall: float,
    hung: list[str],
    events: list[dict[str, Any]],
) -> dict[str, Any]:
    metrics = {nid: read_metrics(c.folder / "metrics.jsonl") for nid, c in children.items()}
    per_round = {nid: _by_round(recs) for nid, recs in metrics.items()}
    killed = sorted({e["node"] for e in events if e["event"] == "sigkill"})
    crashed = sorted(
        nid
        for nid, c in children.items()
        if any(code not in (0, -signal.SIGKILL) for code in c.exit_codes)
        or (nid not in killed and any(code != 0 for code in c.exit_codes))
    )
    slems = {}
    for comp in topology.components():
        g = topology.component_graph(comp)
        if g.number_of_nodes() > 1:
            slems[comp] = slem(metropolis_hastings(g))
    worst_slem = max(slems.values(), default=0.0)
    if topology.dynamics != "static":
        slems, worst_slem = {}, None  # the spectral prediction is for static graphs
    byzantine = sorted(
        {
            item.partition(":")[0]
            for item in getattr(args, "node_set", [])
            if item.partition(":")[2].startswith("faults.attack=") and not item.endswith("=")
        }
    )
    summary: dict[str, Any] = {
        "topology": topology.name,
        "nodes": topology.ids(),
        "edges": len(topology.edges),
        "rounds": args.rounds,
        "workload": args.workload,
        "mode": args.mode,
        "seed": args.seed,
        "wall_seconds": round(wall, 3),
        "crashed": crashed,
        "byzantine": byzantine,
        "killed": killed,
        "hung": sorted(hung),
        "exit_codes": {nid: c.exit_codes for nid, c in children.items()},
        "rounds_done": {nid: (max(r) + 1 if r else 0) for nid, r in per_round.items()},
        "bytes_sent": {nid: _cumulative(recs, "bytes_out") for nid, recs in metrics.items()},
        "bytes_received": {nid: _cumulative(recs, "bytes_in") for nid, recs in metrics.items()},
        "slem": worst_slem,
        "slem_per_component": slems,
    }
    n_rounds = max((max(r) + 1 for r in per_round.values() if r), default=0)
    bytes_per_round = []
    for r in range(n_rounds):
        sent = [
            per_round[n][r].get("bytes_out", 0) - per_round[n].get(r - 1, {}).get("bytes_out", 0)
            for n in per_round
            if r in per_round[n] and (r - 1 in per_round[n] or r == 0)
        ]
        bytes_per_round.append(sum(sent) / len(sent) if sent else None)
    summary["bytes_per_round_per_node"] = bytes_per_round
    timings = [rec["timings"] for recs in metrics.values() for rec in recs if "timings" in rec]
    if timings:
        summary["round_breakdown_s"] = {
            k: sum(t[k] for t in timings) / len(timings) for k in timings[0]
        }
        # without each session's first START_ROUNDS rounds, where nodes wait for the last
        # daemons of the run to come up
        later = [
            rec["timings"]
            for recs in metrics.values()
            for i, rec in enumerate(recs)
            if "timings" in rec
            and i >= START_ROUNDS
            and recs[i - START_ROUNDS].get("session") == rec.get("session")
        ]
        if later:
            summary["round_breakdown_after_start_s"] = {
                k: sum(t[k] for t in later) / len(later) for k in later[0]
            }
    honest = {nid: recs for nid, recs in per_round.items() if nid not in byzantine}
    if args.workload == "consensus":
        summary.update(_consensus_summary(honest, n_rounds, worst_slem, args.target))
    else:
        summary.update(_eval_summary(per_round, byzantine))
    return summary


def _consensus_summary(
    per_round: dict[str, dict[int, dict[str, Any]]], n_rounds: int, worst_slem: float, target: float
) -> dict[str, Any]:
    errors: list[float | None] = []
    for r in range(n_rounds):
        vals = [recs[r].get("error_to_mean") for recs in per_round.values() if r in recs]
        vals = [v for v in vals if v is not None]
        errors.append(max(vals) if vals else None)
    initial = [
        recs[0]["initial_error"]
        for recs in per_round.values()
        if 0 in recs and "initial_error" in recs[0]
    ]
    e0 = math.sqrt(sum(e * e for e in initial)) if initial else 1.0
    measured = next((r + 1 for r, e in enumerate(errors) if e is not None and e <= target), None)
    return {
        "target_error": target,
        "initial_error": e0,
        "consensus_error": errors,
        "final_consensus_error": errors[-1] if errors else None,
        "predicted_rounds": predicted_rounds(worst_slem, target, e0)
        if worst_slem is not None
        else None,
        "measured_rounds": measured,
    }


def _eval_summary(
    per_round: dict[str, dict[int, dict[str, Any]]], byzantine: list[str]
) -> dict[str, Any]:
    """Per-node, per-task metrics over rounds, last per-group metrics, and means."""
    per_node: dict[str, Any] = {}
    for nid, recs in per_round.items():
        evals = [(r, rec) for r, rec in sorted(recs.items()) if "tasks" in rec]
        per_node[nid] = {
            "rounds": [r for r, _ in evals],
            "mean_acc": [rec.get("mean_acc") for _, rec in evals],
            "tasks": {
                task: [rec["tasks"].get(task) for _, rec in evals]
                for task in (evals[-1][1]["tasks"] if evals else {})
            },
            "groups": evals[-1][1].get("groups", {}) if evals else {},
            "final": evals[-1][1]["tasks"] if evals else {},
        }
    finals = [
        v["mean_acc"][-1]
        for nid, v in per_node.items()
        if nid not in byzantine and v["mean_acc"] and v["mean_acc"][-1] is not None
    ]
    return {"per_node": per_node, "final_mean_acc": sum(finals) / len(finals) if finals else None}


def _eval_table(s: dict[str, Any]) -> list[str]:
    """Per-node, per-task accuracy at the last evaluation, and the mean from first to last."""
    per_node = s["per_node"]
    tasks = sorted({t for v in per_node.values() for t in v["final"]})
    short = {t: t[:11] for t in tasks}
    lines = [
        "",
        "held-out accuracy per task (last evaluation); mean accuracy first -> last evaluation",
    ]
    lines.append(f"{'node':<14}" + "".join(f"{short[t]:>12}" for t in tasks) + f"{'mean':>16}")
    for nid in s["nodes"]:
        v = per_node.get(nid, {})
        if not v or not v["final"]:
            lines.append(f"{nid:<14}  (no evaluation recorded)")
            continue
        cells = "".join(
            f"{v['final'][t]['acc']:>12.3f}" if t in v["final"] else f"{'-':>12}" for t in tasks
        )
        accs = v["mean_acc"]
        lines.append(f"{nid:<14}{cells}{accs[0]:>8.3f} -> {accs[-1]:.3f}")
    if s.get("final_mean_acc") is not None:
        lines.append(f"mean over nodes of final mean accuracy: {s['final_mean_acc']:.3f}")
    per_round = [b for b in s.get("bytes_per_round_per_node", []) if b is not None]
    if per_round:
        lines.append(
            f"bytes sent per round per node: {sum(per_round) / len(per_round) / 1e3:.1f} kB"
        )
    return lines


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"topology {s['topology']}  workload {s['workload']}  nodes {len(s['nodes'])}  "
        f"rounds {s['rounds']}  wall {s['wall_seconds']:.1f} s",
        f"{'node':<14}{'rounds':>7}{'sent MB':>10}{'recv MB':>10}  exit",
    ]
    for nid in s["nodes"]:
        lines.append(
            f"{nid:<14}{s['rounds_done'][nid]:>7}{s['bytes_sent'][nid] / 1e6:>10.3f}"
            f"{s['bytes_received'][nid] / 1e6:>10.3f}  {s['exit_codes'][nid]}"
        )
    if s["workload"] == "consensus":
        fe = s["final_consensus_error"]
        lines.append(
            f"final consensus error {fe:.3e}"
            if fe is not None
            else "final consensus error: none recorded"
        )
        lines.append(
            f"rounds to {s['target_error']:g}: measured {s['measured_rounds']}, "
            + (
                f"predicted {s['predicted_rounds']} (SLEM {s['slem']:.4f})"
                if s["slem"] is not None
                else "(time-varying topology: no spectral prediction)"
            )
        )
    if "per_node" in s:
        lines.extend(_eval_table(s))
    if s["killed"]:
        lines.append(f"killed by the testbed: {', '.join(s['killed'])}")
    if s["crashed"]:
        lines.append(f"CRASHED: {', '.join(s['crashed'])}")
    if s["hung"]:
        lines.append(f"HUNG (stopped after the timeout): {', '.join(s['hung'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        bed = Testbed(args)
    except ConfigError as exc:
        print(f"testbed: error: {exc}", file=sys.stderr)
        return 2
    try:
        return bed.run()
    except (RuntimeError, TimeoutError) as exc:
        print(f"testbed: error: {exc}", file=sys.stderr)
        bed.stop_all()
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""Chaos runs: a testbed, a seeded nemesis, healing, settling, and a verdict.

    python scripts/chaos.py --topology topology/torus-16.toml --workload consensus \\
        --duration 90 --seed 1 --out runs/chaos

A run has four phases over `--duration` seconds:

1. warm-up: every daemon starts with `--rounds 0` (run until stopped) and message loss
   `faults.drop = --loss` on every outgoing message (on for the whole run: a daemon cannot
   switch it off while running);
2. nemesis: a schedule drawn from `--seed` (`plan_nemesis`, deterministic) SIGKILLs a
   fraction of the nodes and restarts them from their checkpoints, SIGSTOPs others and
   SIGCONTs them later, and partitions the network once for a few seconds;
3. heal: anything still down is restarted, every stopped daemon continued, every partition
   healed;
4. settle: rounds go on; from `--duration` on the checks are evaluated every second until they
   pass or `--settle-timeout` more seconds have passed.

Then every daemon gets SIGTERM and the checks of `CHECKS` run on what is left on disk: the
convergence of the alive honest nodes, that no checkpoint was lost or corrupted and restarted
nodes resumed from theirs, that metrics files parse, that daemons exited cleanly and no process
is left behind, and that the network namespaces are gone. The fault history is written as JSON
lines (`DIR/faults.jsonl`), the verdict as `DIR/verdict.json`.

Partitions need Linux network namespaces (root): each daemon then runs in its own namespace
`m3t<tag>n<i>`, joined by a veth pair to a bridge in one more namespace (`m3t<tag>br`); nothing
is placed in the root namespace and ZeroMQ traffic stays inside these namespaces on addresses
of 10.250.0.0/16. A partition takes the veths of one side down, moves them to a second bridge
and brings them up again, so each side stays connected within itself; healing moves them back.
Without namespaces the daemons run on 127.0.0.1 and partitions are skipped (recorded as such).

Relative consensus error (consensus workload): every node records, each round, `digest`, 16
fixed random projections of each component (the same directions on every node). With d_i the
concatenated digests of the last record of alive honest node i and m their mean,
spread = max_i ||d_i - m|| / ||m||. Random projections preserve distances up to a small
factor (Johnson-Lindenstrauss), so this is the spread of the states among nodes relative to
their common value. It is not the error to the initial exact mean: a restarted node resumes
from its checkpoint and lost messages make the network mean drift a little, so the nodes agree
on a value near, not at, the initial mean (`error_to_mean` is reported for information).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from m3tgossip.daemon import checkpoint
from m3tgossip.daemon.metrics import read_metrics
from m3tgossip.harness.testbed import Testbed
from m3tgossip.harness.testbed import parse_args as testbed_args

#: fraction of the duration before the nemesis starts, and when everything is healed
NEMESIS_START = 0.15
HEAL_AT = 0.6
#: seconds a killed node stays down / a stopped node stays stopped (min, max)
DOWN_S = (2.0, 6.0)
STOP_S = (1.5, 5.0)
#: seconds between convergence evaluations while settling
CHECK_EVERY_S = 1.0
#: rounds every alive node must complete after the heal
MIN_ROUNDS_AFTER_HEAL = 3
SUBNET = "10.250"
#: edu: evaluations averaged on each side of the nemesis (one evaluation is noisy)
EVALS = 3


# ------------------------------------------------------------------------------- the nemesis


@dataclass(frozen=True)
class Fault:
    """One planned fault: at `at` seconds after the start, on `nodes`, for `duration` s."""

    at: float
    kind: str  # kill (SIGKILL, restart after duration) | stop (SIGSTOP, SIGCONT) | partition
    nodes: tuple[str, ...]
    duration: float


def _ball(adjacency: dict[str, list[str]], start: str, size: int) -> list[str]:
    """`size` nodes around `start`, breadth first (a connected side for a partition)."""
    seen, queue = [start], deque([start])
    while queue and len(seen) < size:
        for nb in sorted(adjacency.get(queue.popleft(), [])):
            if nb not in seen and len(seen) < size:
                seen.append(nb)
                queue.append(nb)
    return seen


def plan_nemesis(
    nodes: list[str],
    adjacency: dict[str, list[str]],
    duration: float,
    seed: int,
    kill_fraction: float = 0.25,
    stop_fraction: float = 0.125,
    partitions: int = 1,
    partition_s: float = 5.0,
    exclude: tuple[str, ...] = (),
) -> list[Fault]:
    """The fault schedule of a run: the same list for the same arguments (seeded).

    Killed and stopped nodes are disjoint; every fault ends before the heal at
    `HEAL_AT * duration`. A partition separates a connected ball of a quarter of the nodes
    from the rest.
    """
    rng = random.Random(seed)
    start, heal = NEMESIS_START * duration, HEAL_AT * duration
    pool = [n for n in sorted(nodes) if n not in exclude]
    n_kill = min(len(pool), round(kill_fraction * len(nodes)))
    killed = rng.sample(pool, n_kill)
    rest = [n for n in pool if n not in killed]
    stopped = rng.sample(rest, min(len(rest), round(stop_fraction * len(nodes))))
    plan: list[Fault] = []

    def window(lo: float, hi: float) -> tuple[float, float]:
        d = rng.uniform(lo, hi)
        d = min(d, max(0.5, heal - start - 0.5))
        at = rng.uniform(start, max(start, heal - d))
        return round(at, 3), round(d, 3)

    for node in killed:
        at, d = window(*DOWN_S)
        plan.append(Fault(at, "kill", (node,), d))
    for node in stopped:
        at, d = window(*STOP_S)
        plan.append(Fault(at, "stop", (node,), d))
    for _ in range(partitions):
        side = _ball(adjacency, rng.choice(sorted(nodes)), max(1, len(nodes) // 4))
        at, d = window(partition_s, partition_s)
        plan.append(Fault(at, "partition", tuple(sorted(side)), d))
    plan.sort(key=lambda f: (f.at, f.kind, f.nodes))
    return plan


# ------------------------------------------------------------------------ network namespaces


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


def netns_available() -> tuple[bool, str]:
    """Whether this process can create network namespaces and bridges (and why not)."""
    if sys.platform != "linux":
        return False, "not Linux"
    name = f"m3tprobe{os.getpid()}"
    try:
        r = _ip("netns", "add", name, check=False)
        if r.returncode != 0:
            return False, f"ip netns add failed: {r.stderr.strip() or r.returncode}"
        r = _ip("-n", name, "link", "add", "br0", "type", "bridge", check=False)
        ok = r.returncode == 0
        why = "" if ok else f"cannot create a bridge: {r.stderr.strip()}"
        _ip("netns", "del", name, check=False)
        return ok, why
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"ip not usable: {exc}"


class NetLab:
    """One namespace per daemon plus a bridge namespace; partitions by moving veths.

    Every name carries a per-run tag, and `cleanup` removes all of them (deleting a namespace
    deletes the veth ends and bridges inside it), also after an error.
    """

    def __init__(self, nodes: list[str], tag: str | None = None) -> None:
        self.tag = tag or uuid.uuid4().hex[:4]
        self.nodes = list(nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.bridge_ns = f"m3t{self.tag}br"
        self.created: list[str] = []
        self.split: set[str] = set()

    def ns(self, node: str) -> str:
        return f"m3t{self.tag}n{self.index[node]}"

    def addr(self, node: str) -> str:
        i = self.index[node] + 1
        return f"{SUBNET}.{i // 250}.{i % 250 + 1}"

    def _veth(self, node: str) -> str:
        return f"m3{self.tag}a{self.index[node]}"

    def setup(self) -> None:
        _ip("netns", "add", self.bridge_ns)
        self.created.append(self.bridge_ns)
        for br in ("br0", "br1"):
            _ip("-n", self.bridge_ns, "link", "add", br, "type", "bridge")
            _ip("-n", self.bridge_ns, "link", "set", br, "up")
        for node in self.nodes:
            ns, outer, inner = self.ns(node), self._veth(node), f"m3{self.tag}b{self.index[node]}"
            _ip("netns", "add", ns)
            self.created.append(ns)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", outer, "netns", self.bridge_ns)
            _ip("link", "set", inner, "netns", ns)
            _ip("-n", self.bridge_ns, "link", "set", outer, "master", "br0")
            _ip("-n", self.bridge_ns, "link", "set", outer, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", inner, "name", "eth0")
            _ip("-n", ns, "addr", "add", f"{self.addr(node)}/16", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def _move(self, nodes: list[str], bridge: str) -> None:
        for node in nodes:
            veth = self._veth(node)
            _ip("-n", self.bridge_ns, "link", "set", veth, "down")
            _ip("-n", self.bridge_ns, "link", "set", veth, "master", bridge)
            _ip("-n", self.bridge_ns, "link", "set", veth, "up")

    def partition(self, side: list[str]) -> None:
        """Cut `side` off from the rest (each side stays connected within itself)."""
        new = [n for n in side if n not in self.split]
        self._move(new, "br1")
        self.split |= set(new)

    def heal(self) -> None:
        self._move(sorted(self.split), "br0")
        self.split.clear()

    def cleanup(self) -> list[str]:
        """Delete every namespace this lab created; returns those that could not be deleted."""
        left = []
        for ns in reversed(self.created):
            r = _ip("netns", "del", ns, check=False)
            if r.returncode != 0 and ns in list_netns():
                left.append(ns)
        self.created = left
        return left

    def leftovers(self) -> list[str]:
        return [ns for ns in list_netns() if ns.startswith(f"m3t{self.tag}")]


def list_netns() -> list[str]:
    r = _ip("netns", "list", check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


# --------------------------------------------------------------------------- measurements


def digest_spread(records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Relative spread of the nodes' digests (see the module docstring); None if undefined."""
    digests = {n: r["digest"] for n, r in records.items() if r.get("digest")}
    if len(digests) < 2:
        return {"spread": None, "nodes": sorted(digests)}
    comps = sorted(set.intersection(*(set(d) for d in digests.values())))
    vec = {
        n: np.concatenate([np.asarray(d[c], dtype=np.float64) for c in comps])
        for n, d in digests.items()
    }
    mean = np.mean(list(vec.values()), axis=0)
    norm = float(np.linalg.norm(mean))
    per = {n: float(np.linalg.norm(v - mean)) / (norm if norm > 0 else 1.0) for n, v in vec.items()}
    worst = max(per, key=per.get)
    return {
        "spread": per[worst],
        "worst_node": worst,
        "per_node": per,
        "nodes": sorted(digests),
        "components": comps,
    }


def metrics_health(path: Path) -> dict[str, int]:
    """Lines of a metrics file and how many do not parse (a SIGKILL may tear one line)."""
    total = bad = 0
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                total += 1
                try:
                    if not isinstance(json.loads(line), dict):
                        bad += 1
                except json.JSONDecodeError:
                    bad += 1
    except FileNotFoundError:
        pass
    return {"lines": total, "unparseable": bad}


def pid_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (this run's folder)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd and pid_alive(int(entry)):
            out.append(int(entry))
    return out


# --------------------------------------------------------------------------------- the run


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--topology", required=True)
    p.add_argument("--workload", default="consensus", choices=("consensus", "edu"))
    p.add_argument(
        "--duration", type=float, default=60.0, help="seconds of warm-up, nemesis and settling"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seeds the nemesis, the loss pattern and the federation"
    )
    p.add_argument("--out", required=True)
    p.add_argument("--loss", type=float, default=0.1, help="message loss probability (whole run)")
    p.add_argument("--kill-fraction", type=float, default=0.25)
    p.add_argument("--stop-fraction", type=float, default=0.125)
    p.add_argument("--partitions", type=int, default=1)
    p.add_argument("--partition-s", type=float, default=5.0)
    p.add_argument(
        "--net",
        default="auto",
        choices=("auto", "netns", "loopback"),
        help="netns: a namespace per daemon (partitions possible); auto: netns if available",
    )
    p.add_argument(
        "--tolerance", type=float, default=1e-4, help="consensus: largest relative spread"
    )
    p.add_argument(
        "--metric-tol",
        type=float,
        default=0.05,
        help="edu: largest drop of a node's mean accuracy against its pre-nemesis value",
    )
    p.add_argument(
        "--settle-timeout",
        type=float,
        default=None,
        help="extra seconds to wait for convergence (default max(30, duration/2))",
    )
    p.add_argument("--deadline", type=float, default=2.0, help="round deadline of the daemons (s)")
    p.add_argument(
        "-o", "--option", action="append", default=[], metavar="KEY=VALUE", help="workload option"
    )
    p.add_argument("--set", action="append", default=[], dest="settings", metavar="TABLE.KEY=VALUE")
    p.add_argument("--node-set", action="append", default=[], metavar="NODE:TABLE.KEY=VALUE")
    p.add_argument(
        "--stop-grace",
        type=float,
        default=60.0,
        help="seconds daemons get to exit after SIGTERM before SIGKILL (counts as unclean)",
    )
    p.add_argument(
        "--ready-timeout", type=float, default=300.0, help="seconds the daemons have to start"
    )
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


CHECKS = (
    "converged",
    "alive_and_progressing",
    "checkpoints_intact",
    "resumed_from_checkpoint",
    "metrics_parseable",
    "clean_shutdown",
    "no_process_left",
    "network_cleaned",
)


class ChaosRun:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.settle_timeout = (
            args.settle_timeout if args.settle_timeout is not None else max(30.0, args.duration / 2)
        )
        self.byzantine = sorted(
            {
                item.partition(":")[0]
                for item in args.node_set
                if item.partition(":")[2].startswith("faults.attack=") and not item.endswith("=")
            }
        )
        self.net_note = ""
        self.lab: NetLab | None = None
        use_netns = args.net == "netns"
        if args.net == "auto":
            use_netns, why = netns_available()
            if not use_netns:
                self.net_note = (
                    f"network namespaces not available ({why}): loopback, partitions skipped"
                )
        elif args.net == "netns":
            ok, why = netns_available()
            if not ok:
                raise RuntimeError(f"--net netns: {why}")
        else:
            self.net_note = "loopback requested: partitions skipped"
        tb = [
            "--topology",
            args.topology,
            "--workload",
            args.workload,
            "--rounds",
            "0",
            "--out",
            str(self.out),
            "--seed",
            str(args.seed),
            "--deadline",
            str(args.deadline),
            "--set",
            f"faults.drop={args.loss}",
            "--set",
            f"faults.seed={args.seed}",
            "--set",
            "gossip.startup_grace_s=5.0",
            "--quiet",
        ]
        for o in args.option:
            tb += ["-o", o]
        for s in args.settings:
            tb += ["--set", s]
        for s in args.node_set:
            tb += ["--node-set", s]
        self.bed = Testbed(testbed_args(tb))
        nodes = self.bed.topology.ids()
        if use_netns:
            self.lab = NetLab(nodes)
            topo = self.bed.topology
            topo = replace(
                topo,
                nodes=tuple(replace(n, host=self.lab.addr(n.id), port=5701) for n in topo.nodes),
            )
            self.bed.topology = topo
            self.bed.topology_path.write_text(topo.to_toml())
            for nid in nodes:
                child = self.bed._child(nid)
                child.args = ["ip", "netns", "exec", self.lab.ns(nid), *child.args]
                self.bed.children[nid] = child
        adjacency = {n: list(self.bed.topology.neighbours(n)) for n in nodes}
        self.plan = plan_nemesis(
            nodes,
            adjacency,
            args.duration,
            args.seed,
            args.kill_fraction,
            args.stop_fraction,
            args.partitions,
            args.partition_s,
            exclude=tuple(self.byzantine),
        )
        self.history: list[dict[str, Any]] = []
        self.t0 = 0.0
        self.pids: list[int] = []
        self.stopped: set[str] = set()
        self.down: dict[str, float] = {}  # node -> planned restart time
        self.kill_info: list[dict[str, Any]] = []
        self.unexpected: list[dict[str, Any]] = []
        self.heal_time: float | None = None
        self.heal_rounds: dict[str, int] = {}
        self.pre_metric: dict[str, float | None] = {}
        self.fault_log = open(self.out / "faults.jsonl", "w", encoding="utf-8")

    # -- bookkeeping

    def now(self) -> float:
        return time.monotonic() - self.t0

    def log(self, event: str, **kw: Any) -> None:
        rec = {"t": round(self.now(), 3), "time": time.time(), "event": event, **kw}
        self.history.append(rec)
        self.fault_log.write(json.dumps(rec) + "\n")
        self.fault_log.flush()
        if not self.args.quiet:
            detail = " ".join(f"{k}={v}" for k, v in kw.items() if k not in ("planned",))
            print(f"chaos {rec['t']:7.1f}s  {event:<12} {detail}", flush=True)

    def records(self, nid: str) -> list[dict[str, Any]]:
        return read_metrics(self.bed.children[nid].folder / "metrics.jsonl")

    def last_round(self, nid: str) -> int:
        recs = self.records(nid)
        return int(recs[-1]["round"]) if recs else -1

    def _start(self, nid: str) -> None:
        child = self.bed.children[nid]
        self.bed.start(child)
        self.pids.append(child.proc.pid)

    # -- faults

    def _kill(self, fault: Fault) -> None:
        nid = fault.nodes[0]
        child = self.bed.children[nid]
        if child.proc is None or child.proc.poll() is not None:
            self.log("kill-skipped", node=nid, reason="not running")
            return
        rnd = self.last_round(nid)
        child.proc.send_signal(signal.SIGKILL)
        child.proc.wait(timeout=10)
        child.exit_codes.append(child.proc.returncode)
        info: dict[str, Any] = {"node": nid, "t": round(self.now(), 3), "last_metrics_round": rnd}
        try:
            found = checkpoint.load(child.folder)
            info["checkpoint_round"] = int(found[1]["round"]) if found else None
        except checkpoint.CheckpointError as exc:
            info["checkpoint_error"] = str(exc)
        metric = self._last_metric(self.records(nid))
        if metric is not None:
            info["metric_before"] = metric
        self.kill_info.append(info)
        self.down[nid] = self.now() + fault.duration
        self.log(
            "sigkill",
            node=nid,
            pid=child.proc.pid,
            round=rnd,
            checkpoint_round=info.get("checkpoint_round"),
        )

    def _restart(self, nid: str) -> None:
        del self.down[nid]
        self._start(nid)
        for info in self.kill_info:
            if info["node"] == nid and "start_index" not in info:
                info["start_index"] = self.bed.children[nid].starts - 1
        self.log("restart", node=nid, pid=self.bed.children[nid].proc.pid)

    def _stop(self, fault: Fault) -> None:
        nid = fault.nodes[0]
        child = self.bed.children[nid]
        if child.proc is None or child.proc.poll() is not None:
            self.log("stop-skipped", node=nid, reason="not running")
            return
        child.proc.send_signal(signal.SIGSTOP)
        self.stopped.add(nid)
        self.log("sigstop", node=nid, pid=child.proc.pid, until=round(fault.at + fault.duration, 3))

    def _cont(self, nid: str) -> None:
        child = self.bed.children[nid]
        if child.proc is not None and child.proc.poll() is None:
            child.proc.send_signal(signal.SIGCONT)
        self.stopped.discard(nid)
        self.log("sigcont", node=nid)

    def _partition(self, fault: Fault) -> None:
        if self.lab is None:
            self.log("partition-skipped", nodes=list(fault.nodes), reason=self.net_note)
            return
        self.lab.partition(list(fault.nodes))
        self.log("partition", nodes=list(fault.nodes), until=round(fault.at + fault.duration, 3))

    def _heal_partition(self) -> None:
        if self.lab is not None and self.lab.split:
            side = sorted(self.lab.split)
            self.lab.heal()
            self.log("heal-partition", nodes=side)

    # -- phases

    def _poll_children(self) -> None:
        for nid, child in self.bed.children.items():
            if nid in self.down or child.proc is None:
                continue
            code = child.proc.poll()
            if code is not None:
                child.exit_codes.append(code)
                child.proc = None
                self.unexpected.append({"node": nid, "code": code, "t": round(self.now(), 3)})
                self.log("unexpected-exit", node=nid, code=code)

    @staticmethod
    def _mean_metric(records: list[dict[str, Any]]) -> float | None:
        vals = [float(r["mean_acc"]) for r in records if r.get("mean_acc") is not None][-EVALS:]
        return float(np.mean(vals)) if vals else None

    @staticmethod
    def _last_metric(records: list[dict[str, Any]]) -> float | None:
        for rec in reversed(records):
            if rec.get("mean_acc") is not None:
                return float(rec["mean_acc"])
        return None

    def run(self) -> int:
        args = self.args
        try:
            if self.lab is not None:
                self.lab.setup()
            self.t0 = time.monotonic()
            self.log(
                "setup",
                net="netns" if self.lab else "loopback",
                note=self.net_note,
                nodes=len(self.bed.children),
                loss=args.loss,
                plan=[asdict(f) for f in self.plan],
            )
            self.log(
                "message-loss", probability=args.loss, scope="every outgoing message, whole run"
            )
            for nid in self.bed.children:
                self._start(nid)
            self.bed.wait_ready(timeout=self.args.ready_timeout)
            # the schedule counts from the moment every daemon is up
            self.t0 = time.monotonic()
            self.log("ready")
            self._nemesis()
            self._heal()
            converged = self._settle()
        except BaseException:
            self._emergency_stop()
            raise
        shutdown = self._shutdown()
        left = self.lab.cleanup() if self.lab is not None else []
        verdict = self._verdict(converged, shutdown, left)
        self.fault_log.close()
        (self.out / "verdict.json").write_text(json.dumps(verdict, indent=2))
        if not args.quiet:
            print(format_verdict(verdict), flush=True)
        return 0 if verdict["passed"] else 1

    def _nemesis(self) -> None:
        pending = list(self.plan)
        conts: dict[str, float] = {}
        heal_partition_at: float | None = None
        heal_at = HEAL_AT * self.args.duration
        for nid in self.bed.children:
            self.pre_metric[nid] = None
        pre_done = False
        while self.now() < heal_at:
            t = self.now()
            if not pre_done and t >= NEMESIS_START * self.args.duration:
                self.pre_metric = {
                    nid: self._mean_metric(self.records(nid)) for nid in self.bed.children
                }
                pre_done = True
            while pending and pending[0].at <= t:
                f = pending.pop(0)
                if f.kind == "kill":
                    self._kill(f)
                elif f.kind == "stop":
                    self._stop(f)
                    conts[f.nodes[0]] = f.at + f.duration
                else:
                    self._partition(f)
                    if self.lab is not None:
                        heal_partition_at = f.at + f.duration
            for nid, when in list(self.down.items()):
                if when <= t:
                    self._restart(nid)
            for nid, when in list(conts.items()):
                if when <= t:
                    del conts[nid]
                    self._cont(nid)
            if heal_partition_at is not None and heal_partition_at <= t:
                heal_partition_at = None
                self._heal_partition()
            self._poll_children()
            time.sleep(0.05)
        for f in pending:
            self.log("fault-not-reached", kind=f.kind, nodes=list(f.nodes), at=f.at)

    def _heal(self) -> None:
        for nid in list(self.down):
            self._restart(nid)
        for nid in sorted(self.stopped):
            self._cont(nid)
        self._heal_partition()
        for u in list(self.unexpected):
            nid = u["node"]
            if self.bed.children[nid].proc is None:
                self._start(nid)
                self.log("restart", node=nid, reason="exited unexpectedly")
        self.heal_time = self.now()
        self.heal_wall = time.time()
        self.heal_rounds = {nid: self.last_round(nid) for nid in self.bed.children}
        self.log("healed", rounds={k: v for k, v in self.heal_rounds.items()})

    def _alive_honest(self) -> list[str]:
        return [
            n
            for n, c in self.bed.children.items()
            if n not in self.byzantine and c.proc is not None and c.proc.poll() is None
        ]

    def convergence(self) -> dict[str, Any]:
        nodes = self._alive_honest()
        last = {}
        for nid in nodes:
            recs = self.records(nid)
            if recs:
                last[nid] = recs[-1]
        if self.args.workload == "consensus":
            s = digest_spread(last)
            errs = [
                r.get("error_to_mean") for r in last.values() if r.get("error_to_mean") is not None
            ]
            s["error_to_mean_max"] = max(errs) if errs else None
            s["rounds"] = {n: int(r["round"]) for n, r in last.items()}
            s["ok"] = (
                s["spread"] is not None
                and len(last) == len(nodes)
                and s["spread"] <= self.args.tolerance
            )
            s["definition"] = (
                "max over alive honest nodes i of ||d_i - mean(d)|| / ||mean(d)||, d_i the "
                "concatenated 16-dim random-projection digests of node i's last metrics record"
            )
            s["tolerance"] = self.args.tolerance
            return s
        per: dict[str, Any] = {}
        ok = True
        for nid in nodes:
            recs = [r for r in self.records(nid) if r.get("mean_acc") is not None]
            after = [r for r in recs if r.get("time", 0) > getattr(self, "heal_wall", float("inf"))]
            final = float(np.mean([r["mean_acc"] for r in after[-EVALS:]])) if after else None
            pre = self.pre_metric.get(nid)
            node_ok = (
                final is not None
                and math.isfinite(final)
                and (pre is None or final >= pre - self.args.metric_tol)
            )
            per[nid] = {
                "pre_nemesis": pre,
                "final": final,
                "last": float(after[-1]["mean_acc"]) if after else None,
                "evaluations_after_heal": len(after),
                "round": int(after[-1]["round"]) if after else None,
                "ok": node_ok,
            }
            ok = ok and node_ok
        finals = [v["final"] for v in per.values() if v["final"] is not None]
        return {
            "ok": ok and bool(nodes),
            "definition": f"every alive honest node evaluated after the heal; the mean of its last {EVALS} "
            f"mean-accuracy evaluations is at least the mean of its last {EVALS} before the "
            "nemesis minus metric_tol",
            "metric_tol": self.args.metric_tol,
            "mean_final_acc": sum(finals) / len(finals) if finals else None,
            "per_node": per,
        }

    def _settle(self) -> dict[str, Any]:
        """Watch convergence from the heal on; from `--duration` on, stop as soon as every
        check of the running network passes, or at the settle timeout."""
        end = self.args.duration + self.settle_timeout
        first_ok: float | None = None
        while True:
            self._poll_children()
            conv = self.convergence()
            if conv["ok"] and first_ok is None:
                first_ok = self.now()
            elif not conv["ok"]:
                first_ok = None
            if self.now() >= self.args.duration:
                if conv["ok"] and self._progress()["ok"] or self.now() >= end:
                    break
            time.sleep(CHECK_EVERY_S)
        conv["checked_at_s"] = round(self.now(), 3)
        conv["converged_since_s"] = round(first_ok, 3) if first_ok is not None else None
        conv["seconds_from_heal_to_convergence"] = (
            round(first_ok - self.heal_time, 3)
            if first_ok is not None and self.heal_time is not None
            else None
        )
        self.log(
            "settled",
            converged=conv["ok"],
            value=conv.get("spread", conv.get("mean_final_acc")),
            seconds_from_heal=conv["seconds_from_heal_to_convergence"],
        )
        return conv

    def _progress(self) -> dict[str, Any]:
        after = {
            nid: self.last_round(nid) - self.heal_rounds.get(nid, -1) for nid in self.bed.children
        }
        dead = [
            n for n, c in self.bed.children.items() if c.proc is None or c.proc.poll() is not None
        ]
        ok = not dead and all(v >= MIN_ROUNDS_AFTER_HEAL for v in after.values())
        return {
            "ok": ok,
            "rounds_after_heal": after,
            "not_running": dead,
            "required": MIN_ROUNDS_AFTER_HEAL,
        }

    def _shutdown(self) -> dict[str, Any]:
        self.progress_at_end = self._progress()
        for nid in sorted(self.stopped):
            self._cont(nid)
        self.log("sigterm-all", grace_s=self.args.stop_grace)
        self.bed.stop_all(grace=self.args.stop_grace)
        codes = {}
        for nid, child in self.bed.children.items():
            codes[nid] = child.proc.returncode if child.proc is not None else None
        self.log("stopped", exit_codes=codes)
        return {"final_exit_codes": codes}

    def _emergency_stop(self) -> None:
        for child in self.bed.children.values():
            if child.proc is not None and child.proc.poll() is None:
                try:
                    child.proc.send_signal(signal.SIGCONT)
                except ProcessLookupError:
                    pass
        self.bed.stop_all()
        if self.lab is not None:
            self.lab.cleanup()
        self.fault_log.close()

    # -- verdict

    def _verdict(
        self, conv: dict[str, Any], shutdown: dict[str, Any], netns_left: list[str]
    ) -> dict[str, Any]:
        checks: dict[str, dict[str, Any]] = {}
        checks["converged"] = {"passed": bool(conv["ok"]), **conv}
        checks["alive_and_progressing"] = {
            "passed": bool(self.progress_at_end["ok"]),
            **self.progress_at_end,
        }
        # checkpoints: every node's loads, and its round is at least the last recorded round + 1
        ck: dict[str, Any] = {}
        ck_ok = True
        for nid, child in self.bed.children.items():
            recs = self.records(nid)
            last = int(recs[-1]["round"]) if recs else -1
            try:
                found = checkpoint.load(child.folder)
                rnd = int(found[1]["round"]) if found else None
                good = rnd is not None and rnd >= last + 1
                ck[nid] = {"round": rnd, "last_metrics_round": last, "ok": good}
            except checkpoint.CheckpointError as exc:
                good = False
                ck[nid] = {"error": str(exc), "ok": False}
            ck_ok = ck_ok and good
        checks["checkpoints_intact"] = {
            "passed": ck_ok,
            "per_node": ck,
            "definition": "checkpoint loads and its round >= last metrics round + 1",
        }
        checks["resumed_from_checkpoint"] = self._resumed()
        health = {
            nid: metrics_health(c.folder / "metrics.jsonl") for nid, c in self.bed.children.items()
        }
        kills = {
            nid: sum(1 for k in self.kill_info if k["node"] == nid) for nid in self.bed.children
        }
        mp_ok = all(h["lines"] > 0 and h["unparseable"] <= kills[nid] for nid, h in health.items())
        checks["metrics_parseable"] = {
            "passed": mp_ok,
            "per_node": health,
            "definition": "every line parses, except at most one torn line per SIGKILL",
        }
        codes = shutdown["final_exit_codes"]
        clean = all(c == 0 for c in codes.values()) and not self.unexpected
        checks["clean_shutdown"] = {
            "passed": clean,
            "exit_codes_on_sigterm": codes,
            "unexpected_exits": self.unexpected,
        }
        alive_pids = [p for p in self.pids if pid_alive(p)]
        strays = processes_mentioning(str(self.out / "nodes"))
        checks["no_process_left"] = {
            "passed": not alive_pids and not strays,
            "pids_started": len(self.pids),
            "still_alive": alive_pids,
            "daemon_processes_of_this_run": strays,
        }
        if self.lab is not None:
            left = netns_left + [ns for ns in self.lab.leftovers() if ns not in netns_left]
            checks["network_cleaned"] = {"passed": not left, "namespaces_left": left}
        else:
            checks["network_cleaned"] = {"passed": True, "skipped": self.net_note}
        injected: dict[str, int] = {}
        for h in self.history:
            if h["event"] in (
                "sigkill",
                "restart",
                "sigstop",
                "sigcont",
                "partition",
                "heal-partition",
                "partition-skipped",
                "kill-skipped",
                "stop-skipped",
            ):
                injected[h["event"]] = injected.get(h["event"], 0) + 1
        return {
            "passed": all(c["passed"] for c in checks.values()),
            "topology": self.bed.topology.name,
            "nodes": len(self.bed.children),
            "workload": self.args.workload,
            "seed": self.args.seed,
            "duration_s": self.args.duration,
            "settle_timeout_s": self.settle_timeout,
            "elapsed_s": round(self.now(), 3),
            "heal_at_s": self.heal_time,
            "net": "netns" if self.lab else "loopback",
            "net_note": self.net_note,
            "message_loss": self.args.loss,
            "byzantine": self.byzantine,
            "faults_injected": injected,
            "fault_plan": [asdict(f) for f in self.plan],
            "failed": [k for k, c in checks.items() if not c["passed"]],
            "checks": checks,
        }

    def _resumed(self) -> dict[str, Any]:
        per = []
        ok = True
        for info in self.kill_info:
            nid = info["node"]
            recs = self.records(nid)
            stdout = (
                (self.bed.children[nid].folder / "stdout.log")
                .read_text(errors="replace")
                .splitlines()
            )
            readies = [json.loads(ln[len("READY ") :]) for ln in stdout if ln.startswith("READY ")]
            idx = info.get("start_index")
            ready = readies[idx] if idx is not None and idx < len(readies) else None
            resumed_round = ready["round"] if ready else None
            sessions_after = [r for r in recs if ready and r.get("session") == ready["session"]]
            first_after = sessions_after[0] if sessions_after else None
            expected = info.get("checkpoint_round")
            row = {
                "node": nid,
                "killed_at_s": info["t"],
                "checkpoint_round_at_kill": expected,
                "resumed_round": resumed_round,
                "first_round_after": int(first_after["round"]) if first_after else None,
                "last_round_before": info["last_metrics_round"],
            }
            good = (
                expected is not None
                and resumed_round == expected
                and row["first_round_after"] is not None
                and row["first_round_after"] >= expected
            )
            if self.args.workload == "edu":
                before = info.get("metric_before")
                after = next(
                    (float(r["mean_acc"]) for r in sessions_after if r.get("mean_acc") is not None),
                    None,
                )
                first_ever = next(
                    (float(r["mean_acc"]) for r in recs if r.get("mean_acc") is not None), None
                )
                row.update(
                    metric_before_kill=before,
                    metric_first_after_restart=after,
                    metric_first_ever=first_ever,
                )
                if before is not None and after is not None:
                    row["metric_change"] = after - before
                    good = good and after >= before - self.args.metric_tol
            row["ok"] = good
            ok = ok and good
            per.append(row)
        return {
            "passed": ok,
            "restarts": per,
            "definition": "a restarted node announces (READY) exactly the round of the checkpoint it left "
            "at the SIGKILL and records no round before it"
            + (
                "; its first mean accuracy after the restart is at least the last before the "
                "kill minus metric_tol"
                if self.args.workload == "edu"
                else ""
            ),
        }


def format_verdict(v: dict[str, Any]) -> str:
    lines = [
        f"chaos verdict: {'PASSED' if v['passed'] else 'FAILED'}  ({v['topology']}, {v['nodes']} nodes, "
        f"{v['workload']}, {v['net']}, loss {v['message_loss']:g}, {v['elapsed_s']:.0f} s)"
    ]
    if v["net_note"]:
        lines.append(f"  note: {v['net_note']}")
    lines.append(
        "  faults: " + ", ".join(f"{k} {n}" for k, n in sorted(v["faults_injected"].items()))
    )
    for name, c in v["checks"].items():
        extra = ""
        if name == "converged":
            if "spread" in c:
                sp, em = c.get("spread"), c.get("error_to_mean_max")
                extra = (
                    f"spread {sp:.3e} (tol {c['tolerance']:g})" if sp is not None else "spread n/a"
                )
                if em is not None:
                    extra += f", error to initial mean {em:.3e}"
            else:
                m = c.get("mean_final_acc")
                extra = (
                    f"mean final accuracy {m:.3f}" if m is not None else "no evaluation after heal"
                )
        elif name == "resumed_from_checkpoint":
            extra = "; ".join(
                f"{r['node']} ck {r['checkpoint_round_at_kill']} -> ready {r['resumed_round']}"
                for r in c["restarts"]
            )
        lines.append(f"  [{'ok' if c['passed'] else 'FAIL'}] {name} {extra}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    root = str(Path(__file__).resolve().parent.parent)
    if root not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        os.environ["PYTHONPATH"] = root + (
            os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""
        )
    try:
        run = ChaosRun(args)
    except RuntimeError as exc:
        print(f"chaos: error: {exc}", file=sys.stderr)
        return 2
    try:
        return run.run()
    except KeyboardInterrupt:
        print("chaos: interrupted; every daemon stopped, namespaces removed", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as exc:
        print(f"chaos: error: {exc}", file=sys.stderr)
        verdict = {"passed": False, "error": str(exc), "failed": ["run"], "checks": {}}
        (run.out / "verdict.json").write_text(json.dumps(verdict, indent=2))
        return 1

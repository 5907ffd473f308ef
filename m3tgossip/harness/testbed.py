"""Multi-process testbed: one OS process per node on 127.0.0.1, then a summary.

    python scripts/testbed.py --topology topology/ring-8.toml --workload consensus \\
        --rounds 60 --out DIR

    summary = Testbed(TestbedSpec(topology="topology/ring-8.toml", out=DIR)).run()

The testbed is only a launcher and a reader of files: it picks free ports, generates a CURVE
keypair per node into DIR/keys (plus an operator key, DIR/operator/operator.key, that every node
allows to query status), writes the resolved topology with ports and public keys into DIR,
starts one `m3tgossip node` process per node (each generates its own state or
data from the federation seed, so nothing is handed out centrally; with `--data DIR` each
trains on its own data folder `DIR/<node id>` instead), shows progress from the
nodes' metrics files, and writes `DIR/summary.json`. It exits non-zero if a daemon crashed or
hung, and on Ctrl+C (or any error) it stops every child it started. `--insecure` runs the
daemons on plaintext links instead (loopback only), without keys. `--prometheus` gives every
daemon a Prometheus endpoint on a free loopback port and lists them in DIR/prometheus.json, a
target file Prometheus' `file_sd_configs` reads.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m3tgossip.daemon.metrics import read_metrics
from m3tgossip.errors import ConfigError
from m3tgossip.harness.progress import Progress
from m3tgossip.harness.summary import Summary, format_summary, summarise
from m3tgossip.harness.testbed_spec import SOURCE, TestbedSpec, parse_args
from m3tgossip.net import generate_keys
from m3tgossip.topology import Topology, load_topology
from m3tgossip.topology.stages import check_rounds

#: seconds between progress lines (a progress bar, on a terminal, is redrawn more often)
PROGRESS_EVERY_S = 2.0
#: seconds children get to stop after SIGTERM before SIGKILL
STOP_GRACE_S = 15.0
#: seconds to reap a process after SIGKILL
REAP_S = 10.0


@dataclass
class Child:
    """One node's daemon: its command line, its folder, and its latest process.

    `exit_codes` holds the exit code of every process that ended, in order; `ready` the READY
    record of the latest one (None until it printed it).
    """

    node: str
    args: list[str]
    folder: Path
    proc: subprocess.Popen | None = None
    ready: dict[str, Any] | None = None
    starts: int = 0
    exit_codes: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Placement:
    """Where one node's daemon listens, and the command its process runs inside
    (e.g. `ip netns exec NS`); nodes without one get a free port on 127.0.0.1."""

    host: str
    port: int
    prefix: tuple[str, ...] = ()


EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def listen_range() -> range:
    """Ports a daemon may be told to listen on: outside the kernel's ephemeral range, so that
    no outgoing connection (a neighbour dialling, a test's client) can take one between the
    moment it is picked and the moment its daemon binds it."""
    try:
        low, high = (int(v) for v in EPHEMERAL_RANGE.read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    if low - 10000 >= 2048:
        return range(10000, low)
    if 65535 - high >= 2048:
        return range(high + 1, 65536)
    return range(1024, 65536)  # no room outside it: fall back to any unprivileged port


def free_ports(n: int, host: str = "127.0.0.1", consecutive: bool = False) -> list[int]:
    """`n` distinct ports free on `host` right now (held open together so they differ), drawn
    at random from `listen_range()`; with `consecutive`, a run `p, p + 1, ..., p + n - 1`."""
    if n <= 0:
        return []
    span = listen_range()
    draw = random.SystemRandom()
    for _ in range(200):
        if consecutive:
            start = draw.randrange(span.start, span.stop - n)
            candidates = list(range(start, start + n))
        else:
            candidates = draw.sample(span, min(len(span), 4 * n))
        socks: list[socket.socket] = []
        try:
            for port in candidates:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    s.bind((host, port))
                except OSError:
                    s.close()
                    if consecutive:
                        break
                    continue
                socks.append(s)
                if len(socks) == n:
                    return [s.getsockname()[1] for s in socks]
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"found no {n} free ports on {host} in {span.start}..{span.stop - 1}")


def _check_nodes(spec: TestbedSpec, ids: list[str], placements: Mapping[str, Placement]) -> None:
    """Every node a spec or a placement names is one of the topology's."""
    named = [("kills", n) for n in spec.kills] + [("node_settings", n) for n in spec.node_settings]
    named += [("placements", n) for n in placements]
    for what, node in named:
        if node not in ids:
            raise ConfigError(
                SOURCE,
                f"{what}[{node!r}]",
                f"no such node in {spec.topology}; nodes are {', '.join(ids)}",
            )


def _check_data(spec: TestbedSpec, ids: list[str]) -> None:
    """With `spec.data`, every node has its data folder there."""
    if spec.data is None:
        return
    missing = [nid for nid in ids if not (spec.data / nid).is_dir()]
    if missing:
        raise ConfigError(
            SOURCE,
            "data",
            f"{spec.data} has no folder for {', '.join(missing)} (one folder per node id)",
        )


class Testbed:
    """The daemons of one run: starts, signals and stops them, and reads their files.

    `run()` is the whole run (start, progress, faults of the spec, summary); the other
    methods let a caller drive the daemons itself (the chaos runner does).
    """

    __test__ = False  # not a pytest test class

    def __init__(self, spec: TestbedSpec, placements: Mapping[str, Placement] | None = None):
        self.spec = spec
        placements = dict(placements or {})
        base = load_topology(spec.topology)
        check_rounds(base.stages, spec.rounds, base.source)
        _check_nodes(spec, base.ids(), placements)
        _check_data(spec, base.ids())
        self.out = spec.out
        self.out.mkdir(parents=True, exist_ok=True)
        free = [nid for nid in base.ids() if nid not in placements]
        picked = free_ports(len(free) * (2 if spec.prometheus else 1))
        topology = base.with_ports(dict(zip(free, picked, strict=False)))
        #: node -> HOST:PORT of its Prometheus endpoint (`spec.prometheus`; nodes on loopback)
        self.prometheus = {
            nid: f"127.0.0.1:{port}" for nid, port in zip(free, picked[len(free) :], strict=False)
        }
        by_host: dict[str, dict[str, int]] = {}
        for nid, place in placements.items():
            by_host.setdefault(place.host, {})[nid] = place.port
        for host, ports in by_host.items():
            topology = topology.with_ports(ports, host)
        self.key_dir = self.out / "keys"
        self.operator_key = self.out / "operator" / "operator.key"
        if not spec.insecure:
            keys = {nid: generate_keys(self.key_dir, nid, force=True).public for nid in base.ids()}
            topology = topology.with_keys(keys)
            generate_keys(self.operator_key.parent, "operator", force=True)
        self.topology: Topology = topology
        self.topology_path = self.out / "topology.toml"
        self.topology_path.write_text(topology.to_toml())
        if self.prometheus:
            targets = [{"targets": [a], "labels": {"node": n}} for n, a in self.prometheus.items()]
            (self.out / "prometheus.json").write_text(json.dumps(targets, indent=2))
        self._children = {
            nid: self._make_child(nid, placements[nid].prefix if nid in placements else ())
            for nid in topology.ids()
        }
        #: what the testbed did, as written to DIR/events.jsonl by `run()`
        self.events: list[dict[str, Any]] = []

    def _make_child(self, nid: str, prefix: tuple[str, ...]) -> Child:
        folder = self.out / "nodes" / nid
        folder.mkdir(parents=True, exist_ok=True)
        s = self.spec
        cmd = [*prefix, sys.executable, "-m", "m3tgossip", "node"]
        cmd += ["--topology", str(self.topology_path), "--id", nid, "--workload", s.workload]
        cmd += ["--rounds", str(s.rounds), "--seed", str(s.seed), "--state-dir", str(folder)]
        cmd += ["--deadline", str(s.deadline), "--mode", s.mode]
        if nid in self.prometheus:
            cmd += ["--prometheus", self.prometheus[nid]]
        if s.data is not None:
            cmd += ["--data", str((s.data / nid).resolve())]
        if s.insecure:
            cmd += ["--insecure"]
        else:
            cmd += ["--key-dir", str(self.key_dir), "--status-key", str(self.operator_key)]
        return Child(nid, cmd + s.node_args(nid), folder)

    # -- one daemon

    @property
    def nodes(self) -> list[str]:
        """The node ids, in the topology's order."""
        return list(self._children)

    def child(self, node: str) -> Child:
        """The daemon of `node` (read it; change it through the methods below)."""
        try:
            return self._children[node]
        except KeyError:
            raise KeyError(f"no node {node!r} in this testbed; nodes are {self.nodes}") from None

    def start(self, node: str) -> int:
        """Start `node`'s daemon (again, after it ended); returns its pid."""
        child = self.child(node)
        if self.alive(node):
            raise RuntimeError(f"node {node} is already running (pid {self.pid(node)})")
        self._record_exit(child)  # the previous process's, if nobody asked for it yet
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
            {"time": time.time(), "event": "start", "node": node, "pid": child.proc.pid}
        )
        return child.proc.pid

    def alive(self, node: str) -> bool:
        """Whether `node`'s latest daemon process is running (a stopped one counts)."""
        proc = self.child(node).proc
        return proc is not None and proc.poll() is None

    def pid(self, node: str) -> int | None:
        """The pid of `node`'s latest daemon process (None if it was never started)."""
        proc = self.child(node).proc
        return None if proc is None else proc.pid

    def exited(self, node: str) -> int | None:
        """The exit code of `node`'s latest process if it ended (then also recorded in its
        `exit_codes`), None while it runs or if it was never started."""
        child = self.child(node)
        if child.proc is None or child.proc.poll() is None:
            return None
        self._record_exit(child)
        return child.proc.returncode

    def _record_exit(self, child: Child) -> None:
        if (
            child.proc is not None
            and child.proc.returncode is not None
            and len(child.exit_codes) < child.starts
        ):
            child.exit_codes.append(child.proc.returncode)

    def kill(self, node: str) -> int:
        """SIGKILL `node`'s running daemon and reap it; returns its exit code."""
        child = self.child(node)
        if child.proc is None or child.proc.poll() is not None:
            raise RuntimeError(f"node {node} is not running")
        child.proc.send_signal(signal.SIGKILL)
        child.proc.wait(timeout=REAP_S)
        self._record_exit(child)
        return child.proc.returncode

    def signal(self, node: str, sig: int) -> bool:
        """Send `sig` (e.g. SIGSTOP, SIGCONT) to `node`'s daemon; False if it is not running."""
        proc = self.child(node).proc
        if proc is None or proc.poll() is not None:
            return False
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            return False
        return True

    def readies(self, node: str) -> list[dict[str, Any]]:
        """The READY record of each start of `node`'s daemon so far (from its stdout.log)."""
        try:
            lines = (self.child(node).folder / "stdout.log").read_text(errors="replace")
        except FileNotFoundError:
            return []
        prefix = "READY "
        return [json.loads(ln[len(prefix) :]) for ln in lines.splitlines() if ln.startswith(prefix)]

    def records(self, node: str) -> list[dict[str, Any]]:
        """`node`'s metrics records so far, over all its sessions."""
        return read_metrics(self.child(node).folder / "metrics.jsonl")

    def last_round(self, node: str) -> int:
        """The last round `node` recorded, -1 before its first."""
        records = self.records(node)
        return int(records[-1]["round"]) if records else -1

    # -- every daemon

    def _check_ready(self, child: Child) -> None:
        if child.ready is None:
            readies = self.readies(child.node)
            if len(readies) >= child.starts:
                child.ready = readies[-1]

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until every started daemon printed READY (at most `timeout`, default the
        spec's `ready_timeout_s`); RuntimeError if one exits first, TimeoutError after."""
        timeout = self.spec.ready_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for child in self._children.values():
                self._check_ready(child)
                if child.proc is not None and child.proc.poll() is not None and child.ready is None:
                    raise RuntimeError(
                        f"node {child.node} exited with {child.proc.returncode} before READY; "
                        f"see {child.folder / 'stderr.log'}"
                    )
            if all(c.ready for c in self._children.values()):
                return
            time.sleep(0.05)
        missing = [c.node for c in self._children.values() if not c.ready]
        raise TimeoutError(f"no READY line from {', '.join(missing)} within {timeout:g} s")

    def stop_all(self, grace: float | None = None) -> None:
        """SIGTERM every live daemon, SIGKILL what is left after the grace period (default
        STOP_GRACE_S); reap all and record their exit codes."""
        live = [c.proc for c in self._children.values() if c.proc is not None]
        live = [proc for proc in live if proc.poll() is None]
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + (STOP_GRACE_S if grace is None else grace)
        for proc in live:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=REAP_S)
        for c in self._children.values():
            self._record_exit(c)

    # -- the whole run

    def run(self) -> Summary:
        """Start every daemon, wait for their rounds (applying the spec's kills and restarts),
        stop them, and write DIR/summary.json and DIR/events.jsonl.

        RuntimeError or TimeoutError if a daemon does not come up; on any error or Ctrl+C
        (KeyboardInterrupt, re-raised) every daemon is stopped first.
        """
        spec = self.spec
        timeout = spec.run_timeout_s
        start = time.monotonic()
        hung: list[str] = []
        kills = dict(spec.kills)
        restart_due: dict[str, float] = {}
        progress: Progress | None = None
        try:
            for nid in self._children:
                self.start(nid)
            self.wait_ready()
            if not spec.quiet:
                print(
                    f"testbed: {len(self._children)} daemons ready on 127.0.0.1 "
                    f"({spec.workload}, {spec.rounds} rounds)",
                    flush=True,
                )
                if self.prometheus:
                    print(f"testbed: Prometheus targets in {self.out / 'prometheus.json'}")
            if not spec.quiet:
                progress = Progress("testbed", spec.rounds, "round", every_s=PROGRESS_EVERY_S)
            next_progress = time.monotonic()
            while True:
                alive = [nid for nid in self._children if self.alive(nid)]
                pending_restart = bool(restart_due)
                self._inject_faults(kills, restart_due)
                if not alive and not pending_restart:
                    break
                if time.monotonic() - start > timeout:
                    hung = alive
                    break
                if progress is not None and time.monotonic() >= next_progress:
                    self._progress(progress)
                    next_progress = time.monotonic() + progress.interval
                time.sleep(0.1)
        except KeyboardInterrupt:
            if progress is not None:
                progress.close()
            print("testbed: interrupted; stopping every daemon", file=sys.stderr, flush=True)
            self.stop_all()
            raise
        finally:
            if progress is not None:
                progress.close()
            self.stop_all()
        killed = [e["node"] for e in self.events if e["event"] == "sigkill"]
        summary = summarise(
            spec,
            self.topology,
            {nid: c.folder for nid, c in self._children.items()},
            {nid: c.exit_codes for nid, c in self._children.items()},
            killed,
            time.monotonic() - start,
            hung,
        )
        summary.write(self.out / "summary.json")
        (self.out / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in self.events))
        if not spec.quiet:
            print(format_summary(summary), flush=True)
        return summary

    def _inject_faults(self, kills: dict[str, int], restart_due: dict[str, float]) -> None:
        """SIGKILL the nodes of `kills` that reached their round; restart the killed ones
        whose time in `restart_due` has come."""
        for nid, rnd in list(kills.items()):
            if self.alive(nid) and self.last_round(nid) >= rnd:
                self.kill(nid)
                self.events.append(
                    {"time": time.time(), "event": "sigkill", "node": nid, "round": rnd}
                )
                del kills[nid]
                if self.spec.restart_after is not None:
                    restart_due[nid] = time.monotonic() + self.spec.restart_after
        for nid, due in list(restart_due.items()):
            if time.monotonic() >= due:
                del restart_due[nid]
                self.start(nid)

    def _progress(self, progress: Progress) -> None:
        rounds = [self.last_round(nid) + 1 for nid in self._children]
        progress.update(
            min(rounds),
            note=f"fastest node at {max(rounds)}",
            line=f"testbed: rounds done min {min(rounds)} max {max(rounds)} of {self.spec.rounds}",
        )


def main(argv: list[str] | None = None) -> int:
    """`m3tgossip testbed`: 0 if every daemon finished, 1 if one crashed, hung or did not come
    up, 2 on bad input, 130 on Ctrl+C."""
    try:
        bed = Testbed(parse_args(list(sys.argv[1:] if argv is None else argv)))
    except ConfigError as exc:
        print(f"testbed: error: {exc}", file=sys.stderr)
        return 2
    try:
        return bed.run().exit_code
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, TimeoutError) as exc:
        print(f"testbed: error: {exc}", file=sys.stderr)
        bed.stop_all()
        return 1


if __name__ == "__main__":
    sys.exit(main())

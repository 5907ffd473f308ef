"""Chaos runs: a testbed, a seeded nemesis, healing, settling, and a verdict.

    python scripts/chaos.py --topology topology/torus-16.toml --workload consensus \\
        --duration 90 --seed 1 --out runs/chaos

    verdict = ChaosRun(ChaosSpec(topology="topology/torus-16.toml", out="runs/chaos")).run()

A run has four phases over `--duration` seconds:

1. warm-up: every daemon starts with `--rounds 0` (run until stopped) and message loss
   `faults.drop = --loss` on every outgoing message (on for the whole run: a daemon cannot
   switch it off while running);
2. nemesis: a schedule drawn from `--seed` (`nemesis.plan_nemesis`, deterministic) SIGKILLs a
   fraction of the nodes and restarts them from their checkpoints, SIGSTOPs others and
   SIGCONTs them later, and partitions the network once for a few seconds;
3. heal: anything still down is restarted, every stopped daemon continued, every partition
   healed;
4. settle: rounds go on; from `--duration` on the checks are evaluated every second until they
   pass or `--settle-timeout` more seconds have passed.

Then every daemon gets SIGTERM and the checks of `verdict.CHECKS` run on what is left on disk:
the convergence of the alive honest nodes (measured as `verdict` describes), that no checkpoint
was lost or corrupted and restarted nodes resumed from theirs, that metrics files parse, that
daemons exited cleanly and no process is left behind, and that the network namespaces are
gone. The fault history is written as JSON lines (`DIR/faults.jsonl`), the verdict as
`DIR/verdict.json`.

Partitions need Linux network namespaces (root): each daemon then runs in its own namespace
(`netlab.NetLab`). Without namespaces the daemons run on 127.0.0.1 and partitions are skipped
(recorded as such).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from m3tgossip.daemon import checkpoint
from m3tgossip.errors import ConfigError
from m3tgossip.harness.chaos_spec import ChaosSpec, parse_args
from m3tgossip.harness.nemesis import HEAL_AT, NEMESIS_START, Fault, plan_nemesis
from m3tgossip.harness.netlab import PORT, NetLab, netns_available
from m3tgossip.harness.testbed import Placement, Testbed
from m3tgossip.harness.verdict import (
    checkpoints_intact,
    clean_shutdown,
    consensus_convergence,
    edu_convergence,
    faults_injected,
    format_verdict,
    last_metric,
    mean_metric,
    metrics_parseable,
    no_process_left,
    resumed_from_checkpoint,
)
from m3tgossip.topology import load_topology

#: seconds between convergence evaluations while settling
CHECK_EVERY_S = 1.0
#: rounds every alive node must complete after the heal
MIN_ROUNDS_AFTER_HEAL = 3


class ChaosRun:
    """One chaos run: its testbed and network, the fault plan and history, and the verdict."""

    def __init__(self, spec: ChaosSpec) -> None:
        self.spec = spec
        bed_spec = spec.testbed()
        self.out = bed_spec.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.settle_timeout = spec.settle_timeout_s
        self.byzantine = bed_spec.byzantine
        self.net_note = ""
        self.lab: NetLab | None = None
        use_netns = spec.net == "netns"
        if spec.net == "auto":
            use_netns, why = netns_available()
            if not use_netns:
                self.net_note = (
                    f"network namespaces not available ({why}): loopback, partitions skipped"
                )
        elif spec.net == "netns":
            ok, why = netns_available()
            if not ok:
                raise RuntimeError(f"--net netns: {why}")
        else:
            self.net_note = "loopback requested: partitions skipped"
        placements: dict[str, Placement] = {}
        if use_netns:
            self.lab = NetLab(load_topology(spec.topology).ids())
            placements = {
                n: Placement(self.lab.addr(n), PORT, self.lab.exec_prefix(n))
                for n in self.lab.nodes
            }
        self.bed = Testbed(bed_spec, placements)
        nodes = self.bed.nodes
        adjacency = {n: list(self.bed.topology.neighbours(n)) for n in nodes}
        self.plan: list[Fault] = plan_nemesis(
            nodes,
            adjacency,
            spec.duration,
            spec.seed,
            spec.kill_fraction,
            spec.stop_fraction,
            spec.partitions,
            spec.partition_s,
            exclude=tuple(self.byzantine),
        )
        self.history: list[dict[str, Any]] = []
        self.t0 = 0.0
        self.pids: list[int] = []
        self.stopped: set[str] = set()
        self.down: dict[str, float] = {}  # node -> planned restart time
        self.gone: set[str] = set()  # nodes whose daemon exited on its own
        self.kill_info: list[dict[str, Any]] = []
        self.unexpected: list[dict[str, Any]] = []
        self.heal_time: float | None = None
        self.heal_wall = float("inf")
        self.heal_rounds: dict[str, int] = {}
        self.pre_metric: dict[str, float | None] = {}
        self.progress_at_end: dict[str, Any] = {}
        self.fault_log = open(self.out / "faults.jsonl", "w", encoding="utf-8")

    # -- bookkeeping

    def now(self) -> float:
        return time.monotonic() - self.t0

    def log(self, event: str, **kw: Any) -> None:
        rec = {"t": round(self.now(), 3), "time": time.time(), "event": event, **kw}
        self.history.append(rec)
        self.fault_log.write(json.dumps(rec) + "\n")
        self.fault_log.flush()
        if not self.spec.quiet:
            detail = " ".join(f"{k}={v}" for k, v in kw.items() if k not in ("planned",))
            print(f"chaos {rec['t']:7.1f}s  {event:<12} {detail}", flush=True)

    def _start(self, nid: str) -> int:
        pid = self.bed.start(nid)
        self.pids.append(pid)
        return pid

    # -- faults

    def _kill(self, fault: Fault) -> None:
        nid = fault.nodes[0]
        if not self.bed.alive(nid):
            self.log("kill-skipped", node=nid, reason="not running")
            return
        rnd = self.bed.last_round(nid)
        pid = self.bed.pid(nid)
        self.bed.kill(nid)
        info: dict[str, Any] = {"node": nid, "t": round(self.now(), 3), "last_metrics_round": rnd}
        try:
            found = checkpoint.load(self.bed.child(nid).folder)
            info["checkpoint_round"] = int(found[1]["round"]) if found else None
        except checkpoint.CheckpointError as exc:
            info["checkpoint_error"] = str(exc)
        metric = last_metric(self.bed.records(nid))
        if metric is not None:
            info["metric_before"] = metric
        self.kill_info.append(info)
        self.down[nid] = self.now() + fault.duration
        self.log(
            "sigkill", node=nid, pid=pid, round=rnd, checkpoint_round=info.get("checkpoint_round")
        )

    def _restart(self, nid: str) -> None:
        del self.down[nid]
        pid = self._start(nid)
        for info in self.kill_info:
            if info["node"] == nid and "start_index" not in info:
                info["start_index"] = self.bed.child(nid).starts - 1
        self.log("restart", node=nid, pid=pid)

    def _stop(self, fault: Fault) -> None:
        nid = fault.nodes[0]
        if not self.bed.signal(nid, signal.SIGSTOP):
            self.log("stop-skipped", node=nid, reason="not running")
            return
        self.stopped.add(nid)
        until = round(fault.at + fault.duration, 3)
        self.log("sigstop", node=nid, pid=self.bed.pid(nid), until=until)

    def _cont(self, nid: str) -> None:
        self.bed.signal(nid, signal.SIGCONT)
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
        for nid in self.bed.nodes:
            if nid in self.down or nid in self.gone:
                continue
            code = self.bed.exited(nid)
            if code is not None:
                self.gone.add(nid)
                self.unexpected.append({"node": nid, "code": code, "t": round(self.now(), 3)})
                self.log("unexpected-exit", node=nid, code=code)

    def run(self) -> dict[str, Any]:
        """The whole run; returns the verdict (also written to DIR/verdict.json)."""
        spec = self.spec
        try:
            if self.lab is not None:
                self.lab.setup()
            self.t0 = time.monotonic()
            self.log(
                "setup",
                net="netns" if self.lab else "loopback",
                note=self.net_note,
                nodes=len(self.bed.nodes),
                loss=spec.loss,
                plan=[asdict(f) for f in self.plan],
            )
            self.log(
                "message-loss", probability=spec.loss, scope="every outgoing message, whole run"
            )
            for nid in self.bed.nodes:
                self._start(nid)
            self.bed.wait_ready()
            # the schedule counts from the moment every daemon is up
            self.t0 = time.monotonic()
            self.log("ready")
            self._nemesis()
            self._heal()
            converged = self._settle()
        except BaseException:
            self._emergency_stop()
            raise
        codes = self._shutdown()
        left = self.lab.cleanup() if self.lab is not None else []
        verdict = self._verdict(converged, codes, left)
        self.fault_log.close()
        (self.out / "verdict.json").write_text(json.dumps(verdict, indent=2))
        if not spec.quiet:
            print(format_verdict(verdict), flush=True)
        return verdict

    def _nemesis(self) -> None:
        pending = list(self.plan)
        conts: dict[str, float] = {}
        heal_partition_at: float | None = None
        heal_at = HEAL_AT * self.spec.duration
        self.pre_metric = {nid: None for nid in self.bed.nodes}
        pre_done = False
        while self.now() < heal_at:
            t = self.now()
            if not pre_done and t >= NEMESIS_START * self.spec.duration:
                self.pre_metric = {
                    nid: mean_metric(self.bed.records(nid)) for nid in self.bed.nodes
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
        for nid in [u["node"] for u in self.unexpected if u["node"] in self.gone]:
            self.gone.discard(nid)
            self._start(nid)
            self.log("restart", node=nid, reason="exited unexpectedly")
        self.heal_time = self.now()
        self.heal_wall = time.time()
        self.heal_rounds = {nid: self.bed.last_round(nid) for nid in self.bed.nodes}
        self.log("healed", rounds=dict(self.heal_rounds))

    def convergence(self) -> dict[str, Any]:
        """The convergence check of the alive honest nodes right now."""
        nodes = [n for n in self.bed.nodes if n not in self.byzantine and self.bed.alive(n)]
        if self.spec.workload == "consensus":
            return consensus_convergence(self.bed, nodes, self.spec.tolerance)
        return edu_convergence(
            self.bed, nodes, self.pre_metric, self.heal_wall, self.spec.metric_tol
        )

    def _settle(self) -> dict[str, Any]:
        """Watch convergence from the heal on; from `duration` on, stop as soon as every
        check of the running network passes, or at the settle timeout."""
        end = self.spec.duration + self.settle_timeout
        first_ok: float | None = None
        while True:
            self._poll_children()
            conv = self.convergence()
            if conv["ok"] and first_ok is None:
                first_ok = self.now()
            elif not conv["ok"]:
                first_ok = None
            if self.now() >= self.spec.duration:
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
        after = {n: self.bed.last_round(n) - self.heal_rounds.get(n, -1) for n in self.bed.nodes}
        dead = [n for n in self.bed.nodes if not self.bed.alive(n)]
        ok = not dead and all(v >= MIN_ROUNDS_AFTER_HEAL for v in after.values())
        return {
            "ok": ok,
            "rounds_after_heal": after,
            "not_running": dead,
            "required": MIN_ROUNDS_AFTER_HEAL,
        }

    def _shutdown(self) -> dict[str, int | None]:
        """SIGTERM every daemon (stopped ones continued first); their exit codes."""
        self.progress_at_end = self._progress()
        for nid in sorted(self.stopped):
            self._cont(nid)
        self.log("sigterm-all", grace_s=self.spec.stop_grace)
        self.bed.stop_all(grace=self.spec.stop_grace)
        codes = {nid: self.bed.exited(nid) for nid in self.bed.nodes}
        self.log("stopped", exit_codes=codes)
        return codes

    def _emergency_stop(self) -> None:
        for nid in self.bed.nodes:
            self.bed.signal(nid, signal.SIGCONT)
        self.bed.stop_all()
        if self.lab is not None:
            self.lab.cleanup()
        self.fault_log.close()

    def _verdict(
        self, conv: dict[str, Any], codes: dict[str, int | None], netns_left: list[str]
    ) -> dict[str, Any]:
        spec = self.spec
        if self.lab is not None:
            left = netns_left + [ns for ns in self.lab.leftovers() if ns not in netns_left]
            network = {"passed": not left, "namespaces_left": left}
        else:
            network = {"passed": True, "skipped": self.net_note}
        results: dict[str, dict[str, Any]] = {
            "converged": {"passed": bool(conv["ok"]), **conv},
            "alive_and_progressing": {
                "passed": bool(self.progress_at_end["ok"]),
                **self.progress_at_end,
            },
            "checkpoints_intact": checkpoints_intact(self.bed),
            "resumed_from_checkpoint": resumed_from_checkpoint(
                self.bed, self.kill_info, spec.workload, spec.metric_tol
            ),
            "metrics_parseable": metrics_parseable(self.bed, self.kill_info),
            "clean_shutdown": clean_shutdown(codes, self.unexpected),
            "no_process_left": no_process_left(self.pids, self.out / "nodes"),
            "network_cleaned": network,
        }
        return {
            "passed": all(c["passed"] for c in results.values()),
            "topology": self.bed.topology.name,
            "nodes": len(self.bed.nodes),
            "workload": spec.workload,
            "seed": spec.seed,
            "duration_s": spec.duration,
            "settle_timeout_s": self.settle_timeout,
            "elapsed_s": round(self.now(), 3),
            "heal_at_s": self.heal_time,
            "net": "netns" if self.lab else "loopback",
            "net_note": self.net_note,
            "message_loss": spec.loss,
            "byzantine": self.byzantine,
            "faults_injected": faults_injected(self.history),
            "fault_plan": [asdict(f) for f in self.plan],
            "failed": [k for k, c in results.items() if not c["passed"]],
            "checks": results,
        }


def main(argv: list[str] | None = None) -> int:
    """The chaos runner: 0 when every check passed, 1 when one failed, 2 on a usage or set-up
    error, 130 on Ctrl+C."""
    # the daemons import the same package as this process, also inside a namespace
    root = str(Path(__file__).resolve().parents[2])
    if root not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        os.environ["PYTHONPATH"] = root + (
            os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""
        )
    try:
        run = ChaosRun(parse_args(list(sys.argv[1:] if argv is None else argv)))
    except (ConfigError, RuntimeError) as exc:
        print(f"chaos: error: {exc}", file=sys.stderr)
        return 2
    try:
        return 0 if run.run()["passed"] else 1
    except KeyboardInterrupt:
        print("chaos: interrupted; every daemon stopped, namespaces removed", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as exc:
        print(f"chaos: error: {exc}", file=sys.stderr)
        failed = {"passed": False, "error": str(exc), "failed": ["run"], "checks": {}}
        (run.out / "verdict.json").write_text(json.dumps(failed, indent=2))
        return 1

"""The node daemon: wires a workload, its neighbours, its link, the release gate, a mixer and a
round schedule together, says hello, runs rounds, checkpoints, and leaves cleanly.

One thread owns the sockets; a stop request (a signal in the daemon) only sets `stop_reason`,
which the loop checks between polls. The transport is given to the node, so every handler and
every schedule runs the same over ZeroMQ and over an in-process fake.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from m3tgossip import protocol
from m3tgossip.consensus import make_mixer
from m3tgossip.daemon import checkpoint, ledger, single_learner
from m3tgossip.daemon.config import NodeConfig
from m3tgossip.daemon.engine import RoundEngine
from m3tgossip.daemon.exchange import Exchange
from m3tgossip.daemon.forget import Erasures
from m3tgossip.daemon.handlers import Handlers
from m3tgossip.daemon.link import Link, TransportLike
from m3tgossip.daemon.metrics import MetricsWriter
from m3tgossip.daemon.mix import MixStep
from m3tgossip.daemon.nodeinfo import write_node_info
from m3tgossip.daemon.notify import Notifier
from m3tgossip.daemon.peers import make_peers
from m3tgossip.daemon.prometheus import Exporter
from m3tgossip.daemon.rounds import RoundCollector
from m3tgossip.daemon.schedules import RoundParts, make_schedule
from m3tgossip.daemon.startup import handshake, make_gate, open_transport
from m3tgossip.daemon.state import NodeState
from m3tgossip.daemon.stream import RoundSums
from m3tgossip.errors import ConfigError
from m3tgossip.log import get_logger
from m3tgossip.topology import Topology, load_topology
from m3tgossip.topology.stages import check_rounds
from m3tgossip.workloads import Workload, make_workload

log = get_logger(__name__)


class Node(NodeState):
    """One daemon. `run()` blocks until the rounds are done or `stop()` is called."""

    def __init__(
        self,
        config: NodeConfig,
        topology: Topology | None = None,
        workload: Workload | None = None,
        transport: TransportLike | None = None,
    ) -> None:
        topology = topology or load_topology(config.topology)
        found = None if config.fresh else checkpoint.load(config.state_path)
        if topology.stages:  # the version of the stage the node resumes in, or joins at
            check_rounds(topology.stages, config.rounds, config.topology)
            k = topology.stage_at(int(found[1]["round"]) if found else 0)
            topology = topology.version(max(k, topology.joins_at(config.id)))
        workload = workload or make_workload(
            config.workload,
            topology=topology,
            node_id=config.id,
            seed=config.seed,
            options=config.workload_options,
        )
        shared = workload.shared()
        g = config.gossip
        time_varying = topology.dynamics != "static"
        try:
            self.schedule = make_schedule(config.id, g.mode, g.overlap, time_varying)
            mixer = make_mixer(
                g.aggregator,
                trim=g.trim,
                gamma=g.gamma,
                lossy_codec=any(str(g.compress.get(c, g.compression)) != "raw" for c in shared),
                noise_aware=g.noise_strength > 0,
                time_varying=time_varying,
            )
        except ValueError as exc:
            raise ConfigError(config.topology, f'node "{config.id}" [gossip]', str(exc)) from exc
        single_learner.check_settings(config, topology, shared, time_varying)
        gate = make_gate(config, topology, workload, shared)
        peers = make_peers(topology, config.id, set(shared))
        super().__init__(config, topology, workload, peers, gate, self.schedule.lag)
        self._resume(found)
        transport = transport or open_transport(config, topology, peers)
        self.link = Link(self.id, transport, lambda: self.round)
        self.exchange = Exchange(self, self.link)
        sums = RoundSums(self, self.exchange, mixer)
        self.rounds = RoundCollector(self, self.link, self.exchange, self.poll, sums)
        self.mixstep = MixStep(self, self.exchange, self.rounds, mixer)
        self.parts = RoundParts(
            self, self.link, self.exchange, self.rounds, self.mixstep, self.poll
        )
        self.handlers = Handlers(
            self,
            self.link,
            self.exchange,
            self.rounds,
            on_push=lambda peer, msg: self.schedule.on_push(self.parts, peer, msg),
            status=self.status,
            erasures=Erasures(self, self.link, self.exchange),
        )
        self.metrics = MetricsWriter(config.metrics_path)
        self.checkpoints = checkpoint.Writer(config.state_path)
        self.exporter = Exporter(config)
        self.engine = RoundEngine(
            self.parts, self.schedule, self.metrics, self.checkpoint, self.exporter
        )
        #: the service manager's notify socket (READY, WATCHDOG, STOPPING), if it gave one
        self.notifier = Notifier.from_env()
        self.engine.beat = self.alive

    def poll(self, timeout_ms: int) -> None:
        """Handle whatever arrives within `timeout_ms`."""
        self.alive()
        self.handlers.poll(timeout_ms)

    def alive(self) -> None:
        """Tell the service manager's watchdog the loop runs (rate-limited, see notify)."""
        self.notifier.watchdog(f"round {self.round}")

    def stop(self, reason: str) -> None:
        """Ask the loop to finish or abandon its round, checkpoint and leave."""
        self.stop_reason = reason

    def _resume(self, found: tuple[dict[str, Any], dict[str, Any]] | None) -> None:
        if self.gate is not None:  # the ledger counts even when the checkpoint is ignored
            spent = ledger.load(self.config.state_path)
            if spent is not None:
                try:
                    self.gate.load(spent)
                except (ValueError, KeyError) as exc:
                    path = self.config.state_path / ledger.FILENAME
                    raise ledger.LedgerError(f"{path}: {exc}") from exc
        if found is None:
            if self.join_round is not None:  # a node a stage adds starts at the stage's round
                self.round = self.join_round
            return
        arrays, meta = found
        if meta.get("model_id") != self.model_id:
            raise RuntimeError(
                f"{self.config.state_path}/{checkpoint.FILENAME}: checkpoint is for model "
                f"{meta.get('model_id')!r}, this node runs {self.model_id!r}; "
                "use --fresh to start over"
            )
        self.workload.load_state(arrays)
        self.round = int(meta["round"])
        saved = meta.get("privacy")
        if (
            self.gate is not None
            and saved
            and self.gate.spend(saved) > self.gate.spend(self.gate.state())
        ):
            self.gate.load(saved)  # the later of ledger and checkpoint
        self.retired = set(meta.get("retired", []))
        self.resumed_from = self.round
        log.info("%s: resumed from checkpoint at round %d", self.id, self.round)

    def run(self) -> int:
        """Announce READY, say hello, run rounds, shut down cleanly. Returns the exit code."""
        self.exporter.start(self, self.link.session)
        ready = {
            "node": self.id,
            "endpoint": self.link.transport.endpoint,
            "session": self.link.session,
            "pid": os.getpid(),
            "round": self.round,
            "workload": self.workload.name,
            "schedule": self.schedule.name,
            "prometheus": self.exporter.bound,
        }
        print("READY " + json.dumps(ready, separators=(",", ":")), flush=True)
        self.notifier.ready(f"listening on {ready['endpoint']}, round {self.round}")
        self.schedule.start(self.parts)
        try:
            if self.schedule.exchanges:
                handshake(self, self.link, self.exchange, self.poll)
            self.engine.run()
        finally:
            self.shutdown()
        return 0

    def checkpoint(self, wait: bool = False) -> None:
        """Checkpoint this node: in the background (the next checkpoint waits for it), or now
        and durably with `wait` (shutdown)."""
        meta = {
            "node": self.id,
            "round": self.round,
            "model_id": self.model_id,
            "session": self.link.session,
            "time": time.time(),
            "privacy": self.gate.state() if self.gate else None,
            "retired": sorted(self.retired),
        }
        self.checkpoints.submit(self.workload.state(), meta)
        if wait:
            self.checkpoints.flush()

    def shutdown(self) -> None:
        """Checkpoint, tell neighbours we leave, close sockets (bounded by linger)."""
        reason = self.stop_reason or (
            "stage"
            if self.at_stage_end
            else "neighbours finished"
            if self.finish_after is not None and self.round < self.config.rounds
            else "finished"
        )
        self.notifier.stopping(f"stopping at round {self.round} ({reason})")
        try:
            self.checkpoint(wait=True)
        except OSError as exc:
            log.error("%s: final checkpoint failed: %s", self.id, exc)
        for peer in self.peers.values():
            self.link.send(peer, protocol.MsgType.LEAVE, {"reason": reason})
        self.metrics.close()
        self.exporter.close()
        self.link.transport.close(int(self.config.gossip.leave_timeout_s * 1000))
        self.notifier.close()
        log.info("%s: stopped at round %d (%s)", self.id, self.round, reason)

    def status(self) -> dict[str, Any]:
        """What `m3tgossip status` prints: a JSON-able summary of this node."""
        now = time.monotonic()
        link = self.link
        return {
            "node": self.id,
            "session": link.session,
            "pid": os.getpid(),
            "endpoint": link.transport.endpoint,
            "workload": self.workload.name,
            "model": self.model_id,
            "mode": self.config.gossip.mode,
            "schedule": self.schedule.name,
            "round": self.round,
            "rounds": self.config.rounds,
            "uptime_s": round(time.time() - self.started, 3),
            "resumed_from": self.resumed_from,
            "components": {c: int(x.size) for c, x in self.shared.items()},
            "bytes_in": link.bytes_in,
            "bytes_out": link.bytes_out,
            "rejected": link.rejected,
            "erasures": {
                "accepted": sorted(self.handlers.erasures.seen),
                "refused": self.handlers.erasures.refused,
            },
            "neighbours": {
                p.id: {
                    "session": p.session,
                    "round": p.round,
                    "left": p.left,
                    "model_ok": p.model_ok,
                    "missed_rounds": p.missed,
                    "loose": self.rounds.loose(p),
                    "heard_s_ago": round(now - p.last_heard, 3) if p.last_heard else None,
                    "bytes_in": p.bytes_in,
                    "bytes_out": p.bytes_out,
                }
                for p in self.peers.values()
            },
        }


class StageRunner:
    """Runs one node through every stage of its spec in this one process.

    A spec with `[[stages]]` is run stage by stage: where the next stage begins, the node
    checkpoints (model, optimiser and privacy ledger) and leaves its neighbours as at any stop,
    and is built again from that checkpoint under the new stage's version of the spec, which
    gives it the stage's components and holder subgraphs; the privacy ledger carries over, so
    one budget covers the whole run. The checkpoint each stage ends with is kept beside the
    node's checkpoint as `stage-<k>.npz`. A spec without stages runs as one node.
    """

    def __init__(
        self, config: NodeConfig, build: Callable[[NodeConfig], Node] | None = None
    ) -> None:
        self.config = config
        self.build = build or Node
        #: the node of the stage running now (None before the first is built)
        self.node: Node | None = None
        self.stop_reason: str | None = None

    @property
    def id(self) -> str:
        return self.config.id

    def stop(self, reason: str) -> None:
        """Stop the node of this stage, and build no further one."""
        self.stop_reason = reason
        if self.node is not None:
            self.node.stop(reason)

    def run(self) -> int:
        """Run the stages from the one the node's checkpoint is in; the last exit code."""
        config = self.config
        while True:
            node = self.node = self.build(config)
            write_node_info(config, node.topology)  # what `m3tgossip predict` and `export` read
            if self.stop_reason is not None:
                node.stop(self.stop_reason)
            code = node.run()
            if node.topology.stages and (node.at_stage_end or node.round == config.rounds):
                checkpoint.keep_stage(config.state_path, node.topology.stage)
            if code or self.stop_reason is not None or not node.at_stage_end:
                return code
            log.info(
                "%s: stage %d begins at round %d: continuing under its version of the spec",
                node.id,
                node.topology.stage + 1,
                node.round,
            )
            config = replace(config, fresh=False)


def run_node(config: NodeConfig) -> int:
    """Entry point of `m3tgossip node`: SIGTERM and SIGINT ask the node to stop; a spec with
    stages runs them all (`StageRunner`)."""
    runner = StageRunner(config)

    def handler(signum: int, _frame: Any) -> None:
        runner.stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return runner.run()

"""The round engine. A round is one fixed sequence of phases:

    train -> release -> exchange (the schedule orders send, collect and mix) -> after-mix
          -> evaluate -> checkpoint -> record

`release` is the node's one release path: with a release gate (a private workload under a
profile that is not `open`), the round is charged there before any schedule can send
anything: a privately trained workload's DP-SGD steps of the round (its release is
post-processing and gets no noise of its own), or else every shared component's local update,
clipped and noised, the node continuing from the released values; a single-learner node with
cancelling noise releases its values as they are and the gate draws the round's per-edge
masks, without which the exchange sends nothing of them. The gate's accounting is
then written to the release ledger (fsync'd), so a crash after sending cannot un-spend it.
What leaves the node afterwards (deltas, full states, push-sum shares) is computed from
released values and neighbours' messages only. The end of a round is written once, here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from m3tgossip.daemon import ledger
from m3tgossip.daemon.metrics import MetricsWriter
from m3tgossip.daemon.prometheus import Exporter
from m3tgossip.daemon.schedules import RoundParts, Schedule
from m3tgossip.daemon.timings import Timings
from m3tgossip.errors import ConfigError
from m3tgossip.net import FaultyTransport
from m3tgossip.privacy.cancel import PROTECTS

#: longest single sleep of a slowed-down local step (a stop request is noticed after it)
SLOWDOWN_SLICE_S = 0.1


class RoundEngine:
    """Runs the node's rounds with its schedule until they are done or the node stops."""

    def __init__(
        self,
        parts: RoundParts,
        schedule: Schedule,
        metrics: MetricsWriter,
        checkpoint: Callable[[], None],
        exporter: Exporter | None = None,
    ) -> None:
        self.parts = parts
        self.schedule = schedule
        node = parts.state
        if node.config.gossip.influence_every and not hasattr(node.workload, "loss_gradient"):
            raise ConfigError(
                f"node {node.id}",
                "gossip.influence_every",
                f"the {node.workload.name!r} workload has no held-out loss to attribute",
            )
        self.metrics = metrics
        self.checkpoint = checkpoint
        #: the node's Prometheus endpoint, updated from every round's record
        self.exporter = exporter
        #: called between round phases (the daemon's watchdog ping; nothing by default)
        self.beat: Callable[[], None] = lambda: None
        #: when this node last checkpointed (monotonic seconds; the start of its rounds counts)
        self.last_checkpoint = time.monotonic()

    def run(self) -> None:
        node = self.parts.state
        schedule = self.schedule
        self.last_checkpoint = time.monotonic()
        while not node.done():
            self.beat()
            t = Timings()
            before = self.snapshot()
            local = self.local_step()
            self.release(before)
            measuring = self.begin_influence()
            self.beat()
            t.lap("local")
            outcome = schedule.exchange(self.parts, before, t)
            if outcome is None:
                break  # stopping: abandon the round, keep local progress
            heard, distance = outcome
            node.workload.after_mix(node.round)
            if measuring:
                loss = node.workload.heldout_loss  # type: ignore[attr-defined]
                influence = self.parts.rounds.sums.influence.record(node.shared, loss)
                local = {**local, "influence": influence} if influence else local
            t.lap("mix")
            self.end_round(local, heard, distance, t)
        schedule.finish(self.parts)

    def begin_influence(self) -> bool:
        """On a round of `gossip.influence_every`, take the workload's held-out loss and its
        gradient before the mix, so the mix can credit each neighbour (`daemon.influence`)."""
        node = self.parts.state
        every = node.config.gossip.influence_every
        measured = None
        if every and self.schedule.exchanges and node.round % every == 0:
            measured = node.workload.loss_gradient()  # type: ignore[attr-defined]
        self.parts.rounds.sums.influence.begin(measured, node.shared)
        return measured is not None

    def local_step(self) -> dict[str, Any]:
        """The workload's local step of the round, slowed down as `faults.slowdown` and
        `faults.slowdown_s` ask (a measurement aid: the loop does nothing else meanwhile, as
        it would on a slower machine)."""
        node = self.parts.state
        faults = node.config.faults
        start = time.monotonic()
        local = node.workload.local_step(node.round)
        if faults.slowed:
            end = time.monotonic() + faults.pause_after(time.monotonic() - start)
            while (left := end - time.monotonic()) > 0 and node.stop_reason is None:
                time.sleep(min(left, SLOWDOWN_SLICE_S))
                self.beat()
        return local

    def snapshot(self) -> dict[str, np.ndarray] | None:
        """The shared values before training, where the release or the schedule needs them."""
        node = self.parts.state
        releasing = node.gate is not None and self.schedule.exchanges
        if not (releasing or self.schedule.needs_before):
            return None
        return {c: x.copy() for c, x in node.shared.items()}

    def release(self, before: dict[str, np.ndarray] | None) -> None:
        """The one release path: charge the round (and clip and noise each component's local
        update, for release noise), then write the ledger before anything can leave."""
        node = self.parts.state
        gate = node.gate
        if gate is None or before is None or not self.schedule.exchanges:
            return
        live = [c for c in node.shared if c not in node.retired]
        if not live:
            return
        if not gate.begin_round():
            for comp in live:
                self.parts.exchange.retire(comp, gate.node_epsilon())
            return
        for comp in live:
            x = node.shared[comp]
            if not gate.can_share(comp):
                self.parts.exchange.retire(comp, gate.node_epsilon())
                continue
            if gate.cancel is not None:
                gate.privatize(comp, x - before[comp])  # the round's masks; the value as it is
                continue
            if gate.components[comp].trained:
                gate.privatize(comp, x - before[comp])  # post-processing: charged, unchanged
                self.parts.exchange.noise_std[comp] = 0.0
                continue
            released, std = gate.privatize(comp, x - before[comp])
            np.add(before[comp], released, out=x)
            self.parts.exchange.noise_std[comp] = std
        ledger.save(node.config.state_path, gate.state())

    def end_round(
        self, local: dict[str, Any], heard: list[str], distance: float, t: Timings
    ) -> None:
        node = self.parts.state
        g = node.config.gossip
        last = node.stop_reason is not None or 0 < node.config.rounds <= node.round + 1
        last = last or (node.stop_at is not None and node.stop_at <= node.round + 1)
        last = last or (node.finish_after is not None and node.finish_after <= node.round + 1)
        evaluate = last or (node.round + 1) % g.eval_every == 0
        evaluation = node.workload.evaluate(node.round) if evaluate else {}
        node.round += 1
        node.rounds_done += 1
        now = time.monotonic()
        # the last round is checkpointed by the shutdown that follows it
        if (
            not node.done()
            and node.round % g.checkpoint_every == 0
            and now - self.last_checkpoint >= g.checkpoint_interval_s
        ):
            self.checkpoint()
            self.last_checkpoint = now
        t.lap("eval_checkpoint")
        self.record(local, evaluation, heard, distance, t.as_dict())

    def record(
        self,
        local: dict[str, Any],
        evaluation: dict[str, Any],
        heard: list[str],
        distance: float,
        timings: dict[str, float],
    ) -> None:
        node = self.parts.state
        record: dict[str, Any] = {
            "round": node.round - 1,
            "node": node.id,
            "session": self.parts.link.session,
            "time": time.time(),
            "consensus_distance": distance,
            "bytes_in": self.parts.link.bytes_in,
            "bytes_out": self.parts.link.bytes_out,
            "heard": heard,
            "neighbours": len([p for p in node.peers.values() if p.components]),
            "deadline_s": self.parts.rounds.deadline(),
        }
        if node.gate is not None and node.gate.cancel is not None:
            record["privacy"] = self.cancel_record()
        elif node.spec.single_learner == "local":
            record["privacy"] = {"mechanism": "local", "dp": False, "node_epsilon": None}
        elif node.gate is not None:
            record["privacy"] = {
                "node_epsilon": node.gate.node_epsilon(),
                "budget": node.gate.profile.epsilon,
                "delta": node.gate.profile.delta,
                "mechanism": "dp-sgd" if node.gate.training else "release-noise",
                "epsilon": {c: node.gate.spent(c) for c in node.shared},
                "retired": sorted(node.retired),
            }
        if self.parts.mixstep.distances:
            record["component_distance"] = dict(self.parts.mixstep.distances)
        if self.parts.mixstep.loose:
            record["loose"] = dict(self.parts.mixstep.loose)
        if self.parts.rounds.isolated:
            record["isolated"] = sorted(self.parts.rounds.isolated)
        if isinstance(self.parts.link.transport, FaultyTransport):
            record["faults"] = self.parts.link.transport.stats()
        record["timings"] = timings
        if local:
            record["train"] = local
        record.update(evaluation)
        self.metrics.write(record)
        if self.exporter is not None:
            self.exporter.observe(record, node)

    def cancel_record(self) -> dict[str, Any]:
        """What a node with cancelling noise says of its privacy: the mechanism and its noise,
        no epsilon (it has none to claim)."""
        gate = self.parts.state.gate
        assert gate is not None and gate.cancel is not None
        return {
            "mechanism": "cancelling-noise",
            "dp": False,
            "node_epsilon": None,
            "budget": None,
            "protects": PROTECTS,
            "noise_std": gate.cancel.std,
            "edge_noise_std": self.parts.exchange.mask_std,
            "releases": gate.released,
            "retired": [],
        }

"""A node's Prometheus endpoint: the numbers of each round's metrics record, for operators.

Off unless the node config names an address (`[node] prometheus = "127.0.0.1:9101"`, or
`--prometheus` on the command line); only loopback addresses unless `prometheus_public = true`.
The series live in a registry of the node's own (never prometheus_client's global one) and are
updated from the record the round engine writes at the end of every round, so a scrape shows
what `metrics.jsonl` holds:

    m3tgossip_node_info{node, workload, model, session}         who answers
    m3tgossip_round, m3tgossip_rounds_total                     last round done, rounds done
    m3tgossip_round_duration_seconds, ..._round_phase_seconds{phase}, ..._round_deadline_seconds
    m3tgossip_consensus_distance                                relative distance to neighbours
    m3tgossip_component_consensus_distance{component}
    m3tgossip_received_bytes_total, m3tgossip_sent_bytes_total
    m3tgossip_neighbours, m3tgossip_neighbours_heard, m3tgossip_neighbours_suspected
    m3tgossip_neighbour_deadline_misses_total{neighbour}       rounds it missed the deadline
    m3tgossip_neighbour_missed_rounds{neighbour}               consecutive misses now
    m3tgossip_neighbour_suspected{neighbour}                   1: not waited for until heard
    m3tgossip_privacy_epsilon, ..._privacy_component_epsilon{component},
    m3tgossip_privacy_retired_components                        privacy spent (private nodes)
    m3tgossip_task_accuracy{task}, m3tgossip_task_f1{task}, m3tgossip_mean_accuracy,
    m3tgossip_group_accuracy_gap{attribute, task}, m3tgossip_worst_group_gap
                                                                the workload's evaluation
    m3tgossip_error_to_mean                                     the consensus workload's error
    process_*                                                   CPU, memory, open files

The HTTP server is prometheus_client's own, in a daemon thread; `close` stops it.
prometheus_client (and the HTTP server, urllib and email modules it brings) is imported only
when the endpoint starts, so a node without one does not hold it in memory.
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING, Any

from m3tgossip.daemon.config import NodeConfig, prometheus_address
from m3tgossip.daemon.state import NodeState
from m3tgossip.log import get_logger

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from m3tgossip.daemon.prometheus_series import Series

log = get_logger(__name__)
#: seconds `close` waits for the server thread
JOIN_S = 5.0


def _number(value: Any) -> float | None:
    """A record's value as a float (NaN stays NaN), None if it is not a number."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class Exporter:
    """One node's Prometheus endpoint; every method does nothing when it is off."""

    def __init__(self, config: NodeConfig) -> None:
        self.node_id = config.id
        #: the address asked for ("" = off) and whether a non-loopback one is allowed
        self.address = config.prometheus
        self.public = config.prometheus_public
        #: HOST:PORT the server listens on once started (a port of 0 resolved)
        self.bound: str | None = None
        self.registry: CollectorRegistry | None = None
        self._series: Series | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        #: last cumulative values seen, to advance the counters by
        self._last: dict[str, float] = {}
        self._warned = False

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def start(self, state: NodeState, session: str) -> None:
        """Create the series and serve them (OSError naming the address if it cannot)."""
        if not self.enabled or self._server is not None:
            return
        from prometheus_client import CollectorRegistry, ProcessCollector
        from prometheus_client.exposition import start_http_server

        from m3tgossip.daemon.prometheus_series import Series

        host, port = prometheus_address(self.address, self.public)
        registry = CollectorRegistry()
        series = Series(registry)
        ProcessCollector(registry=registry)
        series.info.info(
            {
                "node": state.id,
                "workload": state.workload.name,
                "model": state.model_id,
                "session": session,
            }
        )
        for peer in state.peers.values():
            if peer.components:
                series.misses.labels(peer.id)
                series.missed.labels(peer.id).set(0)
                series.suspect.labels(peer.id).set(0)
        try:
            server, thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise OSError(
                f'node "{self.node_id}": cannot serve Prometheus metrics on {self.address}: '
                f"{exc.strerror or exc}"
            ) from exc
        self.registry, self._series = registry, series
        self._server, self._thread = server, thread
        bound_port = server.server_port
        self.bound = f"[{host}]:{bound_port}" if ":" in host else f"{host}:{bound_port}"
        log.info("%s: Prometheus metrics on http://%s/metrics", self.node_id, self.bound)

    def observe(self, record: dict[str, Any], state: NodeState) -> None:
        """Update every series from one end-of-round record (and the neighbours' counters).
        A record it cannot read is logged once and never stops the daemon."""
        s = self._series
        if s is None:
            return
        try:
            self._observe(s, record, state)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            if not self._warned:
                log.warning("%s: Prometheus series not updated: %r", self.node_id, exc)
                self._warned = True

    def _observe(self, s: Series, record: dict[str, Any], state: NodeState) -> None:
        s.round.set(int(record["round"]))
        s.rounds.inc()
        timings = {k: v for k, v in record.get("timings", {}).items() if _number(v) is not None}
        total = timings.pop("total", None)
        for phase, seconds in timings.items():
            s.phase.labels(phase).set(float(seconds))
        if total is not None or timings:
            s.duration.set(float(total) if total is not None else sum(timings.values()))
        self._set(s.deadline, record.get("deadline_s"))
        self._set(s.distance, record.get("consensus_distance"))
        for comp, dist in record.get("component_distance", {}).items():
            self._set(s.comp_distance.labels(comp), dist)
        self._advance(s.bytes_in, "bytes_in", record.get("bytes_in"))
        self._advance(s.bytes_out, "bytes_out", record.get("bytes_out"))
        self._set(s.neighbours, record.get("neighbours"))
        s.heard.set(len(record.get("heard", ())))
        self._neighbours(s, state)
        privacy = record.get("privacy")
        if isinstance(privacy, dict):
            self._optional(s, "m3tgossip_privacy_epsilon", privacy.get("node_epsilon"))
            for comp, eps in privacy.get("epsilon", {}).items():
                self._set(s.comp_epsilon.labels(comp), eps)
            s.optional("m3tgossip_privacy_retired_components").set(len(privacy.get("retired", ())))
        self._evaluation(s, record)

    def _neighbours(self, s: Series, state: NodeState) -> None:
        suspect_after = state.config.gossip.suspect_after
        suspected = 0
        for peer in state.peers.values():
            if not peer.components:
                continue
            self._advance(s.misses.labels(peer.id), f"misses/{peer.id}", peer.deadline_misses)
            s.missed.labels(peer.id).set(peer.missed)
            suspect = peer.live and peer.missed >= suspect_after
            s.suspect.labels(peer.id).set(1 if suspect else 0)
            suspected += suspect
        s.suspected.set(suspected)

    def _evaluation(self, s: Series, record: dict[str, Any]) -> None:
        tasks = record.get("tasks")
        if isinstance(tasks, dict):
            for task, m in tasks.items():
                if isinstance(m, dict):
                    self._set(s.accuracy.labels(task), m.get("acc"))
                    self._set(s.f1.labels(task), m.get("f1"))
        self._optional(s, "m3tgossip_mean_accuracy", record.get("mean_acc"))
        gaps = record.get("gaps")
        if isinstance(gaps, dict):
            for attribute, per_task in gaps.items():
                for task, gap in (per_task or {}).items():
                    self._set(s.gap.labels(attribute, task), gap)
        self._optional(s, "m3tgossip_worst_group_gap", record.get("worst_group_gap"))
        self._optional(s, "m3tgossip_error_to_mean", record.get("error_to_mean"))

    def _optional(self, s: Series, name: str, value: Any) -> None:
        if _number(value) is not None:
            self._set(s.optional(name), value)

    @staticmethod
    def _set(gauge: Any, value: Any) -> None:
        number = _number(value)
        if number is not None:
            gauge.set(number)

    def _advance(self, counter: Any, key: str, total: Any) -> None:
        """Advance a counter to a cumulative total the daemon keeps (never backwards)."""
        number = _number(total)
        if number is None or math.isnan(number):
            return
        delta = number - self._last.get(key, 0.0)
        if delta > 0:
            counter.inc(delta)
            self._last[key] = number

    def close(self) -> None:
        """Stop serving (bounded) and release the port."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=JOIN_S)
        log.info("%s: Prometheus endpoint %s closed", self.node_id, self.bound)

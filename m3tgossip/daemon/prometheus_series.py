"""The series of a node's Prometheus endpoint (`m3tgossip.daemon.prometheus`), in one registry
of the node's own. Imported only when the endpoint starts."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Info

#: series without labels that only some nodes have (private ones, evaluated workloads): made
#: when their first value arrives, so a node never shows a value it does not have
OPTIONAL = {
    "m3tgossip_privacy_epsilon": "Node-level differential-privacy epsilon spent",
    "m3tgossip_privacy_retired_components": (
        "Components whose budget is spent (trained locally, never sent again)"
    ),
    "m3tgossip_mean_accuracy": "Mean held-out accuracy over tasks",
    "m3tgossip_worst_group_gap": "Largest group accuracy gap over tasks",
    "m3tgossip_error_to_mean": "Consensus workload: relative distance to the exact network mean",
}


class Series:
    """Every series of one node, in one registry."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.registry = r
        self._optional: dict[str, Gauge] = {}
        self.info = Info("m3tgossip_node", "The node answering this endpoint", registry=r)
        self.round = Gauge("m3tgossip_round", "Last round this node completed", registry=r)
        self.rounds = Counter(
            "m3tgossip_rounds", "Rounds completed by this daemon process", registry=r
        )
        self.duration = Gauge(
            "m3tgossip_round_duration_seconds", "Wall time of the last round", registry=r
        )
        self.phase = Gauge(
            "m3tgossip_round_phase_seconds",
            "Time of each phase of the last round",
            ["phase"],
            registry=r,
        )
        self.deadline = Gauge(
            "m3tgossip_round_deadline_seconds", "Current adaptive round deadline", registry=r
        )
        self.distance = Gauge(
            "m3tgossip_consensus_distance",
            "Largest distance to a neighbour's value, relative to this node's (last round)",
            registry=r,
        )
        self.comp_distance = Gauge(
            "m3tgossip_component_consensus_distance",
            "Largest relative distance to a neighbour's value of one component (last mix)",
            ["component"],
            registry=r,
        )
        self.bytes_in = Counter("m3tgossip_received_bytes", "Bytes received", registry=r)
        self.bytes_out = Counter("m3tgossip_sent_bytes", "Bytes sent", registry=r)
        self.neighbours = Gauge(
            "m3tgossip_neighbours", "Neighbours sharing a component with this node", registry=r
        )
        self.heard = Gauge(
            "m3tgossip_neighbours_heard", "Neighbours heard in the last round", registry=r
        )
        self.suspected = Gauge(
            "m3tgossip_neighbours_suspected", "Neighbours not waited for now", registry=r
        )
        self.misses = Counter(
            "m3tgossip_neighbour_deadline_misses",
            "Rounds whose deadline passed without this neighbour's messages",
            ["neighbour"],
            registry=r,
        )
        self.missed = Gauge(
            "m3tgossip_neighbour_missed_rounds",
            "Consecutive rounds this neighbour missed",
            ["neighbour"],
            registry=r,
        )
        self.suspect = Gauge(
            "m3tgossip_neighbour_suspected",
            "1 if this neighbour missed suspect_after rounds and is not waited for",
            ["neighbour"],
            registry=r,
        )
        self.comp_epsilon = Gauge(
            "m3tgossip_privacy_component_epsilon",
            "Epsilon spent on one shared component",
            ["component"],
            registry=r,
        )
        self.accuracy = Gauge(
            "m3tgossip_task_accuracy",
            "Held-out accuracy per task (last evaluation)",
            ["task"],
            registry=r,
        )
        self.f1 = Gauge(
            "m3tgossip_task_f1",
            "Held-out macro F1 per task (last evaluation)",
            ["task"],
            registry=r,
        )
        self.gap = Gauge(
            "m3tgossip_group_accuracy_gap",
            "Best minus worst demographic group accuracy (last evaluation)",
            ["attribute", "task"],
            registry=r,
        )

    def optional(self, name: str) -> Gauge:
        """The series `name` of OPTIONAL, registered on first use."""
        if name not in self._optional:
            self._optional[name] = Gauge(name, OPTIONAL[name], registry=self.registry)
        return self._optional[name]

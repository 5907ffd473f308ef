"""Topology specs: loading and checking, generators, time-varying round plans, the check report."""

from m3tgossip.topology.plans import (
    node_weights,
    round_plan,
)
from m3tgossip.topology.spec import (
    KNOWN_TASKS,
    MODALITIES,
    PRIVACY_PROFILES,
    NodeSpec,
    Topology,
    check_report,
    format_report,
    load_topology,
    parse_topology,
)

__all__ = [
    "KNOWN_TASKS",
    "MODALITIES",
    "NodeSpec",
    "PRIVACY_PROFILES",
    "Topology",
    "check_report",
    "format_report",
    "load_topology",
    "node_weights",
    "parse_topology",
    "round_plan",
]

"""Topology specs: the model, loading, generators, time-varying round plans, the check report."""

from m3tgossip.topology.generators import GENERATORS
from m3tgossip.topology.load import load_topology, parse_topology
from m3tgossip.topology.plans import node_weights, round_plan, round_plans
from m3tgossip.topology.report import check_report, format_report, time_varying_rounds
from m3tgossip.topology.spec import (
    DYNAMICS,
    KNOWN_TASKS,
    MODALITIES,
    PRIVACY_PROFILES,
    NodeSpec,
    Topology,
)

__all__ = [
    "DYNAMICS",
    "GENERATORS",
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
    "round_plans",
    "time_varying_rounds",
]

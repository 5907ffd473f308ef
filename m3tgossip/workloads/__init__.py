"""Workloads a node daemon runs: `consensus` (pure averaging, no torch) and `edu` (fine-tuning)."""

from __future__ import annotations

from m3tgossip.workloads.base import Workload

WORKLOADS = ("consensus", "edu")


def make_workload(name: str, **kwargs) -> Workload:
    """Build a workload by name. Imports lazily so the consensus workload never imports torch."""
    if name == "consensus":
        from m3tgossip.workloads.consensus import ConsensusWorkload

        return ConsensusWorkload(**kwargs)
    if name == "edu":
        from m3tgossip.edu.workload import EduWorkload

        return EduWorkload(**kwargs)
    raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}")

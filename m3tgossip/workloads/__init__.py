"""Workloads a node daemon runs: `consensus` (pure averaging, no torch) and `edu` (fine-tuning).

`base` holds the `Workload` protocol between daemon and workload, `consensus` the averaging
workload; `make_workload` builds either by name.
"""

from __future__ import annotations

from typing import Any

from m3tgossip.workloads.base import Workload

#: the names `make_workload` accepts
WORKLOADS = ("consensus", "edu")


def make_workload(name: str, **kwargs: Any) -> Workload:
    """Build the workload `name` with the constructor arguments `kwargs`.

    `kwargs` are those of the workload's class: `topology`, `node_id`, `seed` and `options`.
    Each workload is imported on first use, so the consensus workload never imports torch (the
    edu workload lives in `m3tgossip.edu`, the only package that does).
    """
    if name == "consensus":
        from m3tgossip.workloads.consensus import ConsensusWorkload

        return ConsensusWorkload(**kwargs)
    if name == "edu":
        from m3tgossip.edu.workload import EduWorkload

        return EduWorkload(**kwargs)
    raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}")

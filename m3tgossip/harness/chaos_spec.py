"""What a chaos run is: `ChaosSpec`, its validation, its testbed, and its command line."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m3tgossip.errors import ConfigError
from m3tgossip.harness.testbed_spec import (
    READY_TIMEOUT_S,
    TestbedSpec,
    check_number,
    node_settings,
    parse_assignment,
    parse_node_assignment,
)

#: how the daemons are networked: netns (a namespace each), loopback, auto (netns if possible)
NETS = ("auto", "netns", "loopback")
#: where validation errors of a chaos spec say they come from
SOURCE = "chaos spec"


@dataclass(frozen=True)
class ChaosSpec:
    """Every choice of one chaos run; validated on construction (ConfigError naming the field)."""

    topology: Path
    out: Path
    #: consensus | edu
    workload: str = "consensus"
    #: seconds of warm-up, nemesis and settling
    duration: float = 60.0
    #: seeds the nemesis, the loss pattern and the federation
    seed: int = 0
    #: message loss probability (whole run)
    loss: float = 0.1
    kill_fraction: float = 0.25
    stop_fraction: float = 0.125
    partitions: int = 1
    partition_s: float = 5.0
    net: str = "auto"
    #: consensus: largest relative spread
    tolerance: float = 1e-4
    #: edu: largest drop of a node's mean accuracy against its pre-nemesis value
    metric_tol: float = 0.05
    #: extra seconds to wait for convergence (None: max(30, duration / 2))
    settle_timeout: float | None = None
    #: round deadline of the daemons (s)
    deadline: float = 2.0
    options: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    node_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: seconds daemons get to exit after SIGTERM before SIGKILL (counts as unclean)
    stop_grace: float = 60.0
    #: seconds the daemons have to start
    ready_timeout: float = READY_TIMEOUT_S
    quiet: bool = False

    def __post_init__(self) -> None:
        for name in ("topology", "out"):
            value = getattr(self, name)
            if not isinstance(value, str | os.PathLike) or not str(value):
                raise ConfigError(SOURCE, name, f"must be a path, got {value!r}")
            object.__setattr__(self, name, Path(value))
        if self.workload not in ("consensus", "edu"):
            raise ConfigError(SOURCE, "workload", f"consensus or edu, got {self.workload!r}")
        if self.net not in NETS:
            raise ConfigError(SOURCE, "net", f"one of {', '.join(NETS)}, got {self.net!r}")
        bounds: dict[str, dict[str, Any]] = {
            "duration": {"low": 0, "strict": True},
            "loss": {"low": 0, "high": 1},
            "kill_fraction": {"low": 0, "high": 1},
            "stop_fraction": {"low": 0, "high": 1},
            "partitions": {"low": 0, "whole": True},
            "partition_s": {"low": 0, "strict": True},
            "tolerance": {"low": 0, "strict": True},
            "metric_tol": {"low": 0},
            "stop_grace": {"low": 0},
        }
        if self.settle_timeout is not None:
            bounds["settle_timeout"] = {"low": 0}
        for name, kw in bounds.items():
            value = check_number(SOURCE, name, getattr(self, name), **kw)
            object.__setattr__(self, name, value)
        tb = self.testbed()  # checks the rest: seed, deadline, options and settings
        object.__setattr__(self, "options", tb.options)
        object.__setattr__(self, "settings", dict(self.settings))
        object.__setattr__(self, "node_settings", tb.node_settings)

    @property
    def settle_timeout_s(self) -> float:
        return (
            self.settle_timeout if self.settle_timeout is not None else max(30.0, self.duration / 2)
        )

    def testbed(self) -> TestbedSpec:
        """The testbed under the nemesis: rounds until stopped, loss on every message."""
        return TestbedSpec(
            topology=self.topology,
            out=self.out.resolve(),
            workload=self.workload,
            rounds=0,
            seed=self.seed,
            deadline=self.deadline,
            options=self.options,
            settings={
                "faults.drop": self.loss,
                "faults.seed": self.seed,
                "gossip.startup_grace_s": 5.0,
                # a checkpoint every round: every kill finds one, and kills can land mid-write
                "gossip.checkpoint_interval_s": 0.0,
                **self.settings,
            },
            node_settings=self.node_settings,
            quiet=True,
            ready_timeout_s=self.ready_timeout,
        )


def parse_args(argv: list[str]) -> ChaosSpec:
    """The spec of a chaos command line (argparse exits 2 on bad syntax; ConfigError for
    values a spec does not take)."""
    p = argparse.ArgumentParser(
        prog="chaos",
        description="Chaos runs: a testbed, a seeded nemesis, healing, settling, and a verdict.",
    )
    p.add_argument("--topology", required=True)
    p.add_argument("--workload", default="consensus", choices=("consensus", "edu"))
    p.add_argument(
        "--duration", type=float, default=60.0, help="seconds of warm-up, nemesis and settling"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seeds the nemesis, the loss pattern and the federation"
    )
    p.add_argument("--out", required=True)
    p.add_argument("--loss", type=float, default=0.1, help="message loss probability (whole run)")
    p.add_argument("--kill-fraction", type=float, default=0.25)
    p.add_argument("--stop-fraction", type=float, default=0.125)
    p.add_argument("--partitions", type=int, default=1)
    p.add_argument("--partition-s", type=float, default=5.0)
    p.add_argument(
        "--net",
        default="auto",
        choices=NETS,
        help="netns: a namespace per daemon (partitions possible); auto: netns if available",
    )
    p.add_argument(
        "--tolerance", type=float, default=1e-4, help="consensus: largest relative spread"
    )
    p.add_argument(
        "--metric-tol",
        type=float,
        default=0.05,
        help="edu: largest drop of a node's mean accuracy against its pre-nemesis value",
    )
    p.add_argument(
        "--settle-timeout",
        type=float,
        default=None,
        help="extra seconds to wait for convergence (default max(30, duration/2))",
    )
    p.add_argument("--deadline", type=float, default=2.0, help="round deadline of the daemons (s)")
    p.add_argument(
        "-o",
        "--option",
        action="append",
        default=[],
        type=parse_assignment,
        metavar="KEY=VALUE",
        help="workload option",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        dest="settings",
        type=parse_assignment,
        metavar="TABLE.KEY=VALUE",
    )
    p.add_argument(
        "--node-set",
        action="append",
        default=[],
        type=parse_node_assignment,
        metavar="NODE:TABLE.KEY=VALUE",
    )
    p.add_argument(
        "--stop-grace",
        type=float,
        default=60.0,
        help="seconds daemons get to exit after SIGTERM before SIGKILL (counts as unclean)",
    )
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=READY_TIMEOUT_S,
        help="seconds the daemons have to start",
    )
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    return ChaosSpec(
        topology=a.topology,
        out=a.out,
        workload=a.workload,
        duration=a.duration,
        seed=a.seed,
        loss=a.loss,
        kill_fraction=a.kill_fraction,
        stop_fraction=a.stop_fraction,
        partitions=a.partitions,
        partition_s=a.partition_s,
        net=a.net,
        tolerance=a.tolerance,
        metric_tol=a.metric_tol,
        settle_timeout=a.settle_timeout,
        deadline=a.deadline,
        options=dict(a.option),
        settings=dict(a.settings),
        node_settings=node_settings(a.node_set),
        stop_grace=a.stop_grace,
        ready_timeout=a.ready_timeout,
        quiet=a.quiet,
    )

"""What a testbed run is: `TestbedSpec`, its validation, and its command line in both directions.

    spec = TestbedSpec(topology="topology/ring-8.toml", out="runs/ring8", rounds=60,
                       options={"size": 256}, settings={"faults.drop": 0.1})

Workload options (`-o KEY=VALUE`) and node settings (`--set TABLE.KEY=VALUE`, `--node-set
NODE:TABLE.KEY=VALUE`) hold Python values; each daemon gets them as TOML values on its command
line, the form `m3tgossip node` reads (a bare word that is not TOML is a string).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time
from pathlib import Path
from typing import Any

from m3tgossip.daemon.config import GOSSIP_MODES
from m3tgossip.errors import ConfigError
from m3tgossip.workloads import WORKLOADS

#: seconds a started daemon has to print its READY line, unless a spec says otherwise
READY_TIMEOUT_S = 300.0
#: where validation errors of a spec say they come from
SOURCE = "testbed spec"


def toml_value(value: Any) -> str:
    """`value` as a TOML value (what a daemon's `-o`/`--set` parses); TypeError if it has none."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # 0.1, 1e-06, inf and nan are TOML floats as Python writes them
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        items = (f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"no TOML value for {type(value).__name__} {value!r}")


def parse_value(text: str) -> Any:
    """A TOML value (`4096`, `1e-3`, `true`, `"separate"`), or the text itself if it is none."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_assignment(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` -> (KEY, parsed VALUE); argparse's error for anything else."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), parse_value(value)


def parse_node_assignment(text: str) -> tuple[str, str, Any]:
    """`NODE:TABLE.KEY=VALUE` -> (NODE, TABLE.KEY, parsed VALUE)."""
    node, sep, rest = text.partition(":")
    if not sep or not node:
        raise argparse.ArgumentTypeError(f"expected NODE:TABLE.KEY=VALUE, got {text!r}")
    key, value = parse_assignment(rest)
    return node, key, value


def parse_kill(text: str) -> tuple[str, int]:
    """`NODE@ROUND` -> (NODE, ROUND)."""
    node, sep, rnd = text.partition("@")
    if not sep or not node or not rnd.isdigit():
        raise argparse.ArgumentTypeError(
            f"expected NODE@ROUND with ROUND a whole number, got {text!r}"
        )
    return node, int(rnd)


def _fail(entry: str, problem: str) -> ConfigError:
    return ConfigError(SOURCE, entry, problem)


def check_number(
    source: str,
    name: str,
    value: Any,
    *,
    low: float,
    strict: bool = False,
    high: float | None = None,
    whole: bool = False,
) -> Any:
    """`value` checked to be a finite (whole) number of at least `low` (above it if `strict`)
    and at most `high`; a float unless `whole`. ConfigError from `source` naming `name`."""
    kind = (int,) if whole else (int, float)
    bound = f"{'>' if strict else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
    what = f"a {'whole ' if whole else ''}number {bound}"
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        raise ConfigError(source, name, f"must be {what}, got {value!r}")
    if value < low or (strict and value == low) or (high is not None and value > high):
        raise ConfigError(source, name, f"must be {what}, got {value!r}")
    return value if whole else float(value)


def _assignments(name: str, values: Any, *, table: bool) -> dict[str, Any]:
    """A copy of `values` (KEY -> value), every key checked (TABLE.KEY when `table`)."""
    if not isinstance(values, Mapping):
        raise _fail(name, f"must be a mapping of key to value, got {type(values).__name__}")
    out: dict[str, Any] = {}
    for key, value in values.items():
        where = f"{name}[{key!r}]"
        if not isinstance(key, str) or not key or "=" in key or key != key.strip():
            raise _fail(where, "a key is a non-empty string without '=' or surrounding spaces")
        if table and (key.count(".") < 1 or not all(key.split("."))):
            raise _fail(where, "expected TABLE.KEY, e.g. gossip.aggregator")
        try:
            toml_value(value)
        except TypeError as exc:
            raise _fail(where, str(exc)) from None
        out[key] = value
    return out


@dataclass(frozen=True)
class TestbedSpec:
    """Every choice of one testbed run; validated on construction (ConfigError naming the field).

    Node names (in `kills` and `node_settings`) are checked against the topology when the
    `Testbed` loads it.
    """

    __test__ = False  # not a pytest test class

    #: topology spec (TOML)
    topology: Path
    #: output folder (created)
    out: Path
    #: consensus | edu
    workload: str = "consensus"
    #: rounds every daemon runs (0: until stopped)
    rounds: int = 60
    #: federation seed
    seed: int = 0
    #: relative consensus error target
    target: float = 1e-6
    #: round deadline in seconds
    deadline: float = 5.0
    #: gossip mode (sync | push-sum | local)
    mode: str = "sync"
    #: workload option -> value, for every node
    options: dict[str, Any] = field(default_factory=dict)
    #: node -> round at which the testbed SIGKILLs it
    kills: dict[str, int] = field(default_factory=dict)
    #: seconds after which killed nodes are restarted (None: they stay down)
    restart_after: float | None = None
    #: seconds after which the run gives up and reports hung daemons (None: see `run_timeout_s`)
    timeout: float | None = None
    #: no progress lines and no table
    quiet: bool = False
    #: TABLE.KEY -> value, node config setting for every node
    settings: dict[str, Any] = field(default_factory=dict)
    #: node -> {TABLE.KEY -> value}, node config settings for one node (after `settings`)
    node_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: plaintext links between the daemons, no keys
    insecure: bool = False
    #: seconds the daemons have to print their READY line
    ready_timeout_s: float = READY_TIMEOUT_S
    #: every daemon serves Prometheus metrics on a free loopback port (DIR/prometheus.json)
    prometheus: bool = False
    #: a folder with one data folder per node id (`m3tgossip/docs/data.md`): each node trains on
    #: its own instead of built-in records (edu workload)
    data: Path | None = None

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        def number(name: str, optional: bool = False, **bounds: Any) -> None:
            value = getattr(self, name)
            if not (optional and value is None):
                put(name, check_number(SOURCE, name, value, **bounds))

        for name in ("topology", "out"):
            value = getattr(self, name)
            if not isinstance(value, str | os.PathLike) or not str(value):
                raise _fail(name, f"must be a path, got {value!r}")
            put(name, Path(value))
        if self.data is not None:
            if not isinstance(self.data, str | os.PathLike) or not str(self.data):
                raise _fail("data", f"must be a path, got {self.data!r}")
            put("data", Path(self.data))
            if self.workload != "edu":
                raise _fail("data", f"data folders are for the edu workload, not {self.workload!r}")
        if self.workload not in WORKLOADS:
            raise _fail("workload", f"one of {', '.join(WORKLOADS)}, got {self.workload!r}")
        if self.mode not in GOSSIP_MODES:
            raise _fail("mode", f"one of {', '.join(GOSSIP_MODES)}, got {self.mode!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise _fail("seed", f"must be a whole number, got {self.seed!r}")
        number("rounds", low=0, whole=True)
        number("target", low=0, strict=True)
        number("deadline", low=0, strict=True)
        number("ready_timeout_s", low=0, strict=True)
        number("restart_after", optional=True, low=0)
        number("timeout", optional=True, low=0, strict=True)
        for name in ("quiet", "insecure", "prometheus"):
            if not isinstance(getattr(self, name), bool):
                raise _fail(name, f"must be true or false, got {getattr(self, name)!r}")
        put("options", _assignments("options", self.options, table=False))
        put("settings", _assignments("settings", self.settings, table=True))
        if not isinstance(self.kills, Mapping):
            raise _fail("kills", "must be a mapping of node to round")
        kills = {}
        for node, rnd in self.kills.items():
            kills[node] = check_number(SOURCE, f"kills[{node!r}]", rnd, low=0, whole=True)
        put("kills", kills)
        if not isinstance(self.node_settings, Mapping):
            raise _fail("node_settings", "must be a mapping of node to settings")
        put(
            "node_settings",
            {
                node: _assignments(f"node_settings[{node!r}]", values, table=True)
                for node, values in self.node_settings.items()
            },
        )

    @property
    def run_timeout_s(self) -> float:
        """Seconds the run may take: `timeout`, else 300 s plus four deadlines per round."""
        return self.timeout if self.timeout is not None else 300.0 + self.rounds * 4 * self.deadline

    @property
    def byzantine(self) -> list[str]:
        """Nodes given an attack mode (`faults.attack` set and not empty), sorted."""
        return sorted(n for n, s in self.node_settings.items() if s.get("faults.attack", "") != "")

    def node_args(self, node: str) -> list[str]:
        """The `-o` and `--set` arguments of `node`'s daemon (its own settings last)."""
        args: list[str] = []
        for key, value in self.options.items():
            args += ["-o", f"{key}={toml_value(value)}"]
        for key, value in (*self.settings.items(), *self.node_settings.get(node, {}).items()):
            args += ["--set", f"{key}={toml_value(value)}"]
        return args

    def argv(self) -> list[str]:
        """The `m3tgossip testbed` arguments of this spec (`parse_args` gives it back)."""
        args = ["--topology", str(self.topology), "--out", str(self.out), "--workload"]
        args += [self.workload, "--rounds", str(self.rounds), "--seed", str(self.seed)]
        args += ["--target", repr(self.target), "--deadline", repr(self.deadline)]
        args += ["--mode", self.mode]
        for key, value in self.options.items():
            args += ["-o", f"{key}={toml_value(value)}"]
        for node, rnd in self.kills.items():
            args += ["--kill", f"{node}@{rnd}"]
        if self.restart_after is not None:
            args += ["--restart-after", repr(self.restart_after)]
        if self.timeout is not None:
            args += ["--timeout", repr(self.timeout)]
        if self.quiet:
            args.append("--quiet")
        for key, value in self.settings.items():
            args += ["--set", f"{key}={toml_value(value)}"]
        for node, values in self.node_settings.items():
            for key, value in values.items():
                args += ["--node-set", f"{node}:{key}={toml_value(value)}"]
        if self.insecure:
            args.append("--insecure")
        if self.ready_timeout_s != READY_TIMEOUT_S:
            args += ["--ready-timeout", repr(self.ready_timeout_s)]
        if self.prometheus:
            args.append("--prometheus")
        if self.data is not None:
            args += ["--data", str(self.data)]
        return args


def node_settings(items: list[tuple[str, str, Any]]) -> dict[str, dict[str, Any]]:
    """Parsed `--node-set` arguments grouped by node (a later one for a key wins)."""
    out: dict[str, dict[str, Any]] = {}
    for node, key, value in items:
        out.setdefault(node, {})[key] = value
    return out


def parser() -> argparse.ArgumentParser:
    """The `m3tgossip testbed` command line."""
    p = argparse.ArgumentParser(
        prog="m3tgossip testbed",
        description="Multi-process testbed: one OS process per node on 127.0.0.1, then a summary.",
    )
    p.add_argument("--topology", required=True, help="topology spec (TOML)")
    p.add_argument("--workload", default="consensus", help="consensus | edu")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--seed", type=int, default=0, help="federation seed")
    p.add_argument("--target", type=float, default=1e-6, help="relative consensus error target")
    p.add_argument("--deadline", type=float, default=5.0, help="round deadline in seconds")
    p.add_argument("--mode", default="sync", help="sync | push-sum | local")
    p.add_argument(
        "-o",
        "--option",
        action="append",
        default=[],
        type=parse_assignment,
        metavar="KEY=VALUE",
        help="workload option for every node",
    )
    p.add_argument(
        "--kill",
        action="append",
        default=[],
        type=parse_kill,
        metavar="NODE@ROUND",
        help="SIGKILL NODE when it reaches ROUND (repeatable)",
    )
    p.add_argument(
        "--restart-after",
        type=float,
        default=None,
        metavar="S",
        help="restart killed nodes after S seconds",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="give up (and report hung daemons) after this many seconds",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        dest="settings",
        type=parse_assignment,
        metavar="TABLE.KEY=VALUE",
        help="node config setting for every node (repeatable), e.g. gossip.aggregator=clip",
    )
    p.add_argument(
        "--node-set",
        action="append",
        default=[],
        type=parse_node_assignment,
        metavar="NODE:TABLE.KEY=VALUE",
        help="node config setting for one node (repeatable), e.g. n3:faults.attack=alie",
    )
    p.add_argument(
        "--insecure", action="store_true", help="plaintext links between the daemons, no keys"
    )
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=READY_TIMEOUT_S,
        metavar="S",
        help=f"seconds the daemons have to start (default {READY_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--prometheus",
        action="store_true",
        help="each daemon serves Prometheus metrics on a free 127.0.0.1 port; the targets are "
        "in OUT/prometheus.json (a Prometheus file_sd list)",
    )
    p.add_argument(
        "--data",
        metavar="DIR",
        help="one data folder per node id in DIR (edu workload; m3tgossip/docs/data.md)",
    )
    return p


def parse_args(argv: list[str]) -> TestbedSpec:
    """The spec of a `m3tgossip testbed` command line (argparse exits 2 on bad syntax;
    ConfigError for values a spec does not take)."""
    a = parser().parse_args(argv)
    return TestbedSpec(
        topology=a.topology,
        out=a.out,
        workload=a.workload,
        rounds=a.rounds,
        seed=a.seed,
        target=a.target,
        deadline=a.deadline,
        mode=a.mode,
        options=dict(a.option),
        kills=dict(a.kill),
        restart_after=a.restart_after,
        timeout=a.timeout,
        quiet=a.quiet,
        settings=dict(a.settings),
        node_settings=node_settings(a.node_set),
        insecure=a.insecure,
        ready_timeout_s=a.ready_timeout,
        prometheus=a.prometheus,
        data=a.data,
    )

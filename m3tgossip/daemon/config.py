"""Node configuration: dataclasses with help text, loaded from TOML, overridden from the CLI.

A node config file looks like this (every table and key optional except `node.id` and
`node.topology`, which may also come from the command line):

```toml
[node]
id = "uni-a"
topology = "topology/campus.toml"   # relative paths are relative to this file
workload = "edu"                    # consensus | edu
rounds = 200                        # 0 = run until stopped
seed = 0                            # federation seed: all nodes of a federation use the same
state_dir = "/var/lib/m3tgossip/uni-a"
bind = "tcp://0.0.0.0:5701"         # default: the host:port of this node in the topology
key_dir = "/etc/m3tgossip/keys"     # holds uni-a.key_secret (m3tgossip keys generate)
status_keys = "operators.keys"      # operator public keys allowed to query status
insecure = false                    # true: plaintext, loopback only (tests, testbeds)
prometheus = "127.0.0.1:9101"       # serve Prometheus metrics here (default: off)
prometheus_public = false           # true: allow a non-loopback prometheus address

[gossip]
mode = "sync"                       # sync | push-sum
round_deadline_s = 5.0

[transport]
linger_ms = 2000

[workload]                          # options of the chosen workload
size = 4096
```

Unknown tables or keys and values of the wrong type stop the node with a `ConfigError` that
names the file and the key. Nothing in a config is ever executed.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m3tgossip.errors import ConfigError
from m3tgossip.net import FaultConfig, TransportConfig

GOSSIP_MODES = ("sync", "push-sum", "local")


@dataclass(frozen=True)
class GossipConfig:
    """How rounds run. Every timeout is a named parameter here, never a bare number in the loop."""

    #: "sync": rounds with a deadline and quorum, Metropolis-Hastings mixing over replicas;
    #: "push-sum": asynchronous push-sum, tolerant of stragglers and directed links;
    #: "local": no exchange at all (the local-only reference of the benchmarks)
    mode: str = "sync"
    #: longest a round waits for its neighbours' messages before mixing with those heard
    round_deadline_s: float = 5.0
    #: the deadline adapts to observed neighbour latency, median + deadline_k * MAD of recent
    #: arrivals, but never below deadline_min_s nor above round_deadline_s
    deadline_min_s: float = 1.0
    deadline_k: float = 6.0
    #: how a node combines its neighbours' values: "mean" (Metropolis-Hastings weights),
    #: "clip" (self-centred clipping) or "trimmed" (coordinate-wise trimmed mean of `trim`)
    aggregator: str = "mean"
    trim: int = 1
    #: regulation-aware mixing: an edge's weight shrinks by 1 / (1 + noise_strength * v), v the
    #: larger per-element DP noise variance of its two ends (declared, checked against an
    #: estimate from the deltas received); 0 mixes naively. Federation-wide.
    noise_strength: float = 0.0
    #: how deltas are compressed on the wire: raw | fp16 | int8 | topk:F
    #: (m3tgossip.protocol.codecs), with per-component overrides in `compress`
    #: ({component = codec}); what a codec loses stays in the replica gap and is sent later
    #: (error feedback)
    compression: str = "raw"
    compress: dict = field(default_factory=dict)
    #: consensus step size of CHOCO mixing over replicas (below 1 for heavy compression)
    gamma: float = 1.0
    #: fraction of expected neighbours that must be heard before a round may close at the
    #: deadline; below it the round waits on, up to `max_wait_factor` deadlines
    quorum: float = 0.5
    max_wait_factor: float = 3.0
    #: seconds a starting node waits for its neighbours to say hello before its first round
    startup_grace_s: float = 20.0
    #: a node that a stage of the spec adds (`add_nodes`) waits this long, from its start,
    #: for the first neighbour of its stage to answer its hello (its neighbours take it into
    #: their graph only when they reach the stage's round), then stops with an error
    join_wait_s: float = 3600.0
    #: consecutive missed rounds after which a silent neighbour is no longer waited for
    suspect_after: int = 2
    #: observed stragglers (0: off, only the topology's declared ones): a neighbour that
    #: missed this many round deadlines of this node in its session (for the rest of it), or
    #: whose round is more than this many rounds from this node's (while it is), is on a
    #: loose link, as a neighbour declared slow is: not waited for, its newest value mixed
    #: once when it comes, and this node mixes the latest of a neighbour that far ahead
    #: instead of its queued rounds. Such a link keeps no exact network mean
    #: (`m3tgossip/docs/protocol.md`, stragglers)
    straggler_after: int = 0
    #: seconds between heartbeats while a node waits
    heartbeat_s: float = 0.25
    #: a waiting node keeps waiting (up to max_wait_factor deadlines) for a neighbour that is
    #: alive, i.e. heard from (heartbeats included) within this many seconds; a silent one is
    #: given up at the deadline
    silence_s: float = 3.0
    #: a fresh node whose neighbours are more than this many rounds ahead joins at their
    #: round (late join); a restarted node always joins at their round
    late_join_rounds: int = 5
    #: checkpoint every this many rounds, but not within checkpoint_interval_s seconds of the
    #: previous checkpoint (and always on shutdown, so the final round always is)
    checkpoint_every: int = 1
    checkpoint_interval_s: float = 10.0
    #: evaluate the workload every this many rounds (and always in the last round)
    eval_every: int = 1
    #: every this many rounds (0 = never), record how much each neighbour's term in the mix
    #: moved this node's held-out loss, alone and to first order (`daemon.influence`); needs a
    #: workload with `loss_gradient()`, the `mean` aggregator and lockstep sync rounds
    influence_every: int = 0
    #: sync mode, static topologies: mix the previous round's messages after this round's local
    #: training, then send, so neighbours' messages arrive while this node trains instead of
    #: being waited for (one round of staleness; replicas still agree, so the network mean is
    #: preserved). Federation-wide: every node of a run must use the same setting.
    overlap: bool = False
    #: push-sum: seconds between pushes
    push_interval_s: float = 0.05
    #: seconds a stopping node waits for its last messages to leave
    leave_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        if self.mode not in GOSSIP_MODES:
            raise ValueError(f"mode: must be one of {', '.join(GOSSIP_MODES)}, got {self.mode!r}")
        from m3tgossip.consensus import AGGREGATORS

        if self.aggregator not in AGGREGATORS:
            raise ValueError(
                f"aggregator: one of {', '.join(AGGREGATORS)}, got {self.aggregator!r}"
            )
        if not isinstance(self.trim, int) or isinstance(self.trim, bool) or self.trim < 0:
            raise ValueError(f"trim: an integer >= 0, got {self.trim!r}")
        from m3tgossip.protocol import parse_codec

        for comp, spec in {
            "compression": self.compression,
            **{f"compress.{k}": v for k, v in self.compress.items()},
        }.items():
            try:
                parse_codec(str(spec))
            except ValueError as exc:
                raise ValueError(f"{comp}: {exc}") from None
        if not (isinstance(self.gamma, (int, float)) and 0 < self.gamma <= 1):
            raise ValueError(f"gamma: a number in (0, 1], got {self.gamma!r}")
        if not (
            isinstance(self.noise_strength, (int, float))
            and math.isfinite(self.noise_strength)
            and self.noise_strength >= 0
        ):
            raise ValueError(f"noise_strength: a number >= 0, got {self.noise_strength!r}")
        for name in (
            "round_deadline_s",
            "max_wait_factor",
            "heartbeat_s",
            "push_interval_s",
            "deadline_min_s",
            "deadline_k",
            "silence_s",
        ):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: must be a positive number, got {value!r}")
        for name in ("startup_grace_s", "join_wait_s", "leave_timeout_s", "checkpoint_interval_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}: must be a non-negative number, got {value!r}")
        if not isinstance(self.overlap, bool):
            raise ValueError(f"overlap: true or false, got {self.overlap!r}")
        if not (isinstance(self.quorum, (int, float)) and 0.0 <= self.quorum <= 1.0):
            raise ValueError(f"quorum: must be between 0 and 1, got {self.quorum!r}")
        value = self.straggler_after
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"straggler_after: an integer >= 0 (0 = off), got {value!r}")
        value = self.influence_every
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"influence_every: an integer >= 0 (0 = off), got {value!r}")
        if value and (self.mode != "sync" or self.overlap or self.aggregator != "mean"):
            raise ValueError(
                'influence_every: needs mode = "sync", overlap = false and aggregator = '
                f'"mean" (a term per neighbour), got mode {self.mode!r}, overlap '
                f"{self.overlap!r}, aggregator {self.aggregator!r}"
            )
        for name in ("suspect_after", "checkpoint_every", "eval_every", "late_join_rounds"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class NodeConfig:
    """Everything one daemon needs to run."""

    id: str
    topology: str
    workload: str = "consensus"
    #: rounds to run; 0 runs until SIGINT/SIGTERM
    rounds: int = 100
    #: federation seed (initial states, data generation, LoRA A matrices)
    seed: int = 0
    #: folder for the checkpoint and metrics (default ./m3t-state/<id>)
    state_dir: str = ""
    #: metrics file (default <state_dir>/metrics.jsonl)
    metrics: str = ""
    #: endpoint to bind (default tcp://host:port from the topology entry)
    bind: str = ""
    #: start fresh even if a checkpoint exists
    fresh: bool = False
    #: folder holding this node's CURVE secret key, `<id>.key_secret` (mode 600)
    key_dir: str = ""
    #: file of operator public keys (one per line, optional name after it) allowed to query status
    status_keys: str = ""
    #: plaintext links instead of CURVE; refused unless every endpoint is on loopback
    insecure: bool = False
    #: HOST:PORT of this node's Prometheus endpoint (http://HOST:PORT/metrics); "" = off;
    #: a port of 0 picks a free one. Only loopback hosts unless `prometheus_public`
    prometheus: str = ""
    #: serve the Prometheus endpoint on a non-loopback address (anyone who reaches it reads it)
    prometheus_public: bool = False
    gossip: GossipConfig = field(default_factory=GossipConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    #: injected faults and attack mode (tests, chaos runs, robustness research)
    faults: FaultConfig = field(default_factory=FaultConfig)
    #: the `custom` privacy profile's table (keys of m3tgossip.privacy.profile_for)
    privacy: dict[str, Any] = field(default_factory=dict)
    workload_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.rounds, int) or isinstance(self.rounds, bool) or self.rounds < 0:
            raise ValueError(f"rounds: must be an integer >= 0, got {self.rounds!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed: must be an integer, got {self.seed!r}")
        if not isinstance(self.insecure, bool):
            raise ValueError(f"insecure: must be true or false, got {self.insecure!r}")
        if not isinstance(self.prometheus_public, bool):
            raise ValueError(
                f"prometheus_public: must be true or false, got {self.prometheus_public!r}"
            )
        if self.prometheus:
            prometheus_address(self.prometheus, self.prometheus_public)
        from m3tgossip.workloads import WORKLOADS

        if self.workload not in WORKLOADS:
            raise ValueError(
                f"workload: must be one of {', '.join(WORKLOADS)}, got {self.workload!r}"
            )

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir or f"m3t-state/{self.id}")

    @property
    def metrics_path(self) -> Path:
        return Path(self.metrics) if self.metrics else self.state_path / "metrics.jsonl"


def prometheus_address(text: Any, public: bool) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:PORT` for IPv6) of a Prometheus endpoint, as (host, port).

    ValueError if it is malformed, or if HOST is not a loopback address (`localhost`,
    127.0.0.0/8, ::1) and `public` is not set.
    """
    if not isinstance(text, str):
        raise ValueError(f"prometheus: a HOST:PORT string, got {text!r}")
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(
            f"prometheus: expected HOST:PORT (e.g. 127.0.0.1:9101, port 0-65535), got {text!r}"
        )
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not public:
        raise ValueError(
            f"prometheus: {text!r} is not a loopback address; metrics there are readable by "
            "anyone who reaches it: set prometheus_public = true (--prometheus-public) to "
            "serve them anyway"
        )
    return host, int(port_text)


_TABLES = ("node", "gossip", "transport", "faults", "privacy", "workload")
_NODE_KEYS = {f.name for f in dataclasses.fields(NodeConfig)} - {
    "gossip",
    "transport",
    "faults",
    "privacy",
    "workload_options",
}


def _build(cls: type, values: dict[str, Any], source: str, table: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(
                source, f"[{table}] {key}", f"unknown key; known keys: {', '.join(sorted(known))}"
            )
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:
        raise ConfigError(source, f"[{table}]", str(exc)) from exc


def load_node_config(path: str | None, overrides: dict[str, Any]) -> NodeConfig:
    """Build a `NodeConfig` from an optional TOML file plus CLI overrides (None = not given).

    Overrides use the same names as the `[node]` table; `gossip.<key>` and `transport.<key>`
    override keys of those tables.
    """
    source = path or "<command line>"
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(path, "", "no such file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(path, "", f"not valid TOML: {exc}") from None
    for table in raw:
        if table not in _TABLES:
            raise ConfigError(source, f"[{table}]", f"unknown table; known: {', '.join(_TABLES)}")
        if not isinstance(raw[table], dict):
            raise ConfigError(source, table, "must be a table")
    node = dict(raw.get("node", {}))
    gossip = dict(raw.get("gossip", {}))
    transport = dict(raw.get("transport", {}))
    faults = dict(raw.get("faults", {}))
    workload = dict(raw.get("workload", {}))
    for key, value in overrides.items():
        if value is None:
            continue
        if key.startswith("gossip."):
            gossip[key.split(".", 1)[1]] = value
        elif key.startswith("transport."):
            transport[key.split(".", 1)[1]] = value
        elif key.startswith("workload."):
            workload[key.split(".", 1)[1]] = value
        elif key.startswith("faults."):
            faults[key.split(".", 1)[1]] = value
        elif key.startswith("privacy."):
            raw.setdefault("privacy", {})[key.split(".", 1)[1]] = value
        else:
            node[key] = value
    for key in node:
        if key not in _NODE_KEYS:
            raise ConfigError(
                source, f"[node] {key}", f"unknown key; known keys: {', '.join(sorted(_NODE_KEYS))}"
            )
    for key in ("id", "topology"):
        if not node.get(key):
            raise ConfigError(
                source, f"node.{key}", "missing (give it in [node] or on the command line)"
            )
    if path is not None:
        base = Path(path).parent
        for key in ("topology", "state_dir", "metrics", "key_dir", "status_keys"):
            # Paths from the file are relative to the file; paths from the CLI to the cwd.
            if key in raw.get("node", {}) and overrides.get(key) is None:
                value = Path(str(node[key]))
                if not value.is_absolute():
                    node[key] = str(base / value)
    gossip_cfg = _build(GossipConfig, gossip, source, "gossip")
    transport_cfg = _build(TransportConfig, transport, source, "transport")
    faults_cfg = _build(FaultConfig, faults, source, "faults")
    try:
        return NodeConfig(
            **node,
            gossip=gossip_cfg,
            transport=transport_cfg,
            faults=faults_cfg,
            privacy=dict(raw.get("privacy", {})),
            workload_options=workload,
        )
    except (ValueError, TypeError) as exc:
        raise ConfigError(source, "[node]", str(exc)) from exc

"""The topology model: the node and topology types every node builds from the shared spec.

A `Topology` is the shared picture every node has of the federation: the nodes with their
attributes (role, modalities, tasks, compute tier, privacy profile, endpoint, key, declared
speed and bandwidth), the edges,
which components each node holds and shares, and the per-component holder subgraphs that mixing
runs on. A spec with `[[stages]]` has a version per stage (`Topology.version`), each with the
tasks and modalities its nodes hold from that stage's round on. `m3tgossip.topology.load`
builds one from a TOML file; the format is documented in `m3tgossip/docs/topology.md`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from m3tgossip.topology.stages import Stage, joining, stage_nodes, stages_toml

if TYPE_CHECKING:
    import networkx as nx


MODALITIES = ("text", "image", "signal", "clickstream", "tabular")
KNOWN_TASKS = ("at_risk", "engagement", "stress", "handwriting", "next_response")
#: the modality a known task cannot do without (`topology check` warns when it is missing)
TASK_NEEDS = {"stress": "signal", "handwriting": "image", "next_response": "clickstream"}
ROLES = ("institution", "instructor", "student")
COMPUTE_TIERS = ("full", "lite")
#: the node attributes a node declares its pace with (`speed`, `bandwidth`): a number in (0, 1]
#: relative to a full-speed node; below 1 the node is a straggler (see `NodeSpec.straggler`)
PACE_KEYS = ("speed", "bandwidth")
PRIVACY_PROFILES = ("open", "ferpa", "gdpr", "custom")
#: what a node that holds one learner does instead of per-learner DP-SGD (`single_learner`):
#: send every neighbour a value masked by per-edge noise that cancels in the mix, or keep
#: every component local (`m3tgossip.privacy.cancel`)
SINGLE_LEARNER = ("cancel", "local")
#: how the communication graph changes from round to round
DYNAMICS = ("static", "one-peer-exponential", "s-out")
#: largest node count a spec may have
MAX_NODES = 10_000
#: what a node id looks like
NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: the characters of Z85 text (CURVE public keys are 40 of them)
Z85_CHARS = frozenset(
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
)


@dataclass(frozen=True)
class NodeSpec:
    """One participant as the shared spec describes it."""

    id: str
    index: int
    role: str
    institution: str | None
    modalities: tuple[str, ...]
    tasks: tuple[str, ...]
    host: str
    port: int | None
    compute: str
    privacy: str
    public_key: str | None
    local: tuple[str, ...]
    #: None (a node of many learners), "cancel" or "local" (see SINGLE_LEARNER)
    single_learner: str | None = None
    #: the node's compute relative to a full-speed node, in (0, 1]: its workload trains that
    #: fraction of the local steps of a round (at least one)
    speed: float = 1.0
    #: the node's uplink relative to a full-speed node, in (0, 1]: it sends in one round of
    #: every `send_every`
    bandwidth: float = 1.0
    #: how many records (train and test) the node holds, declared for `weighting = "records"`
    #: of the edu workload (None: not declared; built-in data knows every node's count)
    records: int | None = None

    @property
    def straggler(self) -> bool:
        """Declared slower than full speed (`speed` or `bandwidth` below 1): no neighbour waits
        for its rounds, and it mixes its neighbours' latest values instead of each round's
        (the loose links of `m3tgossip.daemon.rounds`)."""
        return self.speed < 1.0 or self.bandwidth < 1.0

    @property
    def send_every(self) -> int:
        """The node sends its values in one round of this many: ceil(1 / bandwidth)."""
        return max(1, math.ceil(1.0 / self.bandwidth - 1e-9))

    @property
    def components(self) -> tuple[str, ...]:
        """Every component the node holds, shared or local, sorted."""
        names = ["backbone", "fusion"]
        names += [f"encoder.{m}" for m in self.modalities]
        names += [f"{kind}.{t}" for t in self.tasks for kind in ("head", "prompt")]
        return tuple(sorted(names))

    @property
    def shared_components(self) -> tuple[str, ...]:
        """The components the node gossips with the other holders, sorted.

        All but `local` ones. A `lite` node trains only heads and prompts but still mixes the
        encoder, fusion and backbone adapters with their holders (it follows them without
        training them). A node with `single_learner = "local"` shares none: every component it
        trains stays on it.
        """
        if self.single_learner == "local":
            return ()
        return tuple(c for c in self.components if c not in self.local)

    @property
    def endpoint(self) -> str:
        """The ZeroMQ address the node binds, `tcp://host:port`."""
        if self.port is None:
            raise ValueError(
                f'node "{self.id}" has no port; assign one (Topology.with_ports) first'
            )
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


@dataclass(frozen=True)
class Topology:
    """A validated spec: nodes in spec order and edges (each pair sorted, the list sorted)."""

    name: str
    source: str
    description: str
    nodes: tuple[NodeSpec, ...]
    edges: tuple[tuple[str, str], ...]
    #: "static" (the edges), "one-peer-exponential" (round t: each node sends to the node
    #: 2^(t mod log2 n) places after it) or "s-out" (each node sends to `sample` peers drawn
    #: anew every round from the federation seed); the edges of a time-varying spec are
    #: every link any round may use
    dynamics: str = "static"
    sample: int = 1
    #: the semester's `[[stages]]` in order (`m3tgossip.topology.stages`); empty: one stage
    stages: tuple[Stage, ...] = ()
    #: which version of the spec this is: 0 (its nodes as given) .. len(stages)
    stage: int = 0
    _cache: dict[str, Any] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def node(self, node_id: str) -> NodeSpec:
        """The node with this id; KeyError naming the topology if there is none."""
        by_id = self._cached("by_id", lambda: {n.id: n for n in self.nodes})
        if node_id not in by_id:
            raise KeyError(f'no node "{node_id}" in topology "{self.name}" ({self.source})')
        return by_id[node_id]

    def ids(self) -> list[str]:
        """Node ids in spec order (also those a later stage adds: see `present`)."""
        return [n.id for n in self.nodes]

    def joins_at(self, node_id: str) -> int:
        """The stage `node_id` joins at: 0 if it takes part from the start, else the stage
        whose `add_nodes` list it (`m3tgossip.topology.stages`)."""
        self.node(node_id)
        return int(self._cached("joins", lambda: joining(self.stages)).get(node_id, 0))

    def present(self) -> list[str]:
        """Ids of the nodes that take part in this version (spec order): every node but those
        a later stage adds. Only they have edges, neighbours and components' holders."""
        return [n.id for n in self.nodes if self.joins_at(n.id) <= self.stage]

    def live_edges(self) -> list[tuple[str, str]]:
        """The edges between nodes present in this version."""
        here = set(self.present())
        return [(u, v) for u, v in self.edges if u in here and v in here]

    def neighbours(self, node_id: str) -> list[str]:
        """The node's neighbours in this version's graph, sorted (none before it joins)."""
        self.node(node_id)
        return list(self._adjacency(None).get(node_id, []))

    def _adjacency(self, component: str | None) -> dict[str, list[str]]:
        """Node -> sorted neighbours, in the whole graph or among `component`'s holders
        (KeyError if no node holds it): what a daemon needs, without building a graph."""

        def build() -> dict[str, list[str]]:
            ids = self.present() if component is None else self.holders(component)
            if not ids:
                raise KeyError(
                    f'no node of topology "{self.name}" holds component "{component}" shared'
                )
            adjacency: dict[str, list[str]] = {i: [] for i in ids}
            for u, v in self.edges:
                if u in adjacency and v in adjacency:
                    adjacency[u].append(v)
                    adjacency[v].append(u)
            return {i: sorted(nbrs) for i, nbrs in adjacency.items()}

        return self._cached(f"adjacency:{component}", build)

    def graph(self) -> nx.Graph:
        """The graph of this version's nodes (frozen, nodes in spec order)."""

        def build() -> nx.Graph:
            import networkx as nx

            graph = nx.Graph()
            graph.add_nodes_from(self.present())
            graph.add_edges_from(self.live_edges())
            return nx.freeze(graph)

        return self._cached("graph", build)

    def holders(self, component: str) -> list[str]:
        """Ids of the nodes present in this version that hold `component` shared, in spec
        order (empty if none)."""
        here = set(self.present())
        return [n.id for n in self.nodes if component in n.shared_components and n.id in here]

    def components(self) -> list[str]:
        """Every component that at least one node present holds shared, sorted."""
        here = set(self.present())
        return sorted({c for n in self.nodes if n.id in here for c in n.shared_components})

    def component_graph(self, component: str) -> nx.Graph:
        """The subgraph induced by the holders of `component` (frozen, nodes in spec order).

        KeyError if no node holds it shared.
        """

        def build() -> nx.Graph:
            import networkx as nx

            holders = self.holders(component)
            if not holders:
                raise KeyError(
                    f'no node of topology "{self.name}" holds component "{component}" shared'
                )
            held = set(holders)
            graph = nx.Graph()
            graph.add_nodes_from(holders)
            graph.add_edges_from((u, v) for u, v in self.edges if u in held and v in held)
            return nx.freeze(graph)

        return self._cached(f"component:{component}", build)

    def component_neighbours(self, node_id: str, component: str) -> list[str]:
        """The node's neighbours among the holders of `component`, sorted."""
        self.node(node_id)
        adjacency = self._adjacency(component)
        if node_id not in adjacency:
            raise KeyError(f'node "{node_id}" does not hold component "{component}" shared')
        return list(adjacency[node_id])

    def with_ports(self, ports: Mapping[str, int], host: str = "127.0.0.1") -> Topology:
        """A copy with these nodes bound to `host:port` (testbeds assign free ports)."""
        for node_id, port in ports.items():
            self.node(node_id)
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise ValueError(f'port for "{node_id}" must be an integer 1..65535, got {port!r}')
        nodes = tuple(
            replace(n, host=host, port=ports[n.id]) if n.id in ports else n for n in self.nodes
        )
        clash = endpoint_clash(nodes)
        if clash is not None:
            first, second = clash
            raise ValueError(
                f'nodes "{first.id}" and "{second.id}" would both bind {second.host}:{second.port}'
            )
        return replace(self, nodes=nodes)

    def with_keys(self, keys: Mapping[str, str]) -> Topology:
        """A copy with these nodes' CURVE public keys (Z85, 40 characters) set."""
        for node_id, key in keys.items():
            self.node(node_id)
            if not isinstance(key, str) or len(key) != 40 or not set(key) <= Z85_CHARS:
                raise ValueError(f'public key for "{node_id}" must be 40 characters of Z85 text')
        nodes = tuple(replace(n, public_key=keys[n.id]) if n.id in keys else n for n in self.nodes)
        owners: dict[str, str] = {}
        for n in nodes:
            if n.public_key is not None and owners.setdefault(n.public_key, n.id) != n.id:
                raise ValueError(f'nodes "{owners[n.public_key]}" and "{n.id}" have the same key')
        return replace(self, nodes=nodes)

    def to_toml(self) -> str:
        """The spec in explicit-edges form, every attribute spelled out; loads back equal (a
        later stage's version writes stage 0's nodes and the stages, and loads back as stage 0)."""
        if self.stage:
            return self.version(0).to_toml()
        lines = [f"name = {_toml_str(self.name)}"]
        lines.append(f"description = {_toml_str(self.description)}")
        lines.append("edges = [")
        lines += [f"    [{_toml_str(u)}, {_toml_str(v)}]," for u, v in self.edges]
        lines.append("]")
        if self.dynamics != "static":
            lines += [
                "",
                "[dynamics]",
                f"kind = {_toml_str(self.dynamics)}",
                f"sample = {self.sample}",
            ]
        for n in self.nodes:
            lines += ["", "[[nodes]]", f"id = {_toml_str(n.id)}", f"role = {_toml_str(n.role)}"]
            if n.institution is not None:
                lines.append(f"institution = {_toml_str(n.institution)}")
            lines.append(f"modalities = {_toml_list(n.modalities)}")
            lines.append(f"tasks = {_toml_list(n.tasks)}")
            lines.append(f"host = {_toml_str(n.host)}")
            if n.port is not None:
                lines.append(f"port = {n.port}")
            lines.append(f"compute = {_toml_str(n.compute)}")
            lines.append(f"privacy = {_toml_str(n.privacy)}")
            if n.public_key is not None:
                lines.append(f"public_key = {_toml_str(n.public_key)}")
            lines.append(f"local = {_toml_list(n.local)}")
            if n.single_learner is not None:
                lines.append(f"single_learner = {_toml_str(n.single_learner)}")
            for key in PACE_KEYS:
                if getattr(n, key) != 1.0:
                    lines.append(f"{key} = {getattr(n, key)!r}")
            if n.records is not None:
                lines.append(f"records = {n.records}")
        lines += stages_toml(self.stages, _toml_str)
        return "\n".join(lines) + "\n"

    def version(self, k: int) -> Topology:
        """The spec in stage `k` (0 .. len(stages)): every node with the tasks and modalities
        stages 1..k add, so its components and every holder subgraph follow from them."""
        if k == self.stage:
            return self
        return replace(self, nodes=stage_nodes(self._base_nodes(), self.stages, k), stage=k)

    def stage_at(self, round_: int) -> int:
        """The stage that round `round_` (counted from 0) belongs to."""
        return sum(1 for s in self.stages if s.round <= round_)

    def next_stage_round(self) -> int | None:
        """The round the stage after this version's begins at (None: this is the last)."""
        return self.stages[self.stage].round if self.stage < len(self.stages) else None

    def _base_nodes(self) -> tuple[NodeSpec, ...]:
        """The nodes of stage 0: this version's without what stages 1..stage added (a stage
        only adds what a node does not hold before it, so taking it off is exact)."""
        nodes = []
        for n in self.nodes:
            tasks, mods = set(n.tasks), set(n.modalities)
            for s in self.stages[: self.stage]:
                if n.id in s.nodes:
                    tasks -= set(s.tasks)
                    mods -= set(s.modalities)
            nodes.append(replace(n, tasks=tuple(sorted(tasks)), modalities=tuple(sorted(mods))))
        return tuple(nodes)

    def _cached(self, key: str, build: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]


def endpoint_clash(nodes: Sequence[NodeSpec]) -> tuple[NodeSpec, NodeSpec] | None:
    """The first two nodes that would bind the same host:port, or None."""
    bound: dict[tuple[str, int], NodeSpec] = {}
    for node in nodes:
        if node.port is None:
            continue
        key = (node.host, node.port)
        if key in bound:
            return bound[key], node
        bound[key] = node
    return None


def _toml_str(value: str) -> str:
    out = []
    for ch in value:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(_toml_str(v) for v in values) + "]"

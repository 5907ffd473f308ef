"""Graph generators: the `[generator]` table of a spec and the networkx graph it names."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import networkx as nx

from m3tgossip.errors import ConfigError
from m3tgossip.topology.problems import describe_parts, reject_unknown
from m3tgossip.topology.spec import MAX_NODES, NODE_ID

#: the parameters each generator kind takes (besides `kind` and `prefix`)
_GENERATOR_KEYS = {
    "cycle": ("n",),
    "path": ("n",),
    "star": ("n",),
    "complete": ("n",),
    "torus": ("rows", "cols"),
    "watts_strogatz": ("n", "k", "p", "seed"),
    "erdos_renyi": ("n", "p", "seed"),
    "random_regular": ("n", "d", "seed"),
}
#: the generator kinds a spec may name
GENERATORS = tuple(_GENERATOR_KEYS)
_MIN_N = {"cycle": 3, "path": 2, "star": 2, "complete": 2}


def generate(table: Any, source: str) -> nx.Graph:
    """The graph a [generator] table names, nodes `prefix0 .. prefixN-1` in that order.

    ConfigError naming the generator key at fault for an unknown kind, a missing, unknown or
    out-of-range parameter, or a seed that gives a disconnected graph.
    """
    import networkx as nx

    if not isinstance(table, dict):
        raise ConfigError(source, "generator", "must be a table ([generator])")
    kind = table.get("kind")
    if kind not in _GENERATOR_KEYS:
        raise ConfigError(
            source, "generator.kind", f"{kind!r} is not one of {', '.join(GENERATORS)}"
        )
    params = _GENERATOR_KEYS[kind]
    reject_unknown(table, ("kind", "prefix", *params), source, "generator.", f"key for {kind}")
    for key in params:
        if key not in table:
            raise ConfigError(source, f"generator.{key}", f"{kind} needs `{key}`")
    prefix = table.get("prefix", "n")
    if not isinstance(prefix, str) or not NODE_ID.fullmatch(prefix + "0"):
        raise ConfigError(source, "generator.prefix", f"{prefix!r} cannot start a node id")

    def integer(key: str, low: int, high: int = MAX_NODES) -> int:
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(
                source, f"generator.{key}", f"must be an integer in {low}..{high}, got {value!r}"
            )
        return value

    def probability() -> float:
        value = table["p"]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise ConfigError(source, "generator.p", f"must be a number in [0, 1], got {value!r}")
        return float(value)

    seed = integer("seed", 0, 2**32 - 1) if "seed" in params else None
    if kind == "torus":
        rows, cols = integer("rows", 3), integer("cols", 3)
        grid = nx.grid_2d_graph(rows, cols, periodic=True)
        graph = nx.relabel_nodes(grid, {(r, c): r * cols + c for r, c in grid.nodes})
    elif kind in _MIN_N:
        n = integer("n", _MIN_N[kind])
        make = {
            "cycle": nx.cycle_graph,
            "path": nx.path_graph,
            "star": lambda n: nx.star_graph(n - 1),
            "complete": nx.complete_graph,
        }[kind]
        graph = make(n)
    elif kind == "watts_strogatz":
        n = integer("n", 3)
        k = integer("k", 2, n - 1)
        if k % 2:
            raise ConfigError(source, "generator.k", f"must be even (k/2 a side), got {k}")
        p = probability()
        try:
            graph = nx.connected_watts_strogatz_graph(n, k, p, tries=100, seed=seed)
        except nx.NetworkXError:
            raise ConfigError(
                source, "generator.seed", f"no connected graph in 100 tries with seed {seed}"
            ) from None
    elif kind == "erdos_renyi":
        n = integer("n", 2)
        graph = nx.gnp_random_graph(n, probability(), seed=seed)
    else:
        n = integer("n", 2)
        d = integer("d", 1, n - 1)
        if n * d % 2:
            raise ConfigError(source, "generator.d", f"n*d must be even, got {n}*{d}")
        graph = nx.random_regular_graph(d, n, seed=seed)
    ids = {i: f"{prefix}{i}" for i in sorted(graph.nodes)}
    ordered = nx.Graph()
    ordered.add_nodes_from(ids[i] for i in sorted(graph.nodes))
    ordered.add_edges_from((ids[u], ids[v]) for u, v in graph.edges)
    if not nx.is_connected(ordered):
        shown = ", ".join(f"{k}={table[k]}" for k in params)
        raise ConfigError(
            source,
            "generator.seed" if seed is not None else "generator",
            f"{kind} with {shown} is disconnected: {describe_parts(ordered, list(ordered))}; "
            "choose another seed or a denser graph",
        )
    return ordered

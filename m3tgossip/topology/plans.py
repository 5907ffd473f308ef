"""Per-node views of the shared spec that the daemon mixes with: its Metropolis-Hastings row of
each component's holder subgraph, and, on a time-varying topology, each round's out-peers and
mixing row. Every node computes them from the spec alone, so each knows whom to expect."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from m3tgossip.topology.spec import Topology


def node_weights(topology: Topology, node_id: str, component: str) -> dict[str, float]:
    """Row `node_id` of the Metropolis-Hastings matrix of `component`'s holder subgraph.

    Returns `{node_id: w_ii, neighbour: w_ij, ...}` (self first, then neighbours sorted). The
    degrees come from the shared topology spec only. Raises KeyError if the node does not hold
    the component shared.
    """
    graph = topology.component_graph(component)
    if node_id not in graph:
        raise KeyError(f'node "{node_id}" does not hold component "{component}" shared')
    own_degree = graph.degree(node_id)
    neighbours = sorted(graph.neighbors(node_id))
    row = {j: 1.0 / (1.0 + max(own_degree, graph.degree(j))) for j in neighbours}
    return {node_id: 1.0 - sum(row.values()), **row}


def round_plan(
    topology: Topology, node_id: str, round_: int, seed: int = 0
) -> tuple[list[str], dict[str, float]]:
    """Who `node_id` sends to in this round of a time-varying topology, and its mixing row.

    Returns (out-peers, {self: w, in-peer: w, ...}). one-peer-exponential: node i sends to
    i + 2^(t mod ceil(log2 n)) and averages with the node as far before it (weights 1/2; the
    matrix is doubly stochastic, so the mean is kept, and for n a power of two the nodes agree
    exactly after log2 n rounds). s-out: every node sends to `sample` peers drawn from
    (seed, round, node) and averages itself with whatever it receives (Epidemic Learning).
    Every node computes every other node's draw, so each knows whom to expect.
    """
    ids = topology.ids()
    n = len(ids)
    i = ids.index(node_id)
    if topology.dynamics == "one-peer-exponential":
        tau = max(1, math.ceil(math.log2(n)))
        hop = 2 ** (round_ % tau) % n
        if hop == 0:
            return [], {node_id: 1.0}
        return [ids[(i + hop) % n]], {node_id: 0.5, ids[(i - hop) % n]: 0.5}
    if topology.dynamics == "s-out":
        out_of = {j: _sample_out(seed, round_, j, n, topology.sample) for j in range(n)}
        incoming = [ids[j] for j in range(n) if i in out_of[j]]
        share = 1.0 / (1 + len(incoming))
        return [ids[j] for j in out_of[i]], {node_id: share, **{j: share for j in incoming}}
    raise ValueError(f"topology {topology.name!r} is static")


def _sample_out(seed: int, round_: int, j: int, n: int, s: int) -> list[int]:
    rng = np.random.default_rng([seed & 0xFFFFFFFF, round_, j, 0x5EED])
    others = np.delete(np.arange(n), j)
    return sorted(int(v) for v in rng.choice(others, size=min(s, n - 1), replace=False))

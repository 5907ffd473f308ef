"""Per-node views of the shared spec that the daemon mixes with: its Metropolis-Hastings row of
each component's holder subgraph, and, on a time-varying topology, each round's out-peers and
mixing row. Every node computes them from the spec alone, so each knows whom to expect."""

from __future__ import annotations

import math

import numpy as np

from m3tgossip.topology.spec import Topology

#: what a node does in one round of a time-varying topology: (out-peers, {node: weight})
Plan = tuple[list[str], dict[str, float]]


def node_weights(topology: Topology, node_id: str, component: str) -> dict[str, float]:
    """Row `node_id` of the Metropolis-Hastings matrix of `component`'s holder subgraph.

    Returns `{node_id: w_ii, neighbour: w_ij, ...}` (self first, then neighbours sorted). The
    degrees come from the shared topology spec only. Raises KeyError if the node does not hold
    the component shared.
    """
    neighbours = topology.component_neighbours(node_id, component)
    own_degree = len(neighbours)
    row = {
        j: 1.0 / (1.0 + max(own_degree, len(topology.component_neighbours(j, component))))
        for j in neighbours
    }
    return {node_id: 1.0 - sum(row.values()), **row}


def round_plan(topology: Topology, node_id: str, round_: int, seed: int = 0) -> Plan:
    """Who `node_id` sends to in this round of a time-varying topology, and its mixing row.

    Returns (out-peers, {self: w, in-peer: w, ...}). one-peer-exponential: node i sends to
    i + 2^(t mod ceil(log2 n)) and averages with the node as far before it (weights 1/2; the
    matrix is doubly stochastic, so the mean is kept, and for n a power of two the nodes agree
    exactly after log2 n rounds). s-out: every node sends to `sample` peers drawn from
    (seed, round, node) and averages itself with whatever it receives (Epidemic Learning).
    Every node computes every other node's draw, so each knows whom to expect. ValueError on
    a static topology, KeyError for a node it does not have.
    """
    ids = _time_varying_ids(topology)
    i = topology.node(node_id).index
    if topology.dynamics == "one-peer-exponential":
        return _one_peer_plan(ids, i, _hop(len(ids), round_))
    out_of = _s_out_draws(topology, round_, seed)
    return _s_out_plan(ids, i, out_of[i], [j for j, outs in enumerate(out_of) if i in outs])


def round_plans(topology: Topology, round_: int, seed: int = 0) -> dict[str, Plan]:
    """`round_plan` of every node for this round, by node id in spec order.

    Together the rows are the round's mixing matrix W_t (row i: node i's weights).
    """
    ids = _time_varying_ids(topology)
    if topology.dynamics == "one-peer-exponential":
        hop = _hop(len(ids), round_)
        return {node_id: _one_peer_plan(ids, i, hop) for i, node_id in enumerate(ids)}
    out_of = _s_out_draws(topology, round_, seed)
    incoming: list[list[int]] = [[] for _ in ids]
    for j, outs in enumerate(out_of):
        for k in outs:
            incoming[k].append(j)
    return {node_id: _s_out_plan(ids, i, out_of[i], incoming[i]) for i, node_id in enumerate(ids)}


def dynamic_links(ids: list[str], kind: str) -> list[tuple[str, str]]:
    """Every link a time-varying topology of these nodes may use in some round."""
    n = len(ids)
    if kind == "s-out":
        return [(ids[i], ids[j]) for i in range(n) for j in range(i + 1, n)]
    hops = {_hop(n, t) for t in range(one_peer_period(n))} - {0}
    links = set()
    for i in range(n):
        for h in hops:
            u, v = ids[i], ids[(i + h) % n]
            links.add((u, v) if u < v else (v, u))
    return sorted(links)


def one_peer_period(n: int) -> int:
    """Rounds after which the hops of a one-peer exponential graph of n nodes repeat.

    ceil(log2 n), at least 1: in round t the hop is 2^(t mod period) places (mod n).
    """
    return max(1, math.ceil(math.log2(n)))


def _time_varying_ids(topology: Topology) -> list[str]:
    if topology.dynamics == "static":
        raise ValueError(f"topology {topology.name!r} is static")
    return topology.ids()


def _hop(n: int, round_: int) -> int:
    return 2 ** (round_ % one_peer_period(n)) % n


def _one_peer_plan(ids: list[str], i: int, hop: int) -> Plan:
    n = len(ids)
    if hop == 0:
        return [], {ids[i]: 1.0}
    return [ids[(i + hop) % n]], {ids[i]: 0.5, ids[(i - hop) % n]: 0.5}


def _s_out_plan(ids: list[str], i: int, outs: list[int], incoming: list[int]) -> Plan:
    share = 1.0 / (1 + len(incoming))
    return [ids[k] for k in outs], {ids[i]: share, **{ids[j]: share for j in incoming}}


def _s_out_draws(topology: Topology, round_: int, seed: int) -> list[list[int]]:
    """The out-peers (indices, sorted) every node draws in this round of an s-out topology."""
    n = len(topology.nodes)
    return [_sample_out(seed, round_, j, n, topology.sample) for j in range(n)]


def _sample_out(seed: int, round_: int, j: int, n: int, s: int) -> list[int]:
    rng = np.random.default_rng([seed & 0xFFFFFFFF, round_, j, 0x5EED])
    others = np.delete(np.arange(n), j)
    return sorted(int(v) for v in rng.choice(others, size=min(s, n - 1), replace=False))

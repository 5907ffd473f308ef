"""Mixing weights: Metropolis-Hastings rows, their spectral gap, and rows adjusted per round.

This module owns which weights a node gives its neighbours and how fast those weights mix: it
sees graphs and numbers, never arrays of model state. Weights always come from the topology
spec that every node shares (`node_weights`), never from degrees a peer reports about itself.
Per round the daemon shrinks a row on edges to noisy neighbours (`noise_aware_weights`) and
moves the weight of the neighbours it did not hear to itself (`renormalise`).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from m3tgossip.consensus.noise import check_noise_var

if TYPE_CHECKING:
    import networkx as nx

#: eigenvalue moduli this close to 1 are reported as exactly 1 (a disconnected graph)
SLEM_ONE_TOLERANCE = 1e-12


def metropolis_hastings(graph: nx.Graph, order: Sequence[str] | None = None) -> np.ndarray:
    """Metropolis-Hastings mixing matrix of an undirected graph.

    `W[i, j] = 1 / (1 + max(d_i, d_j))` for every edge, `W[i, i] = 1 - sum_j W[i, j]`, zero
    elsewhere. The result is symmetric and doubly stochastic with a positive diagonal. Rows and
    columns follow `order` (default: the graph's node order).
    """
    nodes = list(graph.nodes) if order is None else list(order)
    if len(nodes) != graph.number_of_nodes() or set(nodes) != set(graph.nodes):
        raise ValueError("order must list every node of the graph exactly once")
    if any(u == v for u, v in graph.edges):
        raise ValueError("Metropolis-Hastings weights need a graph without self-loops")
    index = {node: i for i, node in enumerate(nodes)}
    degree = dict(graph.degree())
    W = np.zeros((len(nodes), len(nodes)))
    for u, v in graph.edges():
        i, j = index[u], index[v]
        W[i, j] = W[j, i] = 1.0 / (1.0 + max(degree[u], degree[v]))
    W[np.diag_indices_from(W)] = 1.0 - W.sum(axis=1)
    return W


def slem(W: np.ndarray) -> float:
    """Second largest eigenvalue modulus of a symmetric doubly stochastic matrix.

    It is the factor by which one synchronous round shrinks the distance to the average (in the
    worst case). A 1x1 matrix has nothing to mix and gives 0; a disconnected graph gives 1.
    """
    W = np.asarray(W, dtype=float)
    if W.ndim != 2 or W.shape[0] != W.shape[1]:
        raise ValueError(f"a mixing matrix must be square, got shape {W.shape}")
    if not np.allclose(W, W.T):
        raise ValueError("slem needs a symmetric mixing matrix")
    if W.shape[0] == 1:
        return 0.0
    moduli = np.sort(np.abs(np.linalg.eigvalsh(W)))[::-1]
    value = float(moduli[1])
    return 1.0 if value >= 1.0 - SLEM_ONE_TOLERANCE else value


def predicted_rounds(slem: float, target_error: float, initial_error: float = 1.0) -> int | None:
    """Smallest `t` with `initial_error * slem**t <= target_error`.

    0 when the error is already at or under the target; None when `slem >= 1` (the graph is
    disconnected and the error never shrinks to the target).
    """
    if target_error <= 0.0:
        raise ValueError(f"target_error must be positive, got {target_error}")
    if initial_error < 0.0:
        raise ValueError(f"initial_error must not be negative, got {initial_error}")
    if slem < 0.0:
        raise ValueError(f"slem must not be negative, got {slem}")
    if initial_error <= target_error:
        return 0
    if slem >= 1.0:
        return None
    if slem == 0.0:
        return 1
    t = max(1, math.ceil(math.log(target_error / initial_error) / math.log(slem)))
    # the logarithms can be off by one ulp either way; settle on the exact smallest t
    while initial_error * slem**t > target_error:
        t += 1
    while t > 1 and initial_error * slem ** (t - 1) <= target_error:
        t -= 1
    return t


def simulate_sync(W: np.ndarray, X0: np.ndarray, rounds: int) -> np.ndarray:
    """Relative consensus error of synchronous mixing `X <- W X` for `rounds` rounds.

    Entry `t` of the result is `||X_t - mean|| / ||X0 - mean||` (entry 0 is 1, or 0 if `X0` is
    already at consensus). For symmetric doubly stochastic `W` it never exceeds `slem(W)**t`.
    """
    X = np.array(X0, dtype=np.float64)
    if X.shape[0] != W.shape[0]:
        raise ValueError(f"X0 has {X.shape[0]} rows, W has {W.shape[0]}")
    mean = X.mean(axis=0)
    initial = float(np.linalg.norm(X - mean))
    errors = np.zeros(rounds + 1)
    for t in range(rounds + 1):
        if t:
            X = W @ X
        errors[t] = float(np.linalg.norm(X - mean)) / initial if initial else 0.0
    return errors


def renormalise(
    weights: Mapping[str, float], self_id: str, heard: Collection[str]
) -> dict[str, float]:
    """Drop the neighbours not heard from this round and move their weight to `self_id`.

    The row still sums to 1, so mixing stays an average. Ids in `heard` that have no weight
    (not neighbours for this component) are ignored.
    """
    if self_id not in weights:
        raise ValueError(f'weights have no entry for self "{self_id}"')
    kept = {j: w for j, w in weights.items() if j != self_id and j in heard}
    missing = sum(w for j, w in weights.items() if j != self_id and j not in heard)
    return {self_id: weights[self_id] + missing, **kept}


# --- noise-aware weights ---------------------------------------------------------------------
#
# Neighbours may add differential-privacy noise of different strength to what they send (the
# std per element is declared in the wire TensorMeta `noise` field). Plain Metropolis-Hastings
# lets a heavily noised neighbour inject as much noise into a clean node as a clean neighbour
# injects signal. The adjustment below keeps the matrix symmetric and doubly stochastic:
#
#     w'_ij = w_ij / (1 + strength * max(v_i, v_j))   (i != j),   w'_ii = 1 - sum_j w'_ij
#
# where v_i is node i's per-element noise variance. Both ends of an edge compute the same factor
# from the same declared values, so W' stays symmetric; the removed weight goes to the diagonal,
# so rows (and, by symmetry, columns) still sum to 1 and the network mean is preserved (with the
# CHOCO step it is preserved exactly, noise included: sum_i sum_j w_ij (r_j - r_i) = 0). Every
# edge keeps a positive weight, so a connected graph still reaches consensus; only slower over
# noisy edges. An edge is as unreliable as its noisier end: a clean node listens less to a noisy
# neighbour, and a noisy node mixes less of its own noisy public copy into clean ones. Not done,
# on purpose: re-weighting each row by the neighbours' inverse variances. That row is stochastic
# but the matrix is not symmetric, so the nodes no longer agree on the average (the consensus
# value drifts towards the clean nodes' data and CHOCO's mean is lost).
#
# `strength` has units 1/variance: an edge whose noisier end has variance 1/strength per element
# keeps half its weight. Every node must use the same `strength` (a federation-wide setting),
# or the matrix is no longer symmetric.


def noise_aware_weights(
    weights: Mapping[str, float],
    self_id: str,
    noise_var: Mapping[str, float],
    self_noise_var: float,
    strength: float = 1.0,
) -> dict[str, float]:
    """Shrink each edge weight by `1 / (1 + strength * max(var_self, var_j))`; the rest to self.

    `weights` is a row from `node_weights` (call this before `renormalise`), `noise_var[j]` the
    effective per-element noise variance of neighbour j (see `effective_noise_var`), and
    `self_noise_var` this node's own, as it declares it. Returns a row summing to 1, self
    first, neighbours in the order of `weights`. KeyError if a neighbour has no noise variance.
    """
    if self_id not in weights:
        raise ValueError(f'weights have no entry for self "{self_id}"')
    if not (math.isfinite(strength) and strength >= 0.0):
        raise ValueError(f"strength must be a non-negative finite number, got {strength}")
    check_noise_var(self_noise_var, f'noise variance of self "{self_id}"')
    row: dict[str, float] = {}
    for j, w in weights.items():
        if j == self_id:
            continue
        if j not in noise_var:
            raise KeyError(f'no noise variance for neighbour "{j}"')
        check_noise_var(noise_var[j], f'noise variance of "{j}"')
        row[j] = w / (1.0 + strength * max(self_noise_var, noise_var[j]))
    removed = sum(weights[j] - row[j] for j in row)
    return {self_id: weights[self_id] + removed, **row}

"""Noise-aware mixing weights and the noise-variance estimator."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

from m3tgossip.consensus import (
    effective_noise_var,
    estimate_noise_var,
    metropolis_hastings,
    noise_aware_weights,
    predicted_rounds,
    simulate_sync,
    slem,
)


def _named(graph: nx.Graph) -> nx.Graph:
    return nx.relabel_nodes(graph, {i: f"v{i}" for i in graph.nodes})


GRAPHS = {
    "path-5": _named(nx.path_graph(5)),
    "cycle-6": _named(nx.cycle_graph(6)),
    "star-5": _named(nx.star_graph(4)),
    "complete-4": _named(nx.complete_graph(4)),
    "lollipop": _named(nx.lollipop_graph(4, 3)),
}

# per-element noise variances: open (0), ferpa-ish, gdpr-ish nodes mixed
VAR_PATTERNS = {
    "clean": lambda i: 0.0,
    "mixed": lambda i: [0.0, 4.0, 0.25, 100.0][i % 4],
    "all-noisy": lambda i: 9.0 + i,
}


def _rows(graph: nx.Graph, var: dict[str, float], strength: float) -> np.ndarray:
    """Build W' from every node's own row, each computed locally from the declared values."""
    order = list(graph.nodes)
    W = metropolis_hastings(graph, order)
    out = np.zeros_like(W)
    for i, u in enumerate(order):
        row = {u: W[i, i], **{order[j]: W[i, j] for j in np.flatnonzero(W[i]) if j != i}}
        others = {v: var[v] for v in row if v != u}
        new = noise_aware_weights(row, u, others, var[u], strength)
        assert next(iter(new)) == u
        for v, w in new.items():
            out[i, order.index(v)] = w
    return out


@pytest.mark.parametrize("graph", GRAPHS.values(), ids=GRAPHS.keys())
@pytest.mark.parametrize("pattern", VAR_PATTERNS.values(), ids=VAR_PATTERNS.keys())
@pytest.mark.parametrize("strength", [0.0, 0.1, 1.0, 10.0])
def test_rows_sum_to_one_and_the_matrix_is_symmetric(graph, pattern, strength):
    var = {v: pattern(i) for i, v in enumerate(graph.nodes)}
    W = _rows(graph, var, strength)
    assert np.allclose(W.sum(axis=1), 1.0, atol=1e-12)
    assert np.allclose(W, W.T, atol=1e-15)  # hence doubly stochastic
    assert np.all(W >= 0.0) and np.all(np.diag(W) > 0.0)
    # same sparsity as the graph: every edge keeps a positive weight
    A = nx.to_numpy_array(graph, nodelist=list(graph.nodes)) > 0
    assert np.all((W > 0) == (A | np.eye(len(A), dtype=bool)))


def test_edge_weights_follow_the_closed_form():
    row = {"a": 0.4, "b": 0.2, "c": 0.2, "d": 0.2}
    var = {"b": 0.0, "c": 3.0, "d": 0.5}
    new = noise_aware_weights(row, "a", var, 1.0, strength=2.0)
    assert new["b"] == pytest.approx(0.2 / (1 + 2.0 * 1.0))
    assert new["c"] == pytest.approx(0.2 / (1 + 2.0 * 3.0))
    assert new["d"] == pytest.approx(0.2 / (1 + 2.0 * 1.0))  # max(self, neighbour)
    assert new["a"] == pytest.approx(1.0 - new["b"] - new["c"] - new["d"])
    assert list(new) == ["a", "b", "c", "d"]


def test_noisy_neighbours_get_less_weight():
    row = {"me": 0.25, "clean": 0.25, "ferpa": 0.25, "gdpr": 0.25}
    var = {"clean": 0.0, "ferpa": 1.0, "gdpr": 25.0}
    new = noise_aware_weights(row, "me", var, 0.0)
    assert new["clean"] == 0.25 > new["ferpa"] > new["gdpr"] > 0.0
    assert new["me"] > 0.25


def test_no_noise_or_zero_strength_leaves_weights_unchanged():
    row = {"a": 0.5, "b": 0.25, "c": 0.25}
    assert noise_aware_weights(row, "a", {"b": 0.0, "c": 0.0}, 0.0) == row
    assert noise_aware_weights(row, "a", {"b": 7.0, "c": 1.0}, 2.0, strength=0.0) == row


@pytest.mark.parametrize("graph", GRAPHS.values(), ids=GRAPHS.keys())
def test_consensus_still_converges_to_the_mean(graph):
    var = {v: VAR_PATTERNS["mixed"](i) for i, v in enumerate(graph.nodes)}
    W = _rows(graph, var, strength=1.0)
    lam = slem(W)
    assert lam < 1.0
    assert lam >= slem(metropolis_hastings(graph, list(graph.nodes)))  # slower, never stuck
    rounds = predicted_rounds(lam, 1e-6)
    X0 = np.random.default_rng(0).standard_normal((len(W), 3))
    errors = simulate_sync(W, X0, rounds)
    assert np.all(errors <= lam ** np.arange(rounds + 1) + 1e-12)
    assert errors[-1] <= 1e-6
    X = X0.copy()
    for _ in range(rounds):
        X = W @ X
    assert np.allclose(X, X0.mean(axis=0), atol=1e-5)


def test_noise_never_enters_the_mean_and_less_reaches_clean_nodes():
    """CHOCO with noisy public copies r_j = x_j + e_j: x_i += sum_j w_ij (r_j - r_i).

    With a symmetric W the network mean is unchanged by the noise; the noise a clean node
    takes in, sum_j w_ij^2 var_j + (1 - w_ii)^2 var_i per element, drops with the weights."""
    graph = GRAPHS["cycle-6"]
    order = list(graph.nodes)
    var = {v: (100.0 if i % 2 else 0.0) for i, v in enumerate(order)}  # alternate gdpr / open
    plain = metropolis_hastings(graph, order)
    aware = _rows(graph, var, strength=1.0)
    rng = np.random.default_rng(1)
    v = np.array([var[u] for u in order])
    for W in (plain, aware):
        x = rng.standard_normal((6, 4))
        mean = x.mean(axis=0)
        for _ in range(50):
            r = x + rng.standard_normal(x.shape) * np.sqrt(v)[:, None]
            x = x + (W - np.eye(6)) @ r
        assert np.allclose(x.mean(axis=0), mean, atol=1e-9)

    def injected(W, i):
        off = W[i].copy()
        off[i] = 0.0
        return float(off**2 @ v + (1 - W[i, i]) ** 2 * v[i])

    assert injected(aware, 0) < injected(plain, 0) / 50


def test_weights_validate():
    row = {"a": 0.5, "b": 0.5}
    with pytest.raises(KeyError, match='"b"'):
        noise_aware_weights(row, "a", {}, 0.0)
    with pytest.raises(ValueError):
        noise_aware_weights(row, "x", {"b": 0.0}, 0.0)
    with pytest.raises(ValueError):
        noise_aware_weights(row, "a", {"b": -1.0}, 0.0)
    with pytest.raises(ValueError):
        noise_aware_weights(row, "a", {"b": 1.0}, float("nan"))
    with pytest.raises(ValueError):
        noise_aware_weights(row, "a", {"b": 1.0}, 0.0, strength=-1.0)


# --- estimator -----------------------------------------------------------------------------


def _deltas(n: int, std: float, rounds: int, seed: int, clip: float = 1.0) -> list[np.ndarray]:
    """Dense signal clipped to norm `clip` plus Gaussian noise of `std` per element."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(rounds):
        s = rng.standard_normal(n) + 0.5
        s *= clip / np.linalg.norm(s)
        out.append(s + std * rng.standard_normal(n))
    return out


@pytest.mark.parametrize("std", [0.05, 0.3, 17.0])
def test_estimate_is_consistent_when_noise_dominates(std):
    est = estimate_noise_var(_deltas(20_000, std, 5, seed=2))
    assert est == pytest.approx(std**2, rel=0.03)
    est = estimate_noise_var(_deltas(400_000, std, 5, seed=3))
    assert est == pytest.approx(std**2, rel=0.005)


def test_under_declaring_tenfold_is_corrected():
    std = 0.3
    history = _deltas(20_000, std, 5, seed=4)
    declared = std**2 / 10
    eff = effective_noise_var(declared, estimate_noise_var(history))
    assert eff == pytest.approx(std**2, rel=0.03)
    # an honest declaration is not inflated beyond the estimator's error
    assert effective_noise_var(std**2, estimate_noise_var(history)) == pytest.approx(
        std**2, rel=0.03
    )


def test_a_clean_sparse_update_reads_as_no_noise():
    rng = np.random.default_rng(5)
    d = np.zeros(10_000)
    idx = rng.choice(10_000, 300, replace=False)
    d[idx] = rng.standard_normal(300) * 10.0
    assert estimate_noise_var([d, d * 0.5]) == 0.0


def test_one_odd_round_does_not_move_the_estimate():
    history = _deltas(10_000, 0.2, 4, seed=6)
    history.append(np.full(10_000, 50.0) + np.random.default_rng(7).standard_normal(10_000) * 30)
    assert estimate_noise_var(history) == pytest.approx(0.04, rel=0.1)


def test_estimator_edges():
    assert estimate_noise_var([]) == 0.0
    assert estimate_noise_var([np.zeros(0)]) == 0.0
    with pytest.raises(ValueError):
        estimate_noise_var([np.array([1.0, np.inf])])
    assert effective_noise_var(2.0, 1.0) == 2.0
    assert effective_noise_var(0.0, 1.0) == 1.0
    with pytest.raises(ValueError):
        effective_noise_var(-1.0, 0.0)

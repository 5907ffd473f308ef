"""Consensus arithmetic: Metropolis-Hastings weights, SLEM, predicted rounds, mixing steps."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import networkx as nx
import numpy as np
import pytest

from m3tgossip.consensus import (
    PushSum,
    add_into,
    axpy_into,
    choco_mix_into,
    kernels,
    metropolis_hastings,
    mix_into,
    predicted_rounds,
    renormalise,
    simulate_sync,
    slem,
)
from m3tgossip.topology import node_weights, parse_topology


def _named(graph: nx.Graph) -> nx.Graph:
    return nx.relabel_nodes(graph, {i: f"v{i}" for i in graph.nodes})


IRREGULAR = nx.Graph([("v0", "v1"), ("v0", "v2"), ("v1", "v2"), ("v2", "v3"), ("v3", "v4")])

GRAPHS = {
    "path-4": _named(nx.path_graph(4)),
    "cycle-6": _named(nx.cycle_graph(6)),
    "star-5": _named(nx.star_graph(4)),
    "complete-5": _named(nx.complete_graph(5)),
    "irregular-5": IRREGULAR,
}


def _reference_mh(graph: nx.Graph, order: list[str]) -> np.ndarray:
    """Metropolis-Hastings built entry by entry from the definition."""
    n = len(order)
    A = nx.to_numpy_array(graph, nodelist=order)
    d = A.sum(axis=1)
    W = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if A[i, j]:
                W[i, j] = 1.0 / (1.0 + max(d[i], d[j]))
    for i in range(n):
        W[i, i] = 1.0 - W[i].sum()
    return W


@pytest.mark.parametrize("name", GRAPHS)
def test_metropolis_hastings_matches_definition(name: str) -> None:
    graph = GRAPHS[name]
    order = sorted(graph.nodes)
    W = metropolis_hastings(graph, order)
    np.testing.assert_allclose(W, _reference_mh(graph, order))
    np.testing.assert_allclose(W, W.T)
    np.testing.assert_allclose(W.sum(axis=0), 1.0)
    np.testing.assert_allclose(W.sum(axis=1), 1.0)
    assert (W >= 0).all() and (np.diag(W) > 0).all()


def test_metropolis_hastings_hand_values() -> None:
    # path a - b - c: degrees 1, 2, 1
    W = metropolis_hastings(nx.path_graph(["a", "b", "c"]), ["a", "b", "c"])
    third = 1 / 3
    np.testing.assert_allclose(
        W, [[1 - third, third, 0], [third, 1 - 2 * third, third], [0, third, 1 - third]]
    )


def test_metropolis_hastings_rejects_bad_order() -> None:
    with pytest.raises(ValueError, match="order"):
        metropolis_hastings(IRREGULAR, ["v0", "v1"])


@pytest.mark.parametrize("name", GRAPHS)
def test_slem_matches_numpy(name: str) -> None:
    W = metropolis_hastings(GRAPHS[name])
    moduli = sorted(np.abs(np.linalg.eigvals(W)), reverse=True)
    assert slem(W) == pytest.approx(moduli[1], abs=1e-10)
    assert moduli[0] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("W", "expected"),
    [
        (np.ones((1, 1)), 0.0),  # nothing to mix
        (np.full((4, 4), 0.25), 0.0),  # exact average in one round
        (np.eye(3), 1.0),  # disconnected: never mixes
        (metropolis_hastings(nx.Graph([(0, 1), (2, 3)])), 1.0),
    ],
)
def test_slem_special_cases(W: np.ndarray, expected: float) -> None:
    assert slem(W) == pytest.approx(expected, abs=1e-12)


def test_slem_rejects_asymmetric() -> None:
    with pytest.raises(ValueError, match="symmetric"):
        slem(np.array([[0.5, 0.5], [0.0, 1.0]]))


@pytest.mark.parametrize(
    ("rho", "target", "initial", "expected"),
    [
        (0.5, 0.25, 1.0, 2),
        (0.5, 0.3, 1.0, 2),
        (0.5, 0.5, 1.0, 1),
        (0.5, 1e-3, 1.0, 10),  # 2**-10 < 1e-3 < 2**-9
        (0.9, 1e-6, 1.0, 132),
        (0.5, 0.25, 4.0, 4),
        (0.5, 2.0, 1.0, 0),  # already under the target
        (0.0, 1e-9, 1.0, 1),
        (1.0, 0.1, 1.0, None),  # disconnected
    ],
)
def test_predicted_rounds(rho: float, target: float, initial: float, expected: int | None) -> None:
    rounds = predicted_rounds(rho, target, initial)
    assert rounds == expected
    if rounds:
        assert initial * rho**rounds <= target < initial * rho ** (rounds - 1)


def test_predicted_rounds_bounds_simulated_error() -> None:
    W = metropolis_hastings(IRREGULAR)
    rho = slem(W)
    X0 = np.random.default_rng(0).normal(size=(5, 3))
    errors = simulate_sync(W, X0, 100)
    assert errors[0] == 1.0
    for t, error in enumerate(errors):
        assert error <= rho**t + 1e-12
    rounds = predicted_rounds(rho, 1e-4)
    assert errors[rounds] <= 1e-4


CAMPUS_LIKE = {
    "name": "mini",
    "edges": [["a", "b"], ["b", "c"], ["c", "d"], ["a", "d"], ["b", "d"], ["d", "e"]],
    "nodes": [
        {"id": "a", "modalities": ["text", "tabular"]},
        {"id": "b", "modalities": ["text", "tabular"]},
        {"id": "c", "modalities": ["tabular"]},
        {"id": "d", "modalities": ["text", "tabular"]},
        {"id": "e", "modalities": ["text", "tabular"], "local": ["encoder.text"]},
    ],
}


@pytest.mark.parametrize("component", ["backbone", "encoder.text", "encoder.tabular"])
def test_node_weights_are_rows_of_the_component_matrix(component: str) -> None:
    topology = parse_topology(CAMPUS_LIKE, "mini.toml")
    sub = topology.component_graph(component)
    order = list(sub.nodes)
    W = metropolis_hastings(sub, order)
    for i, node_id in enumerate(order):
        weights = node_weights(topology, node_id, component)
        assert next(iter(weights)) == node_id
        expected = {order[j]: W[i, j] for j in range(len(order)) if W[i, j] or j == i}
        assert weights.keys() == expected.keys()
        for key, value in expected.items():
            assert weights[key] == pytest.approx(value)


def test_node_weights_use_the_holder_subgraph() -> None:
    topology = parse_topology(CAMPUS_LIKE, "mini.toml")
    # encoder.text holders are a, b, d (c lacks text, e keeps it local): a triangle
    assert node_weights(topology, "d", "encoder.text") == pytest.approx(
        {"d": 1 / 3, "a": 1 / 3, "b": 1 / 3}
    )
    with pytest.raises(KeyError, match="does not hold"):
        node_weights(topology, "e", "encoder.text")


@pytest.mark.parametrize(
    ("heard", "expected"),
    [
        ({"a", "b", "c"}, {"s": 0.4, "a": 0.2, "b": 0.3, "c": 0.1}),
        ({"a", "c"}, {"s": 0.7, "a": 0.2, "c": 0.1}),
        (set(), {"s": 1.0}),
        ({"b", "stranger"}, {"s": 0.7, "b": 0.3}),
    ],
)
def test_renormalise_moves_missing_mass_to_self(heard: set[str], expected: dict) -> None:
    weights = {"s": 0.4, "a": 0.2, "b": 0.3, "c": 0.1}
    row = renormalise(weights, "s", heard)
    assert row == pytest.approx(expected)
    assert sum(row.values()) == pytest.approx(1.0)


def test_mix_into_iterates_to_w_power_times_x0() -> None:
    graph = IRREGULAR
    order = sorted(graph.nodes)
    W = metropolis_hastings(graph, order)
    X0 = np.random.default_rng(1).normal(size=(5, 4))
    state = {node: X0[i].copy() for i, node in enumerate(order)}
    rows = {node: {order[j]: W[i, j] for j in range(5) if W[i, j]} for i, node in enumerate(order)}
    for _ in range(100):
        snapshot = {node: value.copy() for node, value in state.items()}
        for node in order:
            neighbours = {j: snapshot[j] for j in rows[node] if j != node}
            mix_into(state[node], node, neighbours, rows[node])
    expected = np.linalg.matrix_power(W, 100) @ X0
    np.testing.assert_allclose(np.stack([state[n] for n in order]), expected, atol=1e-12)
    np.testing.assert_allclose(expected, np.broadcast_to(X0.mean(axis=0), X0.shape), atol=1e-5)


def test_mix_into_casts_other_dtypes_in_place() -> None:
    own = np.array([1.0, 2.0], dtype=np.float32)
    before = own
    mix_into(own, "s", {"a": np.array([3.0, 4.0], dtype=np.float64)}, {"s": 0.5, "a": 0.5})
    assert own is before and own.dtype == np.float32
    np.testing.assert_allclose(own, [2.0, 3.0])


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({}, KeyError),  # neighbour not heard and not renormalised away
        ({"a": np.zeros(3)}, ValueError),  # wrong shape
    ],
)
def test_mix_into_rejects(values: dict, error: type[Exception]) -> None:
    with pytest.raises(error):
        mix_into(np.zeros(2), "s", values, {"s": 0.5, "a": 0.5})


def test_choco_with_exact_replicas_equals_plain_mixing() -> None:
    rng = np.random.default_rng(2)
    own = rng.normal(size=6)
    values = {"a": rng.normal(size=6), "b": rng.normal(size=6)}
    weights = {"s": 0.5, "a": 0.3, "b": 0.2}
    plain = own.copy()
    mix_into(plain, "s", values, weights)
    choco = own.copy()
    choco_mix_into(choco, own.copy(), values, weights, gamma=1.0)
    np.testing.assert_allclose(choco, plain, atol=1e-12)


def test_choco_gamma_scales_the_step() -> None:
    own = np.zeros(2)
    choco_mix_into(own, np.zeros(2), {"a": np.array([2.0, 4.0])}, {"s": 0.5, "a": 0.5}, 0.5)
    np.testing.assert_allclose(own, [0.5, 1.0])


#: the fused path; numpy's in several blocks
LARGE = kernels.FUSED_MIN_SIZE + kernels.NUMPY_BLOCK + 3


def _tolerance(dtype: type) -> dict[str, float]:
    # torch rounds `dst + alpha * src` once (FMA), numpy twice
    return {"rtol": 1e-6, "atol": 1e-6} if dtype is np.float32 else {"rtol": 1e-14, "atol": 1e-14}


def _pair(size: int, dtype: type, read_only: bool, shape: tuple[int, ...] | None = None):
    rng = np.random.default_rng(size)
    dst = rng.standard_normal(size).astype(dtype)
    src = rng.standard_normal(size).astype(dtype)
    if shape is not None:
        dst, src = dst.reshape(shape), src.reshape(shape)
    if read_only:
        src = np.frombuffer(src.tobytes(), dtype=dtype).reshape(src.shape)  # like a decoded frame
        assert not src.flags.writeable
    return dst, src


@pytest.fixture(params=["torch", "numpy"])
def kernel_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "numpy":
        monkeypatch.setattr(kernels, "_torch", False)  # as without torch installed
    else:
        pytest.importorskip("torch")  # loaded: the fused path is taken
    return request.param


@pytest.mark.parametrize("size", [1000, LARGE])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("read_only", [False, True])
def test_kernels_match_numpy(size: int, dtype: type, read_only: bool, kernel_path: str) -> None:
    dst, src = _pair(size, dtype, read_only)
    expected_add = dst + src
    expected_axpy = dst + np.multiply(src, 0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning about the read-only source either
        out = dst.copy()
        add_into(out, src)
        np.testing.assert_array_equal(out, expected_add)
        out = dst.copy()
        axpy_into(out, 0.3, src)
        assert out.dtype == dtype
        np.testing.assert_allclose(out, expected_axpy, **_tolerance(dtype))
        out = dst.copy()
        axpy_into(out, -1.7, src)
        np.testing.assert_allclose(out, dst - np.multiply(src, 1.7), **_tolerance(dtype))


def test_kernels_keep_shapes_and_cast(kernel_path: str) -> None:
    rows = LARGE // 7
    dst, src = _pair(rows * 7, np.float32, True, (rows, 7))
    out = dst.copy()
    axpy_into(out, 0.5, src)
    np.testing.assert_allclose(out, dst + 0.5 * src, **_tolerance(np.float32))
    wide = src.astype(np.float64)
    out = dst.copy()
    axpy_into(out, 0.5, wide)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, dst + 0.5 * src, **_tolerance(np.float32))
    out = dst.copy()
    axpy_into(out, 0.5, src[::-1])  # not contiguous
    np.testing.assert_allclose(out, dst + 0.5 * src[::-1], **_tolerance(np.float32))
    out = dst.copy()
    axpy_into(out, 0.5, out)  # the same array
    np.testing.assert_allclose(out, 1.5 * dst, **_tolerance(np.float32))
    out = dst.copy()
    add_into(out, wide)
    np.testing.assert_allclose(out, dst + src, **_tolerance(np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_mixing_matches_the_numpy_reference(dtype: type, kernel_path: str) -> None:
    rng = np.random.default_rng(4)
    own, mine = (rng.standard_normal(LARGE).astype(dtype) for _ in range(2))
    replicas = {
        j: np.frombuffer(rng.standard_normal(LARGE).astype(dtype).tobytes(), dtype) for j in "ab"
    }
    weights = {"s": 0.5, "a": 0.3, "b": 0.2}
    choco = own.copy()
    choco_mix_into(choco, mine, replicas, weights, gamma=0.8)
    expected = own + 0.8 * (
        0.3 * replicas["a"].astype(np.float64) + 0.2 * replicas["b"] - 0.5 * mine
    )
    np.testing.assert_allclose(choco, expected, **_tolerance(dtype))
    plain = own.copy()
    mix_into(plain, "s", replicas, weights)
    expected = 0.5 * own.astype(np.float64) + 0.3 * replicas["a"] + 0.2 * replicas["b"]
    np.testing.assert_allclose(plain, expected, **_tolerance(dtype))


@pytest.mark.multiprocess
def test_mixing_never_imports_torch() -> None:
    code = (
        "import sys, numpy as np\n"
        "from m3tgossip.consensus import (\n"
        "    FUSED_MIN_SIZE, add_into, axpy_into, choco_mix_into, make_mixer, mix_into,\n"
        ")\n"
        "for n in (FUSED_MIN_SIZE - 1, FUSED_MIN_SIZE + 1):\n"
        "    x, r = np.ones(n), np.frombuffer(np.ones(n).tobytes())\n"
        "    add_into(x, r); axpy_into(x, 0.5, r)\n"
        "    w = {'s': 0.5, 'a': 0.5}\n"
        "    choco_mix_into(x, np.zeros(n), {'a': r}, w); mix_into(x, 's', {'a': r}, w)\n"
        "    make_mixer('mean', gamma=0.5).mix_into(x, np.zeros(n), {'a': r}, w, 's')\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )


def test_push_sum_split_keeps_mass() -> None:
    node = PushSum(np.array([6.0, 3.0]), 1.0)
    share_x, share_w = node.split(2)
    np.testing.assert_allclose(share_x, [2.0, 1.0])
    assert share_w == pytest.approx(1 / 3)
    np.testing.assert_allclose(node.x + 2 * share_x, [6.0, 3.0])
    assert node.w + 2 * share_w == pytest.approx(1.0)
    np.testing.assert_allclose(node.estimate(), [6.0, 3.0])


def test_push_sum_converges_on_a_lossy_directed_cycle() -> None:
    n = 6
    rng = np.random.default_rng(3)
    values = rng.normal(size=(n, 2))
    nodes = [PushSum(values[i]) for i in range(n)]
    for round_ in range(300):
        outgoing = [node.split(1) for node in nodes]
        for i, (x, w) in enumerate(outgoing):
            dropped = (round_ + i) % 5 == 0
            # an undelivered share goes back to its sender, so no mass is lost
            target = nodes[i] if dropped else nodes[(i + 1) % n]
            target.absorb(x, w)
        total_w = sum(node.w for node in nodes)
        assert total_w == pytest.approx(n)
        np.testing.assert_allclose(sum(node.x for node in nodes), values.sum(axis=0))
    for node in nodes:
        np.testing.assert_allclose(node.estimate(), values.mean(axis=0), atol=1e-9)


@pytest.mark.parametrize(
    "call",
    [
        lambda: PushSum(np.zeros(2), 0.0),
        lambda: PushSum(np.zeros(2)).split(-1),
        lambda: PushSum(np.zeros(2)).absorb(np.zeros(3), 0.5),
        lambda: PushSum(np.zeros(2)).absorb(np.zeros(2), -0.5),
    ],
)
def test_push_sum_rejects_bad_input(call) -> None:
    with pytest.raises(ValueError):
        call()

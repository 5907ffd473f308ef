"""Consensus steps: Metropolis-Hastings weights, spectral prediction, in-place mixing, push-sum.

This module owns the arithmetic of averaging and nothing else: it sees numpy arrays and graphs,
never sockets or messages. Weights always come from the topology spec that every node shares
(`node_weights`), never from degrees a peer reports about itself. Round logic that needs them
(deadlines, quorum, who was heard) lives in the daemon; it calls `renormalise` with the
neighbours it heard from and then `mix_into` or `choco_mix_into`.

The in-place kernels `add_into` and `axpy_into` carry the per-element work. `add_into` is
numpy's one-pass in-place add. For arrays of at least `FUSED_MIN_SIZE` elements (C-contiguous,
aligned, non-overlapping, both float32 or both float64) `axpy_into` runs torch's fused
`add_(src, alpha=a)` on zero-copy views: one pass and no temporary, about half the time of
numpy's multiply-then-add. torch is imported on that path only, on first use, so a daemon whose
components are all smaller never loads it; without torch, or for other arrays, numpy ufuncs
with `out=` do the work through a scratch block of at most `NUMPY_BLOCK` elements.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import networkx as nx
import numpy as np

#: eigenvalue moduli this close to 1 are reported as exactly 1 (a disconnected graph)
SLEM_ONE_TOLERANCE = 1e-12

#: elements from which `axpy_into` uses torch's fused kernel
FUSED_MIN_SIZE = 1 << 17
#: elements per scratch block of `axpy_into`'s numpy path (fits a 1 MiB L2 cache as float32)
NUMPY_BLOCK = 1 << 18
_FUSED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
#: the torch module once imported, False if it is not installed, None before the first try
_torch: Any = None


def _fused() -> Any:
    """torch, imported on first use; None where it is not installed."""
    global _torch
    if _torch is None:
        try:
            import torch
        except ImportError:
            _torch = False
        else:
            _torch = torch
    return _torch or None


def _can_fuse(dst: np.ndarray, src: np.ndarray) -> bool:
    """True if torch may update `dst` from `src` element by element through zero-copy views."""
    return (
        dst.dtype in _FUSED_DTYPES
        and src.dtype == dst.dtype
        and src.shape == dst.shape
        and dst.flags.c_contiguous
        and src.flags.c_contiguous
        and dst.flags.aligned
        and src.flags.aligned
        and dst.flags.writeable
        and not np.may_share_memory(dst, src)
    )


def _fused_add(torch: Any, dst: np.ndarray, src: np.ndarray, alpha: float) -> None:
    out = torch.from_numpy(dst)
    if src.flags.writeable:
        other = torch.from_numpy(src)
    else:
        # the view is only read; torch warns about read-only arrays all the same
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
            other = torch.from_numpy(src)
    out.add_(other, alpha=alpha)


def add_into(dst: np.ndarray, src: np.ndarray) -> None:
    """`dst += src`, in place, in one pass; `src` may be read-only and of another dtype (cast).

    numpy's in-place add is already one pass without a temporary (as fast as torch's).
    """
    np.add(dst, src, out=dst, casting="same_kind")


def axpy_into(dst: np.ndarray, alpha: float, src: np.ndarray) -> None:
    """`dst += alpha * src`, in place.

    `src` may be read-only; one of another dtype is cast to `dst`'s (`same_kind`). Large
    float arrays use torch's fused kernel (see the module docstring); otherwise numpy multiplies
    into a scratch block of at most `NUMPY_BLOCK` elements and adds it (a scratch as large as
    `dst` only when one of the arrays is not C-contiguous or `src` is broadcast).
    """
    n = dst.size
    if n >= FUSED_MIN_SIZE:
        if _can_fuse(dst, src) and (torch := _fused()) is not None:
            _fused_add(torch, dst, src, float(alpha))
            return
        if src.shape == dst.shape and dst.flags.c_contiguous and src.flags.c_contiguous:
            flat, other = dst.reshape(-1), src.reshape(-1)
            scratch = np.empty(min(n, NUMPY_BLOCK), dst.dtype)
            for start in range(0, n, NUMPY_BLOCK):
                stop = min(start + NUMPY_BLOCK, n)
                block = scratch[: stop - start]
                np.multiply(other[start:stop], alpha, out=block, casting="same_kind")
                np.add(flat[start:stop], block, out=flat[start:stop])
            return
    scratch = np.empty(dst.shape, dst.dtype)
    np.multiply(src, alpha, out=scratch, casting="same_kind")
    np.add(dst, scratch, out=dst)


def metropolis_hastings(graph: nx.Graph, order: Sequence[str] | None = None) -> np.ndarray:
    """Metropolis-Hastings mixing matrix of an undirected graph.

    `W[i, j] = 1 / (1 + max(d_i, d_j))` for every edge, `W[i, i] = 1 - sum_j W[i, j]`, zero
    elsewhere. The result is symmetric and doubly stochastic with a positive diagonal. Rows and
    columns follow `order` (default: the graph's node order).
    """
    nodes = list(graph.nodes) if order is None else list(order)
    if len(nodes) != graph.number_of_nodes() or set(nodes) != set(graph.nodes):
        raise ValueError("order must list every node of the graph exactly once")
    if nx.number_of_selfloops(graph):
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


def mix_into(
    own: np.ndarray,
    self_id: str,
    values: Mapping[str, np.ndarray],
    weights: Mapping[str, float],
) -> None:
    """`own[:] = w_ii * own + sum_j w_ij * values[j]`, in place.

    One pass over `own` per term (`axpy_into`); neighbour values of another dtype are cast.
    Every neighbour in `weights` must have a value (call `renormalise` first).
    """
    if self_id not in weights:
        raise ValueError(f'weights have no entry for self "{self_id}"')
    neighbours = sorted(j for j in weights if j != self_id)
    for j in neighbours:
        if j not in values:
            raise KeyError(f'no value from neighbour "{j}"; renormalise over those heard first')
        if values[j].shape != own.shape:
            raise ValueError(f'value from "{j}" has shape {values[j].shape}, expected {own.shape}')
    own *= weights[self_id]
    for j in neighbours:
        axpy_into(own, weights[j], values[j])


def choco_mix_into(
    own: np.ndarray,
    replica_self: np.ndarray,
    replicas: Mapping[str, np.ndarray],
    weights: Mapping[str, float],
    gamma: float = 1.0,
) -> None:
    """CHOCO-gossip step: `own += gamma * sum_j w_ij * (replicas[j] - replica_self)`, in place.

    `replica_self` is the public copy of this node's state that its neighbours hold and
    `replicas[j]` this node's copy of neighbour j's; both are kept up to date from compressed
    deltas elsewhere. `weights` is a row from `node_weights`/`renormalise`: its one key without a
    replica is the node itself, whose term is zero. With `gamma = 1` and exact replicas this
    equals `mix_into`.
    """
    without_replica = sorted(j for j in weights if j not in replicas)
    if len(without_replica) > 1:
        raise KeyError(
            f"no replica for {without_replica}; only the node itself may lack one "
            "(renormalise over the neighbours heard first)"
        )
    if replica_self.shape != own.shape:
        raise ValueError(f"replica_self has shape {replica_self.shape}, expected {own.shape}")
    terms = sorted(j for j in weights if j in replicas)
    for j in terms:
        if replicas[j].shape != own.shape:
            raise ValueError(
                f'replica of "{j}" has shape {replicas[j].shape}, expected {own.shape}'
            )
    if not terms:
        return
    for j in terms:
        axpy_into(own, gamma * weights[j], replicas[j])
    axpy_into(own, -gamma * sum(weights[j] for j in terms), replica_self)


class PushSum:
    """Asynchronous push-sum (Kempe, Dobra, Gehrke 2003) for directed or lossy links.

    A node carries a value `x` and a scalar weight `w`; `x / w` tends to the network average as
    long as the total mass (sum of `x` and of `w`) is conserved: a share that is not delivered
    must be absorbed back by its sender.
    """

    def __init__(self, x: np.ndarray, w: float = 1.0) -> None:
        if not w > 0.0:
            raise ValueError(f"push-sum weight must be positive, got {w}")
        self.x = np.array(x, dtype=np.float64)
        self.w = float(w)

    def split(self, n_out: int) -> tuple[np.ndarray, float]:
        """Keep a `1/(n_out+1)` share; return the equal share to send to each out-neighbour."""
        if n_out < 0:
            raise ValueError(f"n_out must not be negative, got {n_out}")
        fraction = 1.0 / (n_out + 1)
        self.x *= fraction
        self.w *= fraction
        return self.x.copy(), self.w

    def absorb(self, x: np.ndarray, w: float) -> None:
        """Add a received (or undelivered, returned) share."""
        if np.shape(x) != self.x.shape:
            raise ValueError(f"push-sum share has shape {np.shape(x)}, expected {self.x.shape}")
        if w < 0.0:
            raise ValueError(f"push-sum share weight must not be negative, got {w}")
        self.x += x
        self.w += w

    def estimate(self) -> np.ndarray:
        """The current estimate of the average, `x / w`."""
        return self.x / self.w


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
    _check_var(self_noise_var, f'noise variance of self "{self_id}"')
    row: dict[str, float] = {}
    for j, w in weights.items():
        if j == self_id:
            continue
        if j not in noise_var:
            raise KeyError(f'no noise variance for neighbour "{j}"')
        _check_var(noise_var[j], f'noise variance of "{j}"')
        row[j] = w / (1.0 + strength * max(self_noise_var, noise_var[j]))
    removed = sum(weights[j] - row[j] for j in row)
    return {self_id: weights[self_id] + removed, **row}


def _check_var(value: float, what: str) -> None:
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{what} must be a non-negative finite number, got {value}")


#: MAD of a standard normal: the median of |N(0, 1)|
_MAD_NORMAL = 0.6744897501960817


def estimate_noise_var(delta_history: Sequence[np.ndarray]) -> float:
    """Per-element noise variance of a neighbour, estimated from the deltas it sent.

    Each delta is (clipped signal + i.i.d. Gaussian noise). Per delta the estimate is the
    squared normalised median absolute deviation, `(median|d - median(d)| / 0.6745)^2`; over
    the history, the median of the per-delta estimates. It is consistent (tends to the true
    variance as the size grows) whenever the noise dominates the signal per element, which
    clipping guarantees for DP-sized noise (a clipped signal has RMS at most C / sqrt(n) per
    element); it ignores up to half the elements carrying a large sparse signal, so a clean
    node with a sparse update scores about 0. A dense unclipped signal reads as noise of its own
    RMS; and a CHOCO delta also carries the sender's mixing correction, with some of its
    neighbours' noise in it, so the estimate leans high next to noisy nodes. An empty history
    gives 0.0.
    """
    estimates = []
    for d in delta_history:
        flat = np.asarray(d, dtype=np.float64).reshape(-1)
        if not flat.size:
            continue
        if not np.all(np.isfinite(flat)):
            raise ValueError("a delta in the history has a non-finite value")
        mad = float(np.median(np.abs(flat - np.median(flat))))
        estimates.append((mad / _MAD_NORMAL) ** 2)
    return float(np.median(estimates)) if estimates else 0.0


def effective_noise_var(declared: float, estimated: float) -> float:
    """`max(declared, estimated)`: under-declaring one's noise gains a node no weight."""
    _check_var(declared, "declared noise variance")
    _check_var(estimated, "estimated noise variance")
    return max(declared, estimated)

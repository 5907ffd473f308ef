"""In-place mixing kernels: a node's state plus weighted neighbour values, one pass per term.

This module owns the per-element arithmetic of averaging and nothing else: it sees numpy arrays,
never graphs, sockets or messages. `add_into` is numpy's one-pass in-place add. `axpy_into`
multiplies into a scratch block of at most `NUMPY_BLOCK` elements (it stays in cache) and adds
it, so it reads and writes each array once, like a fused kernel. For arrays of at least
`FUSED_MIN_SIZE` elements (C-contiguous, aligned, non-overlapping, both float32 or both float64)
it runs torch's fused `add_(src, alpha=a)` on zero-copy views instead, but only in a process
that has already imported torch (one that trains a model): this module never imports torch
itself, so a consensus daemon does not pay torch's start-up time and memory. `mix_into` (plain
weighted average) and `choco_mix_into` (the CHOCO step over replicas) are built on `axpy_into`;
`choco_sum_into` takes the same CHOCO step from the replicas' weighted sum, which a caller may
add up one replica at a time as they arrive, keeping none of them.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

#: elements from which `axpy_into` uses torch's fused kernel
FUSED_MIN_SIZE = 1 << 17
#: elements per scratch block of `axpy_into`'s numpy path (fits a 1 MiB L2 cache as float32)
NUMPY_BLOCK = 1 << 18
_FUSED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
#: False turns the fused path off (as in a process without torch); None: use torch if loaded
_torch: Any = None


def _fused() -> Any:
    """torch if this process has already imported it (never imported here), else None."""
    if _torch is False:
        return None
    return _torch or sys.modules.get("torch")


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
    float arrays use torch's fused kernel where torch is loaded (see the module docstring);
    otherwise numpy multiplies into a scratch block of at most `NUMPY_BLOCK` elements and adds
    it (a scratch as large as `dst` only when one of the arrays is not C-contiguous or `src` is
    broadcast).
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


def squared_distance(a: np.ndarray, b: np.ndarray) -> float:
    """`||a - b||^2` (float64), through a scratch of at most `NUMPY_BLOCK` elements: one read
    of each array and no temporary as large as them."""
    x, y = a.reshape(-1), b.reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {a.shape} and {b.shape}")
    scratch = np.empty(min(x.size, NUMPY_BLOCK), dtype=np.result_type(x, y))
    total = 0.0
    for start in range(0, x.size, NUMPY_BLOCK):
        d = scratch[: min(NUMPY_BLOCK, x.size - start)]
        np.subtract(x[start : start + NUMPY_BLOCK], y[start : start + NUMPY_BLOCK], out=d)
        total += float(d @ d)
    return total


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


def choco_sum_into(
    own: np.ndarray,
    replica_self: np.ndarray,
    total: np.ndarray,
    weight_sum: float,
    gamma: float = 1.0,
) -> None:
    """CHOCO-gossip step from a sum: `own += total - gamma * weight_sum * replica_self`.

    `total` is `sum_j gamma * w_ij * replicas[j]` over the replicas heard, summed elsewhere as
    they arrived, and `weight_sum` is `sum_j w_ij` over the same replicas: the result is
    `choco_mix_into`'s up to float rounding (the terms are added in another order).
    """
    if replica_self.shape != own.shape or total.shape != own.shape:
        raise ValueError(
            f"replica_self {replica_self.shape} and total {total.shape} must be {own.shape}"
        )
    add_into(own, total)
    axpy_into(own, -gamma * weight_sum, replica_self)

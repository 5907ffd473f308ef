"""Rank agreement between modality attributions and the permutation check
(`m3tgossip.edu.explain`): Spearman's correlation, and its pooled form over nodes and tasks
from the ranks within each node-task."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their mean rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation; None with fewer than two points or a constant side."""
    a, b = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(a) != len(b):
        raise ValueError(f"spearman: {len(a)} against {len(b)} values")
    if len(a) < 2:
        return None
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def _centred_ranks(x: Sequence[float]) -> np.ndarray:
    """Ranks within one node-task, less their mean (ties given their mean rank)."""
    r = _ranks(np.asarray(x, np.float64))
    return r - r.mean()


def _pooled_ranks(pairs: Sequence[tuple[Sequence[float], Sequence[float]]]) -> float | None:
    """The correlation of within-group centred ranks pooled over groups: sum of the groups'
    rank covariances over the root of the summed rank variances (one group: its Spearman);
    None where a side has no spread."""
    xs = [_centred_ranks(x) for x, _ in pairs if len(x) >= 2]
    ys = [_centred_ranks(y) for _, y in pairs if len(y) >= 2]
    if not xs:
        return None
    x, y = np.concatenate(xs), np.concatenate(ys)
    sx, sy = float(x @ x), float(y @ y)
    if sx == 0 or sy == 0:
        return None
    return float(x @ y / math.sqrt(sx * sy))


def pooled_spearman(reports: Iterable[Mapping[str, Any]], key: str = "phi") -> dict[str, Any]:
    """Shapley phi (or another per-modality entry of the task summaries, `key`) against the
    permutation drop over explain reports of several nodes (each with `tasks: {task: {phi,
    permutation: {drop}}}`).

    `pooled` is the rank correlation pooled over nodes and tasks: each (node, task) ranks its
    own modalities on both sides, the ranks are centred within it, and the correlation is
    taken over all of them together (`_pooled_ranks`), so a node-task counts by how well it
    orders its own modalities, never by how large its values are beside another's. `per_task`
    is the same per task over the nodes, `mean` the mean of the per-(node, task) Spearman
    correlations where defined. `pooled_raw` is the older figure, one Spearman over the raw
    (node, task, modality) values: it mixes the scales of node-tasks (a task whose values are
    all large ranks above one whose values are all small), so it measures how alike the
    node-tasks' scales are on both sides, not the orders the check is about.
    `pooled_with_shares` pools only the node-tasks whose shares are given (a total above
    `TINY_TOTAL`: the modalities together make the label likelier than none); where they are
    not, the model does worse with its modalities than with none and there is no ranking of
    shares to check."""
    xs: list[float] = []
    ys: list[float] = []
    per: list[float] = []
    groups: list[tuple[list[float], list[float]]] = []
    shared: list[tuple[list[float], list[float]]] = []
    by_task: dict[str, list[tuple[list[float], list[float]]]] = {}
    for report in reports:
        for task, summary in report.get("tasks", {}).items():
            drop = (summary.get("permutation") or {}).get("drop")
            if not drop:
                continue
            mods = [m for m in summary[key] if m in drop]
            x, y = [summary[key][m] for m in mods], [drop[m] for m in mods]
            xs += x
            ys += y
            groups.append((x, y))
            if summary.get("shares"):
                shared.append((x, y))
            by_task.setdefault(task, []).append((x, y))
            rho = spearman(x, y)
            if rho is not None:
                per.append(rho)
    return {
        "pooled": _pooled_ranks(groups),
        "per_task": {t: _pooled_ranks(g) for t, g in sorted(by_task.items())},
        "mean": float(np.mean(per)) if per else None,
        "pooled_raw": spearman(xs, ys),
        "pooled_with_shares": _pooled_ranks(shared),
        "with_shares": len(shared),
        "node_tasks": len(groups),
        "defined": len(per),
        "points": len(xs),
    }

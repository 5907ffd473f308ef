"""The report's plots, drawn with matplotlib (the `plot` extra) into PNG bytes.

Each `*_plot` function returns a `Plot` or None when the run has nothing to show for it (no
evaluation, no privacy accounting, ...). Figures are made without pyplot, so nothing global is
touched and no display is needed.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from m3tgossip.report.runs import NodeRun, Run

#: nodes beyond which the per-node legends are left out (the table names every node)
LEGEND_MAX = 20
INSTALL_HINT = "pip install -e '.[plot]' (or pip install 'matplotlib>=3.8,<3.12')"


@dataclass(frozen=True)
class Plot:
    """One figure of the report: a heading, a sentence saying what it shows, the PNG."""

    key: str
    title: str
    caption: str
    png: bytes


def figure(rows: int, cols: int, width: float = 11.0, height: float = 3.4) -> Any:
    """A matplotlib Figure with a grid of axes; RuntimeError saying how to install it."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise RuntimeError(
            f"m3tgossip report draws its plots with matplotlib, which is not installed: "
            f"{INSTALL_HINT}"
        ) from exc
    fig = Figure(figsize=(width, height * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:  # tab20 pairs a dark and a light shade: take the dark ones first
        return [colormaps["tab20"]((2 * i) % 20 + (2 * i) // 20) for i in range(n)]
    return [colormaps["viridis"](i / (n - 1)) for i in range(n)]


def _lines(
    ax: Any,
    run: Run,
    series: Callable[[NodeRun], tuple[Sequence[float], Sequence[float]]],
    *,
    log: bool = False,
    marker: str | None = None,
) -> bool:
    """One line per node; False if no node had a point."""
    from matplotlib.ticker import MaxNLocator

    drawn = False
    for node, colour in zip(run.nodes.values(), _colours(len(run.nodes)), strict=True):
        xs, ys = series(node)
        if log:
            kept = [(x, y) for x, y in zip(xs, ys, strict=True) if y > 0]
            xs, ys = [x for x, _ in kept], [y for _, y in kept]
        if not xs:
            continue
        ax.plot(xs, ys, label=node.node, color=colour, marker=marker, lw=1.2, ms=3)
        drawn = True
    if log and drawn:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    return drawn


def _legend(fig: Any, axes: list[Any], run: Run) -> None:
    if len(run.nodes) > LEGEND_MAX:
        return
    by_label: dict[str, Any] = {}
    for ax in axes:
        for line in ax.get_lines():
            label = str(line.get_label())
            if label in run.nodes:
                by_label.setdefault(label, line)
    labels = [n for n in run.nodes if n in by_label]
    handles = [by_label[n] for n in labels]
    if handles:
        fig.legend(
            handles, labels, loc="outside right upper", fontsize=8, title="node", frameon=False
        )


def _grid(n: int, cols: int = 3) -> tuple[int, int]:
    cols = min(cols, n)
    return math.ceil(n / cols), cols


def _finish(fig: Any, axes: list[Any], used: int, run: Run) -> bytes:
    for ax in axes[used:]:
        ax.set_visible(False)
    fig.set_layout_engine("constrained")
    _legend(fig, axes, run)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def accuracy_plot(run: Run) -> Plot | None:
    """Held-out accuracy per task per node (edu), or the error to the exact mean (consensus)."""
    if not run.evaluated:
        return _error_plot(run)
    tasks = sorted(
        {t for n in run.nodes.values() for _, rec in n.evaluations() for t in rec["tasks"]}
    )
    panels = [*tasks, "mean over tasks"]
    fig, axes = figure(*_grid(len(panels)), height=3.0)

    def task_acc(task: str) -> Callable[[NodeRun], tuple[list[int], list[float]]]:
        return lambda n: n.series(lambda rec: rec["tasks"][task]["acc"] if "tasks" in rec else None)

    for ax, task in zip(axes, tasks, strict=False):
        _lines(ax, run, task_acc(task), marker=".")
        ax.set_title(task, fontsize=10)
        ax.set_ylim(-0.02, 1.02)
    ax = axes[len(tasks)]
    _lines(ax, run, lambda n: n.series(lambda rec: rec.get("mean_acc")), marker=".")
    ax.set_title(panels[-1], fontsize=10)
    ax.set_ylim(-0.02, 1.02)
    for ax in axes[: len(panels)]:
        ax.set_xlabel("round", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
    return Plot(
        "accuracy",
        "Accuracy per task",
        "Held-out accuracy of every node on each of its tasks at each evaluation, and its mean "
        "over the node's tasks.",
        _finish(fig, axes, len(panels), run),
    )


def _error_plot(run: Run) -> Plot | None:
    if not any("error_to_mean" in rec for n in run.nodes.values() for rec in n.records):
        return None
    fig, axes = figure(1, 1, height=3.6)
    _lines(axes[0], run, lambda n: n.series(lambda rec: rec.get("error_to_mean")), log=True)
    axes[0].set_xlabel("round")
    axes[0].set_ylabel("||x - mean|| / ||mean||")
    return Plot(
        "error",
        "Error to the network mean",
        "Relative distance of every node's vector to the exact mean of all initial vectors "
        "(consensus workload), log scale.",
        _finish(fig, axes, 1, run),
    )


def distance_plot(run: Run) -> Plot | None:
    """The consensus distance each node measured to its neighbours, per round."""
    fig, axes = figure(1, 1, height=3.6)
    drawn = _lines(
        axes[0], run, lambda n: n.series(lambda rec: rec.get("consensus_distance")), log=True
    )
    if not drawn:
        return None
    axes[0].set_xlabel("round")
    axes[0].set_ylabel("relative distance")
    return Plot(
        "distance",
        "Consensus distance per node",
        "Largest distance of a neighbour's shared values to the node's own, relative to the "
        "node's, as measured in each round's mix (log scale; rounds where nothing was heard "
        "are left out).",
        _finish(fig, axes, 1, run),
    )


def bytes_plot(run: Run) -> Plot | None:
    """Cumulative bytes sent and received per node, over every session."""
    fig, axes = figure(1, 2, height=3.4)
    sent = _lines(axes[0], run, lambda n: _mb(n.cumulative("bytes_out")))
    received = _lines(axes[1], run, lambda n: _mb(n.cumulative("bytes_in")))
    if not (sent or received):
        return None
    for ax, what in zip(axes, ("sent", "received"), strict=True):
        ax.set_title(f"bytes {what}", fontsize=10)
        ax.set_xlabel("round")
        ax.set_ylabel("MB (cumulative)")
    return Plot(
        "bytes",
        "Bytes on the wire",
        "Bytes each node sent and received up to each round (all messages, all sessions of a "
        "restarted node added up).",
        _finish(fig, axes, 2, run),
    )


def _mb(series: tuple[list[int], list[float]]) -> tuple[list[int], list[float]]:
    return series[0], [v / 1e6 for v in series[1]]


def privacy_plot(run: Run) -> Plot | None:
    """Node-level epsilon spent per node over rounds (private nodes only)."""
    if not run.private:
        return None
    fig, axes = figure(1, 1, height=3.6)

    def eps(n: NodeRun) -> tuple[list[int], list[float]]:
        return n.series(lambda rec: rec["privacy"]["node_epsilon"])

    if not _lines(axes[0], run, eps):
        return None
    axes[0].set_xlabel("round")
    axes[0].set_ylabel("epsilon spent")
    return Plot(
        "privacy",
        "Privacy spent",
        "Differential-privacy epsilon each private node has spent (its accountant's "
        "node-level figure); nodes under the open profile spend none and are not drawn.",
        _finish(fig, axes, 1, run),
    )


def gaps_plot(run: Run) -> Plot | None:
    """Worst group accuracy gap over rounds, and the last gaps by attribute and task."""
    last: dict[tuple[str, str], list[float]] = {}
    for n in run.nodes.values():
        evals = [rec for _, rec in n.evaluations() if rec.get("gaps")]
        for attribute, per_task in (evals[-1]["gaps"] if evals else {}).items():
            for task, gap in (per_task or {}).items():
                if isinstance(gap, (int, float)):
                    last.setdefault((attribute, task), []).append(float(gap))
    if not last:
        return None
    fig, axes = figure(1, 2, height=3.8)
    _lines(axes[0], run, lambda n: n.series(lambda rec: rec.get("worst_group_gap")), marker=".")
    axes[0].set_title("worst group gap", fontsize=10)
    axes[0].set_xlabel("round")
    axes[0].set_ylabel("best - worst group accuracy")
    keys = sorted(last)
    means = [sum(last[k]) / len(last[k]) for k in keys]
    lows = [max(0.0, m - min(last[k])) for m, k in zip(means, keys, strict=True)]
    highs = [max(0.0, max(last[k]) - m) for m, k in zip(means, keys, strict=True)]
    ax = axes[1]
    ax.bar(range(len(keys)), means, yerr=[lows, highs], color="#4c72b0", capsize=3)
    ax.set_xticks(range(len(keys)), [f"{a}\n{t}" for a, t in keys], fontsize=7, rotation=45)
    ax.set_title("last evaluation: mean over nodes (bars: min to max)", fontsize=10)
    ax.set_ylabel("accuracy gap")
    ax.grid(alpha=0.3, axis="y")
    return Plot(
        "gaps",
        "Group gaps",
        "Difference between the best and the worst demographic group's held-out accuracy "
        "(groups with enough records), per node over rounds, and per attribute and task at "
        "the last evaluation.",
        _finish(fig, axes, 2, run),
    )


def round_time_plot(run: Run) -> Plot | None:
    """Seconds per round per node, and where the time went (mean per phase)."""

    def duration(rec: dict[str, Any]) -> float:
        timings = rec["timings"]
        if "total" in timings:
            return float(timings["total"])
        return sum(v for v in timings.values() if isinstance(v, (int, float)))

    phases: dict[str, dict[str, float]] = {}
    for n in run.nodes.values():
        timed = [
            rec["timings"] for rec in n.by_round.values() if isinstance(rec.get("timings"), dict)
        ]
        if timed:
            names = {k for t in timed for k in t} - {"total"}
            phases[n.node] = {k: sum(t.get(k, 0.0) for t in timed) / len(timed) for k in names}
    if not phases:
        return None
    fig, axes = figure(1, 2, height=3.6)
    _lines(axes[0], run, lambda n: n.series(duration))
    axes[0].set_title("seconds per round", fontsize=10)
    axes[0].set_xlabel("round")
    ax = axes[1]
    order = sorted({k for p in phases.values() for k in p})
    bottom = [0.0] * len(phases)
    for name in order:
        heights = [p.get(name, 0.0) for p in phases.values()]
        ax.bar(range(len(phases)), heights, bottom=bottom, label=name)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_xticks(range(len(phases)), list(phases), fontsize=7, rotation=60)
    ax.set_title("mean seconds per phase", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    return Plot(
        "time",
        "Round time",
        "Wall time of each round per node, and the mean time of each phase (local training, "
        "send, wait for neighbours, mix, evaluation and checkpoint).",
        _finish(fig, axes, 2, run),
    )


def all_plots(run: Run) -> list[Plot]:
    """Every plot the run has data for, in the report's order."""
    makers = (accuracy_plot, distance_plot, bytes_plot, privacy_plot, gaps_plot, round_time_plot)
    return [p for p in (make(run) for make in makers) if p is not None]

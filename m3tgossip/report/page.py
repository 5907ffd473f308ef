"""The report page: one self-contained HTML file (plots as base64 PNG, no external resource)
with what the run was, its plots and a per-node table."""

from __future__ import annotations

import base64
import html
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from m3tgossip.report.plots import Plot, all_plots
from m3tgossip.report.runs import NodeRun, Run, load_run

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
p.caption, p.note { color: #555; font-size: 0.9em; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; font-size: 0.9em; }
dt { font-weight: 600; }
img { max-width: 100%; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
td.bad { color: #b00; font-weight: 600; }
"""


def _fmt(value: Any, spec: str = ".3f") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    return format(value, spec)


def _about(run: Run) -> list[tuple[str, str]]:
    s = run.summary or {}
    rows = [
        ("source", ", ".join(str(p) for p in run.sources)),
        ("workload", run.workload),
        ("nodes", str(len(run.nodes))),
        ("rounds recorded", str(run.rounds)),
    ]
    for key, label in (
        ("topology", "topology"),
        ("mode", "gossip mode"),
        ("seed", "seed"),
        ("wall_seconds", "wall seconds"),
        ("final_consensus_error", "final consensus error"),
        ("measured_rounds", "rounds to target (measured)"),
        ("predicted_rounds", "rounds to target (predicted)"),
        ("final_mean_acc", "final mean accuracy"),
    ):
        if s.get(key) is not None:
            value = s[key]
            spec = ".3e" if "error" in key else ".3f"
            rows.append((label, _fmt(value, spec) if isinstance(value, float) else str(value)))
    for key in ("crashed", "hung", "killed", "byzantine"):
        if s.get(key):
            rows.append((key, ", ".join(map(str, s[key]))))
    return rows


def _tasks(run: Run) -> list[str]:
    return sorted(
        {t for n in run.nodes.values() for _, rec in n.evaluations() for t in rec["tasks"]}
    )


def _row(n: NodeRun, run: Run, tasks: list[str]) -> list[tuple[str, str]]:
    """(cell text, css class) of one node's row."""
    s = run.summary or {}
    sent = n.cumulative("bytes_out")[1]
    received = n.cumulative("bytes_in")[1]
    cells = [
        (n.node, ""),
        (str(len(n.by_round)), ""),
        (str(n.sessions), ""),
        (_fmt(sent[-1] / 1e6 if sent else None), ""),
        (_fmt(received[-1] / 1e6 if received else None), ""),
        (_fmt(n.last("consensus_distance"), ".2e"), ""),
    ]
    if run.workload == "consensus":
        cells.append((_fmt(n.last("error_to_mean"), ".2e"), ""))
    if run.evaluated:
        evals = n.evaluations()
        final = evals[-1][1]["tasks"] if evals else {}
        for t in tasks:
            cells.append((_fmt(final.get(t, {}).get("acc")), ""))
        first = evals[0][1].get("mean_acc") if evals else None
        last = evals[-1][1].get("mean_acc") if evals else None
        cells.append((f"{_fmt(first)} \u2192 {_fmt(last)}" if evals else "-", ""))
        cells.append((_fmt(n.last("worst_group_gap")), ""))
    if run.private:
        privacy = n.last("privacy")
        eps = privacy.get("node_epsilon") if isinstance(privacy, dict) else None
        cells.append((_fmt(eps), ""))
    if run.summary is not None:
        codes = s.get("exit_codes", {}).get(n.node)
        flags = [k for k in ("crashed", "hung", "killed", "byzantine") if n.node in s.get(k, [])]
        bad = any(f in ("crashed", "hung") for f in flags)
        text = str(codes) + (f" ({', '.join(flags)})" if flags else "")
        cells.append((text, "bad" if bad else ""))
    return [(html.escape(c), k) for c, k in cells]


def table(run: Run) -> str:
    """The per-node table as HTML."""
    tasks = _tasks(run) if run.evaluated else []
    head = ["node", "rounds", "sessions", "sent MB", "received MB", "consensus distance"]
    if run.workload == "consensus":
        head.append("error to mean")
    if run.evaluated:
        head += [f"acc {t}" for t in tasks] + ["mean acc first \u2192 last", "worst group gap"]
    if run.private:
        head.append("epsilon")
    if run.summary is not None:
        head.append("exit codes")
    lines = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for n in run.nodes.values():
        cells = "".join(
            f'<td class="{k}">{c}</td>' if k else f"<td>{c}</td>" for c, k in _row(n, run, tasks)
        )
        lines.append(f"<tr>{cells}</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def render(run: Run, plots: Iterable[Plot]) -> str:
    """The whole page."""
    plots = list(plots)
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(run.title)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(run.title)}</h1>",
        f'<p class="note">written {time.strftime("%Y-%m-%d %H:%M:%S %Z")} by m3tgossip report</p>',
        "<dl>",
    ]
    out += [f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in _about(run)]
    out.append("</dl>")
    for plot in plots:
        data = base64.b64encode(plot.png).decode("ascii")
        out += [
            f'<h2 id="{plot.key}">{html.escape(plot.title)}</h2>',
            f'<p class="caption">{html.escape(plot.caption)}</p>',
            f'<img alt="{html.escape(plot.title)}" src="data:image/png;base64,{data}">',
        ]
    keys = {p.key for p in plots}
    if run.workload != "consensus" and not run.evaluated:
        out.append('<p class="note">No node recorded a workload evaluation.</p>')
    if "privacy" not in keys:
        out.append(
            '<p class="note">No node recorded privacy accounting (every node shared under the '
            "open profile, or nothing it shares is private).</p>"
        )
    out += ['<h2 id="nodes">Nodes</h2>', table(run), "</body></html>", ""]
    return "\n".join(out)


def write_report(
    paths: Iterable[str | Path], out: str | Path | None = None, title: str | None = None
) -> tuple[Path, Run]:
    """Read the run under `paths`, draw its plots and write the page to `out` (default
    `<first path>/report.html`); returns the file written and the run."""
    run = load_run(paths, title)
    plots = all_plots(run)
    first = run.sources[0]
    target = Path(out) if out else (first if first.is_dir() else first.parent) / "report.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render(run, plots), encoding="utf-8")
    return target, run

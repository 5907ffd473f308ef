"""HTML reports of runs: `m3tgossip report RUN_DIR` (plots need the `plot` extra)."""

from m3tgossip.report.page import render, table, write_report
from m3tgossip.report.plots import Plot, all_plots
from m3tgossip.report.runs import NodeRun, Run, load_run, node_folders

__all__ = [
    "NodeRun",
    "Plot",
    "Run",
    "all_plots",
    "load_run",
    "node_folders",
    "render",
    "table",
    "write_report",
]

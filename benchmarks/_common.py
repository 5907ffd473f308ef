"""What every benchmark shares: its command line, the machine and load it ran on, testbed runs,
and its JSON and PNG files in `--out`.

The benchmarks import the installed package (`pip install -e '.[plot]'`) and are run as
`python benchmarks/NAME.py`, so this module is found next to them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from m3tgossip.errors import ConfigError
from m3tgossip.harness import Summary, Testbed, TestbedSpec, bar_iter
from m3tgossip.harness.testbed_spec import parse_args as testbed_args

T = TypeVar("T")

#: the repository (its topology/ folder holds the specs the benchmarks run on)
ROOT = Path(__file__).resolve().parent.parent


def parser(doc: str | None, out: str | None, *, load: bool = False) -> argparse.ArgumentParser:
    """A benchmark's command line, described by the first paragraph of `doc`, with `--out`,
    the folder for its JSON, PNG and runs (default `out`; required if None); with `load` also
    `--load-threshold` and `--max-wait` for `wait_for_load`."""
    p = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    if out is None:
        p.add_argument("--out", required=True, help="folder for JSON, PNG and runs")
    else:
        p.add_argument("--out", default=out, help=f"folder for JSON, PNG and runs (default {out})")
    if load:
        p.add_argument(
            "--load-threshold",
            type=float,
            default=4.0,
            help="wait until the 1-minute load average is below this before measuring",
        )
        p.add_argument(
            "--max-wait", type=float, default=600.0, help="longest wait for the load to drop (s)"
        )
    return p


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def machine() -> dict[str, Any]:
    """The machine a benchmark runs on, as its JSON records it."""
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def setup(out: str | Path, text: str) -> Path:
    """Create the output folder and print the setup line (`setup: TEXT`) and the machine with
    its load average, so both are read with the numbers; returns the folder."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    m = machine()
    print(f"setup: {text}", flush=True)
    print(
        f"machine: {m['platform']}, {m['cpus']} CPUs, python {m['python']}, "
        f"load average {loadavg()}",
        flush=True,
    )
    return folder


def wait_for_load(threshold: float, max_wait_s: float, poll_s: float = 30.0) -> dict[str, Any]:
    """Wait (polling) until the 1-minute load is below `threshold`, at most `max_wait_s`."""
    start = time.monotonic()
    before = loadavg()
    while os.getloadavg()[0] >= threshold and time.monotonic() - start < max_wait_s:
        print(f"  load {loadavg()} >= {threshold:g}: waiting {poll_s:g} s", flush=True)
        time.sleep(poll_s)
    return {"before": before, "after": loadavg(), "waited_s": round(time.monotonic() - start, 1)}


#: two-sided 95% Student t quantiles by degrees of freedom (1.96 beyond the table)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def interval(xs: Iterable[float | None]) -> dict[str, Any]:
    """Mean, 95% half-width (Student t over the values; None for one value) and the values;
    None and non-finite values are left out."""
    vals = [float(x) for x in xs if x is not None and math.isfinite(x)]
    if not vals:
        return {"mean": None, "ci95": None, "n": 0, "values": []}
    half = None
    if len(vals) > 1:
        t = T95.get(len(vals) - 1, 1.96)
        half = t * statistics.stdev(vals) / math.sqrt(len(vals))
    return {"mean": statistics.fmean(vals), "ci95": half, "n": len(vals), "values": vals}


def each_run(items: Iterable[T], desc: str) -> Iterator[T]:
    """The items of a benchmark's loop over runs, with a progress bar while stderr is a
    terminal (each testbed run shows its own bar of rounds below it); plain otherwise."""
    return bar_iter(items, desc, unit="run")


def run_testbed(spec: TestbedSpec) -> tuple[Summary, float]:
    """One testbed run (RuntimeError or TimeoutError if its daemons do not come up): its
    summary and its wall seconds, key generation and start-up included."""
    t0 = time.monotonic()
    summary = Testbed(spec).run()
    return summary, time.monotonic() - t0


def completed_run(folder: Path, spec: TestbedSpec) -> Summary | None:
    """The summary of a finished, healthy run of `spec` in `folder` (its `bench-run.json`, if
    there, holding the same testbed command line), else None: a benchmark reuses it."""
    try:
        summary = Summary.read(folder / "summary.json")
    except (OSError, ValueError, TypeError):
        return None
    record = folder / "bench-run.json"
    if record.exists():
        try:
            if testbed_args(json.loads(record.read_text()).get("argv")) != spec:
                return None
        except (SystemExit, ConfigError, TypeError, ValueError):
            return None  # not a testbed command line
    if summary.crashed or summary.hung or summary.rounds != spec.rounds:
        return None
    if summary.seed != spec.seed or min(summary.rounds_done.values(), default=0) < spec.rounds:
        return None
    return summary


def write_json(out: Path, name: str, data: Any, **dumps: Any) -> Path:
    """Write `data` to OUT/NAME.json (indented); returns the path."""
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, **dumps))
    return path


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or None (with a note) if it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    return plt


def save_png(fig: Any, out: Path, name: str, dpi: int = 120) -> Path:
    """Lay a matplotlib figure out tight, save it to OUT/NAME.png and close it; returns the
    path."""
    import matplotlib.pyplot as plt

    path = out / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path

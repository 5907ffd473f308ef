"""Helpers shared by the benchmarks: machine load (recorded with their numbers) and plotting."""

from __future__ import annotations

import os
import time
from typing import Any


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def wait_for_load(threshold: float, max_wait_s: float, poll_s: float = 30.0) -> dict[str, Any]:
    """Wait (polling) until the 1-minute load is below `threshold`, at most `max_wait_s`."""
    start = time.monotonic()
    before = loadavg()
    while os.getloadavg()[0] >= threshold and time.monotonic() - start < max_wait_s:
        print(f"  load {loadavg()} >= {threshold:g}: waiting {poll_s:g} s", flush=True)
        time.sleep(poll_s)
    return {"before": before, "after": loadavg(), "waited_s": round(time.monotonic() - start, 1)}


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

"""Machine-load helpers shared by the benchmarks: they record the load with their numbers."""

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

"""Shared fixtures: child processes started by a test are always reaped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: bound on any single wait for a child process in the tests
WAIT_S = 60.0


class Children:
    """Processes a test started; anything still running at teardown is killed and reaped."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def node(self, *args: str, log: Path | None = None) -> subprocess.Popen:
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        stderr = open(log, "ab") if log else subprocess.DEVNULL
        proc = subprocess.Popen(
            [sys.executable, "-m", "m3tgossip", "node", *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            env=env,
            text=True,
        )
        if log:
            stderr.close()
        self.procs.append(proc)
        return proc

    def reap(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            try:
                proc.wait(timeout=WAIT_S)
            except subprocess.TimeoutExpired:  # pragma: no cover
                pass
            if proc.stdout:
                proc.stdout.close()


@pytest.fixture
def children() -> Iterator[Children]:
    kids = Children()
    try:
        yield kids
    finally:
        kids.reap()


def read_ready(proc: subprocess.Popen, timeout: float = WAIT_S) -> dict:
    """Read stdout lines until the READY line (bounded); return its JSON payload."""
    import json
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                continue
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"node exited ({proc.wait(timeout=WAIT_S)}) before READY")
            if line.startswith("READY "):
                return json.loads(line[len("READY ") :])
    finally:
        sel.close()
    raise AssertionError(f"no READY line within {timeout} s")

"""Checkpoints and metrics survive SIGKILL at any point of writing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from m3tgossip.daemon import checkpoint
from m3tgossip.daemon.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent

WRITER = """
import sys, numpy as np
from m3tgossip.daemon import checkpoint
from m3tgossip.daemon.metrics import MetricsWriter
folder = sys.argv[1]
m = MetricsWriter(folder + "/metrics.jsonl")
big = np.random.default_rng(0).standard_normal(2_000_000)
r = 0
while True:
    big[0] = r
    checkpoint.save(folder, {"x": big}, {"round": r})
    m.write({"round": r, "payload": "y" * 5000})
    if r == 0:
        print("go", flush=True)
    r += 1
"""


@pytest.mark.multiprocess
def test_checkpoint_and_metrics_survive_sigkill_while_writing(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rng = np.random.default_rng(1)
    last_round = -1
    for attempt in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path)],
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        try:
            assert proc.stdout.readline().strip() == "go"
            time.sleep(float(rng.uniform(0.05, 0.6)))  # kill at an arbitrary point of a write
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
            proc.stdout.close()
        found = checkpoint.load(tmp_path)
        assert found is not None, f"attempt {attempt}: checkpoint lost"
        arrays, meta = found
        assert arrays["x"].shape == (2_000_000,)
        assert arrays["x"][0] == meta["round"]  # data and metadata belong together
        records = read_metrics(tmp_path / "metrics.jsonl")
        assert records and all(r["payload"] == "y" * 5000 for r in records)
        last_round = meta["round"]
    assert last_round >= 0
    assert not list(tmp_path.glob(".*.tmp"))  # load() cleared the stray temporary files

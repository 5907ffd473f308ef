"""`m3tgossip forget` against running daemons over CURVE: the operator's request is answered,
a node that leaves stops and its neighbours write their reports and go on without it.

Every wait is bounded and every child is reaped by the `children` fixture."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import WAIT_S
from test_node import start, status, write_spec

from m3tgossip import cli

pytestmark = pytest.mark.multiprocess


def wait_for(what: str, check, wait_s: float = WAIT_S):
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {wait_s} s")


def test_forget_a_node_over_curve(children, tmp_path: Path, capsys) -> None:
    spec = write_spec(tmp_path, "cycle", 3)
    nodes = {nid: start(children, spec, nid, tmp_path) for nid in ("n0", "n1", "n2")}
    for nid, (_, ready, _) in nodes.items():
        wait_for(
            f"round 2 at {nid}",
            lambda e=ready["endpoint"], n=nid: status(tmp_path, n, e)["round"] >= 2,
        )
    key = str(tmp_path / "operator" / "ops")
    ask = ["forget", "--topology", str(spec), "--key", key]

    # the consensus workload holds no learners: refused, and the node says why
    state_dir = ["forget", "--state-dir", str(nodes["n0"][2]), "--key", key]
    assert cli.main([*state_dir, "--learner", "17"]) == 1
    answer = json.loads(capsys.readouterr().out)
    assert not answer["accepted"] and "cannot erase learners" in answer["reason"]
    # a node may erase only itself
    assert cli.main([*ask, "--id", "n0", "--node", "n2"]) == 2

    assert cli.main([*ask, "--id", "n2", "--node", "n2"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["accepted"], answer
    assert nodes["n2"][0].wait(timeout=WAIT_S) == 0  # it left for good

    for nid in ("n0", "n1"):
        folder = nodes[nid][2]
        found = wait_for(f"erasure report of {nid}", lambda f=folder: list(f.glob("erasure-*")))
        report = json.loads(found[0].read_text())
        assert report["request"] == answer["request"]
        assert report["origin"] == "n2" and report["target"] == "node"
        endpoint = nodes[nid][1]["endpoint"]
        state = status(tmp_path, nid, endpoint)
        assert state["erasures"]["accepted"] == [answer["request"]]
        assert state["neighbours"]["n2"]["left"]
        before = state["round"]
        wait_for(
            f"{nid} going on",
            lambda e=endpoint, n=nid, b=before: status(tmp_path, n, e)["round"] > b + 2,
        )

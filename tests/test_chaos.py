"""Chaos runner: the nemesis schedule is seeded, the digest spread is what the verdict says,
and a short run under loss, a SIGKILL/restart and a SIGSTOP/SIGCONT ends with a passing verdict
and nothing left behind (a partition run too, where network namespaces are available)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from m3tgossip.harness import chaos
from m3tgossip.topology import load_topology

ROOT = Path(__file__).resolve().parent.parent

RING8 = str(ROOT / "topology" / "ring-8.toml")


def _adjacency(path: str) -> tuple[list[str], dict[str, list[str]]]:
    topo = load_topology(path)
    return topo.ids(), {n: list(topo.neighbours(n)) for n in topo.ids()}


def test_nemesis_schedule_is_deterministic_for_a_seed() -> None:
    nodes, adj = _adjacency(str(ROOT / "topology" / "torus-16.toml"))
    a = chaos.plan_nemesis(nodes, adj, 60.0, seed=7)
    b = chaos.plan_nemesis(nodes, adj, 60.0, seed=7)
    c = chaos.plan_nemesis(nodes, adj, 60.0, seed=8)
    assert a == b
    assert a != c
    kills = [f for f in a if f.kind == "kill"]
    stops = [f for f in a if f.kind == "stop"]
    parts = [f for f in a if f.kind == "partition"]
    assert len(kills) == 4 and len(stops) == 2 and len(parts) == 1
    assert not {f.nodes[0] for f in kills} & {f.nodes[0] for f in stops}
    heal = chaos.HEAL_AT * 60.0
    for f in a:
        assert chaos.NEMESIS_START * 60.0 <= f.at and f.at + f.duration <= heal + 1e-9
    # the partitioned side is connected within itself
    side = set(parts[0].nodes)
    assert len(side) == 4
    reached, todo = set(), [next(iter(side))]
    while todo:
        n = todo.pop()
        reached.add(n)
        todo += [m for m in adj[n] if m in side and m not in reached]
    assert reached == side


def test_nemesis_never_picks_excluded_nodes() -> None:
    nodes, adj = _adjacency(RING8)
    plan = chaos.plan_nemesis(
        nodes, adj, 30.0, seed=3, kill_fraction=0.5, stop_fraction=0.25, exclude=("n0", "n1")
    )
    assert all(f.nodes[0] not in ("n0", "n1") for f in plan if f.kind in ("kill", "stop"))


def test_digest_spread() -> None:
    same = {"a": {"digest": {"c": [1.0, 2.0]}}, "b": {"digest": {"c": [1.0, 2.0]}}}
    assert chaos.digest_spread(same)["spread"] == 0.0
    apart = {"a": {"digest": {"c": [1.0, 0.0]}}, "b": {"digest": {"c": [3.0, 0.0]}}}
    s = chaos.digest_spread(apart)
    assert s["spread"] == pytest.approx(0.5)  # mean 2, each node 1 away
    assert chaos.digest_spread({"a": same["a"]})["spread"] is None


def _assert_clean(verdict: dict, out) -> None:
    for name in chaos.CHECKS:
        assert name in verdict["checks"], name
        assert "passed" in verdict["checks"][name]
    left = chaos.processes_mentioning(str(out / "nodes"))
    assert left == []


def test_short_chaos_run_on_loopback(tmp_path) -> None:
    out = tmp_path / "run"
    code = chaos.main(
        [
            "--topology",
            RING8,
            "--workload",
            "consensus",
            "--duration",
            "14",
            "--seed",
            "3",
            "--out",
            str(out),
            "--net",
            "loopback",
            "--loss",
            "0.1",
            "--kill-fraction",
            "0.125",
            "--stop-fraction",
            "0.125",
            "--settle-timeout",
            "40",
            "-o",
            "size=128",
            "--quiet",
        ]
    )
    verdict = json.loads((out / "verdict.json").read_text())
    _assert_clean(verdict, out)
    assert verdict["passed"], verdict["failed"]
    assert code == 0
    assert verdict["faults_injected"]["sigkill"] == 1 and verdict["faults_injected"]["restart"] == 1
    assert verdict["faults_injected"]["sigstop"] == 1
    assert verdict["faults_injected"].get("partition-skipped") == 1
    conv = verdict["checks"]["converged"]
    assert conv["spread"] <= 1e-4 and "error_to_mean_max" in conv and "definition" in conv
    restart = verdict["checks"]["resumed_from_checkpoint"]["restarts"][0]
    assert restart["resumed_round"] == restart["checkpoint_round_at_kill"]
    events = [json.loads(line)["event"] for line in (out / "faults.jsonl").read_text().splitlines()]
    for e in (
        "setup",
        "message-loss",
        "sigkill",
        "restart",
        "sigstop",
        "sigcont",
        "healed",
        "settled",
        "stopped",
    ):
        assert e in events


NETNS, WHY = chaos.netns_available() if os.geteuid() == 0 else (False, "not root")


@pytest.mark.skipif(not NETNS, reason=f"network namespaces not available: {WHY}")
def test_partition_in_namespaces_heals(tmp_path) -> None:
    out = tmp_path / "ns"
    code = chaos.main(
        [
            "--topology",
            RING8,
            "--workload",
            "consensus",
            "--duration",
            "20",
            "--seed",
            "4",
            "--out",
            str(out),
            "--net",
            "netns",
            "--loss",
            "0.0",
            "--kill-fraction",
            "0",
            "--stop-fraction",
            "0",
            "--partition-s",
            "8",
            "--settle-timeout",
            "40",
            "-o",
            "size=128",
            "--quiet",
        ]
    )
    verdict = json.loads((out / "verdict.json").read_text())
    _assert_clean(verdict, out)
    assert verdict["net"] == "netns"
    assert (
        verdict["faults_injected"]["partition"] == 1
        and verdict["faults_injected"]["heal-partition"] == 1
    )
    assert verdict["checks"]["network_cleaned"]["passed"]
    assert verdict["passed"], verdict["failed"]
    assert code == 0
    # the partition had an effect: every cut node with a neighbour across the cut closed at
    # least one round that started after the cut hearing nobody from the other side
    faults = [json.loads(line) for line in (out / "faults.jsonl").read_text().splitlines()]
    cut = next(f for f in faults if f["event"] == "partition")
    healed = next(f for f in faults if f["event"] == "heal-partition")
    side = set(cut["nodes"])
    topo = load_topology(RING8)
    from m3tgossip.daemon.metrics import read_metrics

    for n in side:
        if not set(topo.neighbours(n)) - side:
            continue
        recs = read_metrics(out / "nodes" / n / "metrics.jsonl")
        inside = [
            rec
            for prev, rec in zip(recs, recs[1:])
            if cut["time"] < prev["time"] and rec["time"] < healed["time"]
        ]
        assert any(set(rec["heard"]) <= side for rec in inside), (n, [r["heard"] for r in inside])
    assert np.isfinite(verdict["checks"]["converged"]["spread"])

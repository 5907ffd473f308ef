"""The harness: testbed and chaos specs and the summary format; the chaos runner: the nemesis
schedule is seeded, the digest spread is what the verdict says, and a short run under loss, a
SIGKILL/restart and a SIGSTOP/SIGCONT ends with a passing verdict and nothing left behind (a
partition run too, where network namespaces are available)."""

from __future__ import annotations

import json
import os
import signal
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from m3tgossip.daemon.metrics import read_metrics
from m3tgossip.errors import ConfigError
from m3tgossip.harness import (
    ChaosSpec,
    Summary,
    TestbedSpec,
    chaos,
    format_summary,
    nemesis,
    netlab,
    testbed,
    testbed_spec,
)
from m3tgossip.harness.summary import summarise
from m3tgossip.harness.verdict import CHECKS, digest_spread, processes_mentioning
from m3tgossip.topology import load_topology

ROOT = Path(__file__).resolve().parent.parent

RING8 = str(ROOT / "topology" / "ring-8.toml")


def _adjacency(path: str) -> tuple[list[str], dict[str, list[str]]]:
    topo = load_topology(path)
    return topo.ids(), {n: list(topo.neighbours(n)) for n in topo.ids()}


# ------------------------------------------------------------------------- testbed spec


def test_testbed_command_line_parses_into_a_spec_and_back() -> None:
    argv = [
        "--topology",
        RING8,
        "--out",
        "runs/x",
        "--rounds",
        "12",
        "--mode",
        "push-sum",
        "-o",
        "size=128",
        "-o",
        "dtype=float32",
        "--set",
        "gossip.overlap=true",
        "--set",
        "gossip.compression=topk:0.1",
        "--set",
        "faults.drop=0.1",
        "--node-set",
        "n3:faults.attack=alie",
        "--node-set",
        "n4:faults.attack=",
        "--kill",
        "n1@8",
        "--restart-after",
        "0.5",
        "--ready-timeout",
        "900",
        "--quiet",
    ]
    spec = testbed_spec.parse_args(argv)
    assert spec.topology == Path(RING8) and spec.out == Path("runs/x") and spec.rounds == 12
    assert spec.options == {"size": 128, "dtype": "float32"}
    assert spec.settings == {
        "gossip.overlap": True,
        "gossip.compression": "topk:0.1",
        "faults.drop": 0.1,
    }
    assert spec.kills == {"n1": 8} and spec.restart_after == 0.5 and spec.ready_timeout_s == 900
    assert spec.byzantine == ["n3"]  # an empty attack is no attack
    assert testbed_spec.parse_args(spec.argv()) == spec
    # a daemon reads back the values the spec holds, its own settings after everyone's
    args = spec.node_args("n3")
    assert args[::2] == ["-o", "-o", "--set", "--set", "--set", "--set"]
    assert [testbed_spec.parse_assignment(a) for a in args[1::2]] == [
        ("size", 128),
        ("dtype", "float32"),
        ("gossip.overlap", True),
        ("gossip.compression", "topk:0.1"),
        ("faults.drop", 0.1),
        ("faults.attack", "alie"),
    ]


@pytest.mark.parametrize(
    "value",
    ["true", 'a "quoted" \\ path\n', "x\x7fy", "", 1e-06, float("inf"), -3, True, [1, "a", 2.5]],
)
def test_setting_values_reach_the_daemon_unchanged(value) -> None:
    assert testbed_spec.parse_value(testbed_spec.toml_value(value)) == value


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("rounds", -1, "rounds: must be a whole number >= 0, got -1"),
        ("rounds", 2.5, "rounds: must be a whole number"),
        ("workload", "chess", "workload: one of consensus, edu, got 'chess'"),
        ("mode", "gossip", "mode: one of sync, "),
        ("deadline", 0, "deadline: must be a number > 0, got 0"),
        ("ready_timeout_s", float("nan"), "ready_timeout_s: must be a number > 0"),
        ("timeout", True, "timeout: must be a number"),
        ("settings", {"drop": 0.1}, r"settings\['drop'\]: expected TABLE.KEY"),
        ("options", {"size": object()}, r"options\['size'\]: no TOML value for object"),
        ("kills", {"n1": -2}, r"kills\['n1'\]: must be a whole number >= 0"),
        ("node_settings", {"n1": {"x=y": 1}}, r"node_settings\['n1'\]\['x=y'\]: a key is"),
        ("out", "", "out: must be a path"),
    ],
)
def test_a_bad_testbed_spec_names_the_field(field, value, match) -> None:
    kw = {"topology": RING8, "out": "runs/x", field: value}
    with pytest.raises(ConfigError, match=f"^testbed spec: {match}"):
        TestbedSpec(**kw)


def test_a_bad_chaos_spec_names_the_field() -> None:
    with pytest.raises(ConfigError, match="^chaos spec: loss: must be a number >= 0 and <= 1"):
        ChaosSpec(topology=RING8, out="runs/x", loss=1.5)
    with pytest.raises(ConfigError, match="^chaos spec: net: one of auto, netns, loopback"):
        ChaosSpec(topology=RING8, out="runs/x", net="wifi")
    with pytest.raises(ConfigError, match=r"^testbed spec: settings\['drop'\]"):
        ChaosSpec(topology=RING8, out="runs/x", settings={"drop": 0.5})
    spec = ChaosSpec(topology=RING8, out="runs/x", loss=0.2, settings={"faults.seed": 9})
    bed = spec.testbed()
    assert bed.rounds == 0 and bed.quiet and bed.out == Path("runs/x").resolve()
    assert bed.settings == {
        "faults.drop": 0.2,
        "faults.seed": 9,
        "gossip.startup_grace_s": 5.0,
        "gossip.checkpoint_interval_s": 0.0,
    }


def test_testbed_rejects_unknown_nodes_before_writing_anything(tmp_path, capsys) -> None:
    out = tmp_path / "bed"
    for kw in ({"kills": {"n9": 3}}, {"node_settings": {"n9": {"faults.attack": "alie"}}}):
        with pytest.raises(ConfigError, match=r"\['n9'\]: no such node in .*; nodes are n0, "):
            testbed.Testbed(TestbedSpec(topology=RING8, out=out, **kw))
    assert testbed.main(["--topology", RING8, "--out", str(out), "--kill", "n9@3"]) == 2
    assert "testbed: error: testbed spec: kills['n9']: no such node" in capsys.readouterr().err
    assert not out.exists()


def _write_metrics(folder: Path, records: list[dict]) -> Path:
    folder.mkdir(parents=True)
    lines = "".join(json.dumps(r) + "\n" for r in records)
    (folder / "metrics.jsonl").write_text(lines)
    return folder


def test_free_ports_are_outside_the_ephemeral_range(monkeypatch, tmp_path) -> None:
    """Picked ports cannot be taken by an outgoing connection before their daemon binds."""
    from m3tgossip.harness import testbed

    span = testbed.listen_range()
    low, high = (int(v) for v in testbed.EPHEMERAL_RANGE.read_text().split())
    assert not set(span) & set(range(low, high + 1))
    assert testbed.free_ports(0) == []
    ports = testbed.free_ports(20)
    assert len(set(ports)) == 20 and all(p in span for p in ports)
    run = testbed.free_ports(16, consecutive=True)
    assert run == list(range(run[0], run[0] + 16))
    fake = tmp_path / "range"
    fake.write_text("1024\t60999\n")
    monkeypatch.setattr(testbed, "EPHEMERAL_RANGE", fake)
    assert testbed.listen_range() == range(61000, 65536)


def test_summary_of_metrics_files(tmp_path) -> None:
    spec_path = tmp_path / "r3.toml"
    spec_path.write_text('name = "r3"\n[generator]\nkind = "cycle"\nn = 3\n')
    topo = load_topology(spec_path)
    spec = TestbedSpec(topology=spec_path, out=tmp_path, rounds=3, target=0.05, kills={"n1": 1})

    def rec(r: int, session: str, out: int, err: float, **kw) -> dict:
        timings = {"local": 0.5, "total": 1.0 + r}
        return {
            "round": r,
            "session": session,
            "bytes_out": out,
            "bytes_in": out // 2,
            "error_to_mean": err,
            "timings": timings,
            **kw,
        }

    records = {
        "n0": [rec(0, "a", 100, 0.5, initial_error=0.3), rec(1, "a", 200, 0.1)],
        # SIGKILLed after round 1 and restarted: counters start again with the new session
        "n1": [rec(0, "b", 100, 0.4, initial_error=0.4), rec(1, "b", 200, 0.2)],
        "n2": [rec(0, "d", 100, 0.3), rec(1, "d", 250, 0.1)],
    }
    records["n0"].append(rec(2, "a", 300, 0.01))
    records["n1"] += [rec(1, "c", 50, 0.2), rec(2, "c", 150, 0.04)]
    folders = {n: _write_metrics(tmp_path / n, recs) for n, recs in records.items()}
    codes = {"n0": [0], "n1": [-signal.SIGKILL, 0], "n2": [1]}
    s = summarise(spec, topo, folders, codes, killed=["n1"], wall=12.34567, hung=[])
    assert s.crashed == ["n2"] and s.killed == ["n1"] and s.exit_code == 1
    assert s.rounds_done == {"n0": 3, "n1": 3, "n2": 2}
    assert s.bytes_sent == {"n0": 300, "n1": 350, "n2": 250}
    assert s.consensus_error == [0.5, 0.2, 0.04] and s.measured_rounds == 3
    assert s.initial_error == pytest.approx(0.5) and s.wall_seconds == 12.346
    assert s.bytes_per_round_per_node[0] == 100  # every node's first round
    assert s.round_breakdown_s == {"local": 0.5, "total": pytest.approx(17 / 9)}  # 9 records
    assert s.round_breakdown_after_start_s == {"local": 0.5, "total": 3.0}  # n0's third round
    assert s.per_node is None and s.final_mean_acc is None
    keys = list(s.to_dict())
    assert keys[:3] == ["topology", "nodes", "edges"] and keys[-2:] == [
        "predicted_rounds",
        "measured_rounds",
    ]
    assert "per_node" not in keys and "round_breakdown_after_start_s" in keys
    s.write(tmp_path / "summary.json")
    assert json.loads((tmp_path / "summary.json").read_text()) == s.to_dict()
    assert Summary.read(tmp_path / "summary.json") == s
    table = format_summary(s)
    assert "rounds to 0.05: measured 3" in table and "CRASHED: n2" in table
    assert "killed by the testbed: n1" in table


def test_summary_of_an_evaluated_workload(tmp_path) -> None:
    topo = load_topology(RING8)
    attack = {"n7": {"faults.attack": "huge"}}
    spec = TestbedSpec(topology=RING8, out=tmp_path, workload="edu", rounds=2, node_settings=attack)
    evals = {"tasks": {"at_risk": {"acc": 0.75, "f1": 0.5}}}
    folders = {}
    for i, n in enumerate(topo.ids()):
        last = {"round": 1, "mean_acc": 0.5 + i / 100, **evals}
        folders[n] = _write_metrics(tmp_path / n, [{"round": 0}, last])
    s = summarise(spec, topo, folders, {n: [0] for n in folders}, killed=[], wall=1.0, hung=[])
    assert s.byzantine == ["n7"] and s.exit_code == 0
    assert s.final_mean_acc == pytest.approx(0.5 + sum(range(7)) / 700)  # n7 left out
    assert s.per_node["n0"]["rounds"] == [1] and s.per_node["n0"]["final"] == evals["tasks"]
    assert s.round_breakdown_s is None and s.consensus_error is None
    keys = list(s.to_dict())
    assert keys[-2:] == ["per_node", "final_mean_acc"] and "round_breakdown_s" not in keys
    assert "measured_rounds" not in keys
    assert "mean over nodes of final mean accuracy" in format_summary(s)


# ------------------------------------------------------------------------------ chaos


def test_nemesis_schedule_is_deterministic_for_a_seed() -> None:
    nodes, adj = _adjacency(str(ROOT / "topology" / "torus-16.toml"))
    a = nemesis.plan_nemesis(nodes, adj, 60.0, seed=7)
    b = nemesis.plan_nemesis(nodes, adj, 60.0, seed=7)
    c = nemesis.plan_nemesis(nodes, adj, 60.0, seed=8)
    assert a == b
    assert a != c
    kills = [f for f in a if f.kind == "kill"]
    stops = [f for f in a if f.kind == "stop"]
    parts = [f for f in a if f.kind == "partition"]
    assert len(kills) == 4 and len(stops) == 2 and len(parts) == 1
    assert not {f.nodes[0] for f in kills} & {f.nodes[0] for f in stops}
    heal = nemesis.HEAL_AT * 60.0
    for f in a:
        assert nemesis.NEMESIS_START * 60.0 <= f.at and f.at + f.duration <= heal + 1e-9
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
    plan = nemesis.plan_nemesis(
        nodes, adj, 30.0, seed=3, kill_fraction=0.5, stop_fraction=0.25, exclude=("n0", "n1")
    )
    assert all(f.nodes[0] not in ("n0", "n1") for f in plan if f.kind in ("kill", "stop"))


def test_digest_spread() -> None:
    same = {"a": {"digest": {"c": [1.0, 2.0]}}, "b": {"digest": {"c": [1.0, 2.0]}}}
    assert digest_spread(same)["spread"] == 0.0
    apart = {"a": {"digest": {"c": [1.0, 0.0]}}, "b": {"digest": {"c": [3.0, 0.0]}}}
    s = digest_spread(apart)
    assert s["spread"] == pytest.approx(0.5)  # mean 2, each node 1 away
    assert digest_spread({"a": same["a"]})["spread"] is None


def _assert_clean(verdict: dict, out) -> None:
    for name in CHECKS:
        assert name in verdict["checks"], name
        assert "passed" in verdict["checks"][name]
    left = processes_mentioning(str(out / "nodes"))
    assert left == []


@pytest.mark.multiprocess
def test_short_chaos_run_on_loopback(tmp_path) -> None:
    # seed 1 kills n2 and stops n5, far apart on the ring; a plan that takes both neighbours
    # of a node down at once (seed 3: n3 and n5 around n4) leaves that node running rounds on
    # its own, and on a loaded machine the settle timeout can end before it is back in step
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
            "1",
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


NETNS, WHY = netlab.netns_available() if os.geteuid() == 0 else (False, "not root")


@pytest.mark.multiprocess
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
    for n in side:
        if not set(topo.neighbours(n)) - side:
            continue
        recs = read_metrics(out / "nodes" / n / "metrics.jsonl")
        inside = [
            rec
            for prev, rec in pairwise(recs)
            if cut["time"] < prev["time"] and rec["time"] < healed["time"]
        ]
        assert any(set(rec["heard"]) <= side for rec in inside), (n, [r["heard"] for r in inside])
    assert np.isfinite(verdict["checks"]["converged"]["spread"])

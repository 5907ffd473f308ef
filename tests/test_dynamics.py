"""Time-varying topologies: one-peer exponential graphs and s-out peer sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from m3tgossip import cli
from m3tgossip.errors import ConfigError
from m3tgossip.harness import Testbed, TestbedSpec
from m3tgossip.topology import (
    check_report,
    format_report,
    load_topology,
    round_plan,
    round_plans,
    time_varying_rounds,
)

SPECS = Path(__file__).resolve().parent.parent / "topology"


def spec(tmp_path: Path, kind: str, n: int = 8, sample: int = 2) -> Path:
    path = tmp_path / f"{kind}.toml"
    path.write_text(
        f'name = "{kind}"\n[generator]\nkind = "cycle"\nn = {n}\n'
        f'[dynamics]\nkind = "{kind}"\nsample = {sample}\n'
    )
    return path


def matrix(topo, round_: int, seed: int = 0) -> np.ndarray:
    """Round t's mixing matrix W_t, row i built from node i's own round_plan."""
    ids = topo.ids()
    W = np.zeros((len(ids), len(ids)))
    for i, nid in enumerate(ids):
        for j, w in round_plan(topo, nid, round_, seed)[1].items():
            W[i, ids.index(j)] = w
    return W


def disagreement(x: np.ndarray, x0: np.ndarray) -> float:
    """Largest relative consensus error over the columns: ||x - mean(x)|| / ||x0 - mean(x0)||."""
    spread = np.linalg.norm(x0 - x0.mean(axis=0), axis=0)
    return float(np.max(np.linalg.norm(x - x.mean(axis=0), axis=0) / spread))


def simulate(topo, rounds: int, x0: np.ndarray) -> np.ndarray:
    ids = topo.ids()
    x = x0.copy()
    for r in range(rounds):
        rows = {nid: round_plan(topo, nid, r)[1] for nid in ids}
        x = np.array([sum(w * x[ids.index(j)] for j, w in rows[nid].items()) for nid in ids])
    return x


def test_one_peer_exponential_averages_exactly_in_log2_n_rounds(tmp_path: Path) -> None:
    topo = load_topology(spec(tmp_path, "one-peer-exponential", n=16))
    assert topo.dynamics == "one-peer-exponential"
    x0 = np.random.default_rng(0).standard_normal((16, 3))
    x = simulate(topo, 4, x0)
    assert np.allclose(x, x0.mean(axis=0), atol=1e-12)
    # sends and receives agree: whoever i sends to expects i in that round
    for r in range(6):
        for nid in topo.ids():
            for out in round_plan(topo, nid, r)[0]:
                assert nid in round_plan(topo, out, r)[1]


def test_s_out_sampling_is_consistent_and_reaches_consensus(tmp_path: Path) -> None:
    topo = load_topology(spec(tmp_path, "s-out", n=12, sample=2))
    for r in range(5):
        outs = {nid: round_plan(topo, nid, r, seed=3)[0] for nid in topo.ids()}
        assert all(len(v) == 2 and nid not in v for nid, v in outs.items())
        for nid in topo.ids():
            row = round_plan(topo, nid, r, seed=3)[1]
            assert abs(sum(row.values()) - 1) < 1e-12
            assert {j for j in row if j != nid} == {j for j, v in outs.items() if nid in v}
    x = simulate(topo, 40, np.random.default_rng(1).standard_normal((12, 2)))
    assert np.ptp(x, axis=0).max() < 1e-6


def test_round_trip_and_errors(tmp_path: Path) -> None:
    topo = load_topology(spec(tmp_path, "s-out"))
    again = tmp_path / "again.toml"
    again.write_text(topo.to_toml())
    assert load_topology(again).dynamics == "s-out" and load_topology(again).sample == 2
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "b"\n[generator]\nkind = "cycle"\nn = 4\n[dynamics]\nkind = "wobbly"\n')
    with pytest.raises(ConfigError, match="dynamics.kind"):
        load_topology(bad)


def test_round_plans_are_every_nodes_round_plan(tmp_path: Path) -> None:
    for kind in ("one-peer-exponential", "s-out"):
        topo = load_topology(spec(tmp_path, kind, n=11, sample=3))
        for r in range(5):
            plans = round_plans(topo, r, seed=7)
            assert list(plans) == topo.ids()
            assert plans == {nid: round_plan(topo, nid, r, seed=7) for nid in topo.ids()}
    static = load_topology(SPECS / "ring-8.toml")
    with pytest.raises(ValueError, match="static"):
        round_plans(static, 0)
    with pytest.raises(KeyError, match='no node "zz"'):
        round_plan(topo, "zz", 0)


# ----------------------------------------------------------------------------- topology check


def test_check_one_peer_exponential_of_2_to_the_k_is_exact() -> None:
    topo = load_topology(SPECS / "one-peer-exp-16.toml")
    report = check_report(topo)
    json.dumps(report)
    dynamics = report["dynamics"]
    assert (dynamics["kind"], dynamics["method"], dynamics["period"]) == (
        "one-peer-exponential",
        "exact",
        4,
    )
    assert dynamics["rounds"] == report["predicted_rounds"] == 4  # log2 16
    assert report["mh_slem"] is None and report["spectral_gap"] is None
    assert {c["predicted_rounds"] for c in report["components"].values()} == {4}
    assert {c["slem"] for c in report["components"].values()} == {None}
    # the round plans agree: 4 rounds give every node the exact mean, whatever the start
    x0 = np.random.default_rng(3).standard_normal((16, 5))
    x = x0.copy()
    for r in range(4):
        x = matrix(topo, r) @ x
    assert np.allclose(x, x0.mean(axis=0), atol=1e-12)
    # and the count is the worst case for every target: r - 1 rounds leave the slowest start
    # (the first Fourier mode) above the target, r rounds bring every start to it
    slowest = np.cos(2 * np.pi * np.arange(16) / 16)[:, None]
    starts = np.hstack([slowest, x0])
    for target, expected in [(0.99, 1), (0.95, 2), (0.7, 3), (0.5, 4), (1e-6, 4), (1.0, 0)]:
        rounds = time_varying_rounds(topo, target)["rounds"]
        assert rounds == expected, target
        x = starts.copy()
        for r in range(rounds):
            if r == rounds - 1:
                assert disagreement(x[:, :1], starts[:, :1]) > target
            x = matrix(topo, r) @ x
        assert disagreement(x, starts) <= target + 1e-12


def test_check_s_out_applies_the_round_plans_until_the_target() -> None:
    topo = load_topology(SPECS / "s-out-16.toml")
    report = check_report(topo, target_error=1e-6)
    dynamics = report["dynamics"]
    assert (dynamics["kind"], dynamics["sample"], dynamics["seed"]) == ("s-out", 2, 0)
    assert dynamics["method"] == "measured"
    rounds = dynamics["rounds"]
    assert rounds is not None and rounds > 1  # not the 1 round of the complete union graph
    assert report["predicted_rounds"] == rounds
    assert {c["predicted_rounds"] for c in report["components"].values()} == {rounds}
    assert dynamics["error"] <= 1e-6
    # no start does better than the worst case of the same round plans, and other random
    # starts take about as long
    P = np.eye(16)
    J = np.full((16, 16), 1 / 16)
    worst = []
    for r in range(rounds):
        P = matrix(topo, r) @ P
        worst.append(np.linalg.norm((np.eye(16) - J) @ P @ (np.eye(16) - J), 2))
    assert worst[-1] >= dynamics["error"]
    x0 = np.random.default_rng(11).standard_normal((16, 8))
    x, own = x0.copy(), None
    for r in range(rounds + 5):
        x = matrix(topo, r) @ x
        if own is None and disagreement(x, x0) <= 1e-6:
            own = r + 1
    assert own is not None and abs(own - rounds) <= 3
    # s-out keeps the mean only in expectation: the nodes agree away from the initial mean
    assert dynamics["mean_drift"] > 1e-3
    # the draws, and so the count, follow the federation seed
    assert check_report(topo, seed=5)["dynamics"]["seed"] == 5


def test_check_one_peer_exponential_of_other_sizes_is_measured(tmp_path: Path) -> None:
    topo = load_topology(spec(tmp_path, "one-peer-exponential", n=12))
    dynamics = time_varying_rounds(topo, 1e-6)
    assert (dynamics["method"], dynamics["period"]) == ("measured", 4)
    rounds = dynamics["rounds"]
    assert rounds is not None and rounds > 4  # 12 is not a power of two: no exact agreement
    x0 = np.random.default_rng(2).standard_normal((12, 4))
    x = x0.copy()
    for r in range(rounds):
        x = matrix(topo, r) @ x
    assert np.allclose(x.mean(axis=0), x0.mean(axis=0))  # doubly stochastic: the mean is kept
    assert disagreement(x, x0) < 1e-4


def test_check_says_when_the_target_is_not_reached() -> None:
    topo = load_topology(SPECS / "s-out-16.toml")
    report = check_report(topo, target_error=1e-12, max_rounds=5)
    dynamics = report["dynamics"]
    assert dynamics["rounds"] is None and report["predicted_rounds"] is None
    assert dynamics["max_rounds"] == 5 and dynamics["error"] > 1e-12
    text = format_report(report)
    assert "rounds to relative error 1e-12: not reached in 5 rounds" in text
    assert "> 5" in text and "never" not in text
    with pytest.raises(ValueError, match="max_rounds"):
        check_report(topo, max_rounds=0)
    with pytest.raises(ValueError, match="target_error"):
        check_report(topo, target_error=0.0)


def test_check_text_states_the_dynamics() -> None:
    one_peer = format_report(check_report(load_topology(SPECS / "one-peer-exp-16.toml")))
    assert "56 edges (every link some round may use)" in one_peer
    assert "time-varying graph: one-peer exponential" in one_peer
    assert "2^(t mod 4) places after it" in one_peer
    assert "rounds to relative error 1e-06: 4 (exact" in one_peer
    assert "Metropolis-Hastings" not in one_peer
    s_out = check_report(load_topology(SPECS / "s-out-16.toml"))
    text = format_report(s_out)
    assert "time-varying graph: s-out with sample 2" in text
    assert f"rounds to relative error 1e-06: {s_out['dynamics']['rounds']} (measured" in text
    assert "keeps the mean only in expectation" in text
    assert "Metropolis-Hastings" not in text
    static = check_report(load_topology(SPECS / "ring-8.toml"))
    assert "dynamics" not in static
    assert "Metropolis-Hastings mixing" in format_report(static)


def test_cli_topology_check_of_a_time_varying_spec(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(SPECS / "s-out-16.toml")
    assert cli.main(["topology", "check", path, "--seed", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dynamics"]["seed"] == 4
    assert report["predicted_rounds"] == report["dynamics"]["rounds"] > 1
    assert cli.main(["topology", "check", path, "--target", "0"]) == 2
    assert "--target: must be positive" in capsys.readouterr().err


# ----------------------------------------------------------------------------- testbed


@pytest.mark.multiprocess
def test_daemons_on_one_peer_exponential_graph_agree_exactly(tmp_path: Path) -> None:
    out = tmp_path / "bed"
    topology = spec(tmp_path, "one-peer-exponential", n=8)
    bed = TestbedSpec(topology, out, rounds=6, quiet=True, timeout=120, options={"size": 64})
    code = Testbed(bed).run().exit_code
    s = json.loads((out / "summary.json").read_text())
    assert code == 0 and s["predicted_rounds"] is None
    assert s["consensus_error"][2] < 1e-12  # log2(8) = 3 rounds

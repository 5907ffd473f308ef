"""Time-varying topologies: one-peer exponential graphs and s-out peer sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from m3tgossip.errors import ConfigError
from m3tgossip.harness import Testbed, TestbedSpec
from m3tgossip.topology import load_topology, round_plan


def spec(tmp_path: Path, kind: str, n: int = 8, sample: int = 2) -> Path:
    path = tmp_path / f"{kind}.toml"
    path.write_text(
        f'name = "{kind}"\n[generator]\nkind = "cycle"\nn = {n}\n[dynamics]\nkind = "{kind}"\nsample = {sample}\n'
    )
    return path


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


def test_daemons_on_one_peer_exponential_graph_agree_exactly(tmp_path: Path) -> None:
    out = tmp_path / "bed"
    topology = spec(tmp_path, "one-peer-exponential", n=8)
    bed = TestbedSpec(topology, out, rounds=6, quiet=True, timeout=120, options={"size": 64})
    code = Testbed(bed).run().exit_code
    s = json.loads((out / "summary.json").read_text())
    assert code == 0 and s["predicted_rounds"] is None
    assert s["consensus_error"][2] < 1e-12  # log2(8) = 3 rounds

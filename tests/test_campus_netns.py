"""The campus from its bundles: every node in a network namespace of its own with its own
address, started by its bundle's start.sh, converging; `status` answers the operator from a
namespace of its own; nothing is left behind."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import WAIT_S, read_ready

from m3tgossip.daemon.metrics import read_metrics
from m3tgossip.deploy import BundleOptions
from m3tgossip.deploy.netns import NamespaceFederation
from m3tgossip.harness import netlab
from m3tgossip.topology import check_report, load_topology

ROOT = Path(__file__).resolve().parent.parent
CAMPUS = ROOT / "topology" / "campus.toml"
TARGET = 1e-6
NETNS, WHY = netlab.netns_available() if os.geteuid() == 0 else (False, "not root")


@pytest.mark.multiprocess
@pytest.mark.skipif(not NETNS, reason=f"network namespaces not available: {WHY}")
def test_campus_from_bundles_in_namespaces_converges_and_answers_status(tmp_path: Path) -> None:
    topo = load_topology(CAMPUS)
    predicted = check_report(topo, target_error=TARGET)["predicted_rounds"]
    options = BundleOptions(
        workload="consensus",
        rounds=0,
        settings={"workload.size": 64, "gossip.round_deadline_s": 2.0},
    )
    env = {
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }
    fed = NamespaceFederation(CAMPUS, tmp_path / "campus", options, env=env)
    try:
        bundle = fed.setup()
        for node_id in fed.ids:
            fed.start(node_id)
        for node_id, proc in fed.procs.items():
            ready = read_ready(proc)
            # the daemon is what start.sh became inside the node's namespace, on its own address
            assert proc.args[-1] == str(bundle.node_dir(node_id) / "start.sh")
            assert ready["pid"] == proc.pid
            endpoint = bundle.topology.node(node_id).endpoint
            assert ready["endpoint"] == endpoint == f"tcp://{fed.lab.addr(node_id)}:5701"

        # every node reaches the exact mean within a bound set by the predicted rounds
        deadline = time.monotonic() + max(WAIT_S, 2.0 * predicted)
        errors: dict[str, float] = {}
        while time.monotonic() < deadline:
            for node_id in fed.ids:
                recs = read_metrics(bundle.node_dir(node_id) / "state" / "metrics.jsonl")
                if recs:
                    errors[node_id] = recs[-1]["error_to_mean"]
            if len(errors) == len(fed.ids) and max(errors.values()) <= TARGET:
                break
            assert all(p.poll() is None for p in fed.procs.values()), "a daemon exited"
            time.sleep(0.5)
        assert len(errors) == len(fed.ids) and max(errors.values()) <= TARGET, errors

        # the operator, in a namespace of its own, asks every node with the operator key
        with ThreadPoolExecutor(4) as pool:
            statuses = dict(zip(fed.ids, pool.map(fed.status, fed.ids), strict=True))
        for node_id, status in statuses.items():
            assert status["node"] == node_id and status["workload"] == "consensus"
            assert status["round"] >= 1
            assert set(status["neighbours"]) == set(topo.neighbours(node_id))
            assert all(n["session"] for n in status["neighbours"].values())

        codes = fed.stop()
        assert codes == {n: 0 for n in fed.ids}
        assert fed.pids_left() == {}
    finally:
        left = fed.close()
    assert left == [] and fed.lab.leftovers() == []

"""Multi-process tests of the daemon: convergence, clean shutdown, resume, bad input, status.

Daemons run the default transport: CURVE links with a ZAP allow-list, keys generated per test.
Every wait is bounded and every child is reaped by the `children` fixture.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import msgpack
import pytest
import zmq
from conftest import WAIT_S, read_ready

from m3tgossip.daemon import checkpoint
from m3tgossip.daemon.metrics import read_metrics
from m3tgossip.harness import testbed
from m3tgossip.harness.testbed import free_ports
from m3tgossip.net import generate_keys, load_keypair, query_status
from m3tgossip.topology import load_topology

#: every test here starts daemons in processes of their own
pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parent.parent


def write_spec(tmp_path: Path, kind: str = "cycle", n: int = 3) -> Path:
    """A resolved spec with ports and public keys; keys in tmp_path/keys, operator key too."""
    spec = tmp_path / "spec.toml"
    spec.write_text(f'name = "t"\n[generator]\nkind = "{kind}"\nn = {n}\n')
    topo = load_topology(spec)
    keys = {nid: generate_keys(tmp_path / "keys", nid).public for nid in topo.ids()}
    generate_keys(tmp_path / "operator", "ops")
    resolved = tmp_path / "resolved.toml"
    resolved.write_text(
        topo.with_ports(dict(zip(topo.ids(), free_ports(n), strict=True))).with_keys(keys).to_toml()
    )
    return resolved


def status(tmp_path: Path, nid: str, endpoint: str) -> dict:
    """`status` of a running daemon over CURVE, as the operator key of `write_spec`."""
    server_key = load_topology(tmp_path / "resolved.toml").node(nid).public_key
    return query_status(
        endpoint, key=load_keypair(tmp_path / "operator/ops"), server_key=server_key
    )


def wait_rounds(path: Path, rounds: int, session: str | None = None) -> list[dict]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        recs = [r for r in read_metrics(path) if session is None or r["session"] == session]
        if len(recs) >= rounds:
            return recs
        time.sleep(0.05)
    raise AssertionError(f"{path}: fewer than {rounds} rounds within {WAIT_S} s")


def start(children, spec: Path, nid: str, tmp_path: Path, *extra: str):
    folder = tmp_path / nid
    proc = children.node(
        "--topology",
        str(spec),
        "--id",
        nid,
        "--rounds",
        "0",
        "--state-dir",
        str(folder),
        "--deadline",
        "1",
        "--startup-grace",
        "5",
        "-o",
        "size=64",
        "--key-dir",
        str(tmp_path / "keys"),
        "--status-key",
        str(tmp_path / "operator/ops.key"),
        *extra,
        log=tmp_path / f"{nid}.log",
    )
    return proc, read_ready(proc), folder


def run_testbed(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "bed"
    code = testbed.main(
        [*args, "--out", str(out), "--quiet", "--deadline", "2", "--timeout", "120"]
    )
    summary = json.loads((out / "summary.json").read_text())
    summary["exit"] = code
    return summary


def test_testbed_converges_to_exact_mean(tmp_path: Path) -> None:
    spec = tmp_path / "torus.toml"
    spec.write_text('name = "t9"\n[generator]\nkind = "torus"\nrows = 3\ncols = 3\n')
    s = run_testbed(tmp_path, "--topology", str(spec), "--rounds", "40", "-o", "size=256")
    assert s["exit"] == 0 and not s["crashed"] and not s["hung"]
    assert s["final_consensus_error"] <= 1e-6
    assert s["measured_rounds"] <= s["predicted_rounds"]


def test_overlapped_rounds_keep_the_exact_mean(tmp_path: Path) -> None:
    """gossip.overlap mixes each round one round later; replicas still agree, so the nodes
    reach the exact mean of the starting values."""
    spec = tmp_path / "torus.toml"
    spec.write_text('name = "t9"\n[generator]\nkind = "torus"\nrows = 3\ncols = 3\n')
    s = run_testbed(
        tmp_path,
        "--topology",
        str(spec),
        "--rounds",
        "40",
        "-o",
        "size=256",
        "--set",
        "gossip.overlap=true",
    )
    assert s["exit"] == 0 and not s["crashed"] and not s["hung"]
    assert s["final_consensus_error"] <= 1e-6
    for path in (tmp_path / "bed" / "nodes").glob("*/metrics.jsonl"):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(records) == 40
        assert records[0]["heard"] == []  # round 0 has no previous round to mix
        assert any(len(r["heard"]) == 4 for r in records[1:]), path
    assert all(done == 40 for done in s["rounds_done"].values())
    assert all(v > 0 for v in s["bytes_sent"].values())


def test_push_sum_converges_to_exact_mean_over_lossy_links(tmp_path: Path) -> None:
    spec = tmp_path / "ring.toml"
    spec.write_text('name = "r4"\n[generator]\nkind = "cycle"\nn = 4\n')
    s = run_testbed(
        tmp_path,
        "--topology",
        str(spec),
        "--rounds",
        "200",
        "--mode",
        "push-sum",
        "-o",
        "size=32",
        "--set",
        "faults.drop=0.1",
    )
    assert s["exit"] == 0
    assert s["final_consensus_error"] <= 1e-8


def test_sigkill_mid_run_others_continue_and_victim_resumes(tmp_path: Path) -> None:
    spec = tmp_path / "ring.toml"
    spec.write_text('name = "r4"\n[generator]\nkind = "cycle"\nn = 4\n')
    s = run_testbed(
        tmp_path,
        "--topology",
        str(spec),
        "--rounds",
        "30",
        "--kill",
        "n1@8",
        "--restart-after",
        "0.5",
        "-o",
        "size=64",
        "--set",
        "gossip.checkpoint_interval_s=0",  # checkpoint every round: it resumes from 8 or later
    )
    assert s["killed"] == ["n1"] and not s["crashed"] and not s["hung"]
    assert s["exit"] == 0
    assert all(done == 30 for done in s["rounds_done"].values())
    readies = [
        json.loads(line[6:])
        for line in (tmp_path / "bed/nodes/n1/stdout.log").read_text().splitlines()
        if line.startswith("READY ")
    ]
    assert len(readies) == 2
    assert readies[1]["round"] >= 8 and readies[1]["session"] != readies[0]["session"]


def test_sigterm_checkpoints_and_restart_resumes(children, tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    procs = {nid: start(children, spec, nid, tmp_path) for nid in ("n0", "n1", "n2")}
    _, ready0, folder0 = procs["n0"]
    wait_rounds(folder0 / "metrics.jsonl", 5)
    procs["n0"][0].send_signal(signal.SIGTERM)
    assert procs["n0"][0].wait(timeout=WAIT_S) == 0
    arrays, meta = checkpoint.load(folder0)
    assert meta["round"] >= 5 and meta["session"] == ready0["session"]
    # the neighbours were told it left
    deadline = time.monotonic() + WAIT_S
    while not status(tmp_path, "n1", procs["n1"][1]["endpoint"])["neighbours"]["n0"]["left"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # a restart resumes from the checkpoint with a new session and keeps going
    proc, ready, _ = start(children, spec, "n0", tmp_path)
    assert ready["session"] != ready0["session"]
    assert ready["round"] == meta["round"]
    recs = wait_rounds(folder0 / "metrics.jsonl", 3, session=ready["session"])
    assert recs[0]["round"] >= meta["round"]
    assert status(tmp_path, "n0", ready["endpoint"])["resumed_from"] == meta["round"]
    for nid, (p, _, _) in procs.items():
        if nid != "n0":
            p.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=WAIT_S) == 0
    assert all(p.wait(timeout=WAIT_S) == 0 for nid, (p, _, _) in procs.items() if nid != "n0")


GARBAGE = [
    [b"not msgpack at all \xff\xfe"],
    [msgpack.packb({"v": 99, "type": "hello"})],
    [msgpack.packb([1, 2, 3])],
    [b""] * 3,
]


def test_malformed_messages_are_logged_and_dropped(children, tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    procs = {nid: start(children, spec, nid, tmp_path) for nid in ("n0", "n1", "n2")}
    endpoint = procs["n1"][1]["endpoint"]
    before = wait_rounds(procs["n1"][2] / "metrics.jsonl", 2)
    # garbage from an authenticated neighbour's key (n0's), on a link of its own
    keys = load_keypair(tmp_path / "keys/n0")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, b"intruder")
    sock.curve_serverkey = load_topology(spec).node("n1").public_key.encode()
    sock.curve_publickey, sock.curve_secretkey = keys.public.encode(), keys.secret.encode()
    sock.connect(endpoint)
    for frames in GARBAGE:
        sock.send_multipart(frames)
    state = status(tmp_path, "n1", endpoint)
    deadline = time.monotonic() + WAIT_S
    while state["rejected"] < len(GARBAGE):
        assert time.monotonic() < deadline
        time.sleep(0.1)
        state = status(tmp_path, "n1", endpoint)
    sock.close()
    ctx.term()
    wait_rounds(procs["n1"][2] / "metrics.jsonl", len(before) + 3)  # still making rounds
    assert procs["n1"][0].poll() is None
    log = (tmp_path / "n1.log").read_text()
    assert f"dropped message from routing id {b'intruder'.hex()}" in log
    assert "protocol version 99 received" in log
    for p, _, _ in procs.values():
        p.send_signal(signal.SIGTERM)
    assert all(p.wait(timeout=WAIT_S) == 0 for p, _, _ in procs.values())


def test_status_reports_node_state(children, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "path", 2)
    procs = {nid: start(children, spec, nid, tmp_path) for nid in ("n0", "n1")}
    wait_rounds(procs["n0"][2] / "metrics.jsonl", 2)
    state = status(tmp_path, "n0", procs["n0"][1]["endpoint"])
    assert state["node"] == "n0" and state["workload"] == "consensus"
    assert state["round"] >= 2 and set(state["neighbours"]) == {"n1"}
    assert state["neighbours"]["n1"]["session"] == procs["n1"][1]["session"]
    with pytest.raises(TimeoutError):
        query_status(f"tcp://127.0.0.1:{free_ports(1)[0]}", timeout_s=0.3)


def test_neighbour_with_another_model_is_rejected(children, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "path", 2)
    p0, ready0, folder0 = start(children, spec, "n0", tmp_path, "--seed", "1")
    p1, ready1, folder1 = start(children, spec, "n1", tmp_path, "--seed", "2")
    wait_rounds(folder0 / "metrics.jsonl", 2)
    deadline = time.monotonic() + WAIT_S  # n1's hello may arrive after n0's first rounds
    while status(tmp_path, "n0", ready0["endpoint"])["neighbours"]["n1"]["model_ok"]:
        assert time.monotonic() < deadline, "n0 never rejected n1"
        time.sleep(0.1)
    for p in (p0, p1):
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=WAIT_S) == 0
    log = (tmp_path / "n0.log").read_text()
    assert "rejecting neighbour n1: it runs model" in log
    assert all(rec["heard"] == [] for rec in read_metrics(folder0 / "metrics.jsonl"))
    assert all(rec["heard"] == [] for rec in read_metrics(folder1 / "metrics.jsonl"))

"""The daemon's Prometheus endpoint: its settings, the series it serves (scraped with urllib and
parsed as Prometheus' text format), its own registry, a clean shutdown, and a scrape by a real
Prometheus server (Debian's `prometheus`, installed by the test where it can be)."""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import WAIT_S, read_ready
from fakes import FakeNetwork, PrivateVectors, node_config, run_nodes
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from system_packages import system_binary

from m3tgossip.daemon.config import load_node_config
from m3tgossip.daemon.metrics import read_metrics
from m3tgossip.daemon.node import Node
from m3tgossip.errors import ConfigError
from m3tgossip.harness.testbed import free_ports
from m3tgossip.net import generate_keys
from m3tgossip.topology import Topology, load_topology

ROUNDS = 4


class EvaluatedVectors(PrivateVectors):
    """Private vectors whose evaluation looks like the edu workload's."""

    def evaluate(self, round_: int) -> dict:
        acc = min(1.0, 0.5 + 0.1 * round_)
        return {
            "tasks": {"at_risk": {"acc": acc, "f1": acc - 0.1, "n": 40}},
            "groups": {"gender": {"f": {"at_risk": acc}, "m": {"at_risk": acc - 0.05}}},
            "gaps": {"gender": {"at_risk": 0.05}},
            "worst_group_gap": 0.05,
            "mean_acc": acc,
        }


def ring(tmp_path: Path, n: int = 3) -> Topology:
    spec = tmp_path / "ring.toml"
    spec.write_text(
        f'name = "ring"\n[generator]\nkind = "cycle"\nn = {n}\n'
        '[defaults]\nprivacy = "gdpr"\nmodalities = ["tabular"]\ntasks = ["at_risk"]\n'
    )
    return load_topology(spec)


def make_node(topo: Topology, nid: str, tmp_path: Path, net: FakeNetwork, **kw: Any) -> Node:
    config = dataclasses.replace(node_config(topo, nid, tmp_path, rounds=ROUNDS), **kw)
    comps = {c: 6 for c in topo.node(nid).shared_components}
    return Node(
        config, topology=topo, workload=EvaluatedVectors(comps), transport=net.transport(nid)
    )


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, keyed by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return resp.read().decode()


def refused(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


# -- settings


def test_the_endpoint_is_off_unless_configured(tmp_path: Path) -> None:
    topo = ring(tmp_path)
    node = make_node(topo, topo.ids()[0], tmp_path, FakeNetwork())
    assert not node.exporter.enabled
    node.exporter.start(node, node.link.session)
    assert node.exporter.bound is None and node.exporter.registry is None


@pytest.mark.parametrize("address", ["127.0.0.1:9101", "localhost:0", "[::1]:9101", "127.8.0.1:1"])
def test_loopback_addresses_are_accepted(tmp_path: Path, address: str) -> None:
    config = load_node_config(None, {"id": "n0", "topology": "t.toml", "prometheus": address})
    assert config.prometheus == address and not config.prometheus_public


@pytest.mark.parametrize("address", ["0.0.0.0:9101", "10.1.2.3:9101", "campus-host:9101", "[::]:1"])
def test_a_public_address_must_be_opted_into(tmp_path: Path, address: str) -> None:
    path = tmp_path / "node.toml"
    path.write_text(f'[node]\nid = "n0"\ntopology = "t.toml"\nprometheus = "{address}"\n')
    with pytest.raises(ConfigError) as err:
        load_node_config(str(path), {})
    text = str(err.value)
    assert str(path) in text and "prometheus" in text and "prometheus_public = true" in text
    path.write_text(path.read_text() + "prometheus_public = true\n")
    assert load_node_config(str(path), {}).prometheus_public


@pytest.mark.parametrize(
    "address", ["9101", "127.0.0.1", "127.0.0.1:99999", "127.0.0.1:x", ":9101", 9101]
)
def test_a_malformed_address_names_the_key(address: Any) -> None:
    with pytest.raises(ConfigError, match="prometheus"):
        load_node_config(None, {"id": "n0", "topology": "t.toml", "prometheus": address})


def test_a_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    topo = ring(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        node = make_node(topo, topo.ids()[0], tmp_path, FakeNetwork(), prometheus=address)
        with pytest.raises(OSError, match=f"cannot serve Prometheus metrics on {address}"):
            node.exporter.start(node, node.link.session)


# -- series


def test_a_scrape_shows_the_round_record(tmp_path: Path) -> None:
    topo = ring(tmp_path)
    nid = topo.ids()[0]
    node = make_node(topo, nid, tmp_path, FakeNetwork(), prometheus="127.0.0.1:0")
    exporter = node.exporter
    exporter.start(node, node.link.session)
    try:
        assert exporter.bound is not None and not exporter.bound.endswith(":0")
        peers = sorted(node.peers)
        node.peers[peers[0]].deadline_misses = 3
        node.peers[peers[0]].missed = node.config.gossip.suspect_after
        record = {
            "round": 6,
            "consensus_distance": 0.25,
            "component_distance": {"head:at_risk": 0.125},
            "bytes_in": 1000,
            "bytes_out": 2500,
            "heard": [peers[1]],
            "neighbours": 2,
            "deadline_s": 1.5,
            "privacy": {"node_epsilon": 0.75, "epsilon": {"head:at_risk": 0.5}, "retired": []},
            "timings": {"local": 0.25, "wait": 0.5, "mix": 0.25, "total": 1.125},
            **EvaluatedVectors({}).evaluate(2),
        }
        exporter.observe(record, node)
        record.update(bytes_in=1500, bytes_out=2500, round=7)
        exporter.observe(record, node)
        got = samples(scrape(exporter.bound))
    finally:
        exporter.close()
    assert got[("m3tgossip_round", ())] == 7
    assert got[("m3tgossip_rounds_total", ())] == 2
    assert got[("m3tgossip_consensus_distance", ())] == 0.25
    assert (
        got[("m3tgossip_component_consensus_distance", (("component", "head:at_risk"),))] == 0.125
    )
    assert got[("m3tgossip_received_bytes_total", ())] == 1500
    assert got[("m3tgossip_sent_bytes_total", ())] == 2500
    assert got[("m3tgossip_neighbours", ())] == 2
    assert got[("m3tgossip_neighbours_heard", ())] == 1
    assert got[("m3tgossip_neighbours_suspected", ())] == 1
    assert got[("m3tgossip_neighbour_deadline_misses_total", (("neighbour", peers[0]),))] == 3
    assert got[("m3tgossip_neighbour_deadline_misses_total", (("neighbour", peers[1]),))] == 0
    assert got[("m3tgossip_neighbour_suspected", (("neighbour", peers[0]),))] == 1
    assert got[("m3tgossip_neighbour_suspected", (("neighbour", peers[1]),))] == 0
    assert got[("m3tgossip_round_deadline_seconds", ())] == 1.5
    assert got[("m3tgossip_round_duration_seconds", ())] == 1.125
    assert ("m3tgossip_round_phase_seconds", (("phase", "total"),)) not in got
    assert got[("m3tgossip_round_phase_seconds", (("phase", "wait"),))] == 0.5
    assert got[("m3tgossip_privacy_epsilon", ())] == 0.75
    assert got[("m3tgossip_privacy_component_epsilon", (("component", "head:at_risk"),))] == 0.5
    assert got[("m3tgossip_task_accuracy", (("task", "at_risk"),))] == pytest.approx(0.7)
    assert got[("m3tgossip_task_f1", (("task", "at_risk"),))] == pytest.approx(0.6)
    assert got[("m3tgossip_mean_accuracy", ())] == pytest.approx(0.7)
    gap = ("m3tgossip_group_accuracy_gap", (("attribute", "gender"), ("task", "at_risk")))
    assert got[gap] == 0.05
    assert got[("m3tgossip_worst_group_gap", ())] == 0.05
    info = [k for k in got if k[0] == "m3tgossip_node_info"]
    assert len(info) == 1 and dict(info[0][1])["node"] == nid
    assert dict(info[0][1])["session"] == node.link.session
    assert any(name.startswith("process_") for name, _ in got)
    # the node's own registry: nothing of it in prometheus_client's global one
    assert b"m3tgossip_" not in generate_latest(REGISTRY)
    # closed: the port is free again
    assert refused(exporter.bound)
    exporter.close()  # twice is harmless


def test_a_node_shows_no_value_it_does_not_have(tmp_path: Path) -> None:
    topo = ring(tmp_path)
    node = make_node(topo, topo.ids()[0], tmp_path, FakeNetwork(), prometheus="127.0.0.1:0")
    node.exporter.start(node, node.link.session)
    try:
        record = {"round": 0, "consensus_distance": float("nan"), "heard": [], "neighbours": 2}
        node.exporter.observe(record, node)
        got = samples(scrape(node.exporter.bound))
    finally:
        node.exporter.close()
    names = {name for name, _ in got}
    assert math.isnan(got[("m3tgossip_consensus_distance", ())])  # push-sum measures none
    for absent in (
        "m3tgossip_privacy_epsilon",
        "m3tgossip_privacy_retired_components",
        "m3tgossip_mean_accuracy",
        "m3tgossip_worst_group_gap",
        "m3tgossip_error_to_mean",
        "m3tgossip_task_accuracy",
    ):
        assert absent not in names, absent


def test_a_record_it_cannot_read_does_not_stop_the_node(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    topo = ring(tmp_path)
    node = make_node(topo, topo.ids()[0], tmp_path, FakeNetwork(), prometheus="127.0.0.1:0")
    node.exporter.start(node, node.link.session)
    try:
        node.exporter.observe({"round": 1, "timings": "garbled"}, node)
        node.exporter.observe({"round": 2, "heard": []}, node)
        got = samples(scrape(node.exporter.bound))
    finally:
        node.exporter.close()
    assert got[("m3tgossip_round", ())] == 2
    assert "Prometheus series not updated" in caplog.text


def test_running_nodes_export_their_last_record(tmp_path: Path) -> None:
    topo = ring(tmp_path)
    net = FakeNetwork()
    nodes = [make_node(topo, nid, tmp_path, net, prometheus="127.0.0.1:0") for nid in topo.ids()]
    run_nodes(nodes)
    for node in nodes:
        last = read_metrics(node.config.metrics_path)[-1]
        assert node.exporter.registry is not None and node.exporter.bound is not None
        assert refused(node.exporter.bound)  # shut down with the node
        got = samples(generate_latest(node.exporter.registry).decode())
        assert got[("m3tgossip_round", ())] == last["round"] == ROUNDS - 1
        assert got[("m3tgossip_rounds_total", ())] == ROUNDS
        assert got[("m3tgossip_sent_bytes_total", ())] == last["bytes_out"] > 0
        assert got[("m3tgossip_received_bytes_total", ())] == last["bytes_in"] > 0
        assert got[("m3tgossip_neighbours_heard", ())] == len(last["heard"]) == 2
        duration = got[("m3tgossip_round_duration_seconds", ())]
        assert duration == pytest.approx(last["timings"]["total"])
        assert duration >= max(v for k, v in last["timings"].items() if k != "total")
        assert got[("m3tgossip_consensus_distance", ())] == pytest.approx(
            last["consensus_distance"]
        )
        assert last["component_distance"] and set(last["component_distance"]) <= set(node.shared)
        for comp, dist in last["component_distance"].items():
            key = ("m3tgossip_component_consensus_distance", (("component", comp),))
            assert got[key] == pytest.approx(dist) and math.isfinite(dist) and dist >= 0
        assert got[("m3tgossip_privacy_epsilon", ())] == pytest.approx(
            last["privacy"]["node_epsilon"]
        )
        assert last["privacy"]["node_epsilon"] > 0
        for comp, eps in last["privacy"]["epsilon"].items():
            key = ("m3tgossip_privacy_component_epsilon", (("component", comp),))
            assert got[key] == pytest.approx(eps)
        assert got[("m3tgossip_task_accuracy", (("task", "at_risk"),))] == pytest.approx(
            last["tasks"]["at_risk"]["acc"]
        )


# -- a real Prometheus server


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read().decode())


def _wait_targets_up(base: str, n: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT_S
    health: list[str] = []
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"prometheus exited with {proc.returncode}"
        try:
            targets = _get_json(f"{base}/api/v1/targets")["data"]["activeTargets"]
            health = [t["health"] for t in targets]
            if len(health) == n and all(h == "up" for h in health):
                return
        except (urllib.error.URLError, ConnectionError, KeyError, json.JSONDecodeError):
            pass
        time.sleep(0.25)
    raise AssertionError(f"prometheus targets not all up within {WAIT_S} s: {health}")


def _query(base: str, expr: str) -> list[dict]:
    url = f"{base}/api/v1/query?query={urllib.request.quote(expr)}"
    body = _get_json(url)
    assert body["status"] == "success", body
    return body["data"]["result"]


#: series every consensus daemon serves
SERIES = (
    "m3tgossip_round",
    "m3tgossip_rounds_total",
    "m3tgossip_round_duration_seconds",
    "m3tgossip_consensus_distance",
    "m3tgossip_component_consensus_distance",
    "m3tgossip_received_bytes_total",
    "m3tgossip_sent_bytes_total",
    "m3tgossip_neighbours_heard",
    "m3tgossip_neighbour_deadline_misses_total",
    "m3tgossip_neighbour_suspected",
    "m3tgossip_error_to_mean",
    "m3tgossip_node_info",
)
#: series of private nodes whose workload evaluates tasks
PRIVATE_SERIES = (
    "m3tgossip_privacy_epsilon",
    "m3tgossip_privacy_component_epsilon",
    "m3tgossip_task_accuracy",
    "m3tgossip_mean_accuracy",
    "m3tgossip_group_accuracy_gap",
    "m3tgossip_worst_group_gap",
)


class SlowVectors(EvaluatedVectors):
    """Evaluated private vectors whose training takes a while, as a real workload's does."""

    def local_step(self, round_: int) -> dict:
        time.sleep(0.05)
        return super().local_step(round_)


def start_private_nodes(tmp_path: Path) -> tuple[list[Node], list[threading.Thread]]:
    """Three private in-process nodes running until stopped, each with its endpoint bound."""
    topo = ring(tmp_path)
    net = FakeNetwork()
    nodes = []
    for nid in topo.ids():
        config = dataclasses.replace(
            node_config(topo, nid, tmp_path / "private", rounds=0, checkpoint_every=1000),
            prometheus="127.0.0.1:0",
        )
        comps = {c: 6 for c in topo.node(nid).shared_components}
        nodes.append(
            Node(config, topology=topo, workload=SlowVectors(comps), transport=net.transport(nid))
        )
    threads = [threading.Thread(target=n.run, daemon=True) for n in nodes]
    for t in threads:
        t.start()
    deadline = time.monotonic() + WAIT_S
    while any(n.exporter.bound is None for n in nodes) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(n.exporter.bound for n in nodes), "in-process endpoints not bound"
    return nodes, threads


def _until_every_target_has(base: str, series: tuple[str, ...], job: str, n: int) -> None:
    deadline = time.monotonic() + WAIT_S
    missing = list(series)
    while missing and time.monotonic() < deadline:
        missing = [s for s in series if len(_query(base, f'{s}{{job="{job}"}}')) < n]
        time.sleep(0.5)
    assert not missing, f"{job}: series without a sample of every node: {missing}"


@pytest.mark.multiprocess
def test_a_prometheus_server_scrapes_every_daemon(tmp_path: Path, children) -> None:
    """Three daemon processes (consensus workload) and three private, evaluated in-process
    nodes, scraped by a real Prometheus server and queried through its HTTP API."""
    prometheus, why = system_binary("prometheus", "prometheus")
    if prometheus is None:
        pytest.skip(f"no Prometheus server: {why}")
    spec = tmp_path / "spec.toml"
    spec.write_text('name = "t"\n[generator]\nkind = "cycle"\nn = 3\n')
    topo = load_topology(spec)
    ports = free_ports(len(topo.ids()) * 2 + 1)
    keys = {nid: generate_keys(tmp_path / "keys", nid).public for nid in topo.ids()}
    resolved = tmp_path / "resolved.toml"
    ids = topo.ids()
    resolved.write_text(
        topo.with_ports(dict(zip(ids, ports[: len(ids)], strict=True))).with_keys(keys).to_toml()
    )
    metrics_at = {nid: f"127.0.0.1:{p}" for nid, p in zip(ids, ports[len(ids) :], strict=False)}
    procs = {}
    for nid in ids:
        procs[nid] = children.node(
            "--topology", str(resolved), "--id", nid, "--rounds", "0",
            "--state-dir", str(tmp_path / nid), "--deadline", "1", "--startup-grace", "10",
            "-o", "size=64", "--key-dir", str(tmp_path / "keys"),
            "--prometheus", metrics_at[nid],
            log=tmp_path / f"{nid}.log",
        )  # fmt: skip
    for nid, proc in procs.items():
        assert read_ready(proc)["prometheus"] == metrics_at[nid]
    private, threads = start_private_nodes(tmp_path)
    server: subprocess.Popen | None = None
    try:
        web = f"127.0.0.1:{ports[-1]}"
        config = tmp_path / "prometheus.yml"

        def job(name: str, targets: list[str | None]) -> str:
            listed = ", ".join(repr(a) for a in targets)
            return f"  - job_name: {name}\n    static_configs:\n      - targets: [{listed}]\n"

        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n"
            + job("daemons", list(metrics_at.values()))
            + job("private", [n.exporter.bound for n in private])
        )
        with open(tmp_path / "prometheus.log", "wb") as log:
            server = subprocess.Popen(
                [
                    prometheus,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address={web}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        children.procs.append(server)
        base = f"http://{web}"
        _wait_targets_up(base, len(ids) + len(private), server)
        _until_every_target_has(base, SERIES, "daemons", len(ids))
        _until_every_target_has(base, PRIVATE_SERIES, "private", len(private))
        rounds = _query(base, 'm3tgossip_round{job="daemons"}')
        assert {r["metric"]["instance"] for r in rounds} == set(metrics_at.values())
        info = _query(base, "m3tgossip_node_info")
        assert sorted(r["metric"]["node"] for r in info) == sorted(ids + [n.id for n in private])
        sent = _query(base, 'sum(m3tgossip_sent_bytes_total{job="daemons"})')
        assert float(sent[0]["value"][1]) > 0
        eps = _query(base, 'min(m3tgossip_privacy_epsilon{job="private"})')
        assert float(eps[0]["value"][1]) > 0
        acc = _query(base, 'm3tgossip_task_accuracy{job="private",task="at_risk"}')
        assert all(0.5 <= float(r["value"][1]) <= 1.0 for r in acc) and len(acc) == len(private)
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=WAIT_S)
        for node in private:
            node.stop("test over")
        for t in threads:
            t.join(WAIT_S)
    assert not any(t.is_alive() for t in threads)
    assert all(refused(n.exporter.bound) for n in private if n.exporter.bound)
    for proc in procs.values():
        proc.send_signal(signal.SIGTERM)
    for nid, proc in procs.items():
        assert proc.wait(timeout=WAIT_S) == 0
        assert refused(metrics_at[nid])

"""Deployment bundles: the hosts file, keys kept across runs, node configs that load where the
bundle lies, systemd units, start scripts, and the checks that refuse a bad spec."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
from conftest import WAIT_S, read_ready

from m3tgossip.cli import main as cli_main
from m3tgossip.daemon.config import GossipConfig, load_node_config
from m3tgossip.daemon.metrics import read_metrics
from m3tgossip.deploy import (
    BundleOptions,
    load_hosts,
    parse_endpoint,
    service_unit,
    watchdog_seconds,
    write_bundle,
)
from m3tgossip.errors import ConfigError
from m3tgossip.harness.testbed import free_ports
from m3tgossip.net import load_keypair, load_public, load_secret, query_status
from m3tgossip.topology import load_topology

ROOT = Path(__file__).resolve().parent.parent
CAMPUS = ROOT / "topology" / "campus.toml"
PAIR = 'name = "pair"\nedges = [["a", "b"]]\n[[nodes]]\nid = "a"\n[[nodes]]\nid = "b"\n'


def campus_hosts(tmp_path: Path, skip: str = "", extra: str = "") -> Path:
    ids = load_topology(CAMPUS).ids()
    lines = [f'{n} = "10.0.0.{i + 10}:{5701 + i}"' for i, n in enumerate(ids) if n != skip]
    path = tmp_path / "hosts.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_bundle_has_one_working_folder_per_node(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    said: list[str] = []
    options = BundleOptions(workload="consensus", prefix="/opt/m3t", python="/usr/bin/python3")
    result = write_bundle(CAMPUS, campus_hosts(tmp_path), out, options, say=said.append)
    spec = load_topology(out / "topology.toml")
    original = load_topology(CAMPUS)
    assert spec.ids() == original.ids() and spec.edges == original.edges
    for i, node in enumerate(spec.nodes):
        folder = out / "nodes" / node.id
        assert (node.host, node.port) == (f"10.0.0.{i + 10}", 5701 + i)
        assert node.modalities == original.node(node.id).modalities
        # the node's own keys, the secret private, matching the spec
        secret = folder / "keys" / f"{node.id}.key_secret"
        assert mode(secret) == 0o600
        assert load_secret(secret).public == node.public_key
        assert load_public(folder / "keys" / f"{node.id}.key") == node.public_key
        # every folder holds the same filled spec
        assert (folder / "topology.toml").read_text() == (out / "topology.toml").read_text()
        # the config loads from wherever the folder is, its paths inside the folder
        moved = tmp_path / "installed" / node.id
        shutil.copytree(folder, moved)
        config = load_node_config(str(moved / "node.toml"), {})
        assert config.id == node.id and config.workload == "consensus" and config.rounds == 0
        assert Path(config.topology) == moved / "topology.toml"
        assert Path(config.key_dir) == moved / "keys"
        assert Path(config.state_dir) == moved / "state"
        assert load_topology(config.topology).node(node.id).endpoint == node.endpoint
        # the operator's public key, and only that, is allowed to query status
        operator = load_public(out / "operator" / "ops.key")
        assert (folder / "operators.keys").read_text().split() == [operator, "ops"]
        assert not list(folder.rglob("ops.key_secret"))
        unit = (folder / f"m3tgossip-{node.id}.service").read_text()
        assert f"ExecStart=/opt/m3t/{node.id}/start.sh" in unit
        assert f"LoadCredential={node.id}.key_secret:/opt/m3t/{node.id}/keys/" in unit
        start = folder / "start.sh"
        assert mode(start) & 0o111 and "/usr/bin/python3" in start.read_text()
    assert mode(out / "operator" / "ops.key_secret") == 0o600
    assert result.new_keys == {**{n: True for n in spec.ids()}, "operator ops": True}
    assert any(line.startswith("uni-a: tcp://10.0.0.10:5701, new key") for line in said)


def test_a_second_run_keeps_every_key_and_says_so(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    first = write_bundle(CAMPUS, campus_hosts(tmp_path), out)
    before = {p: p.read_text() for p in out.rglob("*.key_secret")}
    # a host moved: the bundle is rewritten with the same keys
    moved = campus_hosts(tmp_path).read_text().replace("10.0.0.10:5701", "10.0.9.1:5701")
    (tmp_path / "hosts.toml").write_text(moved)
    said: list[str] = []
    second = write_bundle(CAMPUS, tmp_path / "hosts.toml", out, say=said.append)
    assert {p: p.read_text() for p in out.rglob("*.key_secret")} == before
    assert not any(second.new_keys.values())
    assert all("kept its existing key" in line for line in said)
    assert second.topology.node("uni-a").host == "10.0.9.1"
    assert [n.public_key for n in second.topology.nodes] == [
        n.public_key for n in first.topology.nodes
    ]
    # the filled spec of a bundle is a valid input for the next run
    third = write_bundle(out / "topology.toml", tmp_path / "hosts.toml", out)
    assert third.topology.nodes == second.topology.nodes


def test_a_key_in_the_spec_without_its_secret_is_refused(tmp_path: Path) -> None:
    write_bundle(CAMPUS, campus_hosts(tmp_path), tmp_path / "a")
    with pytest.raises(ConfigError, match=r'node "uni-a" public_key: the spec names a key but'):
        write_bundle(tmp_path / "a" / "topology.toml", campus_hosts(tmp_path), tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_a_public_key_file_without_its_secret_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    write_bundle(CAMPUS, campus_hosts(tmp_path), out)
    (out / "nodes" / "stu-a1" / "keys" / "stu-a1.key_secret").unlink()
    with pytest.raises(ConfigError, match="stu-a1.key: a public key without its secret"):
        write_bundle(CAMPUS, campus_hosts(tmp_path), out)


@pytest.mark.parametrize(
    ("extra", "skip", "message"),
    [
        ('nobody = "10.0.0.99:5701"\n', "", r"hosts.toml: nobody: no such node in the topology"),
        ("", "stu-b3", r"hosts.toml: no HOST:PORT for 1 node\(s\) of the topology: stu-b3"),
        ("", "", None),
    ],
)
def test_hosts_file_must_name_every_node_and_no_other(
    tmp_path: Path, extra: str, skip: str, message: str | None
) -> None:
    path = campus_hosts(tmp_path, skip=skip, extra=extra)
    ids = load_topology(CAMPUS).ids()
    if message is None:
        assert load_hosts(path, ids)["stu-c2"] == ("10.0.0.23", 5714)
        return
    with pytest.raises(ConfigError, match=message):
        load_hosts(path, ids)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10.0.0.1", "expected HOST:PORT"),
        ("10.0.0.1:0", "port '0' is not a number 1..65535"),
        ("10.0.0.1:65536", "port '65536' is not a number 1..65535"),
        ("10.0.0.1:http", "port 'http' is not a number"),
        ("10.0.0.300:5701", "'10.0.0.300' is not an IPv4 address"),
        ("0.0.0.0:5701", "0.0.0.0 is no address other nodes can reach"),
        ("bad_host!:5701", "'bad_host!' is not a host name or address"),
        ("::1:5701", r"write an IPv6 address in brackets"),
        ("[fe80::zz]:5701", "is not an IPv6 address"),
        ("[::]:5701", "no address other nodes can reach"),
    ],
)
def test_bad_endpoints_are_named(tmp_path: Path, value: str, message: str) -> None:
    path = tmp_path / "hosts.toml"
    path.write_text(f'a = "{value}"\n')
    with pytest.raises(ConfigError, match=rf"hosts.toml: a: .*{message}"):
        load_hosts(path, ["a"])


def test_good_endpoints_parse() -> None:
    assert parse_endpoint("uni-a.campus.example:5701") == ("uni-a.campus.example", 5701)
    assert parse_endpoint("[2001:db8::21]:5701") == ("2001:db8::21", 5701)
    assert parse_endpoint("127.0.0.1:1") == ("127.0.0.1", 1)


def test_hosts_file_errors_name_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "hosts.toml"
    path.write_text('a = "10.0.0.1:5701"\nb = "10.0.0.1:5701"\n')
    with pytest.raises(ConfigError, match="b: 10.0.0.1:5701 is also the endpoint of a"):
        load_hosts(path, ["a", "b"])
    path.write_text('n.1 = "10.0.0.1:5701"\n')
    with pytest.raises(ConfigError, match=r'n: expected a "HOST:PORT" string \(quote an id'):
        load_hosts(path, ["n.1"])
    path.write_text('"n.1" = "10.0.0.1:5701"\n')
    assert load_hosts(path, ["n.1"]) == {"n.1": ("10.0.0.1", 5701)}
    path.write_text("a = 10.0.0.1:5701\n")
    with pytest.raises(ConfigError, match="hosts.toml: not valid TOML"):
        load_hosts(path, ["a"])
    with pytest.raises(ConfigError, match="no such hosts file"):
        load_hosts(tmp_path / "missing.toml", ["a"])


def test_ipv6_hosts_reach_the_spec(tmp_path: Path) -> None:
    spec = tmp_path / "pair.toml"
    spec.write_text(PAIR)
    hosts = tmp_path / "hosts.toml"
    hosts.write_text('a = "[2001:db8::1]:5701"\nb = "[2001:db8::2]:5701"\n')
    result = write_bundle(spec, hosts, tmp_path / "out", BundleOptions(bind_all=True))
    assert result.topology.node("a").endpoint == "tcp://[2001:db8::1]:5701"
    config = tomllib.loads((tmp_path / "out" / "nodes" / "a" / "node.toml").read_text())
    assert config["node"]["bind"] == "tcp://[::]:5701"


def test_a_disconnected_spec_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    spec = tmp_path / "split.toml"
    nodes = "".join(f'[[nodes]]\nid = "{n}"\n' for n in "abcd")
    spec.write_text(f'name = "split"\nedges = [["a", "b"], ["c", "d"]]\n{nodes}')
    hosts = tmp_path / "hosts.toml"
    hosts.write_text("".join(f'{n} = "10.0.0.{i + 1}:5701"\n' for i, n in enumerate("abcd")))
    with pytest.raises(ConfigError, match="split.toml: edges: the graph is disconnected"):
        write_bundle(spec, hosts, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_settings_reach_every_node_config_and_bad_ones_are_refused(tmp_path: Path) -> None:
    options = BundleOptions(
        workload="consensus",
        rounds=40,
        settings={"gossip.round_deadline_s": 2.5, "workload.size": 64, "gossip.compress": {}},
    )
    out = tmp_path / "out"
    write_bundle(CAMPUS, campus_hosts(tmp_path), out, options)
    config = load_node_config(str(out / "nodes" / "uni-b" / "node.toml"), {})
    assert config.gossip.round_deadline_s == 2.5 and config.rounds == 40
    assert config.workload_options == {"size": 64}
    unit = (out / "nodes" / "uni-b" / "m3tgossip-uni-b.service").read_text()
    assert f"WatchdogSec={watchdog_seconds(config.gossip)}\n" in unit
    for settings, message in [
        ({"gossip.round_deadline_s": -1}, "round_deadline_s: must be a positive number"),
        ({"gossip.nonsense": 1}, r"\[gossip\] nonsense: unknown key"),
        ({"bogus.key": 1}, "bogus.key: expected TABLE.KEY"),
    ]:
        bad = BundleOptions(settings=settings)
        with pytest.raises(ConfigError, match=message):
            write_bundle(CAMPUS, campus_hosts(tmp_path), tmp_path / "bad", bad)
        assert not (tmp_path / "bad").exists()
    with pytest.raises(ConfigError, match="--prefix 'opt/m3t': must be an absolute path"):
        bad = BundleOptions(prefix="opt/m3t")
        write_bundle(CAMPUS, campus_hosts(tmp_path), tmp_path / "bad", bad)


def test_the_unit_supervises_and_sandboxes_the_daemon() -> None:
    gossip = GossipConfig(round_deadline_s=5.0, max_wait_factor=3.0)
    unit = service_unit("uni-a", "campus", "/opt/m3tgossip/uni-a", gossip, port=5701, python="py")
    lines = set(unit.splitlines())
    for line in (
        "Type=notify",
        "Restart=on-failure",
        "WatchdogSec=60",
        "StateDirectory=m3tgossip/uni-a",
        "ReadWritePaths=-%S/m3tgossip/uni-a",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "DynamicUser=yes",
        "CapabilityBoundingSet=",
    ):
        assert line in lines, line
    # the watchdog allows several of the longest round waits, and never less than 30 s
    assert watchdog_seconds(gossip) >= 2 * gossip.round_deadline_s * gossip.max_wait_factor
    assert watchdog_seconds(GossipConfig(round_deadline_s=1.0, max_wait_factor=1.0)) == 30
    # a privileged port gets exactly the capability to bind it; a bundle in a home folder
    # stays readable
    low = service_unit("a", "t", "/home/op/m3t/a", gossip, port=701, python="py")
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in low.splitlines()
    assert "ProtectHome=read-only" in low.splitlines()
    with pytest.raises(ValueError, match="must be an absolute path"):
        service_unit("a", "t", "/opt/my bundles/a", gossip, port=5701, python="py")


def test_cli_writes_a_bundle_and_names_bad_input(tmp_path: Path, capsys) -> None:
    hosts = campus_hosts(tmp_path)
    out = tmp_path / "out"
    args = ["deploy", "bundle", "--topology", str(CAMPUS), "--hosts", str(hosts), "--out", str(out)]
    assert cli_main([*args, "--workload", "consensus", "-o", "size=64"]) == 0
    text = capsys.readouterr().out
    assert "topology campus: 14 nodes, 19 edges, connected" in text
    assert "operator ops: new key" in text
    assert cli_main(args) == 0
    assert "uni-a: tcp://10.0.0.10:5701, kept its existing key" in capsys.readouterr().out
    bad = campus_hosts(tmp_path, skip="uni-a")
    assert cli_main(args[:4] + ["--hosts", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "hosts.toml: no HOST:PORT for 1 node(s) of the topology: uni-a" in err


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.multiprocess
@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_a_generated_unit(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # the unit points at the bundle where it lies, so the paths it names exist
    options = BundleOptions(prefix=str(out / "nodes"), python=shutil.which("python3") or "python3")
    write_bundle(CAMPUS, campus_hosts(tmp_path), out, options)
    unit = out / "nodes" / "uni-a" / "m3tgossip-uni-a.service"
    r = subprocess.run(
        [str(SYSTEMD_ANALYZE), "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, SYSTEMD_LOG_LEVEL="notice"),
    )
    assert r.returncode == 0, r.stderr
    assert "m3tgossip-uni-a.service" not in r.stderr, r.stderr


def wait_converged(path: Path, target: float = 1e-6) -> dict:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        recs = read_metrics(path)
        if recs and recs[-1]["error_to_mean"] <= target:
            return recs[-1]
        time.sleep(0.1)
    raise AssertionError(f"{path}: not within {target} of the mean in {WAIT_S} s")


@pytest.mark.multiprocess
def test_start_scripts_run_nodes_by_hand_and_as_systemd_does(tmp_path: Path, children) -> None:
    spec = tmp_path / "pair.toml"
    spec.write_text(PAIR)
    hosts = tmp_path / "hosts.toml"
    ports = dict(zip("ab", free_ports(2), strict=True))
    hosts.write_text("".join(f'{n} = "127.0.0.1:{p}"\n' for n, p in ports.items()))
    out = tmp_path / "out"
    settings = {"workload.size": 64, "gossip.round_deadline_s": 1.0}
    bundle = write_bundle(spec, hosts, out, BundleOptions(workload="consensus", settings=settings))
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    # a as systemd runs it: its state, runtime and credentials folders from the environment
    # (the credential readable through an ACL: its group bits show the ACL mask) and a notify
    # socket
    creds, runtime, state = tmp_path / "creds", tmp_path / "run", tmp_path / "var-lib-a"
    creds.mkdir()
    runtime.mkdir(mode=0o700)
    shutil.copy(out / "nodes" / "a" / "keys" / "a.key_secret", creds / "a.key_secret")
    os.chmod(creds / "a.key_secret", 0o440)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(WAIT_S)
    service = dict(
        env,
        STATE_DIRECTORY=str(state),
        RUNTIME_DIRECTORY=str(runtime),
        CREDENTIALS_DIRECTORY=str(creds),
        NOTIFY_SOCKET=str(tmp_path / "notify.sock"),
        WATCHDOG_USEC="2000000",
    )
    try:
        procs = {}
        for node_id, node_env in (("a", service), ("b", env)):
            with open(tmp_path / f"{node_id}.log", "ab") as log:
                procs[node_id] = subprocess.Popen(
                    [str(out / "nodes" / node_id / "start.sh")],
                    stdout=subprocess.PIPE,
                    stderr=log,
                    stdin=subprocess.DEVNULL,
                    env=node_env,
                    text=True,
                )
            children.procs.append(procs[node_id])
        ready = {n: read_ready(p) for n, p in procs.items()}
        listening = "READY=1\nSTATUS=listening on " + ready["a"]["endpoint"]
        assert notify.recv(4096).decode().startswith(listening)
        assert mode(runtime / "a.key_secret") & 0o077 == 0
        wait_converged(state / "metrics.jsonl")
        wait_converged(out / "nodes" / "b" / "state" / "metrics.jsonl")
        assert not (out / "nodes" / "a" / "state").exists()
        answer = query_status(
            ready["a"]["endpoint"],
            key=load_keypair(out / "operator" / "ops"),
            server_key=bundle.topology.node("a").public_key,
        )
        assert answer["node"] == "a" and answer["round"] >= 1
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        assert [p.wait(timeout=WAIT_S) for p in procs.values()] == [0, 0]
    finally:
        notify.close()

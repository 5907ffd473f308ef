"""Kubernetes manifests from a spec, checked structurally: kinds, selectors and labels,
ordinals and node ids, volumes and Secrets, ports and probes; the init step that installs a
pod's key; and the container recipe."""

from __future__ import annotations

import base64
import json
import stat
import tomllib
from pathlib import Path

import pytest

from m3tgossip import __version__
from m3tgossip.cli import main
from m3tgossip.daemon.config import load_node_config
from m3tgossip.engines import install_key, pod_node
from m3tgossip.engines.kubernetes import DEFAULT_IMAGE, KEYS_MOUNT, SECRETS_MOUNT, UID
from m3tgossip.errors import ConfigError
from m3tgossip.net import load_public, load_secret
from m3tgossip.topology import load_topology, parse_topology

ROOT = Path(__file__).resolve().parent.parent
CAMPUS = ROOT / "topology" / "campus.toml"


@pytest.fixture
def generated(tmp_path: Path) -> Path:
    out = tmp_path / "kube"
    argv = ["kube", "manifests", "--topology", str(CAMPUS), "--out", str(out), "--name", "campus"]
    argv += ["--namespace", "edu", "--rounds", "0", "--set", "gossip.round_deadline_s=8"]
    argv += ["-o", "local_steps=3", "--storage", "2Gi", "--cpu", "500m", "--memory", "3Gi"]
    assert main(argv) == 0
    return out


def load(out: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((out / "manifests").glob("*.json"))}


def by_kind(manifests: dict[str, dict], kind: str) -> list[dict]:
    return [m for m in manifests.values() if m["kind"] == kind]


def test_the_manifests_are_one_statefulset_behind_a_headless_service(generated: Path) -> None:
    ms = load(generated)
    ids = load_topology(CAMPUS).ids()
    kinds = sorted(m["kind"] for m in ms.values())
    assert kinds == sorted(
        ["ConfigMap", "NetworkPolicy", "Service", "StatefulSet"] + ["Secret"] * len(ids)
    )
    assert all(m["metadata"]["namespace"] == "edu" for m in ms.values())
    (svc,) = by_kind(ms, "Service")
    (sts,) = by_kind(ms, "StatefulSet")
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"] == "campus"
    assert sts["spec"]["replicas"] == len(ids)
    pod = sts["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    for selector in (svc["spec"]["selector"], sts["spec"]["selector"]["matchLabels"]):
        assert selector and selector.items() <= pod_labels.items()
    (policy,) = by_kind(ms, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    (daemon,) = pod["spec"]["containers"]
    (port,) = daemon["ports"]
    assert port["containerPort"] == 5701 and port["name"] == "gossip"
    assert svc["spec"]["ports"][0]["targetPort"] == "gossip"
    assert policy["spec"]["ingress"][0]["ports"][0]["port"] == 5701
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert daemon[probe]["tcpSocket"]["port"] == "gossip"
    assert daemon["resources"]["requests"] == {"cpu": "500m", "memory": "3Gi"}
    assert daemon["image"] == DEFAULT_IMAGE == f"m3tgossip:{__version__}"
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] == UID


def test_pod_ordinals_are_node_positions_and_names_are_stable(generated: Path) -> None:
    ms = load(generated)
    ids = load_topology(CAMPUS).ids()
    (config,) = by_kind(ms, "ConfigMap")
    spec = parse_topology(tomllib.loads(config["data"]["topology.toml"]), "configmap")
    assert spec.ids() == ids
    assert (generated / "topology.toml").read_text() == config["data"]["topology.toml"]
    for i, nid in enumerate(ids):
        node = spec.node(nid)
        assert (node.host, node.port) == (f"campus-{i}.campus.edu.svc", 5701)
        assert node.public_key == load_public(generated / "keys" / f"{nid}.key")
        assert pod_node(spec, "campus", f"campus-{i}") == nid
    with pytest.raises(ConfigError, match="ordinal 14, but .* has 14 nodes"):
        pod_node(spec, "campus", "campus-14")
    with pytest.raises(ConfigError, match="not a pod of StatefulSet"):
        pod_node(spec, "campus", "other-1")
    # the node config every pod runs: a valid config once the pod's id is added
    node_toml = config["data"]["node.toml"]
    path = generated / "node.toml"
    path.write_text(node_toml.replace('"/etc/m3tgossip/topology.toml"', '"topology.toml"'))
    cfg = load_node_config(str(path), {"id": ids[3]})
    assert cfg.workload == "edu" and cfg.rounds == 0 and cfg.bind == "tcp://0.0.0.0:5701"
    assert cfg.gossip.round_deadline_s == 8 and cfg.workload_options == {"local_steps": 3}
    assert cfg.key_dir == KEYS_MOUNT and cfg.state_dir == "/var/lib/m3tgossip"
    operators = config["data"]["operators.keys"].split()[0]
    assert operators == load_public(generated / "keys" / "operator.key")


def test_keys_are_secrets_mounted_0400_into_the_init_container_only(generated: Path) -> None:
    ms = load(generated)
    ids = load_topology(CAMPUS).ids()
    secrets = {m["metadata"]["name"]: m for m in by_kind(ms, "Secret")}
    assert sorted(secrets) == sorted(f"campus-key-{i}" for i in range(len(ids)))
    secret_texts = []
    for i, nid in enumerate(ids):
        s = secrets[f"campus-key-{i}"]
        assert s["type"] == "Opaque" and s["metadata"]["annotations"]["m3tgossip/node-id"] == nid
        text = base64.b64decode(s["data"][f"{nid}.key_secret"]).decode()
        on_disk = generated / "keys" / f"{nid}.key_secret"
        assert text == on_disk.read_text() and stat.S_IMODE(on_disk.stat().st_mode) == 0o600
        secret_texts.append(load_secret(on_disk).secret)
        mode = (generated / "manifests" / f"secret-{i}.json").stat().st_mode
        assert stat.S_IMODE(mode) == 0o600
    # secret material nowhere but in the Secret manifests
    for name, m in ms.items():
        if m["kind"] != "Secret":
            raw = (generated / "manifests" / name).read_text()
            assert not any(t in raw for t in secret_texts), name
    sts = by_kind(ms, "StatefulSet")[0]
    pod = sts["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    projected = volumes["secrets"]["projected"]
    assert projected["defaultMode"] == 0o400
    assert [src["secret"]["name"] for src in projected["sources"]] == [
        f"campus-key-{i}" for i in range(len(ids))
    ]
    assert volumes["keys"]["emptyDir"]["medium"] == "Memory"
    assert volumes["config"]["configMap"]["name"] == by_kind(ms, "ConfigMap")[0]["metadata"]["name"]
    (init,) = pod["initContainers"]
    (daemon,) = pod["containers"]
    init_mounts = {m["name"]: m for m in init["volumeMounts"]}
    daemon_mounts = {m["name"]: m for m in daemon["volumeMounts"]}
    assert (
        init_mounts["secrets"]["readOnly"] and init_mounts["secrets"]["mountPath"] == SECRETS_MOUNT
    )
    assert "secrets" not in daemon_mounts  # the daemon sees only its own key
    assert daemon_mounts["keys"]["readOnly"] and daemon_mounts["keys"]["mountPath"] == KEYS_MOUNT
    for mount in [*init["volumeMounts"], *daemon["volumeMounts"]]:
        assert mount["name"] in volumes or mount["name"] == "state"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "state" == daemon_mounts["state"]["name"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert init["command"][:3] == ["m3tgossip", "kube", "keys"]
    assert daemon["command"][:3] == ["m3tgossip", "kube", "node"]
    for container in (init, daemon):
        env = {e["name"]: e for e in container["env"]}
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_the_init_step_installs_only_this_pods_key(generated: Path, tmp_path: Path) -> None:
    ms = load(generated)
    ids = load_topology(CAMPUS).ids()
    # the Secret volume as the kubelet writes it: every node's key, mode 0440 with fsGroup
    volume = tmp_path / "secrets"
    volume.mkdir()
    for m in by_kind(ms, "Secret"):
        for name, data in m["data"].items():
            (volume / name).write_bytes(base64.b64decode(data))
            (volume / name).chmod(0o440)
    keys = tmp_path / "keys"
    keys.mkdir()
    spec = generated / "topology.toml"
    path = install_key(spec, "campus", "campus-5", volume, keys)
    assert path == keys / f"{ids[5]}.key_secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in keys.iterdir()) == [f"{ids[5]}.key", f"{ids[5]}.key_secret"]
    assert load_secret(path).public == load_topology(spec).node(ids[5]).public_key
    # a volume holding another node's key under this name is refused
    (volume / f"{ids[6]}.key_secret").unlink()
    (volume / f"{ids[6]}.key_secret").write_bytes((volume / f"{ids[7]}.key_secret").read_bytes())
    with pytest.raises(ConfigError, match="not the secret of node"):
        install_key(spec, "campus", "campus-6", volume, keys)


def test_regenerating_keeps_the_keys(generated: Path) -> None:
    before = {p.name: p.read_text() for p in (generated / "keys").iterdir()}
    argv = ["kube", "manifests", "--topology", str(CAMPUS), "--out", str(generated)]
    assert main(argv + ["--name", "campus", "--namespace", "edu"]) == 0
    assert {p.name: p.read_text() for p in (generated / "keys").iterdir()} == before


def test_bad_options_are_named(tmp_path: Path, capsys) -> None:
    base = ["kube", "manifests", "--topology", str(CAMPUS), "--out", str(tmp_path / "k")]
    for extra, named in (
        (["--name", "Campus_A"], "--name"),
        (["--namespace", "a.b"], "--namespace"),
        (["--memory", "lots"], "--memory"),
        (["--port", "0"], "--port"),
        (["--set", "nope.x=1"], "--set"),
    ):
        assert main(base + extra) == 2
        assert named in capsys.readouterr().err


def test_the_container_recipe_installs_cpu_torch_and_the_package() -> None:
    recipe = (ROOT / "scripts" / "Containerfile").read_text()
    lines = [ln.strip() for ln in recipe.splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0].startswith("FROM python:3.11")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    torch = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch=="))
    install = f"RUN pip install {torch} --index-url https://download.pytorch.org/whl/cpu"
    assert install in lines
    assert lines.index(install) < next(i for i, ln in enumerate(lines) if "pip install /src" in ln)
    assert "COPY m3tgossip /src/m3tgossip" in lines
    assert f"USER {UID}:{UID}" in lines
    assert 'ENTRYPOINT ["m3tgossip"]' in lines
    assert f"-t {DEFAULT_IMAGE} ." in recipe


def test_the_pod_commands_find_their_node_from_the_pod_name(
    generated: Path, tmp_path: Path, monkeypatch
) -> None:
    """`kube keys` (init container) and `kube node` (daemon container) as the manifests run
    them, with the ConfigMap and Secret volumes laid out in folders."""
    from m3tgossip.engines import commands

    ms = load(generated)
    ids = load_topology(CAMPUS).ids()
    config_dir, volume, keys = tmp_path / "config", tmp_path / "secrets", tmp_path / "keys"
    for d in (config_dir, volume, keys):
        d.mkdir()
    for name, text in by_kind(ms, "ConfigMap")[0]["data"].items():
        (config_dir / name).write_text(text)
    for m in by_kind(ms, "Secret"):
        for name, data in m["data"].items():
            (volume / name).write_bytes(base64.b64decode(data))
            (volume / name).chmod(0o440)
    sts = by_kind(ms, "StatefulSet")[0]["spec"]["template"]["spec"]
    paths = {"/etc/m3tgossip": str(config_dir), SECRETS_MOUNT: str(volume), KEYS_MOUNT: str(keys)}

    def local(command: list[str]) -> list[str]:
        out = []
        for arg in command[1:]:
            for mount, folder in paths.items():
                arg = arg.replace(mount, folder)
            out.append(arg)
        return out

    monkeypatch.setenv("POD_NAME", "campus-2")
    assert main(local(sts["initContainers"][0]["command"])) == 0
    assert sorted(p.name for p in keys.iterdir()) == [f"{ids[2]}.key", f"{ids[2]}.key_secret"]
    started = {}
    monkeypatch.setattr(
        commands, "_run_daemon", lambda path, overrides: started.update(o=overrides, p=path) or 0
    )
    assert main(local(sts["containers"][0]["command"])) == 0
    assert started["o"] == {"id": ids[2], "topology": str(config_dir / "topology.toml")}
    cfg = load_node_config(started["p"], started["o"])
    assert cfg.id == ids[2] and cfg.topology == str(config_dir / "topology.toml")
    monkeypatch.setenv("POD_NAME", "campus-99")
    assert main(local(sts["containers"][0]["command"])) == 2

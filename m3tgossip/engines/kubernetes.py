"""Kubernetes: a federation as one StatefulSet, with manifests generated from the shared spec.

    m3tgossip kube manifests --topology SPEC --out DIR [--name m3t] [--namespace edu]
    kubectl apply -f DIR/manifests/

Pod `NAME-<i>` (ordinal `i`) runs the spec's node at position `i`: it learns its node from its
own name (`POD_NAME`, from the downward API, else the host name) and the spec, so the pods of
the StatefulSet share one template. The headless Service `NAME` gives pod `i` the stable name
`NAME-<i>.NAME.NAMESPACE.svc`, which is the node's `host` in the resolved spec; every node
listens on the same port. `manifests/` holds JSON (which kubectl reads as it reads YAML):

- `service.json`: the headless Service (`clusterIP: None`, `publishNotReadyAddresses`, so
  peers find each other before they are ready);
- `configmap.json`: the resolved spec (hosts, ports, public keys), the node config every pod
  shares, and the operator's public key (allowed to query status);
- `secret-<i>.json`: node `i`'s CURVE secret key, one Secret per node: the only place secret
  material is written besides `DIR/keys/`;
- `statefulset.json`: `replicas` = nodes, ordinals = node positions, a volume claim per pod for
  the state folder (checkpoint, metrics), resource requests, TCP probes on the gossip port;
- `networkpolicy.json`: ingress to the gossip port only from the federation's pods.

Keys. `DIR/keys/` gets a keypair per node and an operator key the first time (mode 600; an
existing pair is kept, never overwritten). The Secrets are mounted read-only with mode 0400
into an init container only: pods of one StatefulSet share their template, so the init
container (`m3tgossip kube keys`) copies just its own node's secret into an in-memory volume,
and the daemon container never sees the other nodes'. The copy is also what gives the file
mode 600: the kubelet makes Secret files readable by the pod's `fsGroup` (0440), which the
daemon refuses for a secret key.
"""

from __future__ import annotations

import base64
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m3tgossip import __version__
from m3tgossip.engines.common import OPERATOR, ensure_keys, node_toml
from m3tgossip.errors import ConfigError
from m3tgossip.net import PUBLIC_SUFFIX, SECRET_SUFFIX, load_secret
from m3tgossip.topology import Topology, load_topology

APP = "m3tgossip"
#: the user and group the daemon runs as (the image's `m3tgossip` user)
UID = 10001
CONFIG_MOUNT = "/etc/m3tgossip"
SECRETS_MOUNT = "/run/m3tgossip/secrets"
KEYS_MOUNT = "/run/m3tgossip/keys"
STATE_MOUNT = "/var/lib/m3tgossip"
DEFAULT_IMAGE = f"m3tgossip:{__version__}"
#: the longest StatefulSet name (its pods' controller-revision-hash label adds 11 characters)
MAX_NAME = 52

_DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")


@dataclass(frozen=True)
class KubeOptions:
    """What `m3tgossip kube manifests` writes into the manifests."""

    name: str = "m3t"
    namespace: str = "default"
    image: str = DEFAULT_IMAGE
    port: int = 5701
    #: appended to the pod names (`NAME-i.NAME.NS.svc.<cluster_domain>`) when given
    cluster_domain: str = ""
    storage: str = "1Gi"
    storage_class: str = ""
    cpu: str = "1"
    memory: str = "2Gi"
    #: `[node]` keys every pod shares (workload, rounds, seed)
    node: dict[str, Any] = field(default_factory=dict)
    #: further node config keys (`gossip.round_deadline_s`, `workload.size`, ...)
    overrides: dict[str, Any] = field(default_factory=dict)

    def check(self, nodes: int) -> None:
        """ConfigError naming the option that Kubernetes would refuse."""
        if _DNS_LABEL.fullmatch(self.name) is None or len(self.name) > MAX_NAME:
            raise ConfigError(
                "--name",
                self.name,
                f"must be a DNS label of at most {MAX_NAME} characters: lower-case letters, "
                "digits and '-', starting with a letter",
            )
        if _DNS_LABEL.fullmatch(self.namespace) is None or len(self.namespace) > 63:
            raise ConfigError("--namespace", self.namespace, "must be a DNS label (a-z, 0-9, -)")
        if self.cluster_domain and _DNS_NAME.fullmatch(self.cluster_domain) is None:
            raise ConfigError("--cluster-domain", self.cluster_domain, "not a DNS name")
        if not self.image or re.search(r"\s", self.image):
            raise ConfigError("--image", self.image, "not an image reference")
        if not 1 <= self.port <= 65535:
            raise ConfigError("--port", str(self.port), "must be 1..65535")
        for what, value in (("--storage", self.storage), ("--cpu", self.cpu)):
            if _QUANTITY.fullmatch(value) is None:
                raise ConfigError(what, value, "not a Kubernetes quantity (e.g. 500m, 1, 2Gi)")
        if _QUANTITY.fullmatch(self.memory) is None:
            raise ConfigError("--memory", self.memory, "not a Kubernetes quantity (e.g. 2Gi)")
        if self.storage_class and _DNS_NAME.fullmatch(self.storage_class) is None:
            raise ConfigError("--storage-class", self.storage_class, "not a DNS name")
        if nodes < 1:
            raise ConfigError("topology", "nodes", "no nodes")

    def pod_host(self, ordinal: int) -> str:
        """The stable DNS name of pod `ordinal` through the headless Service."""
        host = f"{self.name}-{ordinal}.{self.name}.{self.namespace}.svc"
        return f"{host}.{self.cluster_domain}" if self.cluster_domain else host


def resolve(topology: Topology, opts: KubeOptions, keys: Mapping[str, str]) -> Topology:
    """The spec with node `i` on `NAME-i.NAME.NAMESPACE.svc:PORT` and these public keys."""
    out = topology
    for i, node in enumerate(topology.ids()):
        out = out.with_ports({node: opts.port}, opts.pod_host(i))
    return out.with_keys({n: keys[n] for n in topology.ids()})


def labels(opts: KubeOptions) -> dict[str, str]:
    """The labels of every object; the Service, StatefulSet and policy select pods by them."""
    return {"app.kubernetes.io/name": APP, "app.kubernetes.io/instance": opts.name}


def _meta(name: str, opts: KubeOptions, **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": opts.namespace, "labels": labels(opts), **extra}


def secret_name(opts: KubeOptions, ordinal: int) -> str:
    return f"{opts.name}-key-{ordinal}"


def node_config(opts: KubeOptions) -> str:
    """The node config every pod runs (`kube node` adds the pod's id)."""
    node = {
        "topology": f"{CONFIG_MOUNT}/topology.toml",
        **opts.node,
        "state_dir": STATE_MOUNT,
        "bind": f"tcp://0.0.0.0:{opts.port}",
        "key_dir": KEYS_MOUNT,
        "status_keys": f"{CONFIG_MOUNT}/operators.keys",
    }
    comment = (
        f"Node config of every pod of StatefulSet {opts.name}; `m3tgossip kube node` sets\n"
        "the id from the pod's ordinal."
    )
    return node_toml(node, opts.overrides, comment)


def _pod_env(extra: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    ]
    env += [{"name": k, "value": v} for k, v in (extra or {}).items()]
    return env


def _hardened() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def statefulset(topology: Topology, opts: KubeOptions) -> dict[str, Any]:
    """The StatefulSet: one pod per node, ordinal `i` = the spec's node `i`."""
    n = len(topology.nodes)
    tcp = {"tcpSocket": {"port": "gossip"}}
    secret_sources = [
        {
            "secret": {
                "name": secret_name(opts, i),
                "items": [{"key": f"{nid}{SECRET_SUFFIX}", "path": f"{nid}{SECRET_SUFFIX}"}],
            }
        }
        for i, nid in enumerate(topology.ids())
    ]
    resources = {
        "requests": {"cpu": opts.cpu, "memory": opts.memory},
        "limits": {"memory": opts.memory},
    }
    init = {
        "name": "keys",
        "image": opts.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["m3tgossip", "kube", "keys", "--name", opts.name]
        + ["--topology", f"{CONFIG_MOUNT}/topology.toml"]
        + ["--from", SECRETS_MOUNT, "--to", KEYS_MOUNT],
        "env": _pod_env(),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "secrets", "mountPath": SECRETS_MOUNT, "readOnly": True},
            {"name": "keys", "mountPath": KEYS_MOUNT},
        ],
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
        "securityContext": _hardened(),
    }
    daemon = {
        "name": "node",
        "image": opts.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["m3tgossip", "kube", "node", "--name", opts.name]
        + ["--topology", f"{CONFIG_MOUNT}/topology.toml", "--config", f"{CONFIG_MOUNT}/node.toml"],
        "env": _pod_env(
            {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HOME": "/tmp", "HF_HOME": "/tmp/hf"}
        ),
        "ports": [{"name": "gossip", "containerPort": opts.port, "protocol": "TCP"}],
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "keys", "mountPath": KEYS_MOUNT, "readOnly": True},
            {"name": "state", "mountPath": STATE_MOUNT},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "resources": resources,
        # the daemon listens before it loads its workload: the port answers within seconds
        "startupProbe": {**tcp, "periodSeconds": 5, "failureThreshold": 60},
        "readinessProbe": {**tcp, "periodSeconds": 10},
        "livenessProbe": {**tcp, "periodSeconds": 20, "failureThreshold": 3},
        "securityContext": _hardened(),
    }
    claim: dict[str, Any] = {
        "metadata": {"name": "state", "labels": labels(opts)},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": opts.storage}},
        },
    }
    if opts.storage_class:
        claim["spec"]["storageClassName"] = opts.storage_class
    pod = {
        "metadata": {"labels": labels(opts)},
        "spec": {
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 60,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": UID,
                "runAsGroup": UID,
                "fsGroup": UID,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "initContainers": [init],
            "containers": [daemon],
            "volumes": [
                {"name": "config", "configMap": {"name": f"{opts.name}-config"}},
                {"name": "secrets", "projected": {"defaultMode": 0o400, "sources": secret_sources}},
                {"name": "keys", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
                {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
            ],
        },
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta(opts.name, opts, annotations={"m3tgossip/topology": topology.name}),
        "spec": {
            "serviceName": opts.name,
            "replicas": n,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": labels(opts)},
            "template": pod,
            "volumeClaimTemplates": [claim],
        },
    }


def manifests(
    topology: Topology, opts: KubeOptions, secrets: Mapping[str, str], operator: str
) -> dict[str, dict[str, Any]]:
    """File name -> manifest for the resolved `topology`; `secrets` maps node id -> the text
    of its secret key file, `operator` is the operator's public key."""
    opts.check(len(topology.nodes))
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(opts.name, opts),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": labels(opts),
            "ports": [
                {"name": "gossip", "port": opts.port, "targetPort": "gossip", "protocol": "TCP"}
            ],
        },
    }
    config = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(f"{opts.name}-config", opts),
        "data": {
            "topology.toml": topology.to_toml(),
            "node.toml": node_config(opts),
            "operators.keys": f"{operator} {OPERATOR}\n",
        },
    }
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(opts.name, opts),
        "spec": {
            "podSelector": {"matchLabels": labels(opts)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": labels(opts)}}],
                    "ports": [{"port": opts.port, "protocol": "TCP"}],
                }
            ],
        },
    }
    out = {"service.json": service, "configmap.json": config}
    for i, nid in enumerate(topology.ids()):
        encoded = base64.b64encode(secrets[nid].encode("ascii")).decode("ascii")
        out[f"secret-{i}.json"] = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": _meta(secret_name(opts, i), opts, annotations={"m3tgossip/node-id": nid}),
            "data": {f"{nid}{SECRET_SUFFIX}": encoded},
        }
    out["statefulset.json"] = statefulset(topology, opts)
    out["networkpolicy.json"] = policy
    return out


def write_manifests(
    topology_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], opts: KubeOptions
) -> list[Path]:
    """Generate keys (first time only) into `OUT/keys`, write `OUT/topology.toml` (resolved)
    and `OUT/manifests/*.json`; returns the manifest paths."""
    import json

    topology = load_topology(topology_path)
    opts.check(len(topology.nodes))
    out = Path(out_dir)
    keys = ensure_keys(out / "keys", topology.ids())
    resolved = resolve(topology, opts, keys)
    (out / "topology.toml").write_text(resolved.to_toml())
    secrets = {
        nid: (out / "keys" / f"{nid}{SECRET_SUFFIX}").read_text(encoding="ascii")
        for nid in topology.ids()
    }
    folder = out / "manifests"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, manifest in manifests(resolved, opts, secrets, keys[OPERATOR]).items():
        path = folder / name
        if name.startswith("secret-"):
            path.unlink(missing_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(manifest, indent=2) + "\n")
        else:
            path.write_text(json.dumps(manifest, indent=2) + "\n")
        written.append(path)
    return written


# ----------------------------------------------------------------------------- inside a pod


def pod_name(env: Mapping[str, str] | None = None) -> str:
    """This pod's name: `POD_NAME` (downward API), else the host name (a StatefulSet pod's
    host name is its pod name)."""
    env = os.environ if env is None else env
    return env.get("POD_NAME") or socket.gethostname()


def pod_node(topology: Topology, name: str, pod: str) -> str:
    """The node id of pod `NAME-<ordinal>`: the spec's node at position `ordinal`."""
    m = re.fullmatch(re.escape(name) + r"-(0|[1-9][0-9]*)", pod)
    if m is None:
        raise ConfigError(
            "pod", pod, f"not a pod of StatefulSet {name!r} (expected {name}-<ordinal>)"
        )
    ordinal = int(m.group(1))
    ids = topology.ids()
    if ordinal >= len(ids):
        raise ConfigError(
            "pod",
            pod,
            f"ordinal {ordinal}, but {topology.source} has {len(ids)} nodes "
            f"(scale the StatefulSet to {len(ids)} replicas)",
        )
    return ids[ordinal]


def install_key(
    topology_path: str | os.PathLike[str],
    name: str,
    pod: str,
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
) -> Path:
    """The init container's step: copy this pod's node secret from the Secret volume `src`
    into `dst` (mode 600, as the daemon requires), checked against the spec's public key."""
    topology = load_topology(topology_path)
    node = pod_node(topology, name, pod)
    source = Path(src) / f"{node}{SECRET_SUFFIX}"
    try:
        text = source.read_text(encoding="ascii")
    except FileNotFoundError:
        raise ConfigError(str(source), "", f"no secret key for node {node} in the volume") from None
    target = Path(dst) / f"{node}{SECRET_SUFFIX}"
    target.unlink(missing_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(text)
    pair = load_secret(target)
    expected = topology.node(node).public_key
    if expected is not None and pair.public != expected:
        target.unlink()
        raise ConfigError(
            str(source), "", f"not the secret of node {node}'s public_key in {topology.source}"
        )
    (Path(dst) / f"{node}{PUBLIC_SUFFIX}").write_text(pair.public + "\n")
    return target

"""What starts a node of a bundle: its `start.sh` and its systemd service unit.

`start.sh` is the one command that starts the node: it runs `m3tgossip node --config node.toml`
from the folder it lies in, wherever that folder is installed, with any extra arguments passed
on (`./start.sh --rounds 50`). Under systemd it takes the state folder from `STATE_DIRECTORY`
and the secret key from `CREDENTIALS_DIRECTORY` (copied into `RUNTIME_DIRECTORY`: a credential
may carry an ACL, which the daemon refuses on a secret key), which the unit provides.

The unit is `Type=notify`: the daemon says `READY=1` once it listens and pings the watchdog
from its loop (`m3tgossip.daemon.notify`). `WatchdogSec=` is `WATCHDOG_ROUNDS` longest
possible round waits (`gossip.round_deadline_s * gossip.max_wait_factor`), at least
`MIN_WATCHDOG_S`; local training and evaluation of one round must fit in it too (raise it with
`--watchdog` for slow machines). The service runs as a user of its own (`DynamicUser=`), gets
its secret key as a credential (`LoadCredential=`), writes only its state folder
(`StateDirectory=` under `ProtectSystem=strict`) and is sandboxed otherwise.
"""

from __future__ import annotations

import math
import re
import shlex

from m3tgossip.daemon.config import GossipConfig
from m3tgossip.net import SECRET_SUFFIX

#: WatchdogSec= is this many of the longest waits of a round
WATCHDOG_ROUNDS = 4
#: ... but never below this many seconds
MIN_WATCHDOG_S = 30
#: seconds systemd waits for READY=1 (imports, model set-up and binding come before it)
START_TIMEOUT_S = 300
#: paths systemd hides with ProtectHome=yes; a bundle or Python in them gets read-only instead
HOME_PATHS = ("/home", "/root", "/run/user")
#: what a path written into a unit may contain (no quoting or specifier escapes needed)
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9._+/@-]*")


def unit_name(node_id: str) -> str:
    """The systemd service name of a node, `m3tgossip-<id>.service`."""
    return f"m3tgossip-{node_id}.service"


def watchdog_seconds(gossip: GossipConfig) -> int:
    """`WatchdogSec=` for a node with these gossip settings."""
    longest = gossip.round_deadline_s * gossip.max_wait_factor
    return max(MIN_WATCHDOG_S, math.ceil(WATCHDOG_ROUNDS * longest))


def check_unit_path(what: str, path: str) -> str:
    """`path` if it can go into a unit as it is (absolute, no spaces, quotes or `%`)."""
    if _PLAIN_PATH.fullmatch(path) is None:
        raise ValueError(
            f"{what} {path!r}: must be an absolute path of letters, digits and ._+@-/ only"
        )
    return path


def service_unit(
    node_id: str,
    topology_name: str,
    install_dir: str,
    gossip: GossipConfig,
    *,
    port: int,
    python: str,
    watchdog_s: int | None = None,
) -> str:
    """The systemd unit of node `node_id` whose bundle folder is installed at `install_dir`."""
    folder = check_unit_path("install folder", install_dir.rstrip("/") or "/")
    watchdog = watchdog_s if watchdog_s is not None else watchdog_seconds(gossip)
    stop_timeout = max(60, watchdog + math.ceil(gossip.leave_timeout_s))
    in_home = any(p == h or p.startswith(h + "/") for p in (folder, python) for h in HOME_PATHS)
    state = f"m3tgossip/{node_id}"
    title = " ".join(topology_name.split()).replace("%", "%%")
    # binding a port below 1024 is the one privilege the daemon may need
    caps = "CAP_NET_BIND_SERVICE" if port < 1024 else ""
    lines = [
        f"# m3tgossip node {node_id} of topology {title}, from `m3tgossip deploy bundle`.",
        f"# Install: this node's bundle folder at {folder}, then",
        f"#   cp {folder}/{unit_name(node_id)} /etc/systemd/system/",
        f"#   systemctl daemon-reload && systemctl enable --now {unit_name(node_id)}",
        "[Unit]",
        f"Description=m3tgossip node {node_id} ({title})",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={folder}/start.sh",
        "Restart=on-failure",
        "RestartSec=5",
        f"TimeoutStartSec={START_TIMEOUT_S}",
        f"TimeoutStopSec={stop_timeout}",
        f"WatchdogSec={watchdog}",
        "# a user of its own; the secret key is handed over as a credential",
        "DynamicUser=yes",
        f"LoadCredential={node_id}{SECRET_SUFFIX}:{folder}/keys/{node_id}{SECRET_SUFFIX}",
        f"StateDirectory={state}",
        "StateDirectoryMode=0700",
        f"RuntimeDirectory={state}",
        "RuntimeDirectoryMode=0700",
        f"CacheDirectory={state}",
        f"ReadWritePaths=-%S/{state}",
        f"Environment=XDG_CACHE_HOME=%C/{state}",
        "Environment=PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1",
        "UMask=0077",
        "ProtectSystem=strict",
        f"ProtectHome={'read-only' if in_home else 'yes'}",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "NoNewPrivileges=yes",
        f"CapabilityBoundingSet={caps}",
        *([f"AmbientCapabilities={caps}"] if caps else []),
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "SystemCallArchitectures=native",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


def start_script(node_id: str, python: str) -> str:
    """`start.sh` of node `node_id`: runs the daemon with `python` from the script's folder."""
    return f"""#!/bin/sh
# Starts m3tgossip node {node_id} from this bundle folder, wherever it is installed.
# Extra arguments go to `m3tgossip node` (e.g. ./start.sh --rounds 50). Under systemd the
# state folder is $STATE_DIRECTORY and the secret key comes from $CREDENTIALS_DIRECTORY;
# otherwise they are ./state and ./keys (node.toml). M3TGOSSIP_PYTHON overrides the Python.
set -eu
HERE=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
PYTHON=${{M3TGOSSIP_PYTHON:-{shlex.quote(python)}}}
set -- --config "$HERE/node.toml" "$@"
if [ -n "${{CREDENTIALS_DIRECTORY:-}}" ]; then
    # A credential may carry an ACL for the service's user, which the daemon refuses on a
    # secret key: it uses a copy in the service's private runtime folder instead.
    umask 077
    rm -f "$RUNTIME_DIRECTORY/{node_id}{SECRET_SUFFIX}"
    cp "$CREDENTIALS_DIRECTORY/{node_id}{SECRET_SUFFIX}" "$RUNTIME_DIRECTORY/"
    set -- --key-dir "$RUNTIME_DIRECTORY" "$@"
fi
if [ -n "${{STATE_DIRECTORY:-}}" ]; then
    set -- --state-dir "$STATE_DIRECTORY" "$@"
fi
exec "$PYTHON" -m m3tgossip node "$@"
"""

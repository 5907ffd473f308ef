"""A federation from its bundles on one machine, every node in a network namespace of its own.

`NamespaceFederation` is a rehearsal of a campus deployment without the campus: it gives every
node of a spec its own namespace and address (`m3tgossip.harness.netlab`), writes the bundles
for those addresses with `write_bundle`, starts every node with its bundle's own `start.sh` run
inside its namespace (`ip netns exec NS DIR/nodes/ID/start.sh`), and queries `m3tgossip status`
from one more namespace holding only the operator key. `close` stops the daemons (SIGTERM, then
SIGKILL after a bound) and deletes every namespace. Needs root (`netns_available`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from m3tgossip.deploy.bundle import BundleOptions, BundleResult, write_bundle
from m3tgossip.errors import ConfigError
from m3tgossip.harness.netlab import PORT, NetLab
from m3tgossip.topology import load_topology

#: the NetLab member the operator's namespace belongs to (not a valid node id: never a node's)
OPERATOR_MEMBER = "(operator)"
#: what a service manager around this process may have set, which is not for the daemons
ENV_OF_A_SERVICE = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "STATE_DIRECTORY",
    "RUNTIME_DIRECTORY",
    "CREDENTIALS_DIRECTORY",
)
#: seconds stopping daemons get before they are killed (an edu daemon's exit alone takes
#: about 10 s on an idle machine, mostly the interpreter's final garbage collection)
STOP_TIMEOUT_S = 120.0


class NamespaceFederation:
    """The nodes of `topology` started from bundles in `out`, one namespace each.

    `options.prefix` is ignored: the units point at `out/nodes` (where the bundles are).
    `env` is added to the daemons' environment (e.g. PYTHONPATH).
    """

    def __init__(
        self,
        topology: str | os.PathLike[str],
        out: str | os.PathLike[str],
        options: BundleOptions | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.topology = Path(topology)
        self.out = Path(out)
        self.options = options or BundleOptions()
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        for name in ENV_OF_A_SERVICE:
            self.env.pop(name, None)
        self.ids = load_topology(self.topology).ids()
        self.lab = NetLab([*self.ids, OPERATOR_MEMBER])
        self.procs: dict[str, subprocess.Popen] = {}
        self.bundle: BundleResult | None = None

    def setup(self) -> BundleResult:
        """Create the namespaces and write the bundles for their addresses."""
        self.out.mkdir(parents=True, exist_ok=True)
        hosts = self.out / "hosts.toml"
        hosts.write_text(
            "".join(f'"{n}" = "{self.lab.addr(n)}:{PORT}"\n' for n in self.ids), encoding="utf-8"
        )
        self.lab.setup()
        options = replace(self.options, prefix=str((self.out / "nodes").resolve()))
        self.bundle = write_bundle(self.topology, hosts, self.out, options)
        return self.bundle

    def start(self, node_id: str, *args: str) -> subprocess.Popen:
        """Start `node_id` with its bundle's start.sh inside its namespace (stderr to a log)."""
        if self.bundle is None:
            raise RuntimeError("setup() first")
        folder = self.bundle.node_dir(node_id)
        log = open(self.out / f"{node_id}.log", "ab")
        try:
            proc = subprocess.Popen(
                [*self.lab.exec_prefix(node_id), str(folder / "start.sh"), *args],
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env=self.env,
                text=True,
            )
        finally:
            log.close()
        self.procs[node_id] = proc
        return proc

    def status(self, node_id: str, timeout_s: float = 5.0) -> dict[str, Any]:
        """`m3tgossip status` of `node_id`, run in the operator's namespace with its key."""
        if self.bundle is None:
            raise RuntimeError("setup() first")
        key = self.out / "operator" / self.options.operator
        command = [
            *self.lab.exec_prefix(OPERATOR_MEMBER),
            sys.executable,
            "-m",
            "m3tgossip",
            "status",
            "--topology",
            str(self.out / "topology.toml"),
            "--id",
            node_id,
            "--key",
            str(key),
            "--timeout",
            str(timeout_s),
        ]
        r = subprocess.run(
            command, capture_output=True, text=True, env=self.env, timeout=timeout_s + 30
        )
        if r.returncode != 0:
            raise ConfigError("status", node_id, r.stderr.strip() or f"exit {r.returncode}")
        return json.loads(r.stdout)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> dict[str, int]:
        """SIGTERM every running daemon and reap it, SIGKILL what still runs `timeout_s` after
        the signal; exit codes (-9: killed)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        codes = {}
        for node_id, proc in self.procs.items():
            try:
                codes[node_id] = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[node_id] = proc.wait(timeout=STOP_TIMEOUT_S)
            if proc.stdout:
                proc.stdout.close()
        return codes

    def pids_left(self) -> dict[str, list[int]]:
        """Processes still running in any of the namespaces (namespace -> pids)."""
        left = {}
        for member in [*self.ids, OPERATOR_MEMBER]:
            ns = self.lab.ns(member)
            r = subprocess.run(
                ["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=20
            )
            pids = [int(p) for p in r.stdout.split()]
            if pids:
                left[ns] = pids
        return left

    def close(self) -> list[str]:
        """Kill what still runs, delete every namespace; the namespaces left (none if clean)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)
            if proc.stdout and not proc.stdout.closed:
                proc.stdout.close()
        return self.lab.cleanup()

    def __enter__(self) -> NamespaceFederation:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

"""Network namespaces for chaos runs: one per daemon, a bridge between them, and partitions.

Each daemon runs in its own namespace `m3t<tag>n<i>`, joined by a veth pair to a bridge in one
more namespace (`m3t<tag>br`); nothing is placed in the root namespace and ZeroMQ traffic stays
inside these namespaces on addresses of 10.250.0.0/16. A partition takes the veths of one side
down, moves them to a second bridge and brings them up again, so each side stays connected
within itself; healing moves them back. Creating namespaces needs root (`netns_available`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

SUBNET = "10.250"
#: the port every daemon listens on inside its namespace
PORT = 5701


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


def netns_available() -> tuple[bool, str]:
    """Whether this process can create network namespaces and bridges (and why not)."""
    if sys.platform != "linux":
        return False, "not Linux"
    name = f"m3tprobe{os.getpid()}"
    try:
        r = _ip("netns", "add", name, check=False)
        if r.returncode != 0:
            return False, f"ip netns add failed: {r.stderr.strip() or r.returncode}"
        r = _ip("-n", name, "link", "add", "br0", "type", "bridge", check=False)
        ok = r.returncode == 0
        why = "" if ok else f"cannot create a bridge: {r.stderr.strip()}"
        _ip("netns", "del", name, check=False)
        return ok, why
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"ip not usable: {exc}"


def list_netns() -> list[str]:
    """The names of the network namespaces on this machine."""
    r = _ip("netns", "list", check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


class NetLab:
    """One namespace per daemon plus a bridge namespace; partitions by moving veths.

    Every name carries a per-run tag, and `cleanup` removes all of them (deleting a namespace
    deletes the veth ends and bridges inside it), also after an error.
    """

    def __init__(self, nodes: list[str], tag: str | None = None) -> None:
        self.tag = tag or uuid.uuid4().hex[:4]
        self.nodes = list(nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.bridge_ns = f"m3t{self.tag}br"
        self.created: list[str] = []
        self.split: set[str] = set()

    def ns(self, node: str) -> str:
        """The namespace `node`'s daemon runs in."""
        return f"m3t{self.tag}n{self.index[node]}"

    def addr(self, node: str) -> str:
        """`node`'s address inside its namespace."""
        i = self.index[node] + 1
        return f"{SUBNET}.{i // 250}.{i % 250 + 1}"

    def exec_prefix(self, node: str) -> tuple[str, ...]:
        """The command prefix that runs a process in `node`'s namespace."""
        return ("ip", "netns", "exec", self.ns(node))

    def _veth(self, node: str) -> str:
        return f"m3{self.tag}a{self.index[node]}"

    def setup(self) -> None:
        """Create the bridge namespace with both bridges, and every node's namespace."""
        _ip("netns", "add", self.bridge_ns)
        self.created.append(self.bridge_ns)
        for br in ("br0", "br1"):
            _ip("-n", self.bridge_ns, "link", "add", br, "type", "bridge")
            _ip("-n", self.bridge_ns, "link", "set", br, "up")
        for node in self.nodes:
            ns, outer, inner = self.ns(node), self._veth(node), f"m3{self.tag}b{self.index[node]}"
            _ip("netns", "add", ns)
            self.created.append(ns)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", outer, "netns", self.bridge_ns)
            _ip("link", "set", inner, "netns", ns)
            _ip("-n", self.bridge_ns, "link", "set", outer, "master", "br0")
            _ip("-n", self.bridge_ns, "link", "set", outer, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", inner, "name", "eth0")
            _ip("-n", ns, "addr", "add", f"{self.addr(node)}/16", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def _move(self, nodes: list[str], bridge: str) -> None:
        for node in nodes:
            veth = self._veth(node)
            _ip("-n", self.bridge_ns, "link", "set", veth, "down")
            _ip("-n", self.bridge_ns, "link", "set", veth, "master", bridge)
            _ip("-n", self.bridge_ns, "link", "set", veth, "up")

    def partition(self, side: list[str]) -> None:
        """Cut `side` off from the rest (each side stays connected within itself)."""
        new = [n for n in side if n not in self.split]
        self._move(new, "br1")
        self.split |= set(new)

    def heal(self) -> None:
        """Join every cut-off node to the rest again."""
        self._move(sorted(self.split), "br0")
        self.split.clear()

    def cleanup(self) -> list[str]:
        """Delete every namespace this lab created; returns those that could not be deleted."""
        left = []
        for ns in reversed(self.created):
            r = _ip("netns", "del", ns, check=False)
            if r.returncode != 0 and ns in list_netns():
                left.append(ns)
        self.created = left
        return left

    def leftovers(self) -> list[str]:
        """Namespaces of this lab that still exist."""
        return [ns for ns in list_netns() if ns.startswith(f"m3t{self.tag}")]

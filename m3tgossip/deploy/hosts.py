"""The hosts file of a deployment: where each node of the shared spec listens.

One line per node, `NODE_ID = "HOST:PORT"` (TOML); ids with a dot are quoted (`"n.1" = ...`):

```toml
uni-a = "10.0.0.11:5701"
inst-a = "inst-a.uni-a.example:5701"
stu-a1 = "[2001:db8::21]:5701"
```

HOST is an IPv4 address, an IPv6 address in brackets, or a DNS name that the other nodes resolve
to this machine; it is also what the daemon binds. Every node of the spec must be listed, no
other id, and no two nodes on the same HOST:PORT.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Sequence
from pathlib import Path

from m3tgossip.errors import ConfigError

_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def parse_endpoint(text: str) -> tuple[str, int]:
    """(host, port) of `HOST:PORT` (`[v6]:PORT` for IPv6); ValueError saying what is wrong."""
    if text.startswith("["):
        inner, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{text!r}: an IPv6 address is written [ADDRESS]:PORT")
        host, port_text = inner, rest[1:]
        try:
            unspecified = ipaddress.IPv6Address(host).is_unspecified
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
        if unspecified:
            raise ValueError(f"{text!r}: {host} is no address other nodes can reach")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r}: expected HOST:PORT")
        if ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 address in brackets, [ADDRESS]:PORT")
        _check_host(text, host)
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: port {port_text!r} is not a number 1..65535")
    return host, int(port_text)


def _check_host(text: str, host: str) -> None:
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        address = None
    if address is not None:
        if address.is_unspecified:
            raise ValueError(
                f"{text!r}: {host} is no address other nodes can reach; give the machine's own"
            )
        return
    if re.fullmatch(r"[0-9.]+", host):
        raise ValueError(f"{text!r}: {host!r} is not an IPv4 address")
    labels = host.removesuffix(".").split(".")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"{text!r}: {host!r} is not a host name or address")


def load_hosts(path: str | os.PathLike[str], node_ids: Sequence[str]) -> dict[str, tuple[str, int]]:
    """node id -> (host, port) from a hosts file covering exactly `node_ids`.

    ConfigError naming the file and the entry for: a file that is not TOML, a value that is not
    a `"HOST:PORT"` string, a bad host or port, an id the spec does not have, a node of the
    spec left out, two nodes on one HOST:PORT.
    """
    source = str(path)
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(source, "", "no such hosts file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, "", f"cannot read hosts file: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        problem = f'not valid TOML (NODE_ID = "HOST:PORT" lines): {exc}'
        raise ConfigError(source, "", problem) from None
    known = set(node_ids)
    hosts: dict[str, tuple[str, int]] = {}
    used: dict[tuple[str, int], str] = {}
    for node_id, value in data.items():
        if not isinstance(value, str):
            hint = ' (quote an id that has a dot: "n.1" = ...)' if isinstance(value, dict) else ""
            raise ConfigError(source, node_id, f'expected a "HOST:PORT" string{hint}')
        if node_id not in known:
            raise ConfigError(
                source, node_id, f"no such node in the topology (its nodes: {_few(node_ids)})"
            )
        try:
            host, port = parse_endpoint(value)
        except ValueError as exc:
            raise ConfigError(source, node_id, str(exc)) from None
        key = (host.lower(), port)
        if key in used:
            raise ConfigError(
                source,
                node_id,
                f"{value} is also the endpoint of {used[key]}; each node needs its own",
            )
        used[key] = node_id
        hosts[node_id] = (host, port)
    missing = [n for n in node_ids if n not in hosts]
    if missing:
        raise ConfigError(
            source, "", f"no HOST:PORT for {len(missing)} node(s) of the topology: {_few(missing)}"
        )
    return hosts


def _few(ids: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(ids[:limit])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")

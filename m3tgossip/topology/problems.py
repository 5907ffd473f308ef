"""How topology errors and warnings name what is wrong: unknown keys, graph parts, long lists."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import networkx as nx

from m3tgossip.errors import ConfigError


def reject_unknown(
    table: Mapping[str, Any], allowed: tuple[str, ...], source: str, prefix: str, what: str
) -> None:
    """ConfigError for the first key of `table` not in `allowed`, with the closest match."""
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f'; did you mean "{close[0]}"?' if close else f"; expected {', '.join(allowed)}"
            raise ConfigError(source, f"{prefix}{key}", f"unknown {what}{hint}")


def describe_parts(graph: nx.Graph, order: list[str]) -> str:
    """The connected parts of `graph`, e.g. `2 parts: a, b | c` (nodes and parts in `order`)."""
    import networkx as nx

    rank = {node: i for i, node in enumerate(order)}
    parts = sorted(
        (sorted(part, key=rank.__getitem__) for part in nx.connected_components(graph)),
        key=lambda part: rank[part[0]],
    )
    return f"{len(parts)} parts: " + " | ".join(abbreviate(part) for part in parts)


def abbreviate(ids: list[str], limit: int = 8) -> str:
    """The first `limit` ids, comma-separated, and how many more there are."""
    shown = ", ".join(ids[:limit])
    return shown if len(ids) <= limit else f"{shown}, ... (+{len(ids) - limit} more)"

"""Error types shared across the package.

`ConfigError` is raised for bad operator input (topology specs, node configs, data folders) and
always names the file and the offending entry. `ProtocolError` is the single error the wire
decoder raises for anything a peer sent that does not follow the protocol.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad operator input. The message names the file and the entry at fault."""

    def __init__(self, source: str, entry: str, problem: str) -> None:
        self.source = str(source)
        self.entry = entry
        self.problem = problem
        where = f"{self.source}: {entry}" if entry else self.source
        super().__init__(f"{where}: {problem}")


class ProtocolError(ValueError):
    """A message from a peer that does not follow the wire protocol.

    The daemon logs it with its reason and drops the message; it never escapes the loop.
    """

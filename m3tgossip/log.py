"""Logging set-up: `get_logger(__name__)`, level from `M3TGOSSIP_LOG_LEVEL`, colour on a tty."""

from __future__ import annotations

import logging
import os
import sys

_CONFIGURED = False
_COLOURS = {"WARNING": "\033[33m", "ERROR": "\033[31m", "CRITICAL": "\033[31;1m"}


class _Formatter(logging.Formatter):
    def __init__(self, colour: bool) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self.colour and record.levelname in _COLOURS:
            return f"{_COLOURS[record.levelname]}{text}\033[0m"
        return text


def get_logger(name: str) -> logging.Logger:
    """Return a logger under the `m3tgossip` hierarchy, configuring the root handler once."""
    global _CONFIGURED
    if not _CONFIGURED:
        root = logging.getLogger("m3tgossip")
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Formatter(colour=sys.stderr.isatty()))
        root.addHandler(handler)
        root.setLevel(os.environ.get("M3TGOSSIP_LOG_LEVEL", "INFO").upper())
        root.propagate = False
        _CONFIGURED = True
    if not name.startswith("m3tgossip"):
        name = f"m3tgossip.{name}"
    return logging.getLogger(name)

"""The release ledger: what a private node has spent, on disk before any release can leave.

The round engine writes the release gate's accounting here in the release phase of every
round, after charging and before any schedule sends a value: write to a temporary file, fsync,
rename, fsync the folder. A node killed between sending and its next checkpoint therefore
finds its spending on restart, and resumes from the later of ledger and checkpoint
(`ReleaseGate.spend`), so a crash can never un-spend a release. Starting over with a fresh
checkpoint (`--fresh`) keeps the ledger: the learners whose records the node holds have spent
what they spent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FILENAME = "privacy-ledger.json"


class LedgerError(RuntimeError):
    """A ledger exists but cannot be read (names the file and the reason)."""


def save(folder: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write `state` (a gate's `state()`) durably to `folder/privacy-ledger.json`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / FILENAME
    tmp = folder / f".{FILENAME}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(state, fh, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return final


def load(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The ledger in `folder`, None if there is none; stray temporary files are removed."""
    folder = Path(folder)
    for stray in folder.glob(f".{FILENAME}.*.tmp"):
        stray.unlink(missing_ok=True)
    path = folder / FILENAME
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LedgerError(f"{path}: unreadable privacy ledger: {exc}") from exc
    if not isinstance(state, dict):
        raise LedgerError(f"{path}: the privacy ledger is not a JSON object")
    return state

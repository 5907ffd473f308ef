"""Atomic checkpoints of a node's state: write to a temporary file, fsync, rename, fsync the folder.

A checkpoint is an uncompressed `.npz` (arrays only, `allow_pickle=False` on load) with one extra
entry, `__meta__`, holding a JSON document (round, node id, model id, ...). A reader sees either
the previous complete checkpoint or the new complete one, never a torn file, even if the process
is killed with SIGKILL in the middle of writing.
"""

from __future__ import annotations

import json
import os
import threading
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

META_KEY = "__meta__"
FILENAME = "checkpoint.npz"


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be read (names the file and the reason)."""


def save(folder: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """Write `arrays` and `meta` atomically to `folder/checkpoint.npz`; return the path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if META_KEY in arrays:
        raise ValueError(f"array name {META_KEY!r} is reserved")
    final = folder / FILENAME
    tmp = folder / f".{FILENAME}.{os.getpid()}.tmp"
    payload = dict(arrays)
    payload[META_KEY] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    with open(tmp, "wb") as fh:
        np.savez(fh, **payload)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return final


def keep_stage(folder: str | os.PathLike, stage: int) -> Path:
    """Keep the checkpoint in `folder` as the one stage `stage` ended with,
    `stage-<stage>.npz` beside it (copied atomically, like a checkpoint)."""
    folder = Path(folder)
    final = folder / f"stage-{stage}.npz"
    tmp = folder / f".stage-{stage}.npz.{os.getpid()}.tmp"
    with open(folder / FILENAME, "rb") as src, open(tmp, "wb") as fh:
        while chunk := src.read(1 << 20):
            fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    return final


def load(folder: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """Read the checkpoint in `folder`; None if there is none. Stray temporary files are removed."""
    folder = Path(folder)
    for stray in folder.glob(f".{FILENAME}.*.tmp"):
        stray.unlink(missing_ok=True)
    return load_file(folder / FILENAME)


def load_file(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """Read one checkpoint file (a node's, or one a stage ended with); None if there is none."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: np.array(data[k]) for k in data.files if k != META_KEY}
            meta = json.loads(bytes(data[META_KEY]).decode())
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint: {exc}") from exc
    return arrays, meta


class Writer:
    """Writes one folder's checkpoints on a background thread, so a round need not wait for the
    disk (fsync). Writes happen in order, at most one at a time: `submit` first waits for the
    previous write. An error of a background write is raised by the next `submit` or `flush`.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = folder
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Write copies of `arrays` and `meta` in the background (see `save`)."""
        self.flush()
        arrays = {k: np.array(v, copy=True) for k, v in arrays.items()}
        meta = json.loads(json.dumps(meta))
        self._thread = threading.Thread(
            target=self._write, args=(arrays, meta), name="checkpoint", daemon=True
        )
        self._thread.start()

    def _write(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        try:
            save(self.folder, arrays, meta)
        except BaseException as exc:  # noqa: BLE001 - handed to the owner's next call
            self._error = exc

    def flush(self) -> None:
        """Wait for the write in progress; raise its error, if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

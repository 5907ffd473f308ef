"""`Adapter`: how a node turns the records of its data folder into the encoders' inputs.

Fitted on the node's training records and kept with its state (so `m3tgossip predict` adapts new
records exactly as training did):

- tabular: each of the `TABULAR_DIM` encoder slots reads one column. A column named like one of
  `TABULAR_FEATURES` takes that feature's slot; the other columns fill the free slots in the
  order of the file; columns beyond the width are dropped (named in the notes), free slots stay
  0. With `[tabular] standardize` (the default) each column is z-scored with the mean and
  standard deviation of the node's training records; a missing value is 0 (the mean).
- signal: windows are already fitted to 64 x 4 when read; with `[signal] standardize` each
  channel is z-scored with the training records' mean and standard deviation.
- clickstream: the event names of the training records are given token ids
  (`inputs.build_vocabulary`): the model sees the most recent `CLICK_LEN` events, left-aligned
  and padded with 0 after them, as the built-in sessions are.
- labels: the tasks' class names, so predictions are written as the folder names its classes.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from m3tgossip.edu.data.folder import RawFolder
from m3tgossip.edu.data.inputs import build_vocabulary, event_ids
from m3tgossip.edu.data.records import EduData
from m3tgossip.edu.data.schema import (
    CLICK_LEN,
    SIGNAL_SHAPE,
    TABULAR_DIM,
    TABULAR_FEATURES,
    TASKS,
)

VERSION = 1


def tabular_slots(columns: Sequence[str]) -> tuple[tuple[str, ...], list[str]]:
    """The column each encoder slot reads ("" for none) and the columns left out."""
    slots = [c if c in columns else "" for c in TABULAR_FEATURES]
    rest = [c for c in columns if c not in TABULAR_FEATURES]
    free = [k for k, c in enumerate(slots) if not c]
    for k, c in zip(free, rest, strict=False):
        slots[k] = c
    return tuple(slots), rest[len(free) :]


def _scale(values: np.ndarray) -> tuple[float, float]:
    known = values[~np.isnan(values)]
    if not len(known):
        return 0.0, 1.0
    spread = float(known.std())
    return float(known.mean()), spread if spread > 1e-8 else 1.0


@dataclass(frozen=True)
class Adapter:
    """Preprocessing of one node (see the module docstring); JSON-able."""

    tabular_slots: tuple[str, ...] = TABULAR_FEATURES
    tabular_mean: tuple[float, ...] = (0.0,) * TABULAR_DIM
    tabular_scale: tuple[float, ...] = (1.0,) * TABULAR_DIM
    signal_mean: tuple[float, ...] = (0.0,) * SIGNAL_SHAPE[1]
    signal_scale: tuple[float, ...] = (1.0,) * SIGNAL_SHAPE[1]
    vocabulary: dict[str, int] = field(default_factory=dict)
    #: task -> class names (index = class); tasks not listed use "0", "1", ...
    classes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: "folder" (fitted on a data folder) or "builtin" (a node trained on the built-in data)
    source: str = "builtin"

    @classmethod
    def fit(cls, raw: RawFolder, train: np.ndarray) -> Adapter:
        """Fit on the records where the boolean mask `train` is True."""
        m = raw.manifest
        slots, _ = tabular_slots(raw.tabular_columns)
        mean, scale = [0.0] * TABULAR_DIM, [1.0] * TABULAR_DIM
        rows = train & raw.present["tabular"]
        if m.tabular_standardize:
            for k, column in enumerate(slots):
                if column:
                    j = raw.tabular_columns.index(column)
                    mean[k], scale[k] = _scale(raw.tabular[rows, j])
        s_mean, s_scale = [0.0] * SIGNAL_SHAPE[1], [1.0] * SIGNAL_SHAPE[1]
        windows = raw.signal[train & raw.present["signal"]]
        if m.signal_standardize and len(windows):
            for c in range(SIGNAL_SHAPE[1]):
                if windows[..., c].any():
                    s_mean[c], s_scale[c] = _scale(windows[..., c].astype(np.float64).ravel())
        counts = Counter(e for i in np.flatnonzero(train) for e in raw.events[i])
        return cls(
            tabular_slots=slots,
            tabular_mean=tuple(mean),
            tabular_scale=tuple(scale),
            signal_mean=tuple(s_mean),
            signal_scale=tuple(s_scale),
            vocabulary=build_vocabulary(counts),
            classes={t: spec.classes for t, spec in m.tasks.items()},
            source="folder",
        )

    def class_names(self, task: str) -> tuple[str, ...]:
        return self.classes.get(task) or tuple(str(i) for i in range(TASKS[task]))

    def apply(
        self, raw: RawFolder, tasks: Sequence[str] | None = None
    ) -> tuple[EduData, list[str]]:
        """The records of `raw` as `EduData` (labels only for `tasks`, default all the folder's),
        and notes on columns this adapter could not use."""
        n = len(raw)
        data = EduData.empty(n)
        # whose record each is: DP-SGD clips per learner, and erasure removes a learner's all
        data.learner = np.asarray([str(x) for x in raw.learners], dtype=str)
        notes: list[str] = []
        for m in ("tabular", "clickstream", "text", "image", "signal"):
            data.present[m] = raw.present[m].copy()
        if raw.present["tabular"].any():
            unused = [c for c in raw.tabular_columns if c not in self.tabular_slots]
            if unused:
                notes.append(f"tabular: columns not used (the encoder reads 12): {unused}")
            for k, column in enumerate(self.tabular_slots):
                if not column:
                    continue
                if column not in raw.tabular_columns:
                    notes.append(f"tabular: no column {column!r}, read as missing")
                    continue
                x = raw.tabular[:, raw.tabular_columns.index(column)]
                z = (x - self.tabular_mean[k]) / self.tabular_scale[k]
                data.tabular[:, k] = np.nan_to_num(z, nan=0.0)
            data.tabular[~data.present["tabular"]] = 0
        mean = np.array(self.signal_mean, np.float32)
        scale = np.array(self.signal_scale, np.float32)
        data.signal = ((raw.signal - mean) / scale).astype(np.float32)
        data.signal[~data.present["signal"]] = 0
        data.image = raw.image.copy()
        data.text = list(raw.text)
        for i, events in enumerate(raw.events):
            ids = event_ids(events[-CLICK_LEN:], self.vocabulary)
            data.clickstream[i, : len(ids)] = ids
        for t, labels in raw.labels.items():
            if tasks is None or t in tasks:
                data.labels[t] = labels.copy()
        for g, values in raw.groups().items():
            data.groups[g] = values
        return data, notes

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["version"] = VERSION
        return out

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Adapter:
        if raw.get("version") != VERSION:
            raise ValueError(f"preprocessing version {raw.get('version')!r}, expected {VERSION}")
        return cls(
            tabular_slots=tuple(raw["tabular_slots"]),
            tabular_mean=tuple(float(x) for x in raw["tabular_mean"]),
            tabular_scale=tuple(float(x) for x in raw["tabular_scale"]),
            signal_mean=tuple(float(x) for x in raw["signal_mean"]),
            signal_scale=tuple(float(x) for x in raw["signal_scale"]),
            vocabulary={str(k): int(v) for k, v in raw["vocabulary"].items()},
            classes={str(t): tuple(map(str, c)) for t, c in raw["classes"].items()},
            source=str(raw.get("source", "folder")),
        )

    def to_array(self) -> np.ndarray:
        """The adapter as uint8 JSON bytes, to keep among a node's state arrays."""
        return np.frombuffer(json.dumps(self.to_json(), sort_keys=True).encode(), np.uint8).copy()

    @classmethod
    def from_array(cls, array: np.ndarray) -> Adapter:
        return cls.from_json(json.loads(bytes(np.asarray(array, np.uint8)).decode()))

"""Reading one node's data folder (format: `m3tgossip/docs/data.md`) into `RawFolder`.

`read_folder(path)` reads the manifest, labels.csv (the record index), learners.csv and the file
of every modality the manifest lists, checks every row, and fits each image and signal window to
the encoders' shapes as it reads it (`inputs`), so a folder of large images never sits in
memory. What needs statistics of the node's training records (tabular standardisation, signal
standardisation, the clickstream vocabulary) is left to `adapt.Adapter`. Any bad file, row or
value stops with a `ConfigError` naming the file, the row and the field.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from m3tgossip.edu.data.inputs import channel_slots, fit_image, fit_signal
from m3tgossip.edu.data.manifest import Manifest, read_manifest
from m3tgossip.edu.data.schema import (
    CLICK_LEN,
    IMAGE_SHAPE,
    MODALITIES,
    SIGNAL_CHANNELS,
    SIGNAL_SHAPE,
)
from m3tgossip.edu.data.tables import MISSING, Table, json_lines, where
from m3tgossip.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SIGNAL_SUFFIXES = (".npy", ".csv")
SPLITS = ("train", "test")
#: columns of a signal CSV that hold the time stamp
TIME_COLUMNS = ("t", "time")
#: largest image (pixels) read; a bigger one is refused as a likely decompression bomb
MAX_IMAGE_PIXELS = 64_000_000


@dataclass
class RawFolder:
    """A data folder as read: one entry per record of labels.csv, inputs fitted where that needs
    no statistics."""

    manifest: Manifest
    records: list[str]
    #: each record's learner (the record id itself where no file names one)
    learners: list[str]
    #: manifest task -> int64 [N] class index, -1 where unlabelled
    labels: dict[str, np.ndarray]
    #: int8 per record from labels.csv's split column: 1 test, 0 train, -1 not given (None: no
    #: record has one)
    split: np.ndarray | None
    #: learner -> {attribute: value} from learners.csv
    learner_groups: dict[str, dict[str, str]]
    group_names: tuple[str, ...]
    text: list[str]
    image: np.ndarray
    signal: np.ndarray
    #: per record, its most recent `CLICK_LEN` event names in time order
    events: list[list[str]]
    #: per record, how many events its log has (before truncation)
    event_counts: np.ndarray
    tabular: np.ndarray
    tabular_columns: tuple[str, ...]
    present: dict[str, np.ndarray]
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def groups(self) -> dict[str, np.ndarray]:
        """Attribute -> value per record (through its learner; "unknown" where not given)."""
        return {
            g: np.array(
                [self.learner_groups.get(lr, {}).get(g) or "unknown" for lr in self.learners],
                dtype=str,
            )
            for g in self.group_names
        }


class _Records:
    """The record index: ids in order, their learners, and the files that named them."""

    def __init__(self, fixed: bool) -> None:
        self.fixed = fixed
        self.ids: list[str] = []
        self.index: dict[str, int] = {}
        self.learner: dict[int, tuple[str, str]] = {}  # position -> (learner, where it came from)

    def get(self, table: Table, row: int, record: str) -> int:
        if record not in self.index:
            if self.fixed:
                raise table.error(row, "record_id", f"{record!r} is not in labels.csv")
            self.index[record] = len(self.ids)
            self.ids.append(record)
        return self.index[record]

    def set_learner(self, i: int, learner: str, table: Table, row: int) -> None:
        known = self.learner.get(i)
        if known is not None and known[0] != learner:
            raise table.error(
                row,
                "learner_id",
                f"record {self.ids[i]!r} belongs to learner {known[0]!r} in {known[1]}",
            )
        self.learner.setdefault(i, (learner, f"{table.path.name} row {row}"))


def _labels(m: Manifest, records: _Records) -> tuple[dict[str, list[int]], list[str | None]]:
    table = Table(m.file("labels"), ("record_id", *m.tasks))
    labels: dict[str, list[int]] = {t: [] for t in m.tasks}
    split: list[str | None] = []
    for row, values in table.rows():
        record = table.ident(row, values, "record_id")
        if record in records.index:
            raise table.error(row, "record_id", f"{record!r} appears twice")
        i = records.get(table, row, record)
        if values.get("learner_id"):
            records.set_learner(i, values["learner_id"], table, row)
        for name, task in m.tasks.items():
            value = values[name]
            label = -1 if value in MISSING else task.label(value)
            if label is None:
                allowed = ", ".join(task.classes)
                raise table.error(row, name, f"expected one of {allowed} (or empty), got {value!r}")
            labels[name].append(label)
        choice = values.get("split", "")
        if choice and choice not in SPLITS:
            raise table.error(row, "split", f"expected train or test, got {choice!r}")
        split.append(choice or None)
    return labels, split


def _learners(m: Manifest) -> tuple[dict[str, dict[str, str]], tuple[str, ...]]:
    path = m.file("learners")
    if not path.exists():
        if m.groups:
            raise ConfigError(str(path), "", "missing, but the manifest lists group attributes")
        return {}, ()
    table = Table(path, ("learner_id", *(m.groups or ())))
    out: dict[str, dict[str, str]] = {}
    for row, values in table.rows():
        learner = table.ident(row, values, "learner_id")
        if learner in out:
            raise table.error(row, "learner_id", f"{learner!r} appears twice")
        out[learner] = {k: v for k, v in values.items() if k != "learner_id"}
    names = (
        m.groups if m.groups is not None else tuple(h for h in table.header if h != "learner_id")
    )
    return out, names


def _tabular(m: Manifest, records: _Records) -> tuple[dict[int, np.ndarray], tuple[str, ...]]:
    table = Table(m.file("tabular"), ("learner_id", "record_id", *(m.tabular_features or ())))
    rows: dict[int, np.ndarray] = {}
    columns: tuple[str, ...] = m.tabular_features or ()
    for row, values in table.rows():
        if not columns:
            columns = tuple(h for h in table.header if h not in ("learner_id", "record_id"))
        i = records.get(table, row, table.ident(row, values, "record_id"))
        records.set_learner(i, table.ident(row, values, "learner_id"), table, row)
        if i in rows:
            raise table.error(row, "record_id", f"{records.ids[i]!r} has a row already")
        rows[i] = np.array([table.number(row, values, c) for c in columns])
    columns = columns or tuple(h for h in table.header if h not in ("learner_id", "record_id"))
    return rows, columns


def _clickstream(m: Manifest, records: _Records) -> dict[int, tuple[list[str], int]]:
    """Record -> (its most recent CLICK_LEN events in time order, its number of events)."""
    table = Table(m.file("clickstream"), ("learner_id", "record_id", "t", "event"))
    heaps: dict[int, list[tuple[float, int, str]]] = {}
    counts: dict[int, int] = {}
    for row, values in table.rows():
        i = records.get(table, row, table.ident(row, values, "record_id"))
        records.set_learner(i, table.ident(row, values, "learner_id"), table, row)
        item = (table.time(row, values, "t"), row, table.ident(row, values, "event"))
        heap = heaps.setdefault(i, [])
        (heapq.heappush if len(heap) < CLICK_LEN else heapq.heappushpop)(heap, item)
        counts[i] = counts.get(i, 0) + 1
    return {i: ([e for *_, e in sorted(h)], counts[i]) for i, h in heaps.items()}


def _text(m: Manifest, records: _Records) -> dict[int, str]:
    path = m.file("text")
    if path.suffix.lower() == ".csv":
        table = Table(path, ("record_id", "text"))
        rows: Iterator[tuple[int, dict[str, str]]] = table.rows()
    else:
        table = Table(path)
        rows = json_lines(path, ("record_id", "text"))
    out: dict[int, str] = {}
    for row, values in rows:
        i = records.get(table, row, table.ident(row, values, "record_id"))
        if values["text"].strip():
            out[i] = (out[i] + "\n" + values["text"]) if i in out else values["text"]
    return out


def _referenced(
    m: Manifest, modality: str, suffixes: tuple[str, ...], records: _Records
) -> Iterator[tuple[int, Path, Table, int]]:
    """(record, file, table naming it, row) for an index CSV (record_id, file) or a folder of
    `<record_id><suffix>` files (then table is a stand-in naming the folder, row 0)."""
    path = m.file(modality)
    if path.is_dir():
        stand_in = Table(path)
        for file in sorted(path.iterdir()):
            if file.suffix.lower() in suffixes and not file.name.startswith("."):
                if records.fixed and file.stem not in records.index:
                    raise ConfigError(
                        str(file), "", f"record {file.stem!r} (the file name) is not in labels.csv"
                    )
                yield records.get(stand_in, 0, file.stem), file, stand_in, 0
        return
    table = Table(path, ("record_id", "file"))
    for row, values in table.rows():
        i = records.get(table, row, table.ident(row, values, "record_id"))
        name = table.ident(row, values, "file")
        file = path.parent / name
        if not file.is_file():
            raise table.error(row, "file", f"no such file {name!r} beside {path.name}")
        yield i, file, table, row


def _bad(table: Table, row: int, file: Path, problem: str) -> ConfigError:
    if row:
        return table.error(row, "file", f"{file.name}: {problem}")
    return ConfigError(str(file), "", problem)


def _images(m: Manifest, records: _Records) -> dict[int, np.ndarray]:
    out: dict[int, np.ndarray] = {}
    for i, file, table, row in _referenced(m, "image", IMAGE_SUFFIXES, records):
        try:
            image = Image.open(file)
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
            raise _bad(table, row, file, f"unreadable image: {exc}") from None
        with image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise _bad(table, row, file, f"an image of {image.size} pixels is too large")
            try:
                image.load()
                out[i] = fit_image(image, invert=m.image_invert, crop=m.image_crop)
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise _bad(table, row, file, f"unreadable image: {exc}") from None
    return out


def _signal_csv(file: Path) -> tuple[np.ndarray, list[str]]:
    """A window from a CSV: one row per time step, one column per channel (a `t` or `time`
    column is the time stamp, not a channel)."""
    table = Table(file)
    rows = [
        [table.number(r, v, c) for c in table.header if c not in TIME_COLUMNS]
        for r, v in table.rows()
    ]
    names = [c for c in table.header if c not in TIME_COLUMNS]
    data = np.array(rows, dtype=np.float64).reshape(len(rows), len(names))
    bad = np.argwhere(np.isnan(data))
    if len(bad):
        r, c = bad[0]
        raise ConfigError(str(file), where(int(r) + 2, names[c]), "missing value")
    return data, names


def _signals(m: Manifest, records: _Records, notes: list[str]) -> dict[int, np.ndarray]:
    out: dict[int, np.ndarray] = {}
    dropped: set[str] = set()
    for i, file, table, row in _referenced(m, "signal", SIGNAL_SUFFIXES, records):
        if file.suffix.lower() == ".csv":
            data, names = _signal_csv(file)
        else:
            try:
                data = np.load(file, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise _bad(table, row, file, f"unreadable .npy: {exc}") from None
            if data.ndim not in (1, 2) or not np.issubdtype(data.dtype, np.number):
                raise _bad(
                    table, row, file, f"expected numbers [steps, channels], got {data.shape}"
                )
            if data.ndim == 1:
                data = data[:, None]
            names = list(m.signal_channels or SIGNAL_CHANNELS)[: data.shape[1]]
            names += [f"channel_{k}" for k in range(len(names), data.shape[1])]
            if not np.isfinite(data).all():
                raise _bad(table, row, file, "holds NaN or infinite values")
        if len(data) == 0:
            raise _bad(table, row, file, "an empty window (no time steps)")
        slots, lost = channel_slots(names)
        dropped.update(lost)
        out[i] = fit_signal(data, slots, m.signal_fit)
    if dropped:
        notes.append(f"signal: channels dropped (only {SIGNAL_SHAPE[1]} fit): {sorted(dropped)}")
    return out


def read_folder(path: str | Path) -> RawFolder:
    """Read and check a node's data folder."""
    m = read_manifest(path)
    notes: list[str] = []
    labels_path = m.file("labels")
    has_labels = labels_path.exists()
    if not has_labels and m.tasks:
        raise ConfigError(str(labels_path), "", "missing, but the manifest lists tasks")
    records = _Records(fixed=False)
    labels, split = _labels(m, records) if has_labels else ({t: [] for t in m.tasks}, [])
    records.fixed = has_labels  # labels.csv, where there is one, lists every record
    learner_groups, group_names = _learners(m)
    for modality in m.modalities:
        if not m.file(modality).exists():
            raise ConfigError(str(m.file(modality)), "", f"missing, but {modality} is listed")
    tabular, columns = _tabular(m, records) if "tabular" in m.modalities else ({}, ())
    clicks = _clickstream(m, records) if "clickstream" in m.modalities else {}
    texts = _text(m, records) if "text" in m.modalities else {}
    images = _images(m, records) if "image" in m.modalities else {}
    signals = _signals(m, records, notes) if "signal" in m.modalities else {}
    n = len(records.ids)
    for t in m.tasks:
        labels[t] += [-1] * (n - len(labels[t]))
    split += [None] * (n - len(split))
    present = {mod: np.zeros(n, bool) for mod in MODALITIES}
    for mod, found in (("tabular", tabular), ("clickstream", clicks), ("text", texts)):
        present[mod][list(found)] = True
    present["image"][list(images)] = True
    present["signal"][list(signals)] = True
    table = np.full((n, len(columns)), np.nan)
    for i, values in tabular.items():
        table[i] = values
    image = np.zeros((n, *IMAGE_SHAPE), np.float32)
    for i, x in images.items():
        image[i] = x
    signal = np.zeros((n, *SIGNAL_SHAPE), np.float32)
    for i, x in signals.items():
        signal[i] = x
    learners = [records.learner.get(i, (records.ids[i], ""))[0] for i in range(n)]
    unnamed = sum(i not in records.learner for i in range(n))
    if unnamed:
        notes.append(f"{unnamed} records name no learner: each counts as its own learner")
    missing = sorted({lr for lr in learners if lr not in learner_groups} - {""})
    if learner_groups and missing:
        notes.append(f"{len(missing)} learners are not in learners.csv: groups unknown")
    return RawFolder(
        manifest=m,
        records=records.ids,
        learners=learners,
        labels={t: np.array(v, dtype=np.int64) for t, v in labels.items()},
        split=(
            None
            if all(s is None for s in split)
            else np.array([-1 if s is None else int(s == "test") for s in split], np.int8)
        ),
        learner_groups=learner_groups,
        group_names=group_names,
        text=[texts.get(i, "") for i in range(n)],
        image=image,
        signal=signal,
        events=[clicks[i][0] if i in clicks else [] for i in range(n)],
        event_counts=np.array([clicks[i][1] if i in clicks else 0 for i in range(n)], np.int64),
        tabular=table,
        tabular_columns=columns,
        present=present,
        notes=notes,
    )

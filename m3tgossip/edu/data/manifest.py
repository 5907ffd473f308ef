"""`manifest.toml` of a node's data folder: what the folder holds and how to read it.

The format is documented in `m3tgossip/docs/data.md`. `read_manifest(folder)` parses and checks
it; a bad entry stops with a `ConfigError` naming the manifest file and the entry.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m3tgossip.edu.data.schema import MODALITIES, TASKS
from m3tgossip.errors import ConfigError

FILENAME = "manifest.toml"
#: the version of the folder format this code reads and writes
FORMAT = 1
#: label kinds: binary has two classes; categorical and ordinal have the task's head's classes
LABEL_KINDS = ("binary", "categorical", "ordinal")
#: modality (or table) -> file name used when the manifest's [files] table does not give one
DEFAULT_FILES = {
    "labels": "labels.csv",
    "learners": "learners.csv",
    "tabular": "tabular.csv",
    "clickstream": "clickstream.csv",
    "text": "text.jsonl",
    "image": "images.csv",
    "signal": "signal",
}
SIGNAL_FITS = ("resample", "crop")
_TOP_KEYS = {"format", "node", "description", "modalities", "files", "tasks", "groups"}
_TOP_KEYS |= {"tabular", "signal", "image", "split"}


@dataclass(frozen=True)
class TaskSpec:
    """One task of the folder: its label kind and its class names (index = class)."""

    name: str
    kind: str
    classes: tuple[str, ...]

    def label(self, value: str) -> int | None:
        """The class index of a label value (a class name or an index); None if not one."""
        if value in self.classes:
            return self.classes.index(value)
        try:
            index = int(value)
        except ValueError:
            return None
        return index if 0 <= index < len(self.classes) and str(index) == value else None


@dataclass(frozen=True)
class Manifest:
    """A parsed `manifest.toml`."""

    path: Path
    node: str | None
    modalities: tuple[str, ...]
    files: dict[str, str]
    tasks: dict[str, TaskSpec]
    #: learners.csv columns that are group attributes (None: every column but learner_id)
    groups: tuple[str, ...] | None
    description: str = ""
    tabular_standardize: bool = True
    #: column order of the tabular features (None: the header's order)
    tabular_features: tuple[str, ...] | None = None
    signal_fit: str = "resample"
    signal_standardize: bool = True
    #: the signal files' channels in column order (None: the CSV header, or the built-in order)
    signal_channels: tuple[str, ...] | None = None
    #: "auto" (light backgrounds are inverted so ink is bright), or True / False
    image_invert: str | bool = "auto"
    #: crop each image to its ink before shrinking it
    image_crop: bool = True
    test_fraction: float = 0.3
    extra: dict[str, Any] = field(default_factory=dict)

    def file(self, name: str) -> Path:
        """The path of a table or modality file (`labels`, `tabular`, ...)."""
        return self.path.parent / self.files[name]


def _fail(path: Path, entry: str, problem: str) -> ConfigError:
    return ConfigError(str(path), entry, problem)


def _table(raw: Mapping[str, Any], key: str, path: Path, keys: set[str]) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise _fail(path, f"[{key}]", "must be a table")
    unknown = sorted(set(value) - keys)
    if unknown:
        raise _fail(path, f"[{key}] {unknown[0]}", f"unknown key; known: {', '.join(sorted(keys))}")
    return value


def _names(value: Any, path: Path, entry: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _fail(path, entry, f"must be a list of non-empty strings, got {value!r}")
    if len(set(value)) != len(value):
        raise _fail(path, entry, f"lists a name twice: {value!r}")
    return tuple(value)


def _flag(table: Mapping[str, Any], key: str, default: bool, path: Path, entry: str) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise _fail(path, f"{entry} {key}", f"must be true or false, got {value!r}")
    return value


def _task(name: str, value: Any, path: Path) -> TaskSpec:
    entry = f"[tasks.{name}]"
    if name not in TASKS:
        raise _fail(path, entry, f"no model head for this task; tasks are {', '.join(TASKS)}")
    if not isinstance(value, dict):
        raise _fail(path, entry, "must be a table with kind (and optionally classes)")
    unknown = sorted(set(value) - {"kind", "classes", "description"})
    if unknown:
        raise _fail(path, f"{entry} {unknown[0]}", "unknown key; known: kind, classes, description")
    kind = value.get("kind")
    if kind not in LABEL_KINDS:
        raise _fail(path, f"{entry} kind", f"one of {', '.join(LABEL_KINDS)}, got {kind!r}")
    n = TASKS[name]
    if kind == "binary" and n != 2:
        raise _fail(path, f"{entry} kind", f"the model's {name} head has {n} classes, not 2")
    classes = tuple(str(i) for i in range(n))
    if "classes" in value:
        classes = _names(value["classes"], path, f"{entry} classes")
        if len(classes) != n:
            raise _fail(
                path, f"{entry} classes", f"{len(classes)} classes; the model's {name} head has {n}"
            )
    return TaskSpec(name, kind, classes)


def read_manifest(folder: str | Path) -> Manifest:
    """Parse and check `folder/manifest.toml`."""
    path = Path(folder) / FILENAME
    if not Path(folder).is_dir():
        raise _fail(Path(folder), "", "not a folder")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _fail(path, "", "missing: a data folder starts with its manifest") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(path, "", f"cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise _fail(path, "TOML syntax", str(exc)) from None
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise _fail(path, unknown[0], f"unknown key; known: {', '.join(sorted(_TOP_KEYS))}")
    if raw.get("format", FORMAT) != FORMAT:
        raise _fail(path, "format", f"this version reads format {FORMAT}, got {raw['format']!r}")
    node = raw.get("node")
    if node is not None and (not isinstance(node, str) or not node):
        raise _fail(path, "node", f"must be a node id, got {node!r}")
    modalities = _names(raw.get("modalities", []), path, "modalities")
    for m in modalities:
        if m not in MODALITIES:
            raise _fail(path, "modalities", f"unknown modality {m!r}; one of {MODALITIES}")
    files = dict(DEFAULT_FILES)
    for key, value in _table(raw, "files", path, set(DEFAULT_FILES)).items():
        if not isinstance(value, str) or not value or Path(value).is_absolute():
            raise _fail(path, f"[files] {key}", f"a path inside the folder, got {value!r}")
        if ".." in Path(value).parts:
            raise _fail(path, f"[files] {key}", f"a path inside the folder, got {value!r}")
        files[key] = value
    tasks_raw = raw.get("tasks", {})
    if not isinstance(tasks_raw, dict):
        raise _fail(path, "[tasks]", "must be a table of [tasks.<name>] tables")
    tasks = {name: _task(name, value, path) for name, value in tasks_raw.items()}
    groups_table = _table(raw, "groups", path, {"attributes"})
    groups = None
    if "attributes" in groups_table:
        groups = _names(groups_table["attributes"], path, "[groups] attributes")
    tabular = _table(raw, "tabular", path, {"standardize", "features"})
    signal = _table(raw, "signal", path, {"fit", "standardize", "channels"})
    image = _table(raw, "image", path, {"invert", "crop"})
    split = _table(raw, "split", path, {"test_fraction"})
    fit = signal.get("fit", "resample")
    if fit not in SIGNAL_FITS:
        raise _fail(path, "[signal] fit", f"one of {', '.join(SIGNAL_FITS)}, got {fit!r}")
    invert = image.get("invert", "auto")
    if invert != "auto" and not isinstance(invert, bool):
        raise _fail(path, "[image] invert", f'"auto", true or false, got {invert!r}')
    test_fraction = split.get("test_fraction", 0.3)
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)):
        raise _fail(path, "[split] test_fraction", f"a number, got {test_fraction!r}")
    if not 0 <= test_fraction < 1:
        raise _fail(path, "[split] test_fraction", f"in [0, 1), got {test_fraction!r}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise _fail(path, "description", "must be a string")
    return Manifest(
        path=path,
        node=node,
        modalities=modalities,
        files=files,
        tasks=tasks,
        groups=groups,
        description=description,
        tabular_standardize=_flag(tabular, "standardize", True, path, "[tabular]"),
        tabular_features=(
            _names(tabular["features"], path, "[tabular] features")
            if "features" in tabular
            else None
        ),
        signal_fit=fit,
        signal_standardize=_flag(signal, "standardize", True, path, "[signal]"),
        signal_channels=(
            _names(signal["channels"], path, "[signal] channels") if "channels" in signal else None
        ),
        image_invert=invert,
        image_crop=_flag(image, "crop", True, path, "[image]"),
        test_fraction=float(test_fraction),
    )


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return "[" + ", ".join(_toml(v) for v in value) + "]"


def manifest_text(
    *,
    node: str | None,
    modalities: tuple[str, ...] | list[str],
    tasks: Mapping[str, tuple[str, tuple[str, ...]]],
    groups: tuple[str, ...] | list[str],
    description: str = "",
    files: Mapping[str, str] | None = None,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """A manifest.toml: tasks maps task -> (kind, class names); settings holds the [tabular],
    [signal], [image] and [split] tables."""
    lines = [f"format = {FORMAT}"]
    if node is not None:
        lines.append(f"node = {_toml(node)}")
    if description:
        lines.append(f"description = {_toml(description)}")
    lines.append(f"modalities = {_toml(list(modalities))}")
    if files:
        lines += ["", "[files]", *(f"{k} = {_toml(v)}" for k, v in files.items())]
    for name, (kind, classes) in tasks.items():
        lines += ["", f"[tasks.{name}]", f"kind = {_toml(kind)}", f"classes = {_toml(classes)}"]
    lines += ["", "[groups]", f"attributes = {_toml(list(groups))}"]
    for table, values in (settings or {}).items():
        lines += ["", f"[{table}]", *(f"{k} = {_toml(v)}" for k, v in values.items())]
    return "\n".join(lines) + "\n"

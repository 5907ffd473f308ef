"""Reading the CSV and JSON-lines files of a data folder, with errors that name file, row and field.

Rows are numbered as lines of the file (the header is row 1), so an editor's line number finds
them. Values are stripped of surrounding spaces; an empty value, `NA` or `?` is missing.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

from m3tgossip.errors import ConfigError

#: values read as missing
MISSING = ("", "NA", "N/A", "NaN", "nan", "?")


def where(row: int, field: str) -> str:
    """The entry part of an error: `row 5, field 'score'`."""
    return f"row {row}, field {field!r}"


class Table:
    """One CSV file with a header. `rows()` yields (row number, {column: value})."""

    def __init__(self, path: Path, required: tuple[str, ...] = ()) -> None:
        self.path = path
        self.required = required
        self.header: list[str] = []

    def error(self, row: int, field: str, problem: str) -> ConfigError:
        return ConfigError(str(self.path), where(row, field), problem)

    def rows(self) -> Iterator[tuple[int, dict[str, str]]]:
        if not self.path.is_file():
            raise ConfigError(str(self.path), "", "missing (the manifest names it)")
        line = 0
        try:
            with open(self.path, newline="", encoding="utf-8-sig") as handle:
                reader = csv.reader(handle)
                self.header = [h.strip() for h in next(reader, [])]
                if not self.header:
                    raise ConfigError(str(self.path), "row 1", "the file is empty (no header)")
                dupes = sorted({h for h in self.header if self.header.count(h) > 1})
                if dupes:
                    raise ConfigError(str(self.path), "row 1", f"column {dupes[0]!r} appears twice")
                for column in self.required:
                    if column not in self.header:
                        raise ConfigError(
                            str(self.path),
                            f"row 1, field {column!r}",
                            f"missing column (the header is {', '.join(self.header)})",
                        )
                width = len(self.header)
                for values in reader:
                    line = reader.line_num
                    if not values or values == [""]:
                        continue
                    if len(values) != width:
                        raise ConfigError(
                            str(self.path),
                            f"row {line}",
                            f"{len(values)} values, the header has {width}",
                        )
                    yield line, {h: v.strip() for h, v in zip(self.header, values, strict=True)}
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise ConfigError(str(self.path), f"row {line}" if line else "", str(exc)) from None

    def ident(self, row: int, values: dict[str, str], field: str) -> str:
        """A non-empty id (record_id, learner_id)."""
        value = values[field]
        if not value:
            raise self.error(row, field, "empty; every row needs one")
        return value

    def number(self, row: int, values: dict[str, str], field: str) -> float:
        """A finite number, or NaN where missing."""
        return number(values[field], lambda p: self.error(row, field, p))

    def time(self, row: int, values: dict[str, str], field: str) -> float:
        """A number or an ISO 8601 date-time (as seconds since the epoch)."""
        value = values[field]
        problem = f"expected a number or an ISO 8601 date-time, got {value!r}"
        try:
            x = float(value)
        except ValueError:
            try:
                return datetime.fromisoformat(value).timestamp()
            except ValueError:
                raise self.error(row, field, problem) from None
        if not math.isfinite(x):
            raise self.error(row, field, problem)
        return x


def number(value: str, error: Callable[[str], ConfigError]) -> float:
    """`value` as a finite float, NaN if missing; `error(problem)` is raised for anything else."""
    if value in MISSING:
        return math.nan
    try:
        x = float(value)
    except ValueError:
        raise error(f"expected a number, got {value!r}") from None
    if not math.isfinite(x):
        raise error(f"expected a finite number, got {value!r}")
    return x


def json_lines(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, {field: text}) of a JSON-lines file of objects with string `required`."""
    if not path.is_file():
        raise ConfigError(str(path), "", "missing (the manifest names it)")
    try:
        with open(path, encoding="utf-8-sig") as handle:
            for line, text in enumerate(handle, 1):
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ConfigError(str(path), f"row {line}", f"not JSON: {exc}") from None
                if not isinstance(obj, dict):
                    raise ConfigError(str(path), f"row {line}", "expected a JSON object")
                out = {}
                for field in required:
                    value = obj.get(field)
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        value = str(value)
                    if not isinstance(value, str):
                        raise ConfigError(
                            str(path), where(line, field), f"expected a string, got {value!r}"
                        )
                    out[field] = value
                yield line, out
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), "", str(exc)) from None

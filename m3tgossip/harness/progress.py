"""Progress of long runs: a tqdm bar on stderr when stderr is a terminal, plain lines otherwise.

    progress = Progress("testbed", total=60, unit="round")
    progress.update(12, note="max 14", line="testbed: rounds done min 12 max 14 of 60")
    progress.close()

A plain line is printed at most every `every_s` seconds (logs and CI output stay short); a bar
is redrawn on every update. `bar_iter` wraps a loop (the benchmarks' loops over runs) the same
way, and routes the loop's own prints around the bar so neither garbles the other.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm import tqdm
from tqdm.contrib import DummyTqdmFile

#: seconds between plain progress lines
PLAIN_EVERY_S = 2.0
#: seconds between redraws of a bar
BAR_EVERY_S = 0.5

T = TypeVar("T")


def use_bar() -> bool:
    """A bar only for a person watching: stderr is a terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """One progress display: `update` with the absolute count done so far."""

    def __init__(
        self,
        desc: str,
        total: int | None,
        unit: str = "round",
        *,
        bar: bool | None = None,
        every_s: float = PLAIN_EVERY_S,
        leave: bool = False,
    ) -> None:
        self.desc = desc
        self.total = total if total else None
        self.unit = unit
        self.every_s = every_s
        self._next_line = 0.0
        self.bar: Any = None
        if use_bar() if bar is None else bar:
            self.bar = tqdm(
                total=self.total,
                desc=desc,
                unit=unit,
                file=sys.stderr,
                leave=leave,
                dynamic_ncols=True,
            )

    @property
    def interval(self) -> float:
        """How often a caller should call `update`."""
        return BAR_EVERY_S if self.bar is not None else self.every_s

    def update(self, done: int, note: str = "", line: str | None = None) -> None:
        """`done` units so far; `line` is the plain line (default `DESC: DONE of TOTAL UNITs`)."""
        if self.bar is not None:
            if note:
                self.bar.set_postfix_str(note, refresh=False)
            if done > self.bar.n:
                self.bar.update(done - self.bar.n)
            self.bar.refresh()
            return
        now = time.monotonic()
        if now < self._next_line:
            return
        self._next_line = now + self.every_s
        if line is None:
            of = f" of {self.total}" if self.total else ""
            line = f"{self.desc}: {done}{of} {self.unit}s" + (f" ({note})" if note else "")
        print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def bar_iter(items: Iterable[T], desc: str, unit: str = "run") -> Iterator[T]:
    """The items of a long loop, with a bar while stderr is a terminal (plain otherwise: the
    items only). While the bar shows, what the loop prints goes above it."""
    items = list(items)
    if not use_bar():
        yield from items
        return
    with contextlib.redirect_stdout(DummyTqdmFile(sys.stdout)):
        bar = tqdm(items, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
        try:
            yield from bar
        finally:
            bar.close()

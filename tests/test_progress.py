"""Progress of long runs: plain lines when nobody watches, a bar on a terminal."""

from __future__ import annotations

import pytest

from m3tgossip.harness import Progress, bar_iter, progress


def test_plain_lines_are_printed_at_most_every_interval(capsys: pytest.CaptureFixture[str]) -> None:
    p = Progress("testbed", 10, bar=False, every_s=3600.0)
    p.update(1, line="testbed: rounds done min 1 max 2 of 10")
    p.update(2, line="testbed: rounds done min 2 max 3 of 10")
    p.close()
    assert capsys.readouterr().out == "testbed: rounds done min 1 max 2 of 10\n"
    q = Progress("bench", 4, unit="run", bar=False)
    q.update(3, note="fast")
    assert capsys.readouterr().out == "bench: 3 of 4 runs (fast)\n"


def test_a_bar_goes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    with Progress("testbed", 10, bar=True) as p:
        assert p.interval < 2.0
        p.update(4, note="fastest node at 5")
        p.update(3)  # never backwards
        assert p.bar.n == 4
    got = capsys.readouterr()
    assert got.out == ""
    assert "testbed" in got.err and "4/10" in got.err and "fastest node at 5" in got.err


def test_without_a_terminal_the_default_is_plain(capsys: pytest.CaptureFixture[str]) -> None:
    assert not progress.use_bar()  # pytest captures stderr
    assert Progress("testbed", 10).bar is None
    assert list(bar_iter([1, 2, 3], "runs")) == [1, 2, 3]
    assert capsys.readouterr().err == ""


def test_a_loop_on_a_terminal_prints_above_its_bar(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(progress, "use_bar", lambda: True)
    for i in bar_iter(["a", "b"], "runs"):
        print(f"row {i}")
    got = capsys.readouterr()
    assert "row a\n" in got.out and "row b\n" in got.out
    assert "runs" in got.err and "2/2" in got.err

"""Without a terminal the progress bar is one plain line per logging interval."""

from __future__ import annotations

import io

from rich.progress import Progress

from distillkit.engine.logging import PlainProgress, progress_bar


def test_plain_lines_without_a_terminal() -> None:
    stream = io.StringIO()
    bar = PlainProgress(stream)
    with bar:
        task = bar.add_task("dmd2", total=200, completed=100, speed="", losses="")
        bar.update(task, completed=150, speed="2.00 it/s", losses="generator/loss=0.5")
    line = stream.getvalue().strip()
    assert line.startswith("dmd2 step 150/200 (75%)  2.00 it/s  elapsed 0:00:00  ETA ")
    assert line.endswith("generator/loss=0.5") and "\n" not in line


def test_terminal_keeps_rich_and_disabled_stays_silent() -> None:
    assert isinstance(progress_bar(True, interactive=True), Progress)
    assert isinstance(progress_bar(True, interactive=False), PlainProgress)
    quiet = progress_bar(False, interactive=False)  # other ranks, logging.progress_bar=false
    assert isinstance(quiet, Progress) and quiet.disable

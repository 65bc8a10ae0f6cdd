"""Hooks around the loop for everything that observes a run without changing its math.

The loop calls these on the main process only. Sample grids, collapse warnings, reports and
Hub pushes live here as callbacks, so the loop itself stays one readable file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distillkit.engine.loop import RunResult, Trainer


class Callback:
    def on_train_start(self, trainer: Trainer) -> None:
        """After resume, before the first step."""

    def on_log(self, trainer: Trainer, step: int, values: dict[str, float]) -> None:
        """At each logging interval, with the window's averaged scalars (mutable: add keys)."""

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        """After every completed step (``step`` = steps done so far)."""

    def on_train_end(self, trainer: Trainer, result: RunResult) -> None:
        """After the final checkpoint and export."""


def default_callbacks(cfg) -> list[Callback]:
    """The callbacks a config asks for."""
    return []

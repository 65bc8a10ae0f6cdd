"""Hooks around the loop for everything that observes a run without changing its math.

The loop calls these on the main process only. Sample grids, collapse warnings, reports and
Hub pushes live here as callbacks, so the loop itself stays one readable file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distillkit.config import RunConfig
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


class HubPushCallback(Callback):
    """hub.push: refresh the card (repo id, eval table, last grid) and upload the export."""

    def __init__(self, repo_id: str, private: bool, revision: str | None) -> None:
        self.repo_id, self.private, self.revision = repo_id, private, revision

    def on_train_end(self, trainer: Trainer, result: RunResult) -> None:
        from distillkit.errors import DistillkitError
        from distillkit.export.push import HubError, publish

        try:
            url, _ = publish(
                result.output_dir, self.repo_id, private=self.private, revision=self.revision
            )
        except HubError as err:
            raise DistillkitError(
                f"{err}. The run and its export are complete: retry with "
                f"`distillkit push {result.output_dir} --repo-id {self.repo_id}`"
            ) from None
        trainer.accelerator.print(f"pushed to the Hub: {url}")


def default_callbacks(cfg: RunConfig) -> list[Callback]:
    """The callbacks a config asks for, in order: samples, evaluation, report, Hub push."""
    from distillkit.engine.evaluate import EvalCallback
    from distillkit.engine.report import ReportCallback
    from distillkit.engine.samples import SampleCallback

    out: list[Callback] = []
    if cfg.logging.sample_every > 0:
        out.append(SampleCallback(cfg.logging, cfg.teacher.default_guidance))
    if cfg.logging.eval_every > 0:
        out.append(EvalCallback(cfg.logging))
    if cfg.logging.report:
        out.append(ReportCallback())
    if cfg.hub.push and cfg.export.enabled:
        assert cfg.hub.repo_id is not None  # validated by HubConfig
        out.append(HubPushCallback(cfg.hub.repo_id, cfg.hub.private, cfg.hub.revision))
    return out

"""Metrics sinks (jsonl always, tensorboard / wandb on request) and the rich progress bar."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from distillkit.errors import ConfigError


class MetricsLogger:
    """Appends one JSON line per logging step; mirrors scalars to the configured backends."""

    def __init__(
        self,
        output_dir: Path,
        backends: list[str],
        config: dict,
        enabled: bool,
        start_step: int = 0,
    ):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self._forget_after(start_step)
        if "tensorboard" in backends:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "logging.backends has tensorboard but it is not installed: "
                    "pip install 'distillkit[logging]'"
                ) from None
            self._tb = SummaryWriter(str(output_dir / "tensorboard"))
        if "wandb" in backends:
            try:
                import wandb
            except ImportError:
                raise ConfigError(
                    "logging.backends has wandb but it is not installed: "
                    "pip install 'distillkit[logging]'"
                ) from None
            self._wandb = wandb.init(
                project="distillkit", dir=str(output_dir), config=config, reinit=True
            )

    def _forget_after(self, step: int) -> None:
        """A run resumed from step ``step`` replays the steps after it: their earlier records
        (logged before a crash or a pre-emption) go, so every step appears once, in order."""
        if not self.path.is_file():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
        if len(kept) != len(lines):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(kept))
            tmp.replace(self.path)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class PlainProgress:
    """The progress bar without a terminal (SLURM, CI, ``| tee``): one plain line per logging
    interval on stderr (step/total, it/s, elapsed, ETA, the main losses), where rich's bar
    would degrade to truncated cells. Same calls as rich's Progress."""

    def __init__(self, stream=None) -> None:
        self.stream = stream
        self.tasks: dict[int, dict] = {}

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: int, completed: int = 0, **fields) -> int:
        self.tasks[len(self.tasks)] = {
            "description": description,
            "total": total,
            "start_step": completed,
            "started": time.monotonic(),
        }
        return len(self.tasks) - 1

    def update(self, task_id: int, completed: int, speed: str = "", losses: str = "") -> None:
        task = self.tasks[task_id]
        elapsed = time.monotonic() - task["started"]
        done = completed - task["start_step"]
        left = (task["total"] - completed) * elapsed / done if done > 0 else float("nan")
        line = (
            f"{task['description']} step {completed}/{task['total']} "
            f"({100 * completed / max(task['total'], 1):.0f}%)  {speed}  "
            f"elapsed {_clock(elapsed)}  ETA {_clock(left)}  {losses}"
        )
        print(line.rstrip(), file=self.stream or sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    if seconds != seconds:  # NaN: no rate yet
        return "?"
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{sec:02d}"


def progress_bar(enabled: bool, interactive: bool | None = None) -> Progress | PlainProgress:
    """rich's bar on a terminal, plain lines otherwise (``interactive`` defaults to whether
    stderr is a TTY); ``enabled`` is False on every rank but 0 and with
    logging.progress_bar=false."""
    interactive = sys.stderr.isatty() if interactive is None else interactive
    if enabled and not interactive:
        return PlainProgress()
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[speed]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[losses]}"),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )

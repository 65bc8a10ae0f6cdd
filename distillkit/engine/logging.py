"""Metrics sinks (jsonl always, tensorboard / wandb on request) and the rich progress bar."""

from __future__ import annotations

import json
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

    def __init__(self, output_dir: Path, backends: list[str], config: dict, enabled: bool):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        if not enabled:
            return
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


def progress_bar(enabled: bool) -> Progress:
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

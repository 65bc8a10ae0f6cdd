"""Pre-emption: SLURM and Kubernetes send a signal (SIGTERM, or SLURM's ``--signal=USR1@T``) a
grace period before they kill a job. The run then checkpoints at the next step boundary, writes
OUTPUT_DIR/preempted.json and exits with EXIT_PREEMPTED, which a requeue script tests; ``--resume``
continues bit-exactly, as from any checkpoint.

Why not torch elastic's own handling: it restarts workers on failure, it does not checkpoint; and
the ranks must agree on the step they stop at, so the signal a handler saw travels through
accelerate's ``reduce`` (one all-reduce of one integer) at every step boundary of a
multi-process run, as accelerate's own ``check_trigger`` does for a flag.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: "try again later"
MARKER = "preempted.json"


class PreemptionWatch:
    """Installs handlers for ``signals`` while training; ``received`` names the first to arrive."""

    def __init__(self, signals: list[str], grace_s: float) -> None:
        self.signals = [getattr(signal, name) for name in signals]
        self.grace_s = grace_s
        self.received: str | None = None
        self.at: float | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:  # a second signal changes nothing: the first one's clock runs
            self.received, self.at = signal.Signals(signum).name, time.monotonic()

    def __enter__(self) -> PreemptionWatch:
        if threading.current_thread() is threading.main_thread():  # handlers live there only
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def agreed(self, acc: Accelerator) -> str | None:
        """The signal any rank received (the highest-numbered, if several), or None: every rank
        gets the same answer at the same step, also a rank the signal did not reach (a node's
        agent may signal only its own processes), so all name it in their message and marker."""
        if acc.num_processes == 1:
            return self.received
        number = getattr(signal, self.received) if self.received else 0
        found = int(acc.reduce(torch.tensor([number], device=acc.device), reduction="max"))
        return signal.Signals(found).name if found else None

    def time_to_checkpoint(self, acc: Accelerator, checkpoint_seconds: float) -> bool:
        """Whether a checkpoint (as long as the last one took) still fits in the grace period;
        rank 0 decides for all, so no rank waits in a save the others skip."""
        elapsed = 0.0 if self.at is None else time.monotonic() - self.at
        decision = [elapsed + checkpoint_seconds <= self.grace_s]
        if acc.num_processes > 1:
            broadcast_object_list(decision, from_process=0)
        return bool(decision[0])


def write_marker(output_dir: Path, step: int, signal_name: str, checkpoint: str | None) -> None:
    """OUTPUT_DIR/preempted.json: what a requeue script reads under a launcher (torchrun,
    accelerate launch) that reports its own exit code instead of the workers'."""
    info = {"step": step, "signal": signal_name, "checkpoint": checkpoint, "resume": "--resume"}
    (output_dir / MARKER).write_text(json.dumps(info, indent=1) + "\n")


def clear_marker(output_dir: Path) -> None:
    (output_dir / MARKER).unlink(missing_ok=True)

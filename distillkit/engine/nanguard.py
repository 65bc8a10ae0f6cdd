"""The NaN guard without host syncs: skipped updates are decided and counted on the device.

A non-finite gradient norm sets a 0/1 flag on the device; the fused AdamW step reads it as
``found_inf`` and leaves parameters, moments and step counters exactly as they were; the EMA below
and recipes' EMA targets (``Recipe.after_update``) take the same flag. ``NonfiniteTracker`` keeps
the counts on the device too: the loop reads them only where it syncs anyway (logging interval,
before a checkpoint, at the end) and applies ``train.nan_policy`` there.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from diffusers.training_utils import EMAModel
from torch import Tensor

from distillkit.errors import TrainingDiverged
from distillkit.tensors import masked_lerp_


class GuardedEMA(EMAModel):
    """diffusers' EMAModel (same state dict, same decay schedule) whose step can be vetoed by a
    device flag: the count of applied steps lives on the device until ``state_dict`` needs it."""

    def __init__(self, parameters, **kwargs) -> None:
        super().__init__(parameters, **kwargs)
        self._pending: Tensor | None = None  # applied steps not yet in optimization_step

    def _sync(self) -> None:
        if self._pending is not None:
            self.optimization_step += int(self._pending.item())
            self._pending = None

    @torch.no_grad()
    def step_masked(self, parameters: Iterable[torch.nn.Parameter], ok: Tensor) -> None:
        parameters = list(parameters)
        applied = (ok > 0).to(torch.int64)
        self._pending = applied if self._pending is None else self._pending + applied
        # EMAModel.get_decay, on the device
        step = (self._pending + (self.optimization_step - self.update_after_step - 1)).clamp_min(0)
        step = step.to(torch.float32)
        if self.use_ema_warmup:
            decay = 1 - (1 + step / self.inv_gamma) ** -self.power
        else:
            decay = (1 + step) / (10 + step)
        decay = decay.clamp(max=self.decay).clamp(min=self.min_decay)
        decay = torch.where(step <= 0, torch.zeros_like(decay), decay)
        masked_lerp_(self.shadow_params, parameters, 1 - decay, ok)

    def step(self, parameters) -> None:
        parameters = list(parameters)
        device = parameters[0].device if parameters else torch.device("cpu")
        self.step_masked(parameters, torch.ones((), device=device))

    def state_dict(self) -> dict:
        """Whole tensors even when the shadows are FSDP (DTensor) shards: accelerate evaluates
        this on every rank before rank 0 writes it, so the gather is a proper collective."""
        self._sync()
        state = super().state_dict()
        state["shadow_params"] = [_whole(s) for s in state["shadow_params"]]
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = None
        templates = list(self.shadow_params)
        super().load_state_dict(state_dict)
        # sharded shadows: each rank keeps its own shard of the whole saved tensor
        self.shadow_params = [
            _reshard(loaded, like) for loaded, like in zip(self.shadow_params, templates)
        ]


def _whole(t: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _reshard(loaded: Tensor, like: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor) or isinstance(loaded, DTensor):
        return loaded
    full = loaded.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(full, like.device_mesh, like.placements).requires_grad_(False)


@dataclass
class NonfiniteReport:
    """What the tracker saw since its last reset, read once on the host."""

    count: int  # steps with a skipped (non-finite) update
    longest_run: int  # longest run of consecutive such steps (including one carried over)
    first: int  # step indices of the first and last, -1 when none
    last: int

    @property
    def where(self) -> str:
        steps = (
            f"step {self.first}" if self.first == self.last else (f"steps {self.first}-{self.last}")
        )
        return f"{steps}: a loss or gradient became NaN/Inf ({self.count} step(s))"


class NonfiniteTracker:
    """Device-side counters of skipped steps; ``record`` never syncs, ``read`` syncs once."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.run = torch.zeros((), dtype=torch.int64, device=device)
        self.reset(keep_run=False)

    def reset(self, keep_run: bool = True) -> None:
        if not keep_run:
            self.run.zero_()
        zero = torch.zeros((), dtype=torch.int64, device=self.device)
        self.count, self.longest = zero.clone(), self.run.clone()
        self.first, self.last = zero - 1, zero - 1

    def record(self, step: int, bad: Tensor) -> None:
        """``bad``: 0-dim, nonzero when this step's update was skipped."""
        hit = bad > 0
        self.count += hit
        self.run = (self.run + 1) * hit
        self.longest = torch.maximum(self.longest, self.run)
        self.first = torch.where(hit & (self.first < 0), step, self.first)
        self.last = torch.where(hit, step, self.last)

    def read(self) -> NonfiniteReport:
        values = torch.stack([self.count, self.longest, self.first, self.last]).tolist()
        return NonfiniteReport(*(int(v) for v in values))


@dataclass
class NanDecision:
    """What ``NanPolicy.check`` found: ``action`` is "skip" (the bad updates stay skipped, go
    on) or "rollback" (reload the latest checkpoint at lower rates); ``where`` says which steps."""

    action: str
    where: str


class NanPolicy:
    """``train.nan_policy`` as one state machine, fed by the device counters whichever way a bad
    update was found: the fused optimisers' device flag, read where the loop syncs anyway, or
    the host-sync fallback of optimisers without ``found_inf``, read at once."""

    def __init__(self, policy: str, max_failures: int, lr_factor: float, device) -> None:
        self.policy, self.max_failures, self.lr_factor = policy, max_failures, lr_factor
        self.tracker = NonfiniteTracker(device)
        self.rollbacks = 0  # rollbacks since the loop last got past a failure
        self.last_bad = -1

    def remedy(self) -> str:
        """What to change, for the policy the user is on."""
        if self.policy == "rollback":
            return (
                f"Rolling back (each time at lr x{self.lr_factor:g}) did not get past it: lower "
                "recipe.lr or train.max_grad_norm, or check the data at those steps"
            )
        return "Lower recipe.lr or train.max_grad_norm, or set train.nan_policy=rollback"

    def check(self, step: int) -> NanDecision | None:
        """Read the counters (one host sync). None when nothing went wrong since the last check;
        raises ``TrainingDiverged`` when the policy says stop."""
        seen = self.tracker.read()
        if seen.count == 0:
            if step > self.last_bad:  # only progress past the failure clears the count
                self.rollbacks = 0
            return None
        where = f"{seen.where}, seen at the check after step {step}"
        if self.policy == "stop":
            raise TrainingDiverged(
                f"{where}; stopped before any checkpoint of it was written. {self.remedy()}"
            )
        if self.policy == "skip":
            if seen.longest_run >= self.max_failures:
                raise TrainingDiverged(
                    f"{where} ({seen.longest_run} consecutive skipped updates, "
                    f"train.nan_max_skips={self.max_failures}); stopped. {self.remedy()}"
                )
            self.tracker.reset(keep_run=True)
            return NanDecision("skip", where)
        self.rollbacks += 1
        self.last_bad = max(self.last_bad, seen.last)
        self.tracker.reset(keep_run=False)
        if self.rollbacks >= self.max_failures:
            raise TrainingDiverged(
                f"{where} ({self.rollbacks} consecutive rollbacks without getting past it, "
                f"train.nan_max_skips={self.max_failures}); stopped. {self.remedy()}"
            )
        return NanDecision("rollback", where)

"""What the rectified-flow families share: the shifted flow schedule, FlowMatchLCMScheduler
exports, and the few-step sigma grids every flow pipeline (SANA, SD3, FLUX) accepts as
``sigmas=``. Mixed in before :class:`TeacherAdapter`, as ``UNetAdapterMixin`` is for SD."""

from __future__ import annotations

import math

import numpy as np
from diffusers import FlowMatchLCMScheduler
from torch import Tensor

from distillkit.diffusion.schedules import FlowSchedule


def tokens_to_map(tokens: Tensor) -> Tensor:
    """(N, L, C) image tokens of a square patch grid -> (N, C, side, side) for a conv head."""
    n, length, width = tokens.shape
    side = math.isqrt(length)
    return tokens.transpose(1, 2).reshape(n, width, side, length // side)


class FlowAdapterMixin:
    export_scheduler_name = "FlowMatchLCMScheduler"
    denoiser_attr = "transformer"

    def build_schedule(self, scheduler_config: dict) -> FlowSchedule:
        shift = float(scheduler_config.get("flow_shift") or scheduler_config.get("shift") or 1.0)
        n = int(scheduler_config.get("num_train_timesteps", 1000))
        return FlowSchedule("flow", n, shift=shift)

    def export_scheduler(self) -> FlowMatchLCMScheduler:
        # Its step is "x0 = x - sigma * v, re-noise to the next sigma"; at one step sigma = 1.
        return FlowMatchLCMScheduler(
            num_train_timesteps=self.schedule.num_train_timesteps, shift=self.schedule.shift
        )

    @staticmethod
    def grid_sigmas(steps: int, base: int) -> list[float]:
        """``steps`` points of the ``base``-point trailing flow grid u_j = 1 - j / base, picked
        at floor(i * base / steps): LCMScheduler's rule, so a k-step flow student samples k
        points of its training grid as an SD one does. The scheduler applies its shift to them.

        FlowMatchLCMScheduler's own k-step grid cannot serve: it spaces sigmas from 1 down to
        its minimum and always ends there (shift 3: [1.0, 0.009] at 2 steps, [1.0, 0.858,
        0.602, 0.009] at 4), so a "2-step" student would be a 1-step one. The flow pipelines
        take ``sigmas=``; exports store them with each step count they ship."""
        picks = np.floor(np.linspace(0, base, steps, endpoint=False))
        return [float(u) for u in 1.0 - picks / base]

    def sampling_call_kwargs(self, steps: int) -> dict:
        base = self.grid_steps or self.schedule.num_train_timesteps
        return {"sigmas": self.grid_sigmas(steps, base)}

    def solver_timesteps(self, n: int) -> Tensor:
        # the whole n-point grid (LCM's DDIM-grid counterpart: [T, T - T/n, ..., T/n], shifted)
        scheduler = self.export_scheduler()
        sigmas = self.grid_sigmas(n, n)
        scheduler.set_timesteps(sigmas=sigmas, device=self.device, **self.scheduler_grid_kwargs())
        return scheduler.timesteps.float()

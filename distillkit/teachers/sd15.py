"""Stable Diffusion 1.x / 2.x family: UNet, epsilon (or v) prediction, one CLIP text encoder."""

from __future__ import annotations

import inspect
from functools import cached_property

import torch
from diffusers import LCMScheduler
from torch import Tensor, nn

from distillkit.diffusion.schedules import VPSchedule
from distillkit.errors import ConfigError
from distillkit.registry import register_family
from distillkit.teachers.base import TeacherAdapter


class UNetAdapterMixin:
    """What SD1.5 and SDXL share: the VP schedule, the LCM export scheduler, mid-block features."""

    export_scheduler_name = "LCMScheduler"

    def build_schedule(self, scheduler_config: dict) -> VPSchedule:
        return VPSchedule.from_scheduler_config(scheduler_config)

    def export_scheduler(self) -> LCMScheduler:
        # LCM's step is exactly "predict x0, re-noise to the next timestep". Its grid is
        # range(1, s + 1) * (T // s) - 1 for s = original_inference_steps, and one step takes the
        # top of it: T-1 by default; with s = t + 1 > T/2 the spacing is 1 and the top is t.
        known = set(inspect.signature(LCMScheduler.__init__).parameters)
        config = {k: v for k, v in self.pipe.scheduler.config.items() if k in known}
        config.update(timestep_spacing="trailing", steps_offset=1)
        if self.start_timestep is not None:
            config["original_inference_steps"] = self.start_timestep + 1
        elif self.grid_steps is not None:  # LCM's training grid: T // skipping_step points
            config["original_inference_steps"] = self.grid_steps
        return LCMScheduler(**config)

    def check_start_timestep(self, t: int) -> None:
        n = self.schedule.num_train_timesteps
        if not n // 2 <= t < n:
            raise ConfigError(
                f"student.start_timestep={t}: LCMScheduler can start one-step sampling at "
                f"{n // 2}..{n - 1} for this teacher (T = {n}); choose a value in that range"
            )

    def feature_module(self, net: nn.Module) -> tuple[nn.Module, int]:
        return net.mid_block, int(net.config.block_out_channels[-1])

    def feature_blocks(self, net: nn.Module) -> list[tuple[nn.Module, int]]:
        widths = [int(c) for c in net.config.block_out_channels]
        down = list(zip(net.down_blocks, widths))
        up = list(zip(net.up_blocks, reversed(widths)))
        return [*down, (net.mid_block, widths[-1]), *up]

    @cached_property
    def _timestep_scaling(self) -> float:
        return float(self.export_scheduler().config.timestep_scaling)

    def boundary_scalings(self, t: Tensor) -> tuple[Tensor, Tensor]:
        # LCMScheduler.get_scalings_for_boundary_condition_discrete, same float32 ops
        # (sigma_data = 0.5): c_skip(0) = 1, c_out(0) = 0; at t = 999, c_skip ~ 2.5e-9.
        scaled = t.float() * self._timestep_scaling
        c_skip = 0.5**2 / (scaled**2 + 0.5**2)
        c_out = scaled / (scaled**2 + 0.5**2) ** 0.5
        return c_skip, c_out

    def solver_timesteps(self, n: int) -> Tensor:
        # LCM's DDIM grid with skipping step k = T // n: [T-1, T-1-k, ..., k-1] (the grid that
        # LCMScheduler's original_inference_steps=n samples from).
        k = self.schedule.num_train_timesteps // n
        return (torch.arange(n, 0, -1, device=self.device) * k - 1).float()


@register_family("sd15")
class SD15Adapter(UNetAdapterMixin, TeacherAdapter):
    pipeline_class = "StableDiffusionPipeline"

    def encode_prompts(self, prompts: list[str]) -> tuple[dict, dict]:
        embeds, negative = self.pipe.encode_prompt(
            prompts, self.text_device, 1, True, negative_prompt=[""] * len(prompts)
        )
        return {"encoder_hidden_states": embeds}, {"encoder_hidden_states": negative}

    def call_network(self, net: nn.Module, x_t: Tensor, t: Tensor, kwargs: dict) -> Tensor:
        return net(x_t, t, return_dict=False, **kwargs)[0]

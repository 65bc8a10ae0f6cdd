"""Stable Diffusion 1.x / 2.x family: UNet, epsilon (or v) prediction, one CLIP text encoder."""

from __future__ import annotations

import inspect

from diffusers import LCMScheduler
from torch import Tensor, nn

from distillkit.diffusion.schedules import VPSchedule
from distillkit.registry import register_family
from distillkit.teachers.base import TeacherAdapter


class UNetAdapterMixin:
    """What SD1.5 and SDXL share: the VP schedule, the LCM export scheduler, mid-block features."""

    def build_schedule(self, scheduler_config: dict) -> VPSchedule:
        return VPSchedule.from_scheduler_config(scheduler_config)

    def export_scheduler(self) -> LCMScheduler:
        # "trailing" spacing makes the one-step timestep T-1, where the generator is trained;
        # LCM's step is exactly "predict x0, re-noise to the next timestep".
        known = set(inspect.signature(LCMScheduler.__init__).parameters)
        config = {k: v for k, v in self.pipe.scheduler.config.items() if k in known}
        return LCMScheduler(**{**config, "timestep_spacing": "trailing", "steps_offset": 1})

    def feature_module(self, net: nn.Module) -> tuple[nn.Module, int]:
        return net.mid_block, int(net.config.block_out_channels[-1])


@register_family("sd15")
class SD15Adapter(UNetAdapterMixin, TeacherAdapter):
    pipeline_class = "StableDiffusionPipeline"

    def encode_prompts(self, prompts: list[str]) -> tuple[dict, dict]:
        embeds, negative = self.pipe.encode_prompt(
            prompts, self.device, 1, True, negative_prompt=[""] * len(prompts)
        )
        return {"encoder_hidden_states": embeds}, {"encoder_hidden_states": negative}

    def forward(self, net: nn.Module, x_t: Tensor, t: Tensor, kwargs: dict) -> Tensor:
        dtype = next(net.parameters()).dtype
        return net(x_t.to(dtype), t, return_dict=False, **kwargs)[0].float()

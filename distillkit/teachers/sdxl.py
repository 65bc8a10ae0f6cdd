"""SDXL family: two CLIP text encoders, pooled embedding and added size/crop time ids."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distillkit.registry import register_family
from distillkit.teachers.base import TeacherAdapter
from distillkit.teachers.sd15 import UNetAdapterMixin


@register_family("sdxl")
class SDXLAdapter(UNetAdapterMixin, TeacherAdapter):
    pipeline_class = "StableDiffusionXLPipeline"

    def _time_ids(self, n: int, projection_dim: int) -> torch.Tensor:
        # What the pipeline builds by default for height = width = resolution, no crop.
        size = (self.resolution, self.resolution)
        ids = self.pipe._get_add_time_ids(
            size, (0, 0), size, torch.float32, text_encoder_projection_dim=projection_dim
        )
        return ids.to(self.device).repeat(n, 1)

    def encode_prompts(self, prompts: list[str]) -> tuple[dict, dict]:
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompts,
            device=self.text_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
        )
        time_ids = self._time_ids(len(prompts), int(pooled.shape[-1]))
        cond = {
            "encoder_hidden_states": embeds,
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids},
        }
        uncond = {
            "encoder_hidden_states": negative,
            "added_cond_kwargs": {"text_embeds": negative_pooled, "time_ids": time_ids},
        }
        return cond, uncond

    def call_network(self, net: nn.Module, x_t: Tensor, t: Tensor, kwargs: dict) -> Tensor:
        return net(x_t, t, return_dict=False, **kwargs)[0]

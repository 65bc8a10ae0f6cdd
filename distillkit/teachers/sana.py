"""SANA family: linear-attention DiT, rectified-flow velocity, Gemma2 text encoder, DC-AE."""

from __future__ import annotations

import inspect
import math

from diffusers import FlowMatchLCMScheduler
from torch import Tensor, nn

from distillkit.diffusion.schedules import FlowSchedule
from distillkit.registry import register_family
from distillkit.teachers.base import TeacherAdapter


@register_family("sana")
class SanaAdapter(TeacherAdapter):
    pipeline_class = "SanaPipeline"
    denoiser_attr = "transformer"
    export_scheduler_name = "FlowMatchLCMScheduler"

    def build_schedule(self, scheduler_config: dict) -> FlowSchedule:
        shift = float(scheduler_config.get("flow_shift") or scheduler_config.get("shift") or 1.0)
        n = int(scheduler_config.get("num_train_timesteps", 1000))
        return FlowSchedule("flow", n, shift=shift)

    def _call_default(self, name: str):
        """Defaults of SanaPipeline.__call__ (e.g. its long complex-human instruction)."""
        return inspect.signature(type(self.pipe).__call__).parameters[name].default

    def encode_prompts(self, prompts: list[str]) -> tuple[dict, dict]:
        embeds, mask, negative, negative_mask = self.pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=True,
            negative_prompt="",
            device=self.text_device,
            max_sequence_length=self._call_default("max_sequence_length"),
            complex_human_instruction=self._call_default("complex_human_instruction"),
        )
        cond = {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}
        uncond = {"encoder_hidden_states": negative, "encoder_attention_mask": negative_mask}
        return cond, uncond

    def forward(self, net: nn.Module, x_t: Tensor, t: Tensor, kwargs: dict) -> Tensor:
        dtype = next(net.parameters()).dtype
        config = getattr(net, "module", net).config  # through a DDP/FSDP wrapper
        timestep = t * config.timestep_scale
        out = net(x_t.to(dtype), timestep=timestep.to(dtype), return_dict=False, **kwargs)[0]
        if out.shape[1] != x_t.shape[1]:  # learned-sigma heads: keep the velocity half
            out = out.chunk(2, dim=1)[0]
        return out.float()

    def export_scheduler(self) -> FlowMatchLCMScheduler:
        # Its step is "x0 = x - sigma * v, re-noise to the next sigma"; at one step sigma = 1.
        return FlowMatchLCMScheduler(
            num_train_timesteps=self.schedule.num_train_timesteps, shift=self.schedule.shift
        )

    def pipeline_call_kwargs(self) -> dict:
        return {"use_resolution_binning": False}

    def feature_module(self, net: nn.Module) -> tuple[nn.Module, int]:
        blocks = net.transformer_blocks
        width = int(net.config.num_attention_heads * net.config.attention_head_dim)
        return blocks[len(blocks) // 2], width

    def feature_blocks(self, net: nn.Module) -> list[tuple[nn.Module, int]]:
        width = int(net.config.num_attention_heads * net.config.attention_head_dim)
        return [(block, width) for block in net.transformer_blocks]

    def features_to_map(self, feats: Tensor) -> Tensor:
        n, tokens, width = feats.shape
        side = math.isqrt(tokens)
        return feats.transpose(1, 2).reshape(n, width, side, tokens // side)

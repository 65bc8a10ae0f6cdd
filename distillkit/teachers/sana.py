"""SANA family: linear-attention DiT, rectified-flow velocity, Gemma2 text encoder, DC-AE."""

from __future__ import annotations

import inspect
import math

import numpy as np
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

    def call_network(self, net: nn.Module, x_t: Tensor, t: Tensor, kwargs: dict) -> Tensor:
        config = getattr(net, "module", net).config  # through a DDP/FSDP wrapper
        # fp32 timesteps, as SanaPipeline passes them: in bf16 they would round to multiples
        # of 4 in [512, 1024) and the network would see another t than the schedule's
        timestep = t.float() * config.timestep_scale
        out = net(x_t, timestep=timestep, return_dict=False, **kwargs)[0]
        if out.shape[1] != x_t.shape[1]:  # learned-sigma heads: keep the velocity half
            out = out.chunk(2, dim=1)[0]
        return out

    def export_scheduler(self) -> FlowMatchLCMScheduler:
        # Its step is "x0 = x - sigma * v, re-noise to the next sigma"; at one step sigma = 1.
        return FlowMatchLCMScheduler(
            num_train_timesteps=self.schedule.num_train_timesteps, shift=self.schedule.shift
        )

    @staticmethod
    def grid_sigmas(steps: int, base: int) -> list[float]:
        """``steps`` points of the ``base``-point trailing flow grid u_j = 1 - j / base, picked
        at floor(i * base / steps): LCMScheduler's rule, so a k-step SANA student samples k
        points of its training grid as an SD one does. The scheduler applies its shift to them.

        FlowMatchLCMScheduler's own k-step grid cannot serve: it spaces sigmas from 1 down to
        its minimum and always ends there (shift 3: [1.0, 0.009] at 2 steps, [1.0, 0.858,
        0.602, 0.009] at 4), so a "2-step" student would be a 1-step one. SanaPipeline takes
        ``sigmas=``; exports store them with each step count they ship."""
        picks = np.floor(np.linspace(0, base, steps, endpoint=False))
        return [float(u) for u in 1.0 - picks / base]

    def sampling_call_kwargs(self, steps: int) -> dict:
        base = self.grid_steps or self.schedule.num_train_timesteps
        return {"sigmas": self.grid_sigmas(steps, base)}

    def solver_timesteps(self, n: int) -> Tensor:
        # the whole n-point grid (LCM's DDIM-grid counterpart: [T, T - T/n, ..., T/n], shifted)
        scheduler = self.export_scheduler()
        scheduler.set_timesteps(sigmas=self.grid_sigmas(n, n), device=self.device)
        return scheduler.timesteps.float()

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

"""SANA family: linear-attention DiT, rectified-flow velocity, Gemma2 text encoder, DC-AE."""

from __future__ import annotations

from torch import Tensor, nn

from distillkit.registry import register_family
from distillkit.teachers.base import TeacherAdapter
from distillkit.teachers.flow import FlowAdapterMixin, tokens_to_map


@register_family("sana")
class SanaAdapter(FlowAdapterMixin, TeacherAdapter):
    pipeline_class = "SanaPipeline"

    def encode_prompts(self, prompts: list[str]) -> tuple[dict, dict]:
        embeds, mask, negative, negative_mask = self.pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=True,
            negative_prompt="",
            device=self.text_device,
            max_sequence_length=self.text_length(),
            complex_human_instruction=self.call_default("complex_human_instruction"),
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
        return tokens_to_map(feats)

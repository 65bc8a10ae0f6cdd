"""SD3 / SD3.5 family: MMDiT over 2x2 latent patches, rectified-flow velocity with the card's
shift, two CLIP encoders (pooled projections) and T5, all through the pipeline's encode_prompt."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from distillkit.registry import register_family
from distillkit.teachers.base import TeacherAdapter
from distillkit.teachers.flow import FlowAdapterMixin, tokens_to_map


@register_family("sd3")
class SD3Adapter(FlowAdapterMixin, TeacherAdapter):
    pipeline_class = "StableDiffusion3Pipeline"

    def encode_prompts(self, prompts: list[str]) -> tuple[dict, dict]:
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.text_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=[""] * len(prompts),
            max_sequence_length=self.text_length(),
        )
        cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        uncond = {"encoder_hidden_states": negative, "pooled_projections": negative_pooled}
        return cond, uncond

    def call_network(self, net: nn.Module, x_t: Tensor, t: Tensor, kwargs: dict) -> Tensor:
        # fp32 timesteps (sigma * 1000), as the pipeline passes the scheduler's
        return net(x_t, timestep=t.float(), return_dict=False, **kwargs)[0]

    def _width(self, net: nn.Module) -> int:
        return int(net.config.num_attention_heads * net.config.attention_head_dim)

    def feature_module(self, net: nn.Module) -> tuple[nn.Module, int]:
        blocks = net.transformer_blocks
        return blocks[len(blocks) // 2], self._width(net)

    def feature_blocks(self, net: nn.Module) -> list[tuple[nn.Module, int]]:
        return [(block, self._width(net)) for block in net.transformer_blocks]

    def features_to_map(self, feats: Any) -> Tensor:
        # a joint block returns (text tokens, image tokens); the image stream is the feature
        return tokens_to_map(feats[1])

"""Z-Image family (Tongyi-MAI): a single-stream DiT over 2x2 latent patches, the FLUX.1 VAE, a
Qwen3 text encoder (second-to-last hidden states, one unpadded sequence per prompt) and
rectified flow with a fixed shift. Three conventions differ from the other flow families and
stop here:

- the network reads t = 1 - sigma and predicts x0 - eps (noise to data): ZImagePipeline feeds
  (1000 - timestep) / 1000 and negates the output, and so does :meth:`call_network`, so the
  adapter's output is the velocity eps - x0 that the flow schedule and the export expect;
- its inputs are lists: one (C, 1, h, w) frame and one caption sequence of its own length per
  sample. Conditioning must be batched tensors, so it holds the captions zero-padded to the
  encoding length with their token mask, and :meth:`call_network` unpads them again;
- ZImagePipeline's ``guidance_scale`` s computes pos + s (pos - neg): the standard CFG scale is
  s + 1. Recipes' guidance scales (and :meth:`predict`'s) are standard; students are exported
  at 0, which is "no CFG" in both conventions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distillkit.registry import register_family
from distillkit.teachers.base import TeacherAdapter
from distillkit.teachers.flow import FlowAdapterMixin, tokens_to_map


def pipeline_guidance(scale: float) -> float:
    """The ``guidance_scale`` ZImagePipeline needs for the standard CFG ``scale`` (w = s + 1)."""
    return max(float(scale) - 1.0, 0.0)


@register_family("zimage")
class ZImageAdapter(FlowAdapterMixin, TeacherAdapter):
    pipeline_class = "ZImagePipeline"

    def __init__(self, pipe, resolution: int, device: torch.device) -> None:
        patch = 2 * pipe.vae_scale_factor
        if resolution % patch:
            raise ValueError(
                f"teacher.resolution={resolution}: Z-Image patchifies 2x2 latents, so the "
                f"resolution must be a multiple of {patch}"
            )
        super().__init__(pipe, resolution, device)

    # ------------------------------------------------------------------ text and network
    def encode_prompts(self, prompts: list[str]) -> tuple[dict, dict]:
        # a copy: ZImagePipeline._encode_prompt writes the chat-templated text into its list
        embeds, negative = self.pipe.encode_prompt(
            list(prompts),
            device=self.text_device,
            do_classifier_free_guidance=True,
            negative_prompt=[""] * len(prompts),
            max_sequence_length=self.text_length(),
        )
        return self._padded(embeds), self._padded(negative)

    def _padded(self, captions: list[Tensor]) -> dict:
        """Variable-length caption features as (N, L, D) plus a (N, L) token mask, L the
        encoding length (every prompt the same, so cached rows concatenate)."""
        length, first = self.text_length(), captions[0]
        feats = first.new_zeros(len(captions), length, first.shape[-1])
        mask = torch.zeros(len(captions), length, dtype=torch.bool, device=first.device)
        for i, caption in enumerate(captions):
            feats[i, : len(caption)], mask[i, : len(caption)] = caption, True
        return {"cap_feats": feats, "cap_mask": mask}

    def call_network(self, net: nn.Module, x_t: Tensor, t: Tensor, kwargs: dict) -> Tensor:
        captions = [f[m] for f, m in zip(kwargs["cap_feats"], kwargs["cap_mask"])]
        out = net(
            list(x_t.unsqueeze(2).unbind(0)),  # one (C, 1, h, w) frame per sample
            (1000 - t.float()) / 1000,  # fp32, as the pipeline passes it
            captions,
            return_dict=False,
        )[0]
        return -torch.stack(out).squeeze(2)

    # ------------------------------------------------------------------ features
    def _width(self, net: nn.Module) -> int:
        return int(net.config.dim)

    def feature_module(self, net: nn.Module) -> tuple[nn.Module, int]:
        return net.layers[len(net.layers) // 2], self._width(net)

    def feature_blocks(self, net: nn.Module) -> list[tuple[nn.Module, int]]:
        return [(block, self._width(net)) for block in net.layers]

    def features_to_map(self, feats: Tensor) -> Tensor:
        # a joint layer's stream is [image tokens, their padding, caption]: the grid leads
        side = self.resolution // (2 * self.pipe.vae_scale_factor)
        return tokens_to_map(feats[:, : side * side])

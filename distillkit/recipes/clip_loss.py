"""SwiftBrush v2's clamped CLIP loss (Dao et al., ECCV 2024, arXiv:2408.14176), as a generator
loss term: decode the generated latents with the teacher's (frozen) VAE, embed the images and
their prompts with an open_clip model, and penalise 1 - cos(image, text) only while the cosine
is below a clamp, so the term stops pushing once an image is aligned well enough.

The open_clip model comes from a local weight file through the evaluation harness's loader
(:func:`distillkit.clip.load_clip`); nothing is downloaded. Unlike the CLIP
*score*, which goes through 8-bit PIL images, the loss preprocesses on tensors (resize, centre
crop, normalise as the model's eval transform does) so gradients reach the generator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distillkit.errors import ConfigError

# open_clip's OPENAI_DATASET_MEAN / STD: the fallback when a model carries no preprocess_cfg
_MEAN = (0.48145466, 0.4578275, 0.40821073)
_STD = (0.26862954, 0.26130258, 0.27577711)


def clamped_clip_loss(image_emb: Tensor, text_emb: Tensor, clamp: float) -> Tensor:
    """Mean over pairs of 1 - min(cos(image, text), clamp).

    Below the clamp this is the plain CLIP loss 1 - cos, whose descent direction raises the
    similarity; at or above it the loss is the constant 1 - clamp with zero gradient. Up to
    that constant it is max(clamp - cos, 0), the hinge form of SwiftBrush v2's clamped loss.
    """
    cos = F.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)
    return (1.0 - cos.clamp(max=clamp)).mean()


class ClipGuide:
    """A frozen open_clip model that embeds images differentiably and prompts without grad."""

    def __init__(self, scorer) -> None:
        self.model, self.tokenizer = scorer.model, scorer.tokenizer
        self.name, self.weights = scorer.name, scorer.weights
        visual = self.model.visual
        cfg = getattr(visual, "preprocess_cfg", None) or {}
        size = cfg.get("size", getattr(visual, "image_size", 224))
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.interpolation = cfg.get("interpolation", "bicubic")
        if self.interpolation not in ("bicubic", "bilinear"):
            self.interpolation = "bicubic"
        self.mean = torch.tensor(cfg.get("mean", _MEAN)).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", _STD)).view(1, 3, 1, 1)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, images: Tensor) -> Tensor:
        """(N, 1|3, H, W) in [-1, 1] -> the model's input: shortest side resized to the input
        size, centre-cropped, normalised (open_clip's eval transform, without 8-bit rounding)."""
        x = (images.float() + 1) / 2
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        h, w = x.shape[-2:]
        th, tw = self.size
        scale = max(th / h, tw / w)
        new = (max(th, round(h * scale)), max(tw, round(w * scale)))
        if new != (h, w):
            x = F.interpolate(x, size=new, mode=self.interpolation, antialias=True)
        top, left = (new[0] - th) // 2, (new[1] - tw) // 2
        x = x[..., top : top + th, left : left + tw]
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def image_embeddings(self, images: Tensor) -> Tensor:
        pixels = self.preprocess(images.to(self.device))
        return self.model.encode_image(pixels).float()

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> Tensor:
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return self.model.encode_text(tokens).float()

    def loss(self, images: Tensor, prompts: list[str], clamp: float) -> Tensor:
        return clamped_clip_loss(
            self.image_embeddings(images), self.text_embeddings(prompts), clamp
        )


def load_clip_guide(model_name: str, weights: str, device: torch.device) -> ClipGuide:
    """The recipe's CLIP model, loaded like the CLIP score's; errors name the recipe fields."""
    from distillkit.clip import load_clip

    try:
        scorer = load_clip(model_name, weights, device)
    except ConfigError as err:  # its messages name the eval CLI's flags
        msg = str(err).replace("--clip-weights", "recipe.clip_weights")
        raise ConfigError(msg.replace("--clip-model", "recipe.clip_model")) from None
    return ClipGuide(scorer)

"""CLIP with open_clip, from a weight file on disk (never downloaded): the CLIP score of the
evaluation harness and the CLIP model SwiftBrush v2's loss trains with, from one loader.

Definition as in torchmetrics' CLIPScore: per image, 100 * max(cos(image, text), 0) with the
image and its prompt embedded by the same CLIP, averaged over the samples. Images go through
the model's own eval preprocessing (8-bit PIL image, resize, centre crop, normalise), so a score
matches what `open_clip` users compute on saved PNGs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from distillkit.errors import ConfigError

DEFAULT_MODEL = (
    "ViT-L-14"  # the architecture of torchmetrics' default (openai/clip-vit-large-patch14)
)
SCALE = 100.0


def scores_from_embeddings(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Per-pair CLIP score: 100 * max(cos, 0) of matching rows."""
    cos = torch.nn.functional.cosine_similarity(image_emb.double(), text_emb.double(), dim=-1)
    return SCALE * cos.clamp(min=0)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(N, 1|3, H, W) in [-1, 1] -> 8-bit RGB PIL images, as saving PNGs would give."""
    x = images.detach().float().cpu().clamp(-1, 1)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    pixels = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(p) for p in pixels]


class ClipScorer:
    """An open_clip model with its eval transform and tokenizer."""

    def __init__(self, model, preprocess, tokenizer, name: str, weights: str) -> None:
        self.model = model.eval().requires_grad_(False)
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.name, self.weights = name, weights

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = torch.stack([self.preprocess(im) for im in to_pil(images)]).to(self.device)
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return self.model.encode_image(pixels).float(), self.model.encode_text(tokens).float()

    def scores(self, images: torch.Tensor, prompts: list[str], batch_size: int = 32) -> np.ndarray:
        """Per-image CLIP scores (float64) of ``images`` against their ``prompts``."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        out = []
        for i in range(0, len(images), batch_size):
            img, txt = self.embed(images[i : i + batch_size], prompts[i : i + batch_size])
            out.append(scores_from_embeddings(img, txt).cpu())
        return torch.cat(out).numpy()

    def protocol(self) -> dict[str, Any]:
        return {
            "model": f"open_clip {self.name}",
            "weights": self.weights,
            "score": "100 * max(cos(image, text), 0), mean over samples (torchmetrics CLIPScore)",
            "scale": SCALE,
            "preprocess": "8-bit RGB PIL image through the model's eval transform",
        }


def load_clip(model_name: str, weights: Path | str | None, device: str | torch.device = "cpu"):
    """ClipScorer for ``model_name`` (an open_clip architecture) with weights from a file."""
    if not weights:
        raise ConfigError(
            "--clip-weights: CLIP score needs a local open_clip weight file "
            "(e.g. open_clip_pytorch_model.bin / .safetensors); distillkit never downloads it"
        )
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"--clip-weights: {path} does not exist")
    try:
        import open_clip
    except ImportError:
        raise ConfigError("CLIP score needs open_clip: pip install 'distillkit[eval]'") from None
    if model_name not in open_clip.list_models():
        raise ConfigError(
            f"--clip-model: {model_name!r} is not an open_clip architecture "
            "(see open_clip.list_models(), e.g. ViT-B-32, ViT-L-14)"
        )
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=str(path), device=device
        )
        tokenizer = open_clip.get_tokenizer(model_name)
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise ConfigError(
            f"--clip-weights: could not load {path} into {model_name} "
            f"({type(err).__name__}: {first})"
        ) from None
    return ClipScorer(model, preprocess, tokenizer, model_name, path.name)

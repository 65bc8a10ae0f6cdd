"""The digits benchmark data: real 8x8 handwritten digits as 32x32 RGB images, plus prompts.

sklearn bundles the UCI digits (1,797 images), so the benchmark runs offline on any laptop.
Images are upsampled to 32x32 RGB in [-1, 1] so they look like what a diffusers pipeline
returns (3 channels, normalised), and every prompt names exactly one digit so a classifier
can judge whether a generated image matches its prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DIGIT_NAMES: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)

PROMPT_TEMPLATES: tuple[str, ...] = (
    "a handwritten digit {name}",
    "the number {name}, handwritten",
    "a scanned digit {name}",
    "{name} written by hand",
)

IMAGE_SIZE = 32
NUM_CLASSES = len(DIGIT_NAMES)

_NAME_TO_LABEL = {name: i for i, name in enumerate(DIGIT_NAMES)}
_WORD_RE = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class DigitsSplit:
    """A fixed train / held-out split; `seed` and `test_fraction` say how it was drawn."""

    train_images: torch.Tensor  # (N_train, 3, 32, 32) float32 in [-1, 1]
    train_labels: torch.Tensor  # (N_train,) int64
    heldout_images: torch.Tensor  # (N_heldout, 3, 32, 32) float32 in [-1, 1]
    heldout_labels: torch.Tensor  # (N_heldout,) int64
    seed: int
    test_fraction: float


def digits_to_images(raw: np.ndarray, size: int = IMAGE_SIZE) -> torch.Tensor:
    """sklearn's (N, 8, 8) pixel values in [0, 16] -> (N, 3, size, size) float32 in [-1, 1]."""
    x = torch.as_tensor(np.asarray(raw, dtype=np.float32)).reshape(-1, 1, 8, 8)
    x = x / 8.0 - 1.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(-1.0, 1.0).repeat(1, 3, 1, 1).contiguous()


def load_digits_split(seed: int = 0, test_fraction: float = 0.25) -> DigitsSplit:
    """Stratified split of sklearn's digits so every class is in both halves in equal share.

    The judge trains on `train_*` only; metrics compare generated images to `heldout_*`.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    data = load_digits()
    index = np.arange(len(data.target))
    train_idx, test_idx = train_test_split(
        index, test_size=test_fraction, random_state=seed, stratify=data.target
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    images = digits_to_images(data.images)
    labels = torch.as_tensor(data.target, dtype=torch.int64)
    return DigitsSplit(
        train_images=images[train_idx],
        train_labels=labels[train_idx],
        heldout_images=images[test_idx],
        heldout_labels=labels[test_idx],
        seed=seed,
        test_fraction=test_fraction,
    )


def prompt_for(label: int, template_index: int = 0) -> str:
    """The prompt for digit `label` in template `template_index` (taken modulo the count)."""
    if not 0 <= int(label) < NUM_CLASSES:
        raise ValueError(f"label must be in 0..{NUM_CLASSES - 1}, got {label}")
    template = PROMPT_TEMPLATES[template_index % len(PROMPT_TEMPLATES)]
    return template.format(name=DIGIT_NAMES[int(label)])


def label_from_prompt(prompt: str) -> int:
    """Inverse of `prompt_for`: the one digit name in the prompt; ValueError if none or several."""
    found = {_NAME_TO_LABEL[w] for w in _WORD_RE.findall(prompt.lower()) if w in _NAME_TO_LABEL}
    if len(found) != 1:
        raise ValueError(f"expected exactly one digit name in prompt, got {prompt!r}")
    return found.pop()


def eval_prompts(per_class: int = 100) -> list[tuple[str, int]]:
    """Fixed evaluation prompts: `per_class` per digit, classes interleaved, templates cycling.

    Interleaving keeps any prefix of the list balanced across classes.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    prompts: list[tuple[str, int]] = []
    for i in range(per_class):
        for label in range(NUM_CLASSES):
            prompts.append((prompt_for(label, i), label))
    return prompts


# ----------------------------------------------------------------------------- styles
# Two looks a simple statistic separates, for the teacher-LoRA benchmark (style LoRAs are
# trained on restyled digits; evaluation.metrics.style_statistic measures them).
STYLES: tuple[str, ...] = ("bold", "slant", "backslant")
SLANT_SHEAR = 0.3  # x shifts by 0.3 x (y - centre): a clear italic that keeps every digit legible


def restyle(images: torch.Tensor, style: str) -> torch.Tensor:
    """(N, 3, H, W) digits in [-1, 1] in ``style``: ``bold`` thickens the strokes (a 3x3 grey
    dilation; the digits VAEs keep only about half of it), ``slant`` shears them into italics
    (ink moving right towards the top), ``backslant`` the other way."""
    if style == "bold":
        return F.max_pool2d(images, kernel_size=3, stride=1, padding=1)
    if style in ("slant", "backslant"):
        shear = SLANT_SHEAR if style == "slant" else -SLANT_SHEAR
        theta = torch.tensor([[1.0, shear, 0.0], [0.0, 1.0, 0.0]], dtype=images.dtype)
        grid = F.affine_grid(
            theta.expand(len(images), 2, 3), list(images.shape), align_corners=False
        )
        ink = F.grid_sample(images + 1.0, grid, align_corners=False, padding_mode="zeros")
        return (ink - 1.0).clamp(-1.0, 1.0)
    raise ValueError(f"unknown digits style {style!r}: choose from {', '.join(STYLES)}")

"""Adversarial pieces shared by recipes: a light head on denoiser features and its losses.

DMD2 puts the head on its fake-score network (Yin et al. 2024); SiDA and adversarial
post-training reuse the same head and the non-saturating logistic losses.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from distillkit.teachers.base import TeacherAdapter


def gan_generator_loss(fake_logits: Tensor) -> Tensor:
    return F.softplus(-fake_logits).mean()


def gan_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


class DiscriminatorHead(nn.Module):
    """A light classifier on denoiser features (any spatial size): real vs generated."""

    def __init__(self, channels: int, width: int = 128) -> None:
        super().__init__()
        groups = 32 if width % 32 == 0 else 1
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.GroupNorm(groups, width),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GroupNorm(groups, width),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width, 1),
        )

    def forward(self, feats: Tensor) -> Tensor:
        return self.body(feats.float()).squeeze(1)


class FakeScore(nn.Module):
    """The fake-score denoiser, plus the GAN head that reads its bottleneck features."""

    def __init__(self, net: nn.Module, head: nn.Module | None) -> None:
        super().__init__()
        self.net = net
        self.head = head


def unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)


def predict_with_features(
    teacher: TeacherAdapter, fake: FakeScore, x_t: Tensor, t: Tensor, batch_cond
) -> tuple[Tensor, Tensor]:
    """One fake-score call returning its output and the GAN logits from the same forward."""
    block, _ = teacher.feature_module(unwrap(fake.net))
    captured: list[Tensor] = []
    hook = block.register_forward_hook(
        lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        out = teacher.forward(fake.net, x_t, t, batch_cond.cond)
    finally:
        hook.remove()
    return out, fake.head(teacher.features_to_map(captured[-1]))

"""Adversarial pieces shared by recipes: a light head on denoiser features and its losses.

DMD2 puts the head on its fake-score network (Yin et al. 2024); SiDA and adversarial
post-training reuse the same head and the non-saturating logistic losses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillkit.teachers.base import TeacherAdapter, compute_dtype


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
    """The fake-score denoiser, plus the GAN head that reads its bottleneck features.

    Recipes call it like the denoiser itself (``teacher.forward(fake, ...)``), never through
    ``fake.net``: only a call through ``forward`` lets a DDP/FSDP wrapper around this role arm
    and sync its gradients (a bypassed wrapper silently leaves ranks with different weights).
    """

    def __init__(self, net: nn.Module, head: nn.Module | None) -> None:
        super().__init__()
        self.net = net
        self.head = head
        self._tap: tuple[nn.Module, Callable[[Tensor], Tensor]] | None = None
        self.logits: Tensor | None = None

    @property
    def config(self):
        """The denoiser's config: families read it (e.g. SANA's timestep_scale)."""
        return self.net.config

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.net)  # the denoiser's, not the fp32 head's

    def forward(self, *args, **kwargs):
        if self._tap is None:
            return self.net(*args, **kwargs)
        block, to_map = self._tap
        captured: list[Tensor] = []
        hook = block.register_forward_hook(
            lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out)
        )
        try:
            out = self.net(*args, **kwargs)
        finally:
            hook.remove()
        # the head runs inside forward, so a wrapper's gradient sync covers its weights too
        self.logits = self.head(to_map(captured[-1]))
        return out


def unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)


def predict_with_features(
    teacher: TeacherAdapter, fake: nn.Module, x_t: Tensor, t: Tensor, batch_cond
) -> tuple[Tensor, Tensor]:
    """One fake-score call returning its output and the GAN logits from the same forward.

    ``fake`` is the role as the loop holds it: a :class:`FakeScore`, possibly DDP-wrapped.
    """
    inner: FakeScore = unwrap(fake)
    block, _ = teacher.feature_module(inner.net)
    inner._tap = (block, teacher.features_to_map)
    try:
        out = teacher.forward(fake, x_t, t, batch_cond.cond)
    finally:
        inner._tap = None
    logits, inner.logits = inner.logits, None
    return out, logits


def generator_and_fake_score(
    run_cfg, teacher: TeacherAdapter, fake_kind: str, gan: bool
) -> tuple[nn.Module, FakeScore]:
    """The two roles of score-distillation recipes (DMD2, SiD): a generator and a fake score,
    the latter with a GAN head when an adversarial term is configured."""
    from distillkit.students import role_networks

    student = run_cfg.student
    nets = role_networks(
        teacher.denoiser,
        {"generator": (student.type, student.lora), "fake_score": (fake_kind, student.lora)},
        shared_base=student.shared_base,
        gradient_checkpointing=run_cfg.train.gradient_checkpointing,
    )
    head = None
    if gan:
        _, channels = teacher.feature_module(nets["fake_score"])
        head = DiscriminatorHead(channels).to(teacher.device)
    return nets["generator"], FakeScore(nets["fake_score"], head)

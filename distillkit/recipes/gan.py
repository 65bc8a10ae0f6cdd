"""Adversarial pieces shared by recipes: a light head on denoiser features and its losses.

DMD2 puts the head on its fake-score network (Yin et al. 2024); SiDA and adversarial
post-training reuse the same head and the non-saturating logistic losses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillkit.teachers.base import TeacherAdapter, compute_dtype

if TYPE_CHECKING:
    from distillkit.config import RunConfig


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


class TappedBackbone(nn.Module):
    """A denoiser with light heads on chosen blocks: GAN logits from the same forward as its
    output. DMD2's and SiD's fake score (one head on the bottleneck, or none) and APT's
    discriminator (one per tapped depth, averaged) are this one module; the tapped blocks and
    the family's feature reshaping are resolved when it is built.

    Recipes call it like the denoiser (``teacher.forward(net, ...)``), never through ``.net``:
    only a call through ``forward`` lets a DDP/FSDP wrapper around the role arm and sync its
    gradients (a bypassed wrapper silently leaves ranks with different weights). The heads run
    inside ``forward`` for the same reason; ``call_with_logits`` asks for them.
    """

    def __init__(
        self,
        net: nn.Module,
        taps: list[tuple[nn.Module, int]],
        to_map: Callable[[Tensor], Tensor],
        width: int = 128,
    ) -> None:
        super().__init__()
        self.net = net
        self.heads = nn.ModuleList(DiscriminatorHead(channels, width) for _, channels in taps)
        self._blocks = [block for block, _ in taps]  # a plain list: they live inside ``net``
        self._to_map = to_map
        self.capturing = False  # set by call_with_logits for one call
        self.logits: Tensor | None = None

    @property
    def config(self):
        """The denoiser's config: families read it (e.g. SANA's timestep_scale)."""
        return self.net.config

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.net)  # the denoiser's, not the fp32 heads'

    def forward(self, *args, **kwargs):
        if not self.capturing:
            return self.net(*args, **kwargs)
        captured: dict[int, Tensor] = {}

        def keep(index: int):
            def hook(_module, _inputs, out) -> None:
                captured[index] = out  # as the block returns it: the adapter picks

            return hook

        hooks = [block.register_forward_hook(keep(i)) for i, block in enumerate(self._blocks)]
        try:
            out = self.net(*args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        feats = [self._to_map(captured[i]) for i in range(len(self._blocks))]
        self.logits = torch.stack([head(f) for head, f in zip(self.heads, feats)]).mean(0)
        return out


def unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)


def call_with_logits(
    teacher: TeacherAdapter, role: nn.Module, x_t: Tensor, t: Tensor, cond: dict
) -> tuple[Tensor, Tensor]:
    """One call of a :class:`TappedBackbone` role (as the loop holds it, maybe wrapped) with
    ``cond`` the network conditioning: its output and its heads' logits from the same forward."""
    inner: TappedBackbone = unwrap(role)
    if not inner.heads:
        raise ValueError("this network has no GAN head (no adversarial term configured)")
    inner.capturing = True
    try:
        out = teacher.forward(role, x_t, t, cond)
    finally:
        inner.capturing = False
    logits, inner.logits = inner.logits, None
    return out, logits


def predict_with_features(
    teacher: TeacherAdapter, fake: nn.Module, x_t: Tensor, t: Tensor, batch_cond
) -> tuple[Tensor, Tensor]:
    """The fake score's output and GAN logits from one call (``batch_cond``: Conditioning)."""
    return call_with_logits(teacher, fake, x_t, t, batch_cond.cond)


def generator_and_fake_score(
    run_cfg: RunConfig, teacher: TeacherAdapter, fake_kind: str, gan: bool
) -> tuple[nn.Module, TappedBackbone]:
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
    taps = [teacher.feature_module(nets["fake_score"])] if gan else []
    fake = TappedBackbone(nets["fake_score"], taps, teacher.features_to_map)
    return nets["generator"], fake.to(teacher.device)

"""The recipe contract: roles, which roles update at a step, and one loss per role.

The engine loop owns optimisation (backward, clipping, optimiser steps, EMA, checkpoints); a
recipe owns the networks it trains and the math. It never sees optimisers, devices or ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from distillkit.teachers.base import TeacherAdapter

if TYPE_CHECKING:
    from distillkit.config import RunConfig


@dataclass
class Batch:
    """One micro-batch: prompts, optional real images in [-1, 1] with their captions, and the
    micro-batch's own random stream (so runs and resumes are reproducible)."""

    prompts: list[str]
    images: Tensor | None
    captions: list[str] | None
    generator: torch.Generator
    scratch: dict[str, Any] = field(default_factory=dict)  # shared by the roles of one step
    # the same stream on every rank; set by the loop under FSDP only (see ``choice``)
    shared: torch.Generator | None = None
    latents: Tensor | None = None  # the images' cached VAE latents (data.cache_dir), if any

    def real_latents(self, teacher: TeacherAdapter) -> Tensor:
        """The real images in the denoiser's latent space: from the encoding cache when the run
        has one (the VAE encoder then stays off the device), else VAE-encoded now."""
        if self.latents is not None:
            return self.latents
        return teacher.encode_images(self.images)

    def randn(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        return torch.randn(shape, generator=self.generator).to(device)

    def rand(self, n: int) -> Tensor:
        """One uniform [0, 1) draw per row (on the CPU)."""
        return torch.rand(n, generator=self.generator)

    def randint(self, high: int, n: int) -> Tensor:
        """One integer draw in [0, high) per row (on the CPU)."""
        return torch.randint(high, (n,), generator=self.generator)

    def choice(self, k: int) -> int:
        """A random int in [0, k) for a choice that changes how many network calls run (few-step
        backward simulation's stopping step). Under FSDP every call gathers parameters with the
        other ranks, so every rank must choose the same: the loop then supplies ``shared``."""
        gen = self.shared if self.shared is not None else self.generator
        return int(torch.randint(k, (1,), generator=gen))


@dataclass(frozen=True)
class RoleFootprint:
    """One network a recipe holds, as ``distillkit plan`` needs to know it without building it.

    ``kind``: "full" (every weight trains), "lora" (an adapter trains; ``lora`` is its
    rank/alpha/targets section) or "frozen" (a copy that only follows, e.g. LCM's EMA target).
    ``shared_base``: the adapter sits on the teacher's own denoiser (no copy of the base).
    ``heads``: trainable GAN heads of ``head_width`` on the network's features (DMD2/SiD: one
    on the bottleneck, APT: one per tapped depth). ``forwards``: network passes
    whose activations one update keeps (a discriminator on real and fake: 2).
    ``backprop_through``: frozen-at-that-step roles the update's loss back-propagates through.
    """

    name: str
    kind: Literal["full", "lora", "frozen"]
    lora: Any = None
    shared_base: bool = False
    heads: int = 0
    head_width: int = 128
    forwards: int = 1
    backprop_through: tuple[str, ...] = ()


def student_role(run_cfg: RunConfig, name: str = "generator", **extra) -> RoleFootprint:
    """The student's footprint: ``student.type`` with ``student.lora``, on the shared base if
    configured (every recipe's generator is built this way)."""
    return peer_role(run_cfg, name, run_cfg.student.type, run_cfg.student.lora, **extra)


def peer_role(run_cfg: RunConfig, name: str, kind: str, lora, **extra) -> RoleFootprint:
    """A role built like the student from the teacher's denoiser (role_networks)."""
    is_lora = kind == "lora"
    return RoleFootprint(
        name,
        kind,
        lora=lora if is_lora else None,
        shared_base=is_lora and run_cfg.student.shared_base,
        **extra,
    )


class Recipe:
    """Subclasses set ``config_class``, build their role networks in ``__init__`` and declare
    them in ``footprint`` (what ``distillkit plan`` reads; a test holds the two equal)."""

    config_class: ClassVar[type]
    generator_role: ClassVar[str] = "generator"

    @classmethod
    def needs_images(cls, cfg) -> bool:
        """Whether this configuration trains on real images (checked before any weights load)."""
        return False

    @classmethod
    def footprint(cls, run_cfg: RunConfig) -> list[RoleFootprint]:
        """The networks this configuration holds: the trainable roles in ``roles`` order, then
        frozen copies (``state_modules``)."""
        raise NotImplementedError(f"{cls.__name__} does not declare its footprint")

    def __init__(self, run_cfg: RunConfig, teacher: TeacherAdapter) -> None:
        self.run_cfg = run_cfg
        self.cfg = run_cfg.recipe
        self.teacher = teacher
        self.roles: dict[str, nn.Module] = {}

    def schedule(self, step: int) -> list[str]:
        """Roles to update at ``step``, in order."""
        return list(self.roles)

    def loss(self, role: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def after_update(self, role: str, step: int, applied: Tensor | None = None) -> None:
        """Called after ``role``'s optimiser step (e.g. to move an EMA target network).

        ``applied`` is a 0-dim device tensor, 0 when the loop skipped this update because a
        gradient was not finite (None: applied). Honour it on the device, without reading it
        (no ``if applied``: that is a host sync per step); torch.where, not a multiply, since
        NaN * 0 is NaN."""

    def state_modules(self) -> dict[str, nn.Module]:
        """Non-trainable networks whose weights change during training (EMA targets); the
        loop checkpoints them in full so a resume is exact."""
        return {}

    def learning_rate(self, role: str) -> float:
        return float(self.cfg.lr[role])

    @property
    def export_steps(self) -> int:
        """num_inference_steps the exported pipeline is meant to be called with."""
        return 1

    @property
    def step_counts(self) -> tuple[int, ...]:
        """Every step count the generator is trained for (and the export ships and checks)."""
        return (self.export_steps,)

    def generator_step_count(self, batch: Batch) -> int:
        """The step count of one generator draw: with ``student.step_counts`` one of them,
        uniformly, from the batch's stream (the rank-shared one when sharded, so every rank
        runs as many forwards); otherwise the recipe's only count."""
        counts = self.step_counts
        return counts[batch.choice(len(counts))] if len(counts) > 1 else counts[0]

    def generator_net(self) -> nn.Module:
        return self.roles[self.generator_role]

    def plain_generator(self) -> nn.Module:
        """A fresh, unprepared network with the generator's architecture and parameter names
        (teacher weights, untrained adapters), to load gathered weights into: the FSDP export.
        Every recipe's generator is ``trainable_copy(teacher.denoiser, student.type, ...)``."""
        from distillkit.errors import ConfigError
        from distillkit.students import trainable_copy

        student = self.run_cfg.student
        if student.shared_base:
            raise ConfigError(
                "student.shared_base=true is not supported under FSDP (the roles share the "
                "teacher's own denoiser); turn student.shared_base off or use DDP"
            )
        return trainable_copy(self.teacher.denoiser, student.type, student.lora)

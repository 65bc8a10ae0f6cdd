"""APT: adversarial post-training against real data (Lin et al. 2025, "Diffusion Adversarial
Post-Training for One-Step Video Generation", Seaweed-APT, arXiv:2501.08316).

No distillation target: a one-step generator (initialised from the teacher, or from a
distilled run via ``init_from``, as APT starts from a consistency-distilled model) plays a
non-saturating GAN against a discriminator that is itself a copy of the diffusion backbone.
The discriminator sees NOISED inputs x_t = alpha_t x + sigma_t eps and reads features at
several depths (APT: new heads at layers 16, 26 and 36 of the 36-layer DiT; here the light
convolutional heads of gan.py at the same relative depths, their logits averaged). The
approximated R1 (APT's L_aR1) replaces the double-backward gradient penalty:
lambda * ||D(x_t) - D(x_t + sigma n)||^2 on real inputs, sigma = 0.01, lambda = 100.

Settings of the paper's image runs (1024px) as we read them: RMSProp alpha = 0.9, i.e. Adam with
beta1 = 0, beta2 = 0.9 (set in the YAMLs through train.adam_*), learning rate 5e-6 for both
networks, generator EMA decay 0.995 (train.ema.decay), one discriminator update per generator
update. Not implemented: APT's cross-attention-only discriminator blocks with learnable query
tokens (distillkit's adapters expose feature maps, so the heads are convolutional).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field
from safetensors.torch import load_file
from torch import Tensor, nn

from distillkit.errors import ConfigError
from distillkit.recipes.base import Batch, Recipe, RoleFootprint
from distillkit.recipes.gan import (
    TappedBackbone,
    call_with_logits,
    gan_discriminator_loss,
    gan_generator_loss,
)
from distillkit.registry import register_recipe
from distillkit.schema import Strict
from distillkit.students import plain_copy, trainable_copy
from distillkit.teachers.base import Conditioning, TeacherAdapter, tree_cat

if TYPE_CHECKING:
    from distillkit.config import RunConfig

WEIGHTS = "diffusion_pytorch_model.safetensors"


class APTConfig(Strict):
    name: Literal["apt"] = "apt"
    init_from: str | None = Field(
        None, description="pipeline dir exported by distillkit (e.g. a DMD2 run): G's weights"
    )
    discriminator: Literal["full", "lora"] = Field("full", description="APT trains all of D")
    feature_depths: list[float] = Field(
        default_factory=lambda: [16 / 36, 26 / 36, 1.0],
        min_length=1,
        description="relative depths of the D heads (APT: layers 16, 26, 36 of 36)",
    )
    head_width: int = Field(128, ge=8)
    r1_sigma: float = Field(0.01, gt=0, description="approximated R1 perturbation (APT: 0.01)")
    r1_weight: float = Field(100.0, ge=0, description="lambda of the approximated R1 (APT: 100)")
    min_t: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="D's noise level range, fraction of the schedule (flow: before the shift)",
    )
    max_t: float = Field(1.0, gt=0, le=1)
    discriminator_updates_per_generator: int = Field(1, ge=1)
    lr: dict[Literal["generator", "discriminator"], float] = Field(
        default_factory=lambda: {"generator": 5e-6, "discriminator": 5e-6}
    )


# ----------------------------------------------------------------------------- pure math


def approximated_r1(logits: Tensor, perturbed_logits: Tensor) -> Tensor:
    """E ||D(x) - D(x + sigma n)||^2 (APT's L_aR1 without lambda). For small sigma it equals
    sigma^2 E ||grad_x D(x)||^2, R1 (Mescheder et al. 2018) up to the factor sigma^2, since
    D(x + sigma n) - D(x) ~ sigma n . grad D and E[(n . g)^2] = ||g||^2, with no double backward."""
    return (logits.float() - perturbed_logits.float()).square().mean()


def r1_penalty(logits: Tensor, inputs: Tensor) -> Tensor:
    """The exact R1 term E ||grad_x D(x)||^2 (double backward); reference for the tests."""
    (grad,) = torch.autograd.grad(logits.sum(), inputs, create_graph=True)
    return grad.flatten(1).square().sum(1).mean()


def pick_depths(count: int, depths: Sequence[float]) -> list[int]:
    """Block indices at relative depths (1.0 = the last block), deduplicated, in order."""
    return sorted({min(count - 1, max(0, math.ceil(d * count) - 1)) for d in depths})


# ----------------------------------------------------------------------------- networks


def discriminate(
    teacher: TeacherAdapter, disc: nn.Module, x_t: Tensor, t: Tensor, kwargs: dict
) -> Tensor:
    """Logits of the discriminator (a :class:`TappedBackbone` role, maybe wrapped) on noised
    inputs, with ``kwargs`` the network conditioning (``Conditioning.cond``)."""
    return call_with_logits(teacher, disc, x_t, t, kwargs)[1]


def load_exported_denoiser(path: str, teacher: TeacherAdapter) -> nn.Module:
    """The teacher's denoiser architecture with the weights of an exported pipeline."""
    root, attr = Path(path), teacher.denoiser_attr
    folder = root / attr
    if not (root / "model_index.json").is_file() or not folder.is_dir():
        raise ConfigError(
            f"recipe.init_from: {root} is not a diffusers pipeline directory with a {attr}/ "
            "folder (give the pipeline/ directory of a distillkit run)"
        )
    index = folder / f"{WEIGHTS}.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [WEIGHTS]
    missing_files = [f for f in files if not (folder / f).is_file()]
    if missing_files:
        raise ConfigError(f"recipe.init_from: {folder} lacks {missing_files[0]} (safetensors)")
    state: dict[str, Tensor] = {}
    for name in files:
        state.update(load_file(str(folder / name)))
    net = plain_copy(teacher.denoiser)  # transient: trainable_copy makes the fp32 student
    own = net.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in sorted(own.keys() & state.keys())
        if state[k].shape != own[k].shape
    ]
    problems = {"missing": missing, "unexpected": unexpected, "shape mismatches": shapes}
    if any(problems.values()):
        detail = "; ".join(f"{len(v)} {k}, e.g. {v[:2]}" for k, v in problems.items() if v)
        raise ConfigError(
            f"recipe.init_from: the {attr} in {root} does not fit the teacher's "
            f"{type(net).__name__} ({detail}); export it from a run on the same teacher"
        )
    net.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return net


# ----------------------------------------------------------------------------- recipe


@register_recipe
class APT(Recipe):
    config_class = APTConfig

    def __init__(self, run_cfg: RunConfig, teacher: TeacherAdapter) -> None:
        super().__init__(run_cfg, teacher)
        cfg, student = self.cfg, run_cfg.student
        ckpt = run_cfg.train.gradient_checkpointing
        base = teacher.denoiser
        if cfg.init_from is not None:
            base = load_exported_denoiser(cfg.init_from, teacher)
        self.roles["generator"] = trainable_copy(base, student.type, student.lora, ckpt)
        del base
        d_net = trainable_copy(teacher.denoiser, cfg.discriminator, student.lora, ckpt)
        blocks = teacher.feature_blocks(d_net)
        taps = [blocks[i] for i in pick_depths(len(blocks), cfg.feature_depths)]
        disc = TappedBackbone(d_net, taps, teacher.features_to_map, cfg.head_width)
        self.roles["discriminator"] = disc.to(teacher.device)

    @classmethod
    def footprint(cls, run_cfg: RunConfig) -> list[RoleFootprint]:
        # both networks are copies (no shared base): the generator may start from another
        # export, and D trains whole, with one head per tapped depth
        kind, lora = run_cfg.student.type, run_cfg.student.lora
        cfg = run_cfg.recipe
        d_kind = cfg.discriminator
        return [
            RoleFootprint(
                "generator",
                kind,
                lora=lora if kind == "lora" else None,
                backprop_through=("discriminator",),
            ),
            RoleFootprint(
                "discriminator",
                d_kind,
                lora=lora if d_kind == "lora" else None,
                heads=len(set(cfg.feature_depths)),  # at most; pick_depths dedupes per network
                head_width=cfg.head_width,
                forwards=2,  # real and generated samples in one loss
            ),
        ]

    @classmethod
    def needs_images(cls, cfg: APTConfig) -> bool:
        return True

    def schedule(self, step: int) -> list[str]:
        if step % self.cfg.discriminator_updates_per_generator == 0:
            return ["generator", "discriminator"]
        return ["discriminator"]

    def _generate(self, batch: Batch, cond: Conditioning, with_grad: bool) -> Tensor:
        teacher, n = self.teacher, len(batch.captions)
        noise = batch.randn((n, *teacher.latent_shape()), teacher.device)
        with torch.set_grad_enabled(with_grad):
            return teacher.generate(self.roles["generator"], noise, cond, 1)

    def loss(self, role: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        teacher, cfg = self.teacher, self.cfg
        # generated and real samples share the real pairs' captions: D judges (x, c) pairs
        # from one caption distribution, so text alone cannot tell them apart
        cond = teacher.encode(batch.captions)
        n = len(batch.captions)
        disc = self.roles["discriminator"]
        t = teacher.sample_t(n, batch.generator, cfg.min_t, cfg.max_t)
        if role == "generator":
            x0 = self._generate(batch, cond, with_grad=True)
            batch.scratch["x0"] = x0.detach()
            x_t = teacher.add_noise(x0, batch.randn(x0.shape, x0.device), t)
            adv = gan_generator_loss(discriminate(teacher, disc, x_t, t, cond.cond))
            return adv, {"adv": adv.detach()}

        fake = batch.scratch.get("x0")
        if fake is None:
            fake = self._generate(batch, cond, with_grad=False)
        fake_t = teacher.add_noise(fake, batch.randn(fake.shape, fake.device), t)
        real = batch.real_latents(teacher)
        real_t = teacher.add_noise(real, batch.randn(real.shape, real.device), t)
        # the approximated R1 moves only the discriminator's input, by sigma n (same t, eps)
        nudged = real_t + cfg.r1_sigma * batch.randn(real_t.shape, real_t.device)
        parts = [fake_t, real_t, nudged] if cfg.r1_weight > 0 else [fake_t, real_t]
        kwargs = tree_cat([cond.cond] * len(parts))
        # one call for all of them: a DDP-wrapped role must not run forward twice per backward
        logits = discriminate(teacher, disc, torch.cat(parts), t.repeat(len(parts)), kwargs)
        fake_logits, real_logits, *rest = logits.split(n)
        adv = gan_discriminator_loss(real_logits, fake_logits)
        logs = {"adv": adv.detach(), "real_logit": real_logits.detach().mean()}
        if not rest:
            return adv, logs
        r1 = approximated_r1(real_logits, rest[0])
        logs["r1"] = r1.detach()
        return adv + cfg.r1_weight * r1, logs

"""DMD2: Improved Distribution Matching Distillation (Yin et al., 2024, arXiv:2405.14867).

The generator follows the difference between the teacher's ("real") score and a "fake" score
that tracks the generator's own distribution; the fake score is refreshed several times per
generator update (two time-scale rule). An optional GAN head on the fake score's bottleneck
features compares generated and real images. Multi-step generators train by backward
simulation. Defaults are the paper's SDXL settings unless a YAML says otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from distillkit.recipes.base import Batch, Recipe, RoleFootprint, peer_role, student_role
from distillkit.recipes.gan import (
    gan_discriminator_loss,
    gan_generator_loss,
    generator_and_fake_score,
    predict_with_features,
)
from distillkit.registry import register_recipe
from distillkit.schema import Strict
from distillkit.teachers.base import Conditioning, TeacherAdapter, tree_cat

if TYPE_CHECKING:
    from distillkit.config import RunConfig


class DMD2Config(Strict):
    takes_step_counts: ClassVar[bool] = True  # student.step_counts: see generator_step_count
    name: Literal["dmd2"] = "dmd2"
    real_guidance_scale: float = Field(8.0, ge=0, description="CFG of the teacher score")
    fake_guidance_scale: float = Field(
        1.0, description="CFG of the fake score: 1 only (it is never trained unconditionally)"
    )
    fake_updates_per_generator: int = Field(5, ge=1, description="two time-scale update rule")
    generator_steps: int = Field(1, ge=1, le=8, description="few-step generator (backward sim.)")
    min_t: float = Field(
        0.02,
        ge=0,
        lt=1,
        description="DM loss t range, fraction of the schedule (flow teachers: before the shift)",
    )
    max_t: float = Field(0.98, gt=0, le=1)
    fake_score: Literal["full", "lora"] = "full"
    gan_generator_weight: float = Field(0.0, ge=0, description="paper: 5e-3 (SDXL), 1e-3 (SD1.5)")
    gan_discriminator_weight: float = Field(0.0, ge=0, description="paper: 1e-2")
    lr: dict[Literal["generator", "fake_score"], float] = Field(
        default_factory=lambda: {"generator": 5e-7, "fake_score": 5e-7}
    )

    @property
    def gan(self) -> bool:
        return self.gan_generator_weight > 0 or self.gan_discriminator_weight > 0

    @model_validator(mode="after")
    def _fake_unguided(self) -> DMD2Config:
        if self.fake_guidance_scale != 1:
            raise ValueError(
                f"fake_guidance_scale={self.fake_guidance_scale}: DMD2 trains its fake score on "
                "the prompts only, so the fake score has no unconditional branch and its CFG is "
                "undefined (the reference asserts 1); keep 1 and set real_guidance_scale"
            )
        return self


# ----------------------------------------------------------------------------- pure math


def distribution_matching_grad(x0: Tensor, real_x0: Tensor, fake_x0: Tensor) -> Tensor:
    """DMD's per-sample normalised gradient on x0: (s_fake - s_real) direction in x0 space.

    In x0 terms the score difference is proportional to fake_x0 - real_x0; dividing by the mean
    |x0 - real_x0| makes the step size independent of the noise level (DMD, eq. 8).
    """
    p_real = x0 - real_x0
    p_fake = x0 - fake_x0
    dims = tuple(range(1, x0.ndim))
    norm = p_real.abs().mean(dim=dims, keepdim=True).clamp_min(1e-8)
    return torch.nan_to_num((p_real - p_fake) / norm)


def distribution_matching_loss(x0: Tensor, real_x0: Tensor, fake_x0: Tensor) -> Tensor:
    """A surrogate whose gradient w.r.t. x0 is the DM gradient (averaged over elements)."""
    grad = distribution_matching_grad(x0.detach(), real_x0.detach(), fake_x0.detach())
    return 0.5 * F.mse_loss(x0, (x0 - grad).detach())


def denoising_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """Fake-score training: plain regression onto the family's own target (eps, v, velocity)."""
    return F.mse_loss(prediction.float(), target.float())


# ----------------------------------------------------------------------------- recipe


@register_recipe
class DMD2(Recipe):
    config_class = DMD2Config

    def __init__(self, run_cfg: RunConfig, teacher: TeacherAdapter) -> None:
        super().__init__(run_cfg, teacher)
        self.roles["generator"], self.roles["fake_score"] = generator_and_fake_score(
            run_cfg, teacher, self.cfg.fake_score, self.cfg.gan
        )

    @classmethod
    def footprint(cls, run_cfg: RunConfig) -> list[RoleFootprint]:
        cfg = run_cfg.recipe
        through_fake = ("fake_score",) if cfg.gan_generator_weight > 0 else ()
        return [
            student_role(run_cfg, backprop_through=through_fake),
            peer_role(
                run_cfg,
                "fake_score",
                cfg.fake_score,
                run_cfg.student.lora,
                heads=1 if cfg.gan else 0,
                forwards=2 if cfg.gan_discriminator_weight > 0 else 1,  # fake + real logits
            ),
        ]

    @classmethod
    def needs_images(cls, cfg: DMD2Config) -> bool:
        return cfg.gan_discriminator_weight > 0

    def schedule(self, step: int) -> list[str]:
        if step % self.cfg.fake_updates_per_generator == 0:
            return ["generator", "fake_score"]
        return ["fake_score"]

    @property
    def export_steps(self) -> int:
        return max(self.step_counts)

    @property
    def step_counts(self) -> tuple[int, ...]:
        return tuple(self.run_cfg.student.step_counts or [self.cfg.generator_steps])

    def _generate(self, batch: Batch, cond, with_grad: bool) -> Tensor:
        """Generator samples; backward simulation picks a random stopping step when few-step."""
        teacher, k = self.teacher, self.generator_step_count(batch)
        n = len(batch.prompts)
        noise = batch.randn((n, *teacher.latent_shape()), teacher.device)
        last = batch.choice(k) if k > 1 else 0
        with torch.set_grad_enabled(with_grad):
            return teacher.generate(self.roles["generator"], noise, cond, k, last, batch.generator)

    def _gan_input(self, batch: Batch, x0: Tensor) -> tuple[Tensor, Tensor]:
        """x0 noised afresh at its own t in [0, T) for the GAN classifier: DMD2's diffusion GAN
        (main/sd_guidance.py compute_cls_logits, --diffusion_gan_max_timestep 1000), not the
        DM loss's x_t."""
        t = self.teacher.sample_t(x0.shape[0], batch.generator, 0.0, 1.0)
        return self.teacher.add_noise(x0, batch.randn(x0.shape, x0.device), t), t

    def loss(self, role: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        teacher, cfg = self.teacher, self.cfg
        cond = teacher.encode(batch.prompts)
        n = len(batch.prompts)
        fake = self.roles["fake_score"]  # called whole: a DDP wrapper must see the call
        if role == "generator":
            x0 = self._generate(batch, cond, with_grad=True)
            batch.scratch["x0"] = x0.detach()
            t = teacher.sample_t(n, batch.generator, cfg.min_t, cfg.max_t)
            with torch.no_grad():
                x_t = teacher.add_noise(x0, batch.randn(x0.shape, x0.device), t)
                fake_x0 = teacher.denoise(fake, x_t, t, cond)  # unguided: see the config
                real_x0 = teacher.denoise(teacher.denoiser, x_t, t, cond, cfg.real_guidance_scale)
            dm = distribution_matching_loss(x0, real_x0, fake_x0)
            logs: dict[str, Tensor] = {"dm": dm.detach()}
            if cfg.gan_generator_weight == 0:
                return dm, logs
            # the frozen fake score's features on the generated x0, differentiated through
            _, fake_logits = predict_with_features(teacher, fake, *self._gan_input(batch, x0), cond)
            gan = gan_generator_loss(fake_logits)
            logs["gan"] = gan.detach()
            return dm + cfg.gan_generator_weight * gan, logs

        x0 = batch.scratch.get("x0")
        if x0 is None:
            x0 = self._generate(batch, cond, with_grad=False)
        t = teacher.sample_t(n, batch.generator, 0.0, 1.0)
        eps = batch.randn(x0.shape, x0.device)
        x_t = teacher.add_noise(x0, eps, t)
        target = teacher.target(x0, eps, t)
        if cfg.gan_discriminator_weight == 0:
            loss = denoising_loss(teacher.forward(fake, x_t, t, cond.cond), target)
            return loss, {"denoise": loss.detach()}
        # denoising and both GAN inputs in one fake-score call (one forward per backward)
        real = batch.real_latents(teacher)
        real_cond = teacher.encode(batch.captions)
        fake_x, fake_t = self._gan_input(batch, x0)
        real_x, real_t = self._gan_input(batch, real)
        out, logits = predict_with_features(
            teacher,
            fake,
            torch.cat([x_t, fake_x, real_x]),
            torch.cat([t, fake_t, real_t]),
            Conditioning(tree_cat([cond.cond, cond.cond, real_cond.cond]), {}),
        )
        _, fake_logits, real_logits = logits.split([n, n, real.shape[0]])
        dsm = denoising_loss(out[:n], target)
        disc = gan_discriminator_loss(real_logits, fake_logits)
        logs = {"denoise": dsm.detach(), "disc": disc.detach()}
        return dsm + cfg.gan_discriminator_weight * disc, logs

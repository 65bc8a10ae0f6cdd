"""SiD: Score identity Distillation (Zhou et al., ICML 2024, arXiv:2404.04057) for text-to-image.

Data-free. A fake-score network tracks the generator's own distribution with the denoising loss
(one update per generator update, fake first, as in SiD); the generator minimises SiD's fused
score-identity loss, whose gradient flows through *both* score networks' inputs (DMD stops it).
Guidance follows SiD-LSG (Zhou et al., ICLR 2025, arXiv:2406.01561: kappa_1 trains the fake
score, kappa_2 = kappa_3 evaluate it, kappa_4 guides the teacher); the few-step mixture, Zero-CFG,
Anti-CFG and the SiDA adversarial term follow "Few-Step Diffusion via Score identity
Distillation" (Zhou, Gu, Wang 2025, arXiv:2505.12674). Reference code: mingyuanzhou/SiD-LSG
(training/sid_training_loop.py) and the SiD-DiT loop for flow-matching teachers.

Where we differ on purpose: with ``student.start_timestep`` (SiD-LSG's t_init) the generator's
input is unit-variance noise z at t_init, where SiD-LSG feeds add_noise(0, z, t_init) = sigma_t z
(0.9286 z at 625). The exported LCMScheduler pipeline feeds z itself (its init_noise_sigma is 1,
not configurable) and computes x0 = (x - sigma_t eps) / alpha_t from that same z, so a student
trained on sigma_t z cannot be exported for plain diffusers: folding sigma_t into the UNet's
input convolution reproduces the network but not the scheduler's use of its input (tried: 7.6 %
relative RMS off on the tiny teacher). Training does what the export reproduces; z also has the
variance of the teacher's marginal at t_init (alpha_t^2 + sigma_t^2 = 1), sigma_t z has 0.86.
A digits row comparing the two inputs is still owed (it needs a sampler outside the export).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from distillkit.recipes.base import Batch, Recipe, RoleFootprint, peer_role, student_role
from distillkit.recipes.dmd2 import denoising_loss
from distillkit.recipes.gan import (
    gan_discriminator_loss,
    gan_generator_loss,
    generator_and_fake_score,
    predict_with_features,
    unwrap,
)
from distillkit.registry import register_recipe
from distillkit.schema import Strict
from distillkit.teachers.base import Conditioning, TeacherAdapter

if TYPE_CHECKING:
    from distillkit.config import RunConfig

LSG_SCALE = 4.5  # SiD-LSG's released kappa_1..4 (the CLIP-optimal setting; 1.5 is FID-optimal)


class SiDConfig(Strict):
    takes_step_counts: ClassVar[bool] = True  # student.step_counts: see generator_step_count
    name: Literal["sid"] = "sid"
    alpha: float = Field(1.2, description="SiD's alpha (paper default 1.2; SiD-LSG runs use 1.0)")
    guidance: Literal["lsg", "zero_cfg", "anti_cfg"] = Field(
        "lsg",
        description="lsg: the kappas below; zero_cfg: teacher without CFG, fake score on the "
        "empty prompt; anti_cfg: teacher without CFG, fake score at a negative CFG scale",
    )
    # None = the mode's own value: 4.5 (LSG) / 1 (Zero-, Anti-CFG) for the teacher, 4.5 (LSG) or
    # the empty prompt (Zero-CFG) for the fake score; `key=null` on the command line restores it
    real_guidance_scale: float | None = Field(None, ge=0, description="kappa_4: teacher CFG")
    fake_guidance_scale: float | None = Field(
        None, description="kappa_2 = kappa_3: fake-score CFG in the generator loss (anti_cfg: < 0)"
    )
    fake_train_guidance_scale: float | None = Field(
        None, description="kappa_1: fake-score CFG in its own loss; None = fake_guidance_scale"
    )
    fake_prompt_dropout: float = Field(
        0.1, ge=0, lt=1, description="empty prompts while training a guided fake score (SiD-LSG)"
    )
    weighting: Literal["sid", "alpha"] = Field(
        "sid", description="sid: 1/mean|x_g - f_real| (SiD); alpha: alpha_t (SiD-DiT's 1-sigma)"
    )
    generator_steps: int = Field(1, ge=1, le=8, description="few-step generator (uniform mixture)")
    min_t: float = Field(
        0.02,
        ge=0,
        lt=1,
        description="t range, fraction of the schedule (VP: 20..980; flow: before the shift)",
    )
    max_t: float = Field(0.98, gt=0, le=1)
    fake_score: Literal["full", "lora"] = "full"
    gan_generator_weight: float = Field(0.0, ge=0, description="SiDA adversarial term (0 = off)")
    gan_discriminator_weight: float = Field(0.0, ge=0)
    lr: dict[Literal["generator", "fake_score"], float] = Field(
        default_factory=lambda: {"generator": 1e-6, "fake_score": 1e-6}
    )

    @property
    def gan(self) -> bool:
        return self.gan_generator_weight > 0 or self.gan_discriminator_weight > 0

    @model_validator(mode="after")
    def _check_guidance(self) -> SiDConfig:
        scales = ("real_guidance_scale", "fake_guidance_scale", "fake_train_guidance_scale")
        fixed = {"zero_cfg": scales, "anti_cfg": (scales[0], scales[2])}.get(self.guidance, ())
        given = [k for k in fixed if getattr(self, k) is not None]
        if given:
            raise ValueError(f"guidance={self.guidance} sets {given} itself: set them to null")
        fake, train = self.fake_guidance_scale, self.fake_train_guidance_scale
        if self.guidance == "lsg" and min(fake or 0, train or 0) < 0:
            raise ValueError("a negative fake-score guidance is Anti-CFG: set guidance=anti_cfg")
        if self.guidance == "anti_cfg" and not (fake is not None and fake < 0):
            raise ValueError("guidance=anti_cfg needs a negative fake_guidance_scale (e.g. -1)")
        return self

    def kappas(self) -> tuple[float | None, float | None, float]:
        """(kappa_1 fake training, kappa_2 = kappa_3 fake in the generator loss, kappa_4
        teacher); None = the fake score on the empty prompt."""
        if self.guidance == "zero_cfg":
            return None, None, 1.0
        if self.guidance == "anti_cfg":
            return 1.0, self.fake_guidance_scale, 1.0
        fake = LSG_SCALE if self.fake_guidance_scale is None else self.fake_guidance_scale
        train = fake if self.fake_train_guidance_scale is None else self.fake_train_guidance_scale
        real = LSG_SCALE if self.real_guidance_scale is None else self.real_guidance_scale
        return train, fake, real


# ----------------------------------------------------------------------------- pure math


def sid_weight(x_g: Tensor, real_x0: Tensor) -> Tensor:
    """SiD's per-sample weight w(t) = C / ||x_g - f_real(x_t)||_1 (SiD Sec. 4 "loss weighting",
    as DMD's normaliser), detached: the step size no longer depends on the noise level."""
    dims = tuple(range(1, x_g.ndim))
    mean_abs = (x_g.detach().float() - real_x0.detach().float()).abs().mean(dims, keepdim=True)
    return 1.0 / mean_abs.clamp_min(1e-5)


def sid_generator_loss(
    x_g: Tensor, real_x0: Tensor, fake_x0: Tensor, alpha: float, weight: Tensor | float = 1.0
) -> Tensor:
    """SiD's generator loss (SiD Sec. 4, the alpha-fused loss; SiD-LSG training loop):

        L = w(t) [(1 - alpha) ||f_real - f_fake||^2 + (f_real - f_fake)^T (f_fake - x_g)],

    with f_real / f_fake the teacher / fake-score x0 predictions at x_t = a_t x_g + s_t eps, both
    differentiable in x_g. The reference sums over elements and divides by the batch; this takes
    the element mean (a constant C*H*W factor, which keeps gradient clipping meaningful)."""
    diff = real_x0.float() - fake_x0.float()
    per_element = (1 - alpha) * diff.square() + diff * (fake_x0.float() - x_g.float())
    return (weight * per_element).mean()


# ----------------------------------------------------------------------------- recipe


@register_recipe
class SiD(Recipe):
    config_class = SiDConfig

    def __init__(self, run_cfg: RunConfig, teacher: TeacherAdapter) -> None:
        super().__init__(run_cfg, teacher)
        self.roles["generator"], self.roles["fake_score"] = generator_and_fake_score(
            run_cfg, teacher, self.cfg.fake_score, self.cfg.gan
        )

    @classmethod
    def footprint(cls, run_cfg: RunConfig) -> list[RoleFootprint]:
        cfg = run_cfg.recipe
        return [
            # SiD's generator loss differentiates through the fake score's output
            student_role(run_cfg, backprop_through=("fake_score",)),
            peer_role(
                run_cfg,
                "fake_score",
                cfg.fake_score,
                run_cfg.student.lora,
                heads=1 if cfg.gan else 0,
                forwards=2 if cfg.gan_discriminator_weight > 0 else 1,
            ),
        ]

    @classmethod
    def needs_images(cls, cfg: SiDConfig) -> bool:
        return cfg.gan_discriminator_weight > 0

    def schedule(self, step: int) -> list[str]:
        return ["fake_score", "generator"]  # SiD: refresh the fake score, then move the generator

    @property
    def export_steps(self) -> int:
        return max(self.step_counts)

    @property
    def step_counts(self) -> tuple[int, ...]:
        return tuple(self.run_cfg.student.step_counts or [self.cfg.generator_steps])

    def _generate(self, batch: Batch, cond: Conditioning, with_grad: bool) -> Tensor:
        """One draw from the uniform mixture over the k generation steps' outputs (few-step SiD:
        a random number of steps per draw, only the last with gradients)."""
        teacher, k = self.teacher, self.generator_step_count(batch)
        noise = batch.randn((len(batch.prompts), *teacher.latent_shape()), teacher.device)
        last = batch.choice(k) if k > 1 else 0
        with torch.set_grad_enabled(with_grad):
            return teacher.generate(self.roles["generator"], noise, cond, k, last, batch.generator)

    def _fake_x0(self, net, x_t: Tensor, t: Tensor, cond: Conditioning, scale: float | None):
        if scale is None:  # Zero-CFG: the fake score never sees the text
            return self.teacher.denoise(net, x_t, t, cond.with_empty_prompts())
        return self.teacher.denoise(net, x_t, t, cond, scale)

    def _weight(self, x_g: Tensor, real_x0: Tensor, t: Tensor) -> Tensor:
        if self.cfg.weighting == "sid":
            return sid_weight(x_g, real_x0)
        alpha, _ = self.teacher.alpha_sigma(t)
        return alpha.float().reshape(-1, *([1] * (x_g.ndim - 1)))

    def loss(self, role: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        teacher, cfg = self.teacher, self.cfg
        cond = teacher.encode(batch.prompts)
        n = len(batch.prompts)
        fake = self.roles["fake_score"]  # called whole when it trains: a DDP wrapper must see it
        k_train, k_fake, k_real = cfg.kappas()
        if role == "generator":
            # frozen here, but differentiated through: bypass any wrapper, which would otherwise
            # wait for gradients of weights that do not train in this step
            fake = unwrap(fake)
            x_g = self._generate(batch, cond, with_grad=True)
            t = teacher.sample_t(n, batch.generator, cfg.min_t, cfg.max_t)
            x_t = teacher.add_noise(x_g, batch.randn(x_g.shape, x_g.device), t)
            real_x0 = teacher.denoise(teacher.denoiser, x_t, t, cond, k_real)
            logs: dict[str, Tensor] = {}
            gan, fake_x0 = x_g.new_zeros(()), None
            if cfg.gan_generator_weight > 0:
                # SiDA: the logits come from the fake score's own features on generated x_t
                g_cond = cond.with_empty_prompts() if k_fake is None else cond
                out, logits = predict_with_features(teacher, fake, x_t, t, g_cond)
                gan = gan_generator_loss(logits)
                logs["gan"] = gan.detach()
                if k_fake is None or k_fake == 1:  # that forward is the fake score as well
                    fake_x0 = teacher.to_x0(out, x_t, t)
            if fake_x0 is None:
                fake_x0 = self._fake_x0(fake, x_t, t, cond, k_fake)
            sid = sid_generator_loss(
                x_g, real_x0, fake_x0, cfg.alpha, self._weight(x_g, real_x0, t)
            )
            logs["sid"] = sid.detach()
            return sid + cfg.gan_generator_weight * gan, logs

        x0 = self._generate(batch, cond, with_grad=False)
        t = teacher.sample_t(n, batch.generator, cfg.min_t, cfg.max_t)
        eps = batch.randn(x0.shape, x0.device)
        x_t = teacher.add_noise(x0, eps, t)
        target = teacher.target(x0, eps, t)
        if k_train is None:
            f_cond = cond.with_empty_prompts()
        elif k_train != 1 or k_fake != 1:
            drop = torch.rand(n, generator=batch.generator) < cfg.fake_prompt_dropout
            f_cond = cond.with_empty_prompts(drop)
        else:
            f_cond = cond
        if cfg.gan_discriminator_weight == 0:
            pred = teacher.predict(fake, x_t, t, f_cond, k_train)
            loss = denoising_loss(pred, target)
            return loss, {"denoise": loss.detach()}
        out, fake_logits = predict_with_features(teacher, fake, x_t, t, f_cond)
        pred = out if k_train in (None, 1) else teacher.predict(fake, x_t, t, f_cond, k_train)
        dsm = denoising_loss(pred, target)
        real = batch.real_latents(teacher)
        real_t = teacher.add_noise(real, batch.randn(real.shape, real.device), t)
        real_cond = teacher.encode(batch.captions)
        if k_train is None:
            real_cond = real_cond.with_empty_prompts()
        elif f_cond is not cond:  # the fake rows' prompt dropout, drawn alike for the real rows:
            # else an empty text would tell the discriminator "generated"
            real_drop = torch.rand(real.shape[0], generator=batch.generator)
            real_cond = real_cond.with_empty_prompts(real_drop < cfg.fake_prompt_dropout)
        _, real_logits = predict_with_features(teacher, fake, real_t, t, real_cond)
        disc = gan_discriminator_loss(real_logits, fake_logits)
        logs = {"denoise": dsm.detach(), "disc": disc.detach()}
        return dsm + cfg.gan_discriminator_weight * disc, logs

"""SwiftBrush: one-step text-to-image with Variational Score Distillation (Nguyen & Tran, CVPR
2024, arXiv:2312.05239).

Image-free. The fake score is the teacher plus a LoRA (ProlificDreamer's VSD "LoRA teacher"),
trained with the denoising loss on the student's samples; the student follows the VSD gradient
w(t) (eps_teacher - eps_lora), w(t) = sigma_t^2, through a surrogate MSE. Defaults are the
published run (VinAIResearch/SwiftBrush README and train_swiftbrush.py: SD2.1-base, guidance 4.5,
lr 1e-6 student / 1e-3 LoRA, LoRA rank 64 alpha 108 on to_q/to_v, t in [20, 981)).

Option: SwiftBrush v2's clamped CLIP loss (Dao et al., ECCV 2024, arXiv:2408.14176), on when
``clip_model`` is set: the generated latents go through the frozen VAE decoder and an open_clip
model, and ``clip_weight * (1 - min(cos(image, prompt), clip_clamp))`` joins the generator loss
(see :mod:`distillkit.recipes.clip_loss`). The weights are a local file, never downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from distillkit.config import LoraConfigSection
from distillkit.recipes.base import Batch, Recipe, RoleFootprint, peer_role, student_role
from distillkit.recipes.clip_loss import load_clip_guide
from distillkit.registry import register_recipe
from distillkit.schema import Strict
from distillkit.students import role_networks
from distillkit.teachers.base import TeacherAdapter

if TYPE_CHECKING:
    from distillkit.config import RunConfig


class SwiftBrushConfig(Strict):
    name: Literal["swiftbrush"] = "swiftbrush"
    real_guidance_scale: float = Field(4.5, ge=0, description="teacher CFG in the VSD gradient")
    fake_guidance_scale: float | None = Field(
        None, ge=0, description="LoRA-score CFG in the VSD gradient; None = real (reference code)"
    )
    min_t: float = Field(
        0.02,
        ge=0,
        lt=1,
        description="VSD t range, fraction of the schedule (VP: 20..981; flow: before the shift)",
    )
    max_t: float = Field(0.981, gt=0, le=1)
    lora_rank: int = Field(64, ge=1, le=1024, description="fake-score LoRA rank (paper: 64)")
    lora_alpha: float = Field(108.0, gt=0, description="fake-score LoRA alpha (README: 108)")
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_v"], min_length=1, description="reference: q, v"
    )
    fake_prompt_dropout: float = Field(
        0.1, ge=0, lt=1, description="empty prompts in the LoRA's loss, so its CFG is defined"
    )
    lr: dict[Literal["generator", "fake_score"], float] = Field(
        default_factory=lambda: {"generator": 1e-6, "fake_score": 1e-3}
    )
    clip_model: str | None = Field(
        None, description="SwiftBrush v2 clamped CLIP loss: open_clip architecture (e.g. ViT-B-32)"
    )
    clip_weights: str | None = Field(
        None, description="local open_clip weight file (.safetensors/.bin); never downloaded"
    )
    clip_weight: float = Field(
        0.1, ge=0, description="CLIP loss weight (SBv2 reimplementation: 0.1); 0 turns it off"
    )
    clip_clamp: float = Field(
        0.35, gt=-1, le=1, description="cosine above which the CLIP loss stops pushing (0.35)"
    )

    @property
    def use_clip(self) -> bool:
        return self.clip_model is not None and self.clip_weight > 0

    @model_validator(mode="after")
    def _check_clip(self) -> SwiftBrushConfig:
        if self.clip_model is None:
            if "clip_weight" in self.model_fields_set and self.clip_weight > 0:
                raise ValueError(
                    "recipe.clip_weight > 0 needs recipe.clip_model (an open_clip architecture) "
                    "and recipe.clip_weights (its local weight file)"
                )
            if self.clip_weights is not None:
                raise ValueError("recipe.clip_weights is set but recipe.clip_model is not")
        elif self.clip_weight > 0:
            if not self.clip_weights:
                raise ValueError(
                    "recipe.clip_weights: the CLIP loss needs a local open_clip weight file "
                    "(distillkit never downloads it)"
                )
            if not Path(self.clip_weights).expanduser().is_file():
                raise ValueError(f"recipe.clip_weights: {self.clip_weights} does not exist")
        return self


# ----------------------------------------------------------------------------- pure math


def vsd_weight(sigma: Tensor, like: Tensor) -> Tensor:
    """w(t) = sigma_t^2, the weighting of the reference code (score_gradient = sigma_t^2 * ...)."""
    return sigma.float().square().reshape(-1, *([1] * (like.ndim - 1)))


def vsd_grad(eps_real: Tensor, eps_fake: Tensor, weight: Tensor) -> Tensor:
    """The VSD gradient on the generated x0 (SwiftBrush Sec. 3, from ProlificDreamer's VSD):
    grad_x0 = w(t) (eps_teacher(x_t, t, y) - eps_lora(x_t, t, y)), both guided."""
    return torch.nan_to_num(weight * (eps_real.float() - eps_fake.float()))


def vsd_loss(x0: Tensor, eps_real: Tensor, eps_fake: Tensor, weight: Tensor) -> Tensor:
    """A surrogate whose gradient w.r.t. x0 is the VSD gradient averaged over elements: the
    score networks are never differentiated, only the generator is."""
    grad = vsd_grad(eps_real.detach(), eps_fake.detach(), weight.detach())
    return 0.5 * F.mse_loss(x0.float(), (x0.detach().float() - grad))


def lora_denoising_loss(eps_pred: Tensor, eps: Tensor, alpha: Tensor) -> Tensor:
    """The LoRA's loss as in the reference: ||alpha_t (eps_lora - eps)||^2, an epsilon loss
    weighted by alpha_t^2 (written in epsilon space so flow and v teachers use it unchanged)."""
    a = alpha.float().reshape(-1, *([1] * (eps.ndim - 1)))
    return F.mse_loss(a * eps_pred.float(), a * eps.float())


# ----------------------------------------------------------------------------- recipe


def _fake_lora(run_cfg):
    """The fake score's own LoRA section (SwiftBrush: rank 64 on attention, not the student's)."""
    cfg = run_cfg.recipe
    return LoraConfigSection(
        rank=cfg.lora_rank, alpha=cfg.lora_alpha, target_modules=cfg.lora_target_modules
    )


@register_recipe
class SwiftBrush(Recipe):
    """VSD generator + LoRA fake score; with ``clip_model`` set, SwiftBrush v2's clamped CLIP
    loss joins the generator's. Its defaults (weight 0.1, clamp 0.35) follow an unofficial SBv2
    training script, which also anneals the weight linearly to 0 (not done here); the official
    repository publishes evaluation code only."""

    config_class = SwiftBrushConfig

    def __init__(self, run_cfg: RunConfig, teacher: TeacherAdapter) -> None:
        super().__init__(run_cfg, teacher)
        cfg, student = self.cfg, run_cfg.student
        fake_lora = _fake_lora(run_cfg)
        nets = role_networks(
            teacher.denoiser,
            {"generator": (student.type, student.lora), "fake_score": ("lora", fake_lora)},
            shared_base=student.shared_base,
            gradient_checkpointing=run_cfg.train.gradient_checkpointing,
        )
        self.roles.update(nets)
        self.clip = None  # frozen and not a role: never optimised or checkpointed
        if cfg.use_clip:
            self.clip = load_clip_guide(cfg.clip_model, cfg.clip_weights, teacher.device)

    @classmethod
    def footprint(cls, run_cfg: RunConfig) -> list[RoleFootprint]:
        # VSD's generator gradient is computed without autograd through either score network;
        # the optional CLIP term back-propagates through the VAE decoder and CLIP (not counted)
        return [
            student_role(run_cfg),
            peer_role(run_cfg, "fake_score", "lora", _fake_lora(run_cfg)),
        ]

    def schedule(self, step: int) -> list[str]:
        return ["generator", "fake_score"]  # the reference's order, on the same samples

    def loss(self, role: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        teacher, cfg = self.teacher, self.cfg
        cond = teacher.encode(batch.prompts)
        n = len(batch.prompts)
        fake = self.roles["fake_score"]
        if role == "generator":
            noise = batch.randn((n, *teacher.latent_shape()), teacher.device)
            x0 = teacher.generate(self.roles["generator"], noise, cond, 1)
            batch.scratch["x0"] = x0.detach()
            t = teacher.sample_t(n, batch.generator, cfg.min_t, cfg.max_t)
            x_t = teacher.add_noise(x0.detach(), batch.randn(x0.shape, x0.device), t)
            fake_scale = cfg.fake_guidance_scale
            fake_scale = cfg.real_guidance_scale if fake_scale is None else fake_scale
            with torch.no_grad():
                real = teacher.predict(teacher.denoiser, x_t, t, cond, cfg.real_guidance_scale)
                lora = teacher.predict(fake, x_t, t, cond, fake_scale)
                eps_real, eps_fake = teacher.to_eps(real, x_t, t), teacher.to_eps(lora, x_t, t)
            _, sigma = teacher.alpha_sigma(t)
            loss = vsd_loss(x0, eps_real, eps_fake, vsd_weight(sigma, x0))
            logs = {"vsd": loss.detach()}
            if self.clip is not None:  # through the frozen VAE decoder into the generator
                clip = self.clip.loss(teacher.decode_latents(x0), batch.prompts, cfg.clip_clamp)
                loss = loss + cfg.clip_weight * clip
                logs["clip"] = clip.detach()
            return loss, logs

        x0 = batch.scratch.get("x0")
        if x0 is None:
            with torch.no_grad():
                noise = batch.randn((n, *teacher.latent_shape()), teacher.device)
                x0 = teacher.generate(self.roles["generator"], noise, cond, 1)
        t = teacher.sample_t(n, batch.generator, 0.0, 1.0)
        eps = batch.randn(x0.shape, x0.device)
        x_t = teacher.add_noise(x0, eps, t)
        drop = torch.rand(n, generator=batch.generator) < cfg.fake_prompt_dropout
        out = teacher.forward(fake, x_t, t, cond.with_empty_prompts(drop).cond)
        alpha, _ = teacher.alpha_sigma(t)
        loss = lora_denoising_loss(teacher.to_eps(out, x_t, t), eps, alpha)
        return loss, {"denoise": loss.detach()}

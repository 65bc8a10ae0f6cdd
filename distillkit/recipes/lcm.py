"""LCM and LCM-LoRA: latent consistency distillation (Luo et al. 2023, arXiv:2310.04378;
LCM-LoRA: Luo et al. 2023, arXiv:2311.05556).

The student is a consistency function f(x, t) = c_skip(t) x + c_out(t) x0_student(x, t) (LCM
Sec. 4.1, the parameterization of Song et al.'s consistency models); ``teacher.consistency`` is
exactly what the exported scheduler's step returns, so the export needs nothing extra. Training
(LCM Algorithm 1) takes x at t_{n+k} on the forward process, runs ONE guided teacher solver step
to t_n (augmented PF-ODE, LCM Sec. 4.2, CFG scale 1 + omega with omega ~ U[w_min, w_max]) over
the skipping interval k (Sec. 4.3), and pulls f(x_{t_{n+k}}, t_{n+k}) toward the target network's
f(x_{t_n}, t_n) with a pseudo-Huber distance.

One recipe name for both papers: LCM-LoRA *is* LCM with a LoRA student (``student.type: lora``);
what changes with the student type is only the target network, derived here as LCM-LoRA's
training script does. An alias name would duplicate a config that differs in no field.

Defaults follow the authors' diffusers scripts (examples/consistency_distillation, written with
the LCM team): k = 20 on 1000 steps (50 DDIM steps), omega in [3, 15] (their SDXL scripts; the
SD1.5 full script uses [5, 15]), EMA target decay 0.95, pseudo-Huber c = 0.001.
Not implemented: the omega-embedding of full LCM (``time_cond_proj_dim``) adds weights to the
UNet and has no SANA counterpart; like LCM-LoRA the student averages over omega.

``student.step_counts: [1, 2, 4]`` is MLCM's multistep consistency distillation (Xie et al.
2024, arXiv:2406.05768, after Heek et al. 2024's multistep consistency models): each update
draws a count k; the export's k sampling points cut the grid into k segments, and the student
at t is pulled toward the target network's point at the lower edge s of t's segment (both
carried there by DDIM), not toward t = 0. k = 1 is plain LCM. The distance is taken in x0
(the clean estimate whose DDIM from x_t lands on the target's edge point, as Heek et al. do),
so pseudo-Huber's c and the loss scale stay those of LCM. The export samples as LCMScheduler
does (x0, then fresh noise to the next point), as MLCM's released inference does. Measured
on digits: more accurate and less diverse than plain LCM at every count (README).
"""

from __future__ import annotations

import copy
import itertools
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from distillkit.errors import ConfigError
from distillkit.recipes.base import Batch, Recipe, RoleFootprint, student_role
from distillkit.recipes.gan import unwrap
from distillkit.registry import register_recipe
from distillkit.schema import Strict
from distillkit.students import role_networks
from distillkit.teachers.base import Conditioning, TeacherAdapter
from distillkit.tensors import masked_lerp_

if TYPE_CHECKING:
    from distillkit.config import RunConfig


class LCMConfig(Strict):
    name: Literal["lcm"] = "lcm"
    takes_step_counts: ClassVar[bool] = True  # student.step_counts: MLCM's segments
    latents: Literal["dataset", "teacher"] = Field(
        "dataset", description="x0 from data.images (LCM trains on LAION) or teacher samples"
    )
    skipping_step: int = Field(20, ge=1, le=500, description="k: solver grid of T // k steps")
    w_min: float = Field(3.0, ge=0, description="omega range; the teacher's CFG scale is 1+omega")
    w_max: float = Field(15.0, ge=0)
    target_ema_decay: float = Field(
        0.95, ge=0, lt=1, description="mu of the EMA target (full students; LoRA: no target copy)"
    )
    loss: Literal["huber", "l2"] = "huber"
    huber_c: float = Field(0.001, gt=0, description="pseudo-Huber c (diffusers LCM scripts)")
    inference_steps: int = Field(
        4,
        ge=1,
        le=8,
        description="steps the export is called with (with student.step_counts: if one of "
        "them, else their largest)",
    )
    teacher_steps: int = Field(25, ge=1, le=1000, description="latents=teacher: solver steps")
    teacher_guidance: float | None = Field(
        None, ge=0, description="latents=teacher: CFG scale (default: teacher.default_guidance)"
    )
    lr: dict[Literal["generator"], float] = Field(default_factory=lambda: {"generator": 1e-6})


# ----------------------------------------------------------------------------- pure math


def solver_step(schedule, out: Tensor, x_t: Tensor, t: Tensor, t_prev: Tensor) -> Tensor:
    """One deterministic solver step of the PF-ODE from t to t_prev, written once:
    x_prev = alpha(t_prev) x0_hat + sigma(t_prev) eps_hat (DDIM, Song et al. 2021, eq. 12 with
    eta = 0). With a flow schedule (alpha = 1 - sigma) this is exactly the Euler step
    x + (sigma_prev - sigma) v. ``schedule`` is anything with to_x0 / to_eps / add_noise (a
    teacher adapter or a :class:`~distillkit.diffusion.schedules.Schedule`)."""
    x0 = schedule.to_x0(out, x_t, t)
    eps = schedule.to_eps(out, x_t, t)
    return schedule.add_noise(x0, eps, t_prev)


def _coefficients(schedule, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    shape = (-1, *([1] * (like.ndim - 1)))
    alpha, sigma = schedule.alpha_sigma(t)
    return alpha.to(like).reshape(shape), sigma.to(like).reshape(shape)


def to_boundary(schedule, x0: Tensor, x_t: Tensor, t: Tensor, s: Tensor) -> Tensor:
    """Carry x_t at t to the segment edge s < t along DDIM with the clean estimate x0 (Heek et
    al. 2024's multistep consistency map): alpha_s x0 + sigma_s (x_t - alpha_t x0) / sigma_t.
    s = 0 is the clean end: x0 itself (a VP schedule's alpha at t = 0 is not exactly 1)."""
    alpha_t, sigma_t = _coefficients(schedule, t, x_t)
    alpha_s, sigma_s = _coefficients(schedule, s, x_t)
    carried = alpha_s * x0 + sigma_s * (x_t - alpha_t * x0) / sigma_t
    return torch.where((s == 0).reshape(alpha_s.shape), x0, carried)


def from_boundary(schedule, x_s: Tensor, x_t: Tensor, t: Tensor, s: Tensor) -> Tensor:
    """The clean estimate whose :func:`to_boundary` from (x_t, t) lands on x_s: that map is
    affine in x0 with slope alpha_s - sigma_s alpha_t / sigma_t, positive for s < t."""
    alpha_t, sigma_t = _coefficients(schedule, t, x_t)
    alpha_s, sigma_s = _coefficients(schedule, s, x_t)
    slope = alpha_s - sigma_s * alpha_t / sigma_t
    x0 = (x_s - sigma_s / sigma_t * x_t) / slope
    return torch.where((s == 0).reshape(alpha_s.shape), x_s, x0)


def segment_target(
    schedule,
    target_x0: Tensor,
    x_end: Tensor,
    t_end: Tensor,
    x_start: Tensor,
    t_start: Tensor,
    edge: Tensor,
) -> Tensor:
    """MLCM's target in x0 form: the target network's estimate at (x_end, t_end) carried to the
    segment edge (x_end itself where t_end is the edge), then read back as the clean estimate
    the student at (x_start, t_start) must give to land on it. With edge = 0 everywhere this is
    ``target_x0``: plain LCM."""
    at_edge = to_boundary(schedule, target_x0, x_end, t_end, edge)
    at_edge = torch.where((t_end == edge).reshape(-1, *([1] * (x_end.ndim - 1))), x_end, at_edge)
    return from_boundary(schedule, at_edge, x_start, t_start, edge)


def segment_edges(grid: Tensor, points: Tensor) -> Tensor:
    """For each interval n of the descending ``grid`` (ending at 0), the grid index of the lower
    edge of its segment, the segments being cut at ``points`` (a k-step sampling grid, each a
    grid point, the first the top) and at 0."""
    index = [int((grid - p).abs().argmin()) for p in points.tolist()]
    if any(abs(float(grid[i]) - p) > 1e-3 for i, p in zip(index, points.tolist())):
        raise ValueError(f"sampling points {points.tolist()} are not on the grid {grid.tolist()}")
    cuts = sorted({*index[1:], len(grid) - 1})
    intervals = torch.arange(len(grid) - 1)
    return torch.tensor(cuts)[torch.searchsorted(torch.tensor(cuts), intervals, right=True)]


def pseudo_huber(pred: Tensor, target: Tensor, c: float) -> Tensor:
    """mean(sqrt((pred - target)^2 + c^2) - c): elementwise, as the diffusers LCM scripts do
    (Song & Dhariwal 2023 use the per-sample norm); ~L2/(2c) near 0, ~L1 beyond c."""
    diff = pred.float() - target.float()
    return (torch.sqrt(diff.square() + c * c) - c).mean()


def consistency_loss(pred: Tensor, target: Tensor, kind: str, c: float) -> Tensor:
    if kind == "huber":
        return pseudo_huber(pred, target, c)
    return F.mse_loss(pred.float(), target.float())


@torch.no_grad()
def ema_update(
    target: nn.Module, source: nn.Module, decay: float, applied: Tensor | None = None
) -> None:
    """theta^- <- mu theta^- + (1 - mu) theta (LCM Algorithm 1, last line); a no-op, decided on
    the device, when the 0-dim flag ``applied`` is 0 (the student's update was skipped)."""
    masked_lerp_(target.parameters(), source.parameters(), 1.0 - decay, applied)


# ----------------------------------------------------------------------------- recipe


@register_recipe
class LCM(Recipe):
    config_class = LCMConfig

    def __init__(self, run_cfg: RunConfig, teacher: TeacherAdapter) -> None:
        super().__init__(run_cfg, teacher)
        student, cfg = run_cfg.student, self.cfg
        if student.start_timestep is not None:
            raise ConfigError(
                "student.start_timestep does not apply to recipe lcm: a consistency student "
                "samples its own distillation grid from T-1; remove the setting"
            )
        steps = max(teacher.schedule.num_train_timesteps // cfg.skipping_step, 1)
        if max(self.step_counts) > steps:
            raise ConfigError(
                f"recipe.inference_steps / student.step_counts: {max(self.step_counts)} steps "
                f"exceed the {steps}-point distillation grid of recipe.skipping_step="
                f"{cfg.skipping_step}; lower one"
            )
        # LCM-LoRA with student.shared_base: the student is an adapter on the teacher's own
        # denoiser (the teacher is that base with adapters off), one copy of the base weights,
        # as diffusers' LCM-LoRA script holds it
        net = role_networks(
            teacher.denoiser,
            {"generator": (student.type, student.lora)},
            shared_base=student.shared_base,
            gradient_checkpointing=run_cfg.train.gradient_checkpointing,
        )["generator"]
        self.roles["generator"] = net
        # Full LCM: an EMA copy is the target (theta^-). LCM-LoRA's script has none: the
        # student itself under no_grad, which costs no memory.
        self.target: nn.Module | None = None
        if student.type == "full":
            self.target = copy.deepcopy(net).requires_grad_(False).eval()
        self.grid = self._with_zero(teacher.solver_timesteps(steps))
        # the export samples k of these points, as the student learnt them (diffusers' LCM
        # scripts: original_inference_steps = num_ddim_timesteps)
        teacher.use_sampling_grid(steps)
        # MLCM (student.step_counts only): per count, each interval's segment edge (k = 1: t = 0)
        self.edges: dict[int, Tensor] = {}
        try:
            for k in student.step_counts or ():
                points = teacher.generator_timesteps(k)
                self.edges[k] = segment_edges(self.grid, points).to(self.grid.device)
        except ValueError as err:
            raise ConfigError(
                f"student.step_counts: the {teacher.family} export's sampling points are not on "
                f"the distillation grid of recipe.skipping_step={cfg.skipping_step} ({err}); "
                "a k-step student could not land on its segment edges; remove student.step_counts "
                "and report this with the teacher's scheduler config"
            ) from err

    @classmethod
    def footprint(cls, run_cfg: RunConfig) -> list[RoleFootprint]:
        roles = [student_role(run_cfg)]
        if run_cfg.student.type == "full":  # the EMA target, a frozen copy (state_modules)
            roles.append(RoleFootprint("target", "frozen"))
        return roles

    @classmethod
    def needs_images(cls, cfg: LCMConfig) -> bool:
        return cfg.latents == "dataset"

    @property
    def export_steps(self) -> int:
        counts = self.run_cfg.student.step_counts
        if counts and self.cfg.inference_steps not in counts:
            return max(counts)
        return self.cfg.inference_steps

    @property
    def step_counts(self) -> tuple[int, ...]:
        return tuple(self.run_cfg.student.step_counts or [self.export_steps])

    def state_modules(self) -> dict[str, nn.Module]:
        return {"target": self.target} if self.target is not None else {}

    def after_update(self, role: str, step: int, applied: Tensor | None = None) -> None:
        if self.target is not None:
            student = unwrap(self.roles["generator"])
            ema_update(self.target, student, self.cfg.target_ema_decay, applied)

    def _with_zero(self, grid: Tensor) -> Tensor:
        """Descending solver grid plus t = 0: the last interval lands on the boundary, where
        c_skip = 1 and c_out = 0 make the target the solver's output itself."""
        return torch.cat([grid.float(), grid.new_zeros(1).float()]).to(self.teacher.device)

    @torch.no_grad()
    def _teacher_latents(self, cond: Conditioning, batch: Batch) -> Tensor:
        """Data-free x0: a guided teacher trajectory from pure noise on the same solver."""
        teacher, n = self.teacher, len(batch.prompts)
        scale = self.cfg.teacher_guidance
        if scale is None:
            scale = self.run_cfg.teacher.default_guidance or 1.0
        x = batch.randn((n, *teacher.latent_shape()), teacher.device)
        grid = self._with_zero(teacher.solver_timesteps(self.cfg.teacher_steps))
        for t, t_prev in itertools.pairwise(grid):
            t, t_prev = t.expand(n), t_prev.expand(n)
            x = solver_step(
                teacher, teacher.predict(teacher.denoiser, x, t, cond, scale), x, t, t_prev
            )
        return x

    def loss(self, role: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        teacher, cfg = self.teacher, self.cfg
        if cfg.latents == "dataset":
            cond = teacher.encode(batch.captions)
            x0 = batch.real_latents(teacher)
        else:
            cond = teacher.encode(batch.prompts)
            x0 = self._teacher_latents(cond, batch)
        n, device = x0.shape[0], x0.device
        k = self.generator_step_count(batch)  # draws only when several counts are trained
        index = batch.randint(len(self.grid) - 1, n).to(device)
        t_start, t_end = self.grid[index], self.grid[index + 1]
        x_start = teacher.add_noise(x0, batch.randn(x0.shape, device), t_start)
        omega = cfg.w_min + (cfg.w_max - cfg.w_min) * batch.rand(n)
        student = self.roles["generator"]
        pred = teacher.consistency(student, x_start, t_start, cond)
        with torch.no_grad():
            # augmented PF-ODE step: eps_c + omega (eps_c - eps_u), i.e. CFG scale 1 + omega
            out = teacher.predict(teacher.denoiser, x_start, t_start, cond, 1.0 + omega.to(device))
            x_end = solver_step(teacher, out, x_start, t_start, t_end)
            target_net = self.target if self.target is not None else student
            target = teacher.consistency(target_net, x_end, t_end, cond)
            if self.edges:
                edge = self.grid[self.edges[k][index]]
                target = segment_target(teacher, target, x_end, t_end, x_start, t_start, edge)
        loss = consistency_loss(pred, target, cfg.loss, cfg.huber_c)
        return loss, {"consistency": loss.detach(), "omega": omega.mean()}

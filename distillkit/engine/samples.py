"""Sample grids from fixed prompts and seeds during training, and the mode-collapse guard.

Why: losses of distribution-matching recipes say little about image quality, and a collapsed
one-step generator (the same image for every seed, or flat colour) can keep a healthy-looking
loss. A grid every N steps shows it; the guard measures it: the diversity of the student's
samples divided by the teacher's on the same prompts and noise, computed once at the start.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from distillkit.data.sources import SMOKE_PROMPTS
from distillkit.engine.callbacks import Callback
from distillkit.images import save_grid
from distillkit.teachers.base import TeacherAdapter

if TYPE_CHECKING:
    from distillkit.config import LoggingConfig
    from distillkit.engine.loop import RunResult, Trainer

DIVERSITY_LOG = "samples/diversity.jsonl"
CHUNK = 4  # samples per generator call


def diversity_stats(images: torch.Tensor) -> dict[str, float]:
    """pairwise: RMS pixel distance between samples; detail: mean per-image pixel std."""
    x = images.detach().double().cpu().flatten(1)
    pairwise = (torch.pdist(x) / math.sqrt(x.shape[1])).mean().item() if len(x) > 1 else 0.0
    return {"pairwise": pairwise, "detail": x.std(dim=1).mean().item()}


def collapse_ratios(stats: dict[str, float], reference: dict[str, float]) -> dict[str, float]:
    """Student / teacher per statistic (nan where the teacher's is 0)."""
    return {k: stats[k] / reference[k] if reference[k] > 0 else math.nan for k in stats}


@contextlib.contextmanager
def eval_mode(*nets: nn.Module) -> Iterator[None]:
    """Dropout off for sampling, every module's own flag restored afterwards."""
    modules = [m for net in nets for m in net.modules()]
    flags = [m.training for m in modules]
    for m in modules:
        m.training = False
    try:
        yield
    finally:
        for m, flag in zip(modules, flags):
            m.training = flag


@torch.no_grad()
def teacher_samples(
    teacher: TeacherAdapter, noise: torch.Tensor, cond, steps: int, guidance: float | None
) -> torch.Tensor:
    """Deterministic DDIM-style sampling (predicted noise re-used), guided like the teacher."""
    timesteps = teacher.generator_timesteps(steps)
    x = noise
    for i in range(steps):
        t = timesteps[i].expand(len(x))
        out = teacher.predict(teacher.denoiser, x, t, cond, guidance)
        x0 = teacher.to_x0(out, x, t)
        if i == steps - 1:
            return x0
        eps = teacher.to_eps(out, x, t)
        x = teacher.add_noise(x0, eps, timesteps[i + 1].expand(len(x)))
    return x


class SampleCallback(Callback):
    """Grids under OUTPUT_DIR/samples/step-XXXXXX.png; `collapse/*` ratios in the metrics."""

    def __init__(self, cfg: LoggingConfig, teacher_guidance: float | None = None) -> None:
        self.cfg, self.guidance = cfg, teacher_guidance
        self.prompts = list(cfg.sample_prompts or SMOKE_PROMPTS)
        self.reference: dict[str, float] | None = None
        self.pending: dict[str, float] = {}
        self.last_step = -1
        self.warnings: list[str] = []
        self._tb = None
        self.use_wandb = False

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: Trainer) -> None:
        teacher, k = trainer.teacher, self.cfg.sample_per_prompt
        self.texts = [p for p in self.prompts for _ in range(k)]
        gen = torch.Generator().manual_seed(self.cfg.sample_seed)
        shape = (len(self.texts), *teacher.latent_shape())
        self.noise = torch.randn(shape, generator=gen).to(teacher.device)
        self.out_dir = Path(trainer.output_dir) / "samples"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        steps = self.cfg.collapse_teacher_steps
        with _quiet_rng(), trainer.accelerator.autocast():
            images = self._chunked(
                teacher,
                lambda noise, cond, i: teacher_samples(teacher, noise, cond, steps, self.guidance),
            )
        self.reference = diversity_stats(images)
        self._save(images, self.out_dir / "teacher.png")
        self.use_wandb = "wandb" in trainer.cfg.logging.backends
        if "tensorboard" in trainer.cfg.logging.backends:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(trainer.output_dir) / "tensorboard"))

    def on_log(self, trainer: Trainer, step: int, values: dict[str, float]) -> None:
        if self._due(trainer, step) and self.last_step != step:
            self.sample(trainer, step)
        values.update(self.pending)
        self.pending = {}

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        if self._due(trainer, step) and self.last_step != step:
            self.sample(trainer, step)  # its ratios join the next logged record

    def on_train_end(self, trainer: Trainer, result: RunResult) -> None:
        if self._tb is not None:
            self._tb.close()

    # ------------------------------------------------------------------ work
    def _due(self, trainer: Trainer, step: int) -> bool:
        return step % self.cfg.sample_every == 0 or step == trainer.cfg.train.max_steps

    def generate(self, trainer: Trainer) -> torch.Tensor:
        """The generator's samples for the fixed prompts and noise, as images in [-1, 1]."""
        return generator_images(trainer, self.texts, self.noise, self.cfg.sample_seed + 1)

    def _chunked(self, teacher: TeacherAdapter, sample) -> torch.Tensor:
        return chunked_images(teacher, self.texts, self.noise, sample)

    def sample(self, trainer: Trainer, step: int) -> dict[str, float]:
        self.last_step = step
        images = self.generate(trainer)
        path = self._save(images, self.out_dir / f"step-{step:06d}.png")
        assert self.reference is not None
        ratios = collapse_ratios(diversity_stats(images), self.reference)
        stats = {
            "collapse/diversity_ratio": ratios["pairwise"],
            "collapse/detail_ratio": ratios["detail"],
        }
        low = [k for k, v in stats.items() if v < self.cfg.collapse_threshold]
        record: dict[str, Any] = {"step": step, **stats, "grid": path.name}
        if low:
            text = (
                f"step {step}: possible mode collapse: "
                + ", ".join(f"{k}={stats[k]:.3g}" for k in low)
                + f" < {self.cfg.collapse_threshold} x the teacher's (see {path})"
            )
            record["warning"] = text
            self.warnings.append(text)
            print(f"warning: {text}", file=sys.stderr)
        with open(self.out_dir.parent / DIVERSITY_LOG, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        self.pending.update(stats)
        self._log_image(path, step)
        return stats

    def _save(self, images: torch.Tensor, path: Path) -> Path:
        k = self.cfg.sample_per_prompt
        return save_grid(images, path, rows=len(self.prompts), cols=k)

    def _log_image(self, path: Path, step: int) -> None:
        if self._tb is not None:
            import numpy as np
            from PIL import Image

            with Image.open(path) as im:
                self._tb.add_image(
                    "samples", np.asarray(im.convert("RGB")), step, dataformats="HWC"
                )
            self._tb.flush()
        if self.use_wandb:
            import wandb

            if wandb.run is not None:
                wandb.run.log({"samples": wandb.Image(str(path))}, step=step)


@torch.no_grad()
def chunked_images(teacher: TeacherAdapter, texts: list[str], noise: torch.Tensor, sample):
    """``sample(noise, cond, chunk)`` -> latents, CHUNK samples at a time (bounded memory at
    1024 px), decoded to images on the CPU."""
    out = []
    for i, start in enumerate(range(0, len(texts), CHUNK)):
        cond = teacher.encode(texts[start : start + CHUNK])
        latents = sample(noise[start : start + CHUNK], cond, i)
        out.append(teacher.decode_latents(latents).float().cpu())
    return torch.cat(out)


def generator_images(
    trainer: Trainer, texts: list[str], noise: torch.Tensor, seed: int
) -> torch.Tensor:
    """The current generator's samples at the export's step count for fixed prompts and noise,
    as images in [-1, 1]; the training RNG streams do not move (chunk i draws from seed + i)."""
    teacher, acc = trainer.teacher, trainer.accelerator
    net = acc.unwrap_model(trainer.recipe.generator_net())
    nets = [net, teacher.denoiser]  # a shared-base adapter runs the teacher's modules
    steps = trainer.recipe.export_steps

    def run(noise: torch.Tensor, cond, i: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed + i)
        return teacher.generate(net, noise, cond, steps=steps, generator=gen)

    with torch.no_grad(), _quiet_rng(), eval_mode(*nets), acc.autocast():
        return chunked_images(teacher, texts, noise, run)


@contextlib.contextmanager
def _quiet_rng() -> Iterator[None]:
    """Sampling must not move the training RNG streams (bit-exact resume)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield

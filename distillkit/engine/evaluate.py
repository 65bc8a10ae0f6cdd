"""Evaluation while training (``logging.eval_every``) and the checkpoint worth shipping.

Why: users of DMD2 and SiD pick checkpoints by eye from sample grids, and a distribution-matching
loss says little about quality. Every N steps this scores the generator the export would ship
(the EMA weights when ``train.ema.use_for_export``) on a small fixed prompt set with fixed noise:
the digits judges (accuracy and Fréchet distance under both) and/or the CLIP score. Scores go
to the metrics log as ``eval/<name>`` (the report plots them against steps and wall time), and
the best one by ``logging.eval_select_by`` is kept in OUTPUT_DIR/best/ for ``export.select:
best``. The best file survives resume, so a resumed run keeps ranking against it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from distillkit.config import EVAL_DIRECTIONS
from distillkit.engine.callbacks import Callback
from distillkit.engine.samples import generator_images

if TYPE_CHECKING:
    from distillkit.config import LoggingConfig
    from distillkit.engine.loop import Trainer

BEST_DIR = "best"
BEST_WEIGHTS = "generator.safetensors"
BEST_META = "best.json"
EVAL_LOG = "eval.jsonl"


def is_better(value: float, best: float | None, key: str) -> bool:
    """Lower FDs and higher accuracies / CLIP scores win; ties keep the earlier checkpoint."""
    if best is None:
        return True
    return value < best if EVAL_DIRECTIONS[key] == "min" else value > best


def trainable_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What training changed: the generator's trainable tensors by name (LoRA or full)."""
    return {
        name: p.detach().float().cpu().contiguous()
        for name, p in net.named_parameters()
        if p.requires_grad
    }


def load_best_into(net: torch.nn.Module, output_dir: Path) -> dict[str, Any]:
    """Copy OUTPUT_DIR/best/'s tensors into ``net``'s trainable parameters; returns best.json."""
    from distillkit.errors import ConfigError

    folder = Path(output_dir) / BEST_DIR
    if not (folder / BEST_META).is_file():
        raise ConfigError(
            f"export.select: best, but {folder / BEST_META} is missing: no evaluation ran "
            "(logging.eval_every larger than train.max_steps?)"
        )
    state = load_file(str(folder / BEST_WEIGHTS))
    params = dict(net.named_parameters())
    missing = sorted(set(state) - set(params))
    if missing:
        raise ConfigError(
            f"{folder / BEST_WEIGHTS} names tensors this generator lacks: {missing[:3]}"
        )
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].dtype))
    return json.loads((folder / BEST_META).read_text())


class EvalCallback(Callback):
    """``eval/*`` scores every ``logging.eval_every`` steps; the best generator in best/."""

    def __init__(self, cfg: LoggingConfig) -> None:
        self.cfg = cfg
        self.pending: dict[str, float] = {}
        self.best: float | None = None
        self.last_step = -1

    def on_train_start(self, trainer: Trainer) -> None:
        from distillkit.data.digits import eval_prompts
        from distillkit.data.sources import SMOKE_PROMPTS

        self.texts: list[str] = []
        self.labels: list[int] = []
        if "digits" in self.cfg.eval_metrics:
            from distillkit.evaluation.digits_eval import load_judge
            from distillkit.evaluation.pixel_judge import train_pixel_judge

            pairs = eval_prompts(self.cfg.eval_per_class)
            self.texts = [p for p, _ in pairs]
            self.labels = [label for _, label in pairs]
            self.judge, self.split = load_judge()
            self.pixel_judge = train_pixel_judge(self.split)
        self.clip_texts: list[str] = []
        if "clip" in self.cfg.eval_metrics:
            from distillkit.clip import load_clip

            prompts = self.cfg.eval_prompts or self.cfg.sample_prompts or list(SMOKE_PROMPTS)
            self.clip_texts = [p for p in prompts for _ in range(self.cfg.eval_per_prompt)]
            self.clip = load_clip(self.cfg.eval_clip_model, self.cfg.eval_clip_weights)
        teacher = trainer.teacher
        gen = torch.Generator().manual_seed(self.cfg.eval_seed)
        count = len(self.texts) + len(self.clip_texts)
        self.noise = torch.randn((count, *teacher.latent_shape()), generator=gen)
        self.noise = self.noise.to(teacher.device)
        self.out_dir = Path(trainer.output_dir)
        meta = self.out_dir / BEST_DIR / BEST_META
        if meta.is_file() and trainer.start_step > 0:  # resumed: rank against the best so far
            self.best = json.loads(meta.read_text())["score"]
        elif meta.is_file():  # an earlier attempt that never checkpointed: not this run's
            shutil.rmtree(self.out_dir / BEST_DIR)
            trainer.accelerator.print(f"removed {self.out_dir / BEST_DIR}: a fresh run's best")
        self.started = time.time()

    def on_log(self, trainer: Trainer, step: int, values: dict[str, float]) -> None:
        if self._due(trainer, step) and self.last_step != step:
            self.evaluate(trainer, step)
        values.update(self.pending)
        self.pending = {}

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        if self._due(trainer, step) and self.last_step != step:
            self.evaluate(trainer, step)

    def _due(self, trainer: Trainer, step: int) -> bool:
        return step % self.cfg.eval_every == 0 or step == trainer.cfg.train.max_steps

    def evaluate(self, trainer: Trainer, step: int) -> dict[str, float]:
        self.last_step = step
        began = time.perf_counter()
        with exported_weights(trainer) as net:
            texts = self.texts + self.clip_texts
            images = generator_images(trainer, texts, self.noise, self.cfg.eval_seed + 1)
            scores = self.score(images)
            key = self.cfg.eval_select_by
            record: dict[str, Any] = {"step": step, "time": round(time.time(), 3), **scores}
            record["sample_steps"] = trainer.recipe.export_steps  # the count the scores are at
            record["seconds"] = round(time.perf_counter() - began, 3)  # to take off wall times
            if is_better(scores[key], self.best, key):
                self.best = scores[key]
                self._save_best(net, step, key, scores)
                record["best"] = True
        with open(self.out_dir / EVAL_LOG, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        self.pending.update({f"eval/{k}": v for k, v in scores.items()})
        return scores

    def score(self, images: torch.Tensor) -> dict[str, float]:
        out: dict[str, float] = {}
        n = len(self.texts)
        if self.texts:
            from distillkit.evaluation.metrics import digits_scores
            from distillkit.evaluation.pixel_judge import pixel_scores

            labels = torch.tensor(self.labels)
            real = self.split.heldout_images
            cnn = digits_scores(images[:n], labels, self.judge, real)
            px = pixel_scores(images[:n], labels, self.pixel_judge, real)
            out.update(accuracy=cnn["accuracy"], fd=cnn["fd"], diversity=cnn["diversity"])
            out.update(px_accuracy=px["accuracy"], px_fd=px["fd"])
        if self.clip_texts:
            out["clip_score"] = float(self.clip.scores(images[n:], self.clip_texts).mean())
        return out

    def _save_best(self, net: torch.nn.Module, step: int, key: str, scores: dict) -> None:
        """Weights first, then best.json, each replaced whole: a crash leaves the old pair or
        new weights under the old meta (the next evaluation rewrites both)."""
        folder = self.out_dir / BEST_DIR
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{BEST_WEIGHTS}.tmp"
        save_file(trainable_state(net), str(tmp), metadata={"step": str(step)})
        tmp.replace(folder / BEST_WEIGHTS)
        meta = {"step": step, "select_by": key, "score": scores[key], "scores": scores}
        (folder / f"{BEST_META}.tmp").write_text(json.dumps(meta, indent=1))
        (folder / f"{BEST_META}.tmp").replace(folder / BEST_META)


@contextlib.contextmanager
def exported_weights(trainer: Trainer) -> Iterator[torch.nn.Module]:
    """The live generator holding the weights the export would ship: the EMA shadows swapped
    in (and the training weights put back after) when ``train.ema.use_for_export``."""
    net = trainer.accelerator.unwrap_model(trainer.recipe.generator_net())
    ema = trainer.ema if trainer.cfg.train.ema.use_for_export else None
    if ema is None:
        yield net
        return
    params = [p for p in net.parameters() if p.requires_grad]
    ema.store(params)
    ema.copy_to(params)
    try:
        yield net
    finally:
        ema.restore(params)

"""train.lr_scheduler: every role's rate is the configured curve of the LOOP step, also for a role
that updates only every k-th step (DMD2's generator) and through skipped updates."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _trainer(tmp_path, *overrides: str):
    from accelerate import Accelerator

    from distillkit.config import load_config
    from distillkit.engine.loop import Trainer

    cfg = load_config(
        REPO / "recipes" / "dmd2_sd15.yaml",
        [f"output_dir={tmp_path / 'run'}", "logging.progress_bar=false", *overrides],
    )
    (tmp_path / "run").mkdir()
    return Trainer(cfg, Accelerator(mixed_precision="no"), smoke=True, builtin_data=True)


def _expected(kind: str, step: int, warmup: int, total: int) -> float:
    """diffusers.optimization's curves, written out: linear warmup, then the decay."""
    if step < warmup:
        return step / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / (total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_every_role_follows_the_loop_step(tmp_path, kind):
    total, warmup, every = 8, 2, 3
    trainer = _trainer(
        tmp_path,
        f"train.lr_scheduler={kind}",
        f"train.lr_warmup_steps={warmup}",
        f"train.max_steps={total}",
        f"recipe.fake_updates_per_generator={every}",
    )
    base = {role: trainer.recipe.learning_rate(role) for role in trainer.schedulers}
    for step in range(5):
        trainer.train_step(step)
        for role, sched in trainer.schedulers.items():
            want = base[role] * _expected(kind, step + 1, warmup, total)
            assert sched.get_last_lr()[0] == pytest.approx(want, rel=1e-6), (role, step)
    # the generator updated twice (steps 0 and 3) yet is at the same point as the fake score
    assert inner_step_count(trainer, "generator") == 2
    assert inner_step_count(trainer, "fake_score") == 5


def inner_step_count(trainer, role: str) -> int:
    from distillkit.engine.optim import inner_optimizer

    opt = inner_optimizer(trainer.optimizers[role])
    steps = {int(s["step"]) for s in opt.state.values() if "step" in s}
    assert len(steps) == 1
    return steps.pop()

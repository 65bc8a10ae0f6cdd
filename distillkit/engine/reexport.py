"""`distillkit export RUN_DIR`: rebuild the run's networks, load a checkpoint, and export it
through the same ``export_run`` as the end of training (same files, card and metadata); a run
with ``export.select: best`` exports its best evaluated generator unless --checkpoint is given."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from distillkit.config import RunConfig
from distillkit.engine.nanguard import GuardedEMA
from distillkit.engine.state import CheckpointDir, load_trainable, verify
from distillkit.errors import ConfigError
from distillkit.export import ExportReport
from distillkit.export.run import export_run
from distillkit.registry import get_recipe
from distillkit.teachers.load import load_teacher

EMA_STATE = "custom_checkpoint_0.pkl"  # accelerate's file for the one registered object


def reexport(run_dir: Path, checkpoint: str | None = None) -> ExportReport:
    run_file = run_dir / "run.yaml"
    if not run_file.is_file():
        raise ConfigError(f"{run_dir} is not a distillkit run directory (no run.yaml)")
    saved = yaml.safe_load(run_file.read_text())
    cfg = RunConfig.model_validate(saved["config"])
    cfg.output_dir = str(run_dir)  # the directory it was found in, wherever it was trained
    smoke = bool(saved.get("smoke"))
    ckpts = CheckpointDir(run_dir / "checkpoints", cfg.train.checkpoints_keep)
    if checkpoint is None:
        found = ckpts.latest_good()
        if found is None:
            raise ConfigError(f"{run_dir}/checkpoints holds no complete checkpoint to export")
        path = found[0]
    else:
        path = ckpts.root / checkpoint
        verify(path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = load_teacher(cfg.teacher, device, smoke)
    teacher.use_start_timestep(cfg.student.start_timestep)
    recipe = get_recipe(cfg.recipe.name)(cfg, teacher)
    generator = recipe.generator_net()
    load_trainable(generator, path / f"{recipe.generator_role}.safetensors")
    ema_file = path / EMA_STATE
    if cfg.train.ema.decay > 0 and cfg.train.ema.use_for_export:
        if not ema_file.is_file():
            raise ConfigError(
                f"{path} is incomplete: no EMA state ({EMA_STATE}), and the run exports its EMA "
                "weights (train.ema.use_for_export). Export another checkpoint with --checkpoint"
            )
        params = [p for p in generator.parameters() if p.requires_grad]
        ema = GuardedEMA(params, decay=cfg.train.ema.decay)  # the class training checkpoints
        ema.load_state_dict(torch.load(ema_file, weights_only=True))
        ema.copy_to(params)
    if cfg.export.select == "best" and checkpoint is None:  # --checkpoint names one instead
        from distillkit.engine.evaluate import load_best_into

        best = load_best_into(generator, run_dir)
        print(f"exporting the best evaluated generator (step {best['step']}, {best['select_by']})")
    return export_run(cfg, teacher, generator, recipe.step_counts, smoke=smoke)

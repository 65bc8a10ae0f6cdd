"""`distillkit export RUN_DIR`: rebuild the run's networks, load a checkpoint, export again."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from distillkit.config import RunConfig
from distillkit.engine.cards import card_info
from distillkit.engine.state import CheckpointDir, load_trainable, verify
from distillkit.errors import ConfigError
from distillkit.export import ExportReport, export_student
from distillkit.hub import write_model_card
from distillkit.registry import get_recipe
from distillkit.teachers.load import load_teacher


def reexport(run_dir: Path, checkpoint: str | None = None) -> ExportReport:
    run_file = run_dir / "run.yaml"
    if not run_file.is_file():
        raise ConfigError(f"{run_dir} is not a distillkit run directory (no run.yaml)")
    saved = yaml.safe_load(run_file.read_text())
    cfg = RunConfig.model_validate(saved["config"])
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
    ema_file = path / "custom_checkpoint_0.pkl"
    if cfg.train.ema.decay > 0 and cfg.train.ema.use_for_export and ema_file.is_file():
        from diffusers.training_utils import EMAModel

        params = [p for p in generator.parameters() if p.requires_grad]
        ema = EMAModel(params, decay=cfg.train.ema.decay)
        ema.load_state_dict(torch.load(ema_file, weights_only=True))
        ema.copy_to(params)
    info = card_info(cfg, smoke)

    def write_card(pipeline_dir: Path, steps: int) -> None:
        info.num_inference_steps = steps
        write_model_card(pipeline_dir, info)

    return export_student(
        teacher,
        generator,
        run_dir,
        steps=recipe.export_steps,
        verify=cfg.export.verify,
        tolerance=cfg.export.tolerance,
        relative_tolerance=cfg.export.relative_tolerance,
        lora_file=cfg.export.lora_file,
        write_card=write_card,
    )

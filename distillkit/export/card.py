"""What the model card says about a run: built from its config, shared by run and re-export."""

from __future__ import annotations

from distillkit.config import RunConfig
from distillkit.hub import CardInfo
from distillkit.registry import get_family


def card_info(cfg: RunConfig, smoke: bool) -> CardInfo:
    teacher = cfg.teacher
    return CardInfo(
        teacher_id=("tiny random " + teacher.family) if smoke else str(teacher.model_id),
        teacher_revision=None if smoke else teacher.revision,
        family=teacher.family,
        pipeline_class=get_family(teacher.family).pipeline_class,
        recipe=cfg.recipe.name,
        student=cfg.student.type,
        num_inference_steps=1,
        guidance_scale=0.0,
        scheduler=get_family(teacher.family).export_scheduler_name,
        license=teacher.license,
        config_summary=flat_summary(cfg),
        has_lora=cfg.student.type == "lora" and cfg.export.lora_file,
    )


def flat_summary(cfg: RunConfig) -> dict:
    out = {}
    for section in ("recipe", "student", "train"):
        for key, value in getattr(cfg, section).model_dump(mode="json").items():
            if not isinstance(value, dict | list):
                out[f"{section}.{key}"] = value
    return out

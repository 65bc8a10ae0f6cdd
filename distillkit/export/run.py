"""One export of a trained generator, shared by the end of training and `distillkit export`:
the same card, the same metadata, the same ``export.json`` and the same warnings, whichever
path made it (the re-export used to drop the metadata and ``export.json``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from torch import nn

from distillkit.config import RunConfig
from distillkit.errors import WriteFailed
from distillkit.export.card import card_info, public_lora_name, write_model_card
from distillkit.export.pipeline import ExportReport, export_student
from distillkit.faults import fault_point
from distillkit.teachers.base import TeacherAdapter

EXPORT_SUMMARY = "export.json"


def _write_summary(path: Path, summary: dict) -> None:
    """export.json, replaced whole or not at all (the pipeline it describes is already in place;
    a full disk here leaves the previous summary, and says so)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(summary, indent=1))
        fault_point("export-summary", tmp)
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise WriteFailed(
            f"export: the pipeline is in place but {path} could not be written ({err.strerror})"
        ) from None


def export_run(
    cfg: RunConfig,
    teacher: TeacherAdapter,
    generator: nn.Module,
    steps: tuple[int, ...],
    *,
    smoke: bool,
    say: Callable[[str], None] = print,
) -> ExportReport:
    """Export ``generator`` into ``cfg.output_dir`` (pipeline/, lora/, export.json), verified as
    ``cfg.export`` says, with a model card for each shipped step count in ``steps``."""
    output_dir = Path(cfg.output_dir)
    info = card_info(cfg, smoke)

    def write_card(pipeline_dir: Path, shipped_steps: int) -> None:
        info.num_inference_steps = shipped_steps
        fault_point("export-card", pipeline_dir)
        write_model_card(pipeline_dir, info)

    try:
        report = export_student(
            teacher,
            generator,
            output_dir,
            steps=steps,
            verify=cfg.export.verify,
            tolerance=cfg.export.tolerance,
            relative_tolerance=cfg.export.relative_tolerance,
            lora_file=cfg.export.lora_file,
            write_card=write_card,
            metadata={
                "recipe": cfg.recipe.name,
                "family": cfg.teacher.family,
                "resolution": teacher.resolution,  # what evaluation samples at by default
                # public names only: the pipeline folder is what gets pushed
                "teacher_loras": [
                    {"lora": public_lora_name(spec.model_dump()), "scale": spec.scale}
                    for spec in cfg.teacher.loras
                ],
            },
        )
    except OSError as err:  # export_student has removed its temporary directories
        raise WriteFailed(
            f"export: cannot write {err.filename or output_dir} ({err.strerror}); the previous "
            f"export in {output_dir} (if any) is untouched and the temporary files are removed: "
            f"free space, then `distillkit export {output_dir}` (the checkpoints hold the run)"
        ) from None
    teacher_dtype = str(teacher.dtype).removeprefix("torch.")
    summary = {
        "pipeline": str(report.pipeline_dir),
        "lora": str(report.lora_dir) if report.lora_dir else None,
        "pipeline_max_abs_diff": report.pipeline_max_abs_diff,
        "pipeline_rel_rms": report.pipeline_rel_rms,
        "lora_max_abs_diff": report.lora_max_abs_diff,
        "lora_rel_rms": report.lora_rel_rms,
        "check": report.check,
        "rounding_rel_rms": report.rounding_rel_rms,
        "teacher_dtype": teacher_dtype,
        "shipped_steps": list(report.shipped_steps),
    }
    _write_summary(output_dir / EXPORT_SUMMARY, summary)
    if (report.rounding_rel_rms or 0) > cfg.export.relative_tolerance:
        say(
            f"warning: the export's {teacher_dtype} weights round away part of training "
            f"(relative RMS {report.rounding_rel_rms:.3g} of the denoiser output): weight "
            "updates below half-precision resolution do not survive the cast"
            + (" (lora/ on the teacher keeps them, unfused)" if report.lora_dir else "")
            + "; expected after a few steps, a sign of too little training after many"
        )
    return report

"""Export: the verified diffusers pipeline and LoRA file (pipeline.py), what the model card says
about a run (card.py), and the one export of a trained run (run.py) that the end of training and
`distillkit export` share."""

from distillkit.export.pipeline import (
    EXPORT_META,
    LORA_FILE,
    VERIFY_PROMPT,
    ExportReport,
    OutputCheck,
    call_arguments,
    export_student,
    lora_state,
    pipeline_one_step,
)

__all__ = [
    "EXPORT_META",
    "LORA_FILE",
    "VERIFY_PROMPT",
    "ExportReport",
    "OutputCheck",
    "call_arguments",
    "export_student",
    "lora_state",
    "pipeline_one_step",
]

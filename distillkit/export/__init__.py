"""Export: the verified diffusers pipeline and LoRA file (pipeline.py), the model card and what
distillkit.json says about a run (card.py), the one export of a trained run that the end of
training and `distillkit export` share (run.py), and the Hub push (push.py)."""

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

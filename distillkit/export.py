"""Export the student as a plain diffusers pipeline (and a LoRA file), verified before it lands.

Both artefacts are written to temporary directories, reloaded with plain diffusers and compared
with the training-time one-step output; only then do they replace ``pipeline/`` and ``lora/``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from peft.utils import get_peft_model_state_dict
from torch import nn

from distillkit.errors import ExportError
from distillkit.students import is_lora, lora_owner, merged_copy, plain_copy
from distillkit.teachers.base import TeacherAdapter

VERIFY_PROMPT = "a handwritten digit seven"
LORA_FILE = "pytorch_lora_weights.safetensors"
EXPORT_META = "distillkit.json"  # machine-readable call settings next to the model card


@dataclass
class ExportReport:
    pipeline_dir: Path
    lora_dir: Path | None
    pipeline_max_abs_diff: float | None
    lora_max_abs_diff: float | None


def _replace_dir(tmp: Path, final: Path) -> None:
    """Swap a verified ``tmp`` into ``final``; the old copy is removed only after the swap."""
    old = final.with_name(final.name + f".old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _fixed_noise(teacher: TeacherAdapter, seed: int = 1234) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((1, *teacher.latent_shape()), generator=gen).to(teacher.device)


def pipeline_one_step(
    pipe: DiffusionPipeline, teacher: TeacherAdapter, noise: torch.Tensor
) -> torch.Tensor:
    """What a user's ``pipe(prompt, num_inference_steps=1, guidance_scale=0)`` computes."""
    out = pipe(
        prompt=[VERIFY_PROMPT],
        num_inference_steps=1,
        guidance_scale=0.0,
        latents=noise.to(pipe.dtype),
        height=teacher.resolution,
        width=teacher.resolution,
        output_type="latent",
        **teacher.pipeline_call_kwargs(),
    )
    return out.images.float()


def lora_state(net: nn.Module) -> tuple[dict, dict]:
    """diffusers-format LoRA tensors and the adapter metadata that keeps alpha/rank on reload."""
    # peft's own key format (lora_A / lora_B): load_lora_weights reads it for every target
    # module, while the legacy diffusers conversion only renames attention projections.
    owner, name = lora_owner(net)
    layers = get_peft_model_state_dict(owner, adapter_name=name)
    return layers, owner.peft_config[name].to_dict()


@torch.no_grad()
def export_student(
    teacher: TeacherAdapter,
    generator: nn.Module,
    output_dir: Path,
    *,
    steps: int,
    verify: bool = True,
    tolerance: float = 1e-4,
    lora_file: bool = True,
    write_card=None,
    metadata: dict | None = None,
) -> ExportReport:
    """Write ``output_dir/pipeline`` (+ ``output_dir/lora``) after checking them on reload."""
    generator = getattr(generator, "module", generator)
    merged = merged_copy(generator).to(teacher.device, teacher.dtype)
    noise = _fixed_noise(teacher)
    expected = teacher.generate(merged, noise, teacher.encode([VERIFY_PROMPT]), steps=1)

    tmp = output_dir / f".pipeline.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    lora_tmp = None
    try:
        pipe = teacher.pipeline_for_export(merged)
        pipe.save_pretrained(tmp, safe_serialization=True)
        call = {"num_inference_steps": steps, "guidance_scale": 0.0, **(metadata or {})}
        (tmp / EXPORT_META).write_text(json.dumps(call, indent=1))
        pipe_diff = lora_diff = None
        if verify:
            reloaded = DiffusionPipeline.from_pretrained(tmp, torch_dtype=teacher.dtype)
            reloaded.to(teacher.device)
            reloaded.set_progress_bar_config(disable=True)
            got = pipeline_one_step(reloaded, teacher, noise)
            pipe_diff = float((got - expected).abs().max())
            if not pipe_diff <= tolerance:
                raise ExportError(
                    f"export check failed: the reloaded pipeline's one-step output differs from "
                    f"training by {pipe_diff:.3g} (> export.tolerance={tolerance}); "
                    f"the previous export in {output_dir} was left untouched"
                )
        if lora_file and is_lora(generator):
            lora_tmp = output_dir / f".lora.tmp-{os.getpid()}"
            shutil.rmtree(lora_tmp, ignore_errors=True)
            layers, metadata = lora_state(generator)
            prefix = teacher.denoiser_attr
            type(teacher.pipe).save_lora_weights(
                lora_tmp,
                **{f"{prefix}_lora_layers": layers, f"{prefix}_lora_adapter_metadata": metadata},
                safe_serialization=True,
            )
            if verify:
                lora_diff = _verify_lora(teacher, lora_tmp, noise, expected, tolerance)
        if write_card is not None:
            write_card(tmp, steps)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if lora_tmp is not None:
            shutil.rmtree(lora_tmp, ignore_errors=True)
        raise
    pipeline_dir, lora_dir = output_dir / "pipeline", None
    _replace_dir(tmp, pipeline_dir)
    if lora_tmp is not None:
        lora_dir = output_dir / "lora"
        _replace_dir(lora_tmp, lora_dir)
    return ExportReport(pipeline_dir, lora_dir, pipe_diff, lora_diff)


def _verify_lora(
    teacher: TeacherAdapter, lora_dir: Path, noise, expected, tolerance: float
) -> float:
    """Load the file into a fresh teacher pipeline the way a user would: load_lora_weights."""
    components = dict(teacher.pipe.components)
    components[teacher.denoiser_attr] = plain_copy(teacher.denoiser)
    pipe = type(teacher.pipe)(**components)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = teacher.export_scheduler()
    pipe.load_lora_weights(lora_dir, weight_name=LORA_FILE)
    got = pipeline_one_step(pipe, teacher, noise)
    diff = float((got - expected).abs().max())
    if not diff <= tolerance:
        raise ExportError(
            f"export check failed: the LoRA file loaded with load_lora_weights differs from the "
            f"merged student by {diff:.3g} (> export.tolerance={tolerance})"
        )
    return diff

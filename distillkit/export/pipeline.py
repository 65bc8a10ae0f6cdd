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
from distillkit.faults import fault_point
from distillkit.students import is_lora, lora_owner, merged_copy, plain_copy
from distillkit.teachers.base import TeacherAdapter
from distillkit.teachers.loras import TeacherLoras, layer_factors, lora_file_state, stack

VERIFY_PROMPT = "a handwritten digit seven"
LORA_FILE = "pytorch_lora_weights.safetensors"
EXPORT_META = "distillkit.json"  # machine-readable call settings next to the model card
# its entry for the arguments every call repeats, at any step count (max_sequence_length); a
# digits teacher's folder has a distillkit.json with its resolution and this entry
PROMPT_CALL_KWARGS = "prompt_call_kwargs"


@dataclass
class ExportReport:
    pipeline_dir: Path
    lora_dir: Path | None
    pipeline_max_abs_diff: float | None
    lora_max_abs_diff: float | None
    pipeline_rel_rms: float | None = None
    lora_rel_rms: float | None = None
    check: str = ""  # the bound the outputs were held to
    shipped_steps: tuple[int, ...] = (1,)
    # relative RMS between the trained weights' denoiser output (fp32 masters, unfused LoRA)
    # and the exported weights' (merged, in the teacher's dtype): what the export's own rounding
    # costs; large when training moved weights by less than half-precision resolution
    rounding_rel_rms: float | None = None


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
    """What a user's ``pipe(prompt, num_inference_steps=1, guidance_scale=0)`` computes (FLUX.1-dev:
    the guidance input the student was trained with instead of 0)."""
    out = pipe(
        prompt=[VERIFY_PROMPT],
        guidance_scale=teacher.student_guidance_scale(),
        latents=teacher.pipeline_latents(noise).to(pipe.dtype),
        height=teacher.resolution,
        width=teacher.resolution,
        output_type="latent",
        **call_arguments(teacher, 1),
        **teacher.pipeline_call_kwargs(),
    )
    return teacher.latents_from_pipeline(out.images).float()


def call_arguments(teacher: TeacherAdapter, steps: int) -> dict:
    """The sampling arguments of a ``steps``-step call: what distillkit.json and the model card
    give users, and what makes plain diffusers sample the grid the student was trained on."""
    return {
        "num_inference_steps": steps,
        **teacher.sampling_call_kwargs(steps),
        **teacher.prompt_call_kwargs(),
    }


class OutputCheck:
    """How close the reloaded export must come to the training-time output. fp32: max abs
    difference <= ``tolerance``. bf16/fp16: the pipeline's own rounding dominates (its scheduler
    step divides by alpha_T ~ 0.07 in the network's dtype; ~0.3 % relative RMS measured on the
    tiny teachers), so the relative RMS difference must stay under ``relative_tolerance``; wrong
    weights or wiring differ by far more, and the weights are compared bit for bit besides."""

    def __init__(self, dtype: torch.dtype, tolerance: float, relative_tolerance: float) -> None:
        self.half = dtype in (torch.bfloat16, torch.float16)
        self.tolerance, self.relative = tolerance, relative_tolerance

    def describe(self) -> str:
        if self.half:
            return f"relative RMS <= export.relative_tolerance={self.relative}"
        return f"max abs <= export.tolerance={self.tolerance}"

    def measure(self, got: torch.Tensor, expected: torch.Tensor) -> tuple[float, float, bool]:
        diff = (got.float() - expected.float()).flatten()
        max_abs = float(diff.abs().max())
        rel_rms = float(diff.norm() / expected.float().flatten().norm().clamp_min(1e-12))
        ok = rel_rms <= self.relative if self.half else max_abs <= self.tolerance
        return max_abs, rel_rms, ok


def _default_to_fp32(pipeline_dir: Path) -> None:
    """transformers 5 loads a text encoder in the dtype its config names, diffusers its own
    models in fp32 unless told: a bf16 export opened with a plain ``from_pretrained(dir)`` got a
    bf16 CLIP feeding an fp32 UNet, and the SD pipelines (which do not cast the embeddings)
    failed with "mat1 and mat2 must have the same dtype". Naming float32 as the text encoders'
    default load dtype makes a plain load fp32 throughout, as the Hub's fp32 checkpoints load;
    the weights stay in the teacher's dtype on disk, and ``torch_dtype=`` still decides."""
    for config_file in pipeline_dir.glob("*/config.json"):
        config = json.loads(config_file.read_text())
        keys = [k for k in ("dtype", "torch_dtype") if k in config]
        if "architectures" in config and keys:  # a transformers model
            config.update(dict.fromkeys(keys, "float32"))
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _check_weights(reloaded: nn.Module, merged: nn.Module) -> None:
    """The saved denoiser is the merged student, bit for bit (a lost LoRA scale, a dtype slip
    or a dropped key shows here even where half-precision rounding hides it in the outputs)."""
    ours, theirs = merged.state_dict(), reloaded.state_dict()
    if ours.keys() != theirs.keys():
        missing = sorted(ours.keys() ^ theirs.keys())[:3]
        raise ExportError(f"export check failed: the reloaded denoiser's keys differ ({missing})")
    bad = [k for k in ours if not torch.equal(ours[k].to(theirs[k].device), theirs[k])]
    if bad:
        raise ExportError(
            f"export check failed: {len(bad)} reloaded denoiser tensors differ from the merged "
            f"student (e.g. {bad[0]})"
        )


def _check_grids(scheduler, teacher: TeacherAdapter, steps: tuple[int, ...]) -> None:
    """At every step count the export ships, the reloaded scheduler, set up from the call
    arguments it is shipped with (as the pipeline's ``retrieve_timesteps`` does), samples
    exactly the training-time grid."""
    for k in steps:
        got = teacher.set_grid(scheduler, k).to(teacher.device)
        want = teacher.generator_timesteps(k)
        if got.shape != want.shape or not torch.equal(got, want):
            raise ExportError(
                f"export check failed: at {k} steps the exported scheduler samples "
                f"{got.tolist()}, training used {want.tolist()}"
            )


def lora_state(net: nn.Module, teacher_loras: TeacherLoras | None = None) -> tuple[dict, dict]:
    """diffusers-format LoRA tensors and the adapter metadata that keeps alpha/rank on reload.

    With ``teacher.loras`` the student learnt on base + style, so the file stacks the style's
    factors and the student's per layer: one LoRA that gives base + style + speed on the plain
    base pipeline."""
    # peft's own key format (lora_A / lora_B): load_lora_weights reads it for every target
    # module, while the legacy diffusers conversion only renames attention projections.
    owner, name = lora_owner(net)
    if teacher_loras is not None:
        return lora_file_state(stack(teacher_loras.factors, layer_factors(owner, [name])))
    layers = get_peft_model_state_dict(owner, adapter_name=name)
    # peft keeps target_modules as a set, whose order follows each process's string hashing:
    # sorted, the same adapter gives the same file bytes in every process (export = re-export)
    metadata = {
        key: sorted(value) if isinstance(value, set) else value
        for key, value in owner.peft_config[name].to_dict().items()
    }
    return layers, metadata


@torch.no_grad()
def export_student(
    teacher: TeacherAdapter,
    generator: nn.Module,
    output_dir: Path,
    *,
    steps: int | tuple[int, ...],
    verify: bool = True,
    tolerance: float = 1e-4,
    relative_tolerance: float = 0.02,
    lora_file: bool = True,
    write_card=None,
    metadata: dict | None = None,
) -> ExportReport:
    """Write ``output_dir/pipeline`` (+ ``output_dir/lora``) after checking them on reload.

    ``steps``: the step count(s) the generator was trained for; the export ships those and 1,
    and its card and distillkit.json lead with the largest."""
    counts = (steps,) if isinstance(steps, int) else tuple(steps)
    steps = max(counts)
    generator = getattr(generator, "module", generator)
    merged = merged_copy(generator).to(teacher.device, teacher.dtype)
    noise = _fixed_noise(teacher)
    expected = teacher.generate(merged, noise, teacher.encode([VERIFY_PROMPT]), steps=1)
    check = OutputCheck(teacher.dtype, tolerance, relative_tolerance)
    shipped = tuple(sorted({1, *counts}))
    trained = _denoiser_output(teacher, generator, noise)
    rounding = check.measure(_denoiser_output(teacher, merged, noise), trained)[1]

    tmp = output_dir / f".pipeline.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    lora_tmp = None
    report = ExportReport(tmp, None, None, None, check=check.describe(), shipped_steps=shipped)
    report.rounding_rel_rms = rounding
    try:
        pipe = teacher.pipeline_for_export(merged)
        pipe.save_pretrained(tmp, safe_serialization=True)
        fault_point("export-save", tmp)
        _default_to_fp32(tmp)
        guidance = teacher.student_guidance_scale()
        calls = {
            str(k): {**call_arguments(teacher, k), "guidance_scale": guidance} for k in shipped
        }
        meta = {
            **calls[str(steps)],
            "calls": calls,
            PROMPT_CALL_KWARGS: teacher.prompt_call_kwargs(),
            **(metadata or {}),
        }
        (tmp / EXPORT_META).write_text(json.dumps(meta, indent=1))
        if verify:
            reloaded = DiffusionPipeline.from_pretrained(tmp, torch_dtype=teacher.dtype)
            reloaded.to(teacher.device)
            reloaded.set_progress_bar_config(disable=True)
            _check_weights(getattr(reloaded, teacher.denoiser_attr), merged)
            _check_grids(reloaded.scheduler, teacher, shipped)
            got = pipeline_one_step(reloaded, teacher, noise)
            report.pipeline_max_abs_diff, report.pipeline_rel_rms, ok = check.measure(got, expected)
            if not ok:
                raise ExportError(
                    f"export check failed: the reloaded pipeline's one-step output differs from "
                    f"training (max abs {report.pipeline_max_abs_diff:.3g}, relative RMS "
                    f"{report.pipeline_rel_rms:.3g}; needed {check.describe()}); "
                    f"the previous export in {output_dir} was left untouched"
                )
            del reloaded
        if lora_file and is_lora(generator):
            lora_tmp = output_dir / f".lora.tmp-{os.getpid()}"
            shutil.rmtree(lora_tmp, ignore_errors=True)
            layers, adapter_metadata = lora_state(generator, teacher.loras)
            fault_point("export-lora", lora_tmp)
            prefix = teacher.denoiser_attr
            type(teacher.pipe).save_lora_weights(
                lora_tmp,
                **{
                    f"{prefix}_lora_layers": layers,
                    f"{prefix}_lora_adapter_metadata": adapter_metadata,
                },
                safe_serialization=True,
            )
            if verify:
                report.lora_max_abs_diff, report.lora_rel_rms = _verify_lora(
                    teacher, lora_tmp, trained, noise, check
                )
        if write_card is not None:
            write_card(tmp, steps)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if lora_tmp is not None:
            shutil.rmtree(lora_tmp, ignore_errors=True)
        raise
    report.pipeline_dir = output_dir / "pipeline"
    _replace_dir(tmp, report.pipeline_dir)
    if lora_tmp is not None:
        report.lora_dir = output_dir / "lora"
        _replace_dir(lora_tmp, report.lora_dir)
    return report


def _denoiser_output(teacher: TeacherAdapter, net: nn.Module, noise: torch.Tensor) -> torch.Tensor:
    """``net``'s raw output on the one-step input (the check prompt at the first timestep)."""
    cond = teacher.encode([VERIFY_PROMPT]).cond
    return teacher.forward(net, noise, teacher.generator_timesteps(1)[:1], cond)


def _verify_lora(
    teacher: TeacherAdapter, lora_dir: Path, trained: torch.Tensor, noise, check: OutputCheck
) -> tuple[float, float]:
    """Load the file into a fresh teacher pipeline the way a user would (load_lora_weights;
    with ``teacher.loras``, onto the base denoiser reloaded as published) and compare its
    denoiser with the trained student's on the one-step input. Both run the LoRA unfused, so
    only the file (tensors, alpha/rank metadata, key names) can differ: a lost scale moves the
    output by far more than rounding. Not the merged export's output: in half precision the
    merge rounds away updates smaller than the weights' resolution (reported as
    ``rounding_rel_rms``), and the network outputs, not the samples: the sample at t = T
    divides the noise prediction's rounding by alpha_T (~0.07). The scheduler and the pipeline
    around the denoiser are the merged export's, checked already."""
    components = dict(teacher.pipe.components)
    if teacher.loras is not None:  # the run's denoiser has them fused: the published one
        base = teacher.loras.reload_base().to(teacher.device)
    else:
        base = plain_copy(teacher.denoiser)
    components[teacher.denoiser_attr] = base
    pipe = type(teacher.pipe)(**components)
    pipe.load_lora_weights(lora_dir, weight_name=LORA_FILE)
    got = _denoiser_output(teacher, getattr(pipe, teacher.denoiser_attr), noise)
    max_abs, rel_rms, ok = check.measure(got, trained)
    if not ok:
        raise ExportError(
            f"export check failed: the LoRA file loaded with load_lora_weights differs from the "
            f"trained student (max abs {max_abs:.3g}, relative RMS {rel_rms:.3g} in the denoiser "
            f"output; needed {check.describe()})"
        )
    return max_abs, rel_rms

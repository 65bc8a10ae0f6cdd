"""The export's reload checks catch what half-precision rounding could hide: a denoiser tensor that
is not the merged student's, a scheduler whose few-step grid left the training grid, and a LoRA
file whose alpha/rank scale got lost; while a correct bf16 export passes."""

from __future__ import annotations

import pytest
import torch
from diffusers import LCMScheduler

import distillkit.export.pipeline as export_module
from distillkit.config import LoraConfigSection
from distillkit.errors import ExportError
from distillkit.export import export_student
from distillkit.students import trainable_copy


def _lora_student(teacher):
    student = trainable_copy(teacher.denoiser, "lora", LoraConfigSection(rank=4, alpha=1.0))
    with torch.no_grad():  # a trained-looking adapter: lora_B away from its zero init
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    return student


def test_a_correct_bf16_export_passes_by_relative_rms(tiny_adapter, tmp_path):
    teacher = tiny_adapter("sd15", dtype="bf16")
    report = export_student(teacher, _lora_student(teacher), tmp_path, steps=4)
    assert "relative RMS" in report.check and report.shipped_steps == (1, 4)
    assert report.pipeline_rel_rms <= 0.02 and report.lora_rel_rms <= 0.02
    assert report.pipeline_max_abs_diff > 1e-4  # bf16 rounding: the fp32 bound would fail it


def test_a_lost_lora_scale_fails_in_bf16(tiny_adapter, tmp_path, monkeypatch):
    """Without its adapter metadata the file reloads at alpha = r (scale 1, not 1/4)."""
    teacher = tiny_adapter("sd15", dtype="bf16")
    real = export_module.lora_state
    monkeypatch.setattr(export_module, "lora_state", lambda net, loras: (real(net, loras)[0], None))
    with pytest.raises(ExportError, match="load_lora_weights differs"):
        export_student(teacher, _lora_student(teacher), tmp_path, steps=1)
    assert not (tmp_path / "pipeline").exists() and not (tmp_path / "lora").exists()


def test_a_denoiser_tensor_off_the_student_fails(tiny_adapter, tmp_path, monkeypatch):
    teacher = tiny_adapter("sd15", dtype="bf16")
    real = teacher.pipeline_for_export

    def nudged(denoiser):
        pipe = real(denoiser)
        pipe.unet = type(denoiser).from_config(denoiser.config).to(denoiser.dtype)  # re-init
        return pipe

    monkeypatch.setattr(teacher, "pipeline_for_export", nudged)
    with pytest.raises(ExportError, match="denoiser tensors differ"):
        export_student(teacher, trainable_copy(teacher.denoiser, "full"), tmp_path, steps=1)


def test_a_scheduler_off_the_training_grid_fails(tiny_adapter, tmp_path, monkeypatch):
    """LCM's 10-point grid (skipping step 100) trained, the default 50-point grid saved."""
    teacher = tiny_adapter("sd15")
    monkeypatch.setattr(teacher, "grid_steps", 10)
    real = teacher.pipeline_for_export

    def default_grid(denoiser):
        pipe = real(denoiser)
        config = {**pipe.scheduler.config, "original_inference_steps": 50}
        pipe.scheduler = LCMScheduler.from_config(config)
        return pipe

    monkeypatch.setattr(teacher, "pipeline_for_export", default_grid)
    with pytest.raises(ExportError, match="at 4 steps the exported scheduler samples"):
        export_student(teacher, trainable_copy(teacher.denoiser, "full"), tmp_path, steps=4)


def test_a_few_step_sana_export_samples_its_grid_in_evaluation(tiny_adapter, tmp_path):
    """SANA exports store the 4-step call's sigmas; evaluation (generate_images) passes them, so
    the scheduler samples the trailing grid, not its own degenerate one ([1, .858, .602, .009])."""
    from diffusers import DiffusionPipeline

    from distillkit.evaluation.generate import generate_images
    from distillkit.export.card import export_sampling_kwargs

    teacher = tiny_adapter("sana")
    export_student(teacher, trainable_copy(teacher.denoiser, "full"), tmp_path, steps=4)
    assert export_sampling_kwargs(tmp_path / "pipeline", 4) == {"sigmas": [1.0, 0.75, 0.5, 0.25]}
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    seen = []
    real = pipe.scheduler.set_timesteps

    def spy(num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        seen.append(sigmas)  # retrieve_timesteps reads this signature for its `sigmas`
        real(num_inference_steps, device, sigmas=sigmas, mu=mu, timesteps=timesteps)

    pipe.scheduler.set_timesteps = spy
    generate_images(pipe, ["a handwritten digit one"], steps=4, guidance=0.0, seed=0)
    assert seen == [[1.0, 0.75, 0.5, 0.25]]
    assert pipe.scheduler.sigmas[:4].tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5])

"""Safe loading and export: safetensors by default, no remote code, verified exports only."""

from __future__ import annotations

import hashlib

import pytest
import torch
from diffusers import DiffusionPipeline

import distillkit.export.pipeline as export_module
from distillkit.config import TeacherConfig
from distillkit.errors import ConfigError, ExportError
from distillkit.export import export_student
from distillkit.students import trainable_copy
from distillkit.teachers.load import SMOKE_RESOLUTION, load_teacher, tiny_teacher_dir


def test_pickle_only_teacher_is_refused_by_default(tmp_path):
    pipe = DiffusionPipeline.from_pretrained(tiny_teacher_dir("sd15", SMOKE_RESOLUTION))
    pipe.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    cfg = TeacherConfig(model_id=str(tmp_path / "pickled"), family="sd15", resolution=32)
    with pytest.raises(ConfigError, match="teacher.use_safetensors=false"):
        load_teacher(cfg, torch.device("cpu"))
    # the explicit opt-in loads it
    opted = cfg.model_copy(update={"use_safetensors": False})
    assert load_teacher(opted, torch.device("cpu")).family == "sd15"


def test_remote_code_only_when_configured(monkeypatch):
    seen = []
    real = DiffusionPipeline.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", spy)
    local = str(tiny_teacher_dir("sd15", SMOKE_RESOLUTION))
    load_teacher(TeacherConfig(model_id=local, family="sd15", resolution=32), torch.device("cpu"))
    assert "trust_remote_code" not in seen[-1] and seen[-1]["use_safetensors"] is True
    cfg = TeacherConfig(model_id=local, family="sd15", resolution=32, trust_remote_code=True)
    load_teacher(cfg, torch.device("cpu"))
    assert seen[-1]["trust_remote_code"] is True


def _digest(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_failed_verification_keeps_the_previous_export(tmp_path, tiny_adapter, monkeypatch):
    teacher = tiny_adapter("sd15")
    student = trainable_copy(teacher.denoiser, "full")
    report = export_student(teacher, student, tmp_path, steps=1)
    assert report.pipeline_max_abs_diff <= 1e-4
    before = _digest(tmp_path / "pipeline")

    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01)
    real = export_module.pipeline_one_step
    monkeypatch.setattr(export_module, "pipeline_one_step", lambda *a, **k: real(*a, **k) + 1e-2)
    with pytest.raises(ExportError, match="export.tolerance"):
        export_student(teacher, student, tmp_path, steps=1)
    assert _digest(tmp_path / "pipeline") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]

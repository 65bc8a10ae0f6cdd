"""Every shipped SiD and SwiftBrush recipe through the real CLI on its tiny same-family teacher:
train both roles, export, reload with plain diffusers and sample in one step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from distillkit.teachers.load import SMOKE_RESOLUTION, tiny_teacher_dir

REPO = Path(__file__).resolve().parents[2]
CONFIGS = [
    (recipe, family) for recipe in ("sid", "swiftbrush") for family in ("sd15", "sdxl", "sana")
]
LOSS_KEY = {"sid": "generator/sid", "swiftbrush": "generator/vsd"}


def _sample(pipe: DiffusionPipeline) -> np.ndarray:
    kwargs = {"use_resolution_binning": False} if "Sana" in type(pipe).__name__ else {}
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        "a handwritten digit three",
        num_inference_steps=1,
        guidance_scale=0.0,
        height=SMOKE_RESOLUTION,
        width=SMOKE_RESOLUTION,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images


@pytest.mark.parametrize(("recipe", "family"), CONFIGS, ids=[f"{r}_{f}" for r, f in CONFIGS])
def test_smoke_run_exports_a_one_step_pipeline(tmp_path, recipe, family):
    out = tmp_path / "run"
    config = REPO / "recipes" / f"{recipe}_{family}.yaml"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "distillkit.cli",
            "run",
            str(config),
            "--smoke",
            f"output_dir={out}",
            "logging.sample_every=0",  # sample grids and reports are tested elsewhere
            "logging.report=false",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and "fake_score/loss" in last and LOSS_KEY[recipe] in last
    report = json.loads((out / "export.json").read_text())
    assert report["pipeline_max_abs_diff"] <= 1e-4

    pipe = DiffusionPipeline.from_pretrained(out / "pipeline")
    images = _sample(pipe)
    assert images.shape == (1, SMOKE_RESOLUTION, SMOKE_RESOLUTION, 3) and np.isfinite(images).all()
    call = json.loads((out / "pipeline" / "distillkit.json").read_text())
    few_step = (recipe, family) in {("sid", "sdxl"), ("sid", "sana")}  # 4-step uniform mixture
    assert call["num_inference_steps"] == (4 if few_step else 1)

    lora = out / "lora" / "pytorch_lora_weights.safetensors"
    student_is_lora = "type: lora" in config.read_text()
    assert lora.is_file() == student_is_lora
    if student_is_lora:  # the LoRA file on the teacher reproduces the merged export
        teacher = DiffusionPipeline.from_pretrained(tiny_teacher_dir(family, SMOKE_RESOLUTION))
        teacher.scheduler = pipe.scheduler
        teacher.load_lora_weights(out / "lora")
        np.testing.assert_allclose(_sample(teacher), images, atol=1e-3)

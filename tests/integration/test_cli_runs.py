"""The real CLI on tiny same-family teachers: train, checkpoint, export, reload, resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from distillkit.teachers.load import SMOKE_RESOLUTION, tiny_teacher_dir

REPO = Path(__file__).resolve().parents[2]


def distillkit(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "distillkit.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"distillkit {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc


def _teacher_weights(family: str) -> dict[str, torch.Tensor]:
    sub = "transformer" if family == "sana" else "unet"
    return load_file(
        str(
            tiny_teacher_dir(family, SMOKE_RESOLUTION) / sub / "diffusion_pytorch_model.safetensors"
        )
    )


def _sample_one_step(pipe: DiffusionPipeline, seed: int = 0) -> np.ndarray:
    kwargs = {"use_resolution_binning": False} if "Sana" in type(pipe).__name__ else {}
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a handwritten digit three",
        num_inference_steps=1,
        guidance_scale=0.0,
        height=SMOKE_RESOLUTION,
        width=SMOKE_RESOLUTION,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )
    return out.images


@pytest.mark.parametrize(
    ("config", "family"),
    [("dmd2_sd15", "sd15"), ("dmd2_sdxl", "sdxl"), ("dmd2_sana", "sana")],
)
def test_smoke_run_trains_exports_and_reloads(tmp_path, config, family):
    out = tmp_path / "run"
    distillkit("run", f"recipes/{config}.yaml", "--smoke", f"output_dir={out}")

    # trained parameters changed
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    trained = load_file(str(ckpt / "generator.safetensors"))
    teacher = _teacher_weights(family)
    changed = [k for k, v in trained.items() if not torch.equal(v, teacher[k])]
    assert changed, "no generator weight moved"

    # the export reloads with plain diffusers and samples in one step
    pipe = DiffusionPipeline.from_pretrained(out / "pipeline")
    assert (
        type(pipe).__name__
        == {
            "sd15": "StableDiffusionPipeline",
            "sdxl": "StableDiffusionXLPipeline",
            "sana": "SanaPipeline",
        }[family]
    )
    images = _sample_one_step(pipe)
    assert images.shape == (1, SMOKE_RESOLUTION, SMOKE_RESOLUTION, 3) and np.isfinite(images).all()
    report = json.loads((out / "export.json").read_text())
    assert report["pipeline_max_abs_diff"] <= 1e-4
    card = (out / "pipeline" / "README.md").read_text()
    assert "num_inference_steps" in card and "dmd2" in card
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 2 and "fake_score/loss" in metrics[-1]


def test_lora_student_exports_a_loadable_lora_file(tmp_path):
    out = tmp_path / "run"
    distillkit("run", "recipes/dmd2_sdxl_lora.yaml", "--smoke", f"output_dir={out}")
    lora = out / "lora" / "pytorch_lora_weights.safetensors"
    assert lora.is_file()
    teacher = DiffusionPipeline.from_pretrained(tiny_teacher_dir("sdxl", SMOKE_RESOLUTION))
    teacher.scheduler = DiffusionPipeline.from_pretrained(out / "pipeline").scheduler
    before = _sample_one_step(teacher)
    teacher.load_lora_weights(out / "lora")
    after = _sample_one_step(teacher)
    merged = _sample_one_step(DiffusionPipeline.from_pretrained(out / "pipeline"))
    assert not np.allclose(before, after)
    np.testing.assert_allclose(after, merged, atol=1e-3)
    assert json.loads((out / "export.json").read_text())["lora_max_abs_diff"] <= 1e-4


def test_resume_and_reexport(tmp_path):
    out = tmp_path / "run"
    distillkit("run", "recipes/dmd2_sd15.yaml", "--smoke", f"output_dir={out}", "train.max_steps=2")
    # a second run into the same directory without --resume refuses and damages nothing
    refused = distillkit(
        "run", "recipes/dmd2_sd15.yaml", "--smoke", f"output_dir={out}", check=False
    )
    assert refused.returncode == 2 and "--resume" in refused.stderr
    proc = distillkit(
        "run",
        "recipes/dmd2_sd15.yaml",
        "--smoke",
        "--resume",
        f"output_dir={out}",
        "train.max_steps=3",
    )
    assert "resumed from step-0000002" in proc.stdout + proc.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    reexport = distillkit("export", str(out))
    assert "exported pipeline" in reexport.stdout
    assert (out / "pipeline" / "model_index.json").is_file()


def test_embedding_cache_gives_the_same_run(tmp_path):
    """data.cache_dir precomputes text embeddings and latents once; training is unchanged."""
    common = ["run", "recipes/dmd2_sd15.yaml", "--smoke", "logging.sample_every=0"]
    distillkit(*common, f"output_dir={tmp_path / 'plain'}")
    cache = tmp_path / "cache"
    distillkit(*common, f"output_dir={tmp_path / 'cached'}", f"data.cache_dir={cache}")
    assert sorted(p.name for p in cache.rglob("*.safetensors")) == [
        "latents.safetensors",
        "text.safetensors",
    ]

    def losses(run: str) -> list[dict]:
        rows = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(r).items() if "loss" in k} for r in rows]

    # the cached latents were VAE-encoded 32 images at a time, the plain run's per micro-batch:
    # the same numbers up to float rounding of batched convolutions
    plain, cached = losses("plain"), losses("cached")
    assert [sorted(r) for r in plain] == [sorted(r) for r in cached] and plain
    for a, b in zip(plain, cached):
        assert b == pytest.approx(a, rel=1e-4)

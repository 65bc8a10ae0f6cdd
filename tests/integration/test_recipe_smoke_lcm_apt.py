"""Every shipped LCM / LCM-LoRA / APT YAML through the real CLI on tiny same-family teachers:
train two steps, checkpoint, export, reload with plain diffusers, sample in 1 (and 4) steps;
LoRA files load into the teacher; APT starts from another run's export via init_from."""

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
FAST = ["logging.progress_bar=false", "logging.sample_every=0", "logging.report=false"]
SCHEDULER = {"sd15": "LCMScheduler", "sdxl": "LCMScheduler", "sana": "FlowMatchLCMScheduler"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Run a YAML once per module (``--smoke``) and hand back its output directory."""
    done: dict[tuple, Path] = {}

    def run(config: str, *overrides: str) -> Path:
        key = (config, overrides)
        if key not in done:
            out = tmp_path_factory.mktemp(config) / "run"
            args = ["run", f"recipes/{config}.yaml", "--smoke", f"output_dir={out}"]
            proc = subprocess.run(
                [sys.executable, "-m", "distillkit.cli", *args, *FAST, *overrides],
                capture_output=True,
                text=True,
                timeout=600,
                cwd=REPO,
            )
            assert proc.returncode == 0, f"{config} failed:\n{proc.stderr[-3000:]}"
            done[key] = out
        return done[key]

    return run


def _denoiser(family: str) -> str:
    return "transformer" if family == "sana" else "unet"


def _weights(pipeline_dir: Path, family: str) -> dict[str, torch.Tensor]:
    return load_file(str(pipeline_dir / _denoiser(family) / "diffusion_pytorch_model.safetensors"))


def _checkpoint(out: Path) -> Path:
    return out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()


def _sample(pipe: DiffusionPipeline, steps: int) -> np.ndarray:
    kwargs = {"use_resolution_binning": False} if "Sana" in type(pipe).__name__ else {}
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        "a handwritten digit three",
        num_inference_steps=steps,
        guidance_scale=0.0,
        height=SMOKE_RESOLUTION,
        width=SMOKE_RESOLUTION,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images


def _check_export(out: Path, family: str) -> DiffusionPipeline:
    assert json.loads((out / "export.json").read_text())["pipeline_max_abs_diff"] <= 1e-4
    pipe = DiffusionPipeline.from_pretrained(out / "pipeline")
    assert type(pipe.scheduler).__name__ == SCHEDULER[family]
    one = _sample(pipe, 1)
    assert one.shape == (1, SMOKE_RESOLUTION, SMOKE_RESOLUTION, 3) and np.isfinite(one).all()
    return pipe


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sana"])
@pytest.mark.parametrize("student", ["full", "lora"])
def test_lcm_smoke(smoke, family, student):
    config = f"lcm_{family}" if student == "full" else f"lcm_lora_{family}"
    out = smoke(config)
    pipe = _check_export(out, family)
    four = _sample(pipe, 4)
    assert np.isfinite(four).all() and not np.allclose(four, _sample(pipe, 1))
    assert (
        json.loads((out / "pipeline" / "distillkit.json").read_text())["num_inference_steps"] == 4
    )
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 2 and np.isfinite(metrics[-1]["generator/consistency"])

    ckpt = _checkpoint(out)
    trained = load_file(str(ckpt / "generator.safetensors"))
    teacher_dir = tiny_teacher_dir(family, SMOKE_RESOLUTION)
    if student == "full":
        teacher = _weights(teacher_dir, family)
        target = load_file(str(ckpt / "state-target.safetensors"))  # the EMA target, in full
        moved = [k for k, v in trained.items() if not torch.equal(v, teacher[k])]
        assert moved, "no student weight moved"
        k = moved[0]
        assert not torch.equal(target[k], teacher[k]) and not torch.equal(target[k], trained[k])
        return
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)
    lora = out / "lora" / "pytorch_lora_weights.safetensors"
    assert lora.is_file() and not (ckpt / "state-target.safetensors").exists()
    base = DiffusionPipeline.from_pretrained(teacher_dir)
    base.scheduler = pipe.scheduler
    before = _sample(base, 1)
    base.load_lora_weights(out / "lora")
    after = _sample(base, 1)
    assert not np.allclose(before, after)
    np.testing.assert_allclose(after, _sample(pipe, 1), atol=1e-3)


@pytest.mark.parametrize("family", ["sdxl", "sana"])
def test_apt_smoke(smoke, family):
    out = smoke(f"apt_{family}")
    _check_export(out, family)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = metrics[-1]
    assert {"generator/adv", "discriminator/adv", "discriminator/r1"} <= set(last)
    ckpt = _checkpoint(out)
    teacher = _weights(tiny_teacher_dir(family, SMOKE_RESOLUTION), family)
    for role, prefix in (("generator", ""), ("discriminator", "net.")):
        trained = load_file(str(ckpt / f"{role}.safetensors"))
        moved = [k for k, v in trained.items() if k.startswith(prefix) and k[len(prefix) :] in
                 teacher and not torch.equal(v, teacher[k[len(prefix) :]])]  # fmt: skip
        assert moved, f"no {role} backbone weight moved"
    assert any(k.startswith("heads.") for k in load_file(str(ckpt / "discriminator.safetensors")))


def test_apt_starts_from_another_runs_export(smoke):
    """init_from: the generator begins at the LCM run's exported UNet (kept there by lr 0),
    not at the teacher, while the discriminator still trains from the teacher's weights."""
    lcm = smoke("lcm_sd15")
    out = smoke("apt_sd15", f"recipe.init_from={lcm / 'pipeline'}", "recipe.lr.generator=0")
    _check_export(out, "sd15")
    start, got = _weights(lcm / "pipeline", "sd15"), _weights(out / "pipeline", "sd15")
    teacher = _weights(tiny_teacher_dir("sd15", SMOKE_RESOLUTION), "sd15")
    assert all(torch.equal(got[k], start[k]) for k in start)
    assert any(not torch.equal(start[k], teacher[k]) for k in start)
    disc = load_file(str(_checkpoint(out) / "discriminator.safetensors"))
    assert any(not torch.equal(disc[f"net.{k}"], teacher[k]) for k in teacher if f"net.{k}" in disc)

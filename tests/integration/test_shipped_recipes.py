"""Every shipped YAML (recipes/*.yaml, not the digits ones) through the real CLI with --smoke, as
a GPU run would compute it: the tiny teacher in the dtype `teacher.dtype` gives on CUDA (bf16),
the YAML's own mixed precision, LoRA config, shared base, GAN weights, generator steps and
guidance. Each run trains both roles, checkpoints, exports and verifies; here its export is
reloaded with plain diffusers and sampled at every step count it ships."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from distillkit.config import load_config
from distillkit.teachers.load import SMOKE_RESOLUTION, tiny_teacher_dir

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
FAST = ["logging.progress_bar=false", "logging.sample_every=0", "logging.report=false"]
PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
             "sana": "SanaPipeline", "sd3": "StableDiffusion3Pipeline",
             "flux": "FluxPipeline", "zimage": "ZImagePipeline"}  # fmt: skip
SCHEDULER = {"sd15": "LCMScheduler", "sdxl": "LCMScheduler"}  # the flow families: FlowMatchLCM


def test_every_shipped_recipe_is_covered():
    families = {load_config(REPO / "recipes" / f"{name}.yaml").teacher.family for name in SHIPPED}
    assert len(SHIPPED) >= 31 and families == set(PIPELINES)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Run a shipped YAML once per module with --smoke through the CLI's own ``main`` (in this
    process: a subprocess would spend ~8 s of each run importing torch and diffusers; the
    process boundary, exit codes and signals are tested in test_cli and test_crash_safety);
    returns (output dir, stdout)."""
    from accelerate.state import AcceleratorState

    from distillkit.cli import main

    done: dict[tuple, tuple[Path, str]] = {}

    def run(name: str, *overrides: str) -> tuple[Path, str]:
        key = (name, overrides)
        if key not in done:
            out = tmp_path_factory.mktemp(name) / "run"
            recipe = REPO / "recipes" / f"{name}.yaml"
            args = ["run", str(recipe), "--smoke", "--builtin-data", f"output_dir={out}"]
            AcceleratorState._reset_state(reset_partial_state=True)  # a fresh process's state
            stdout, stderr = io.StringIO(), io.StringIO()
            try:
                with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                    code = main([*args, *FAST, *overrides])
            finally:  # and leave none behind for the tests that follow
                AcceleratorState._reset_state(reset_partial_state=True)
            assert code == 0, f"{name} failed:\n{stderr.getvalue()[-3000:]}"
            done[key] = (out, stdout.getvalue())
        return done[key]

    return run


def _denoiser(family: str) -> str:
    return "unet" if family in ("sd15", "sdxl") else "transformer"


def _weights(pipeline_dir: Path, family: str) -> dict[str, torch.Tensor]:
    folder = pipeline_dir / _denoiser(family)
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def _sample(pipe: DiffusionPipeline, call: dict) -> np.ndarray:
    kwargs = {"use_resolution_binning": False} if "Sana" in type(pipe).__name__ else {}
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        "a handwritten digit three",
        height=SMOKE_RESOLUTION,
        width=SMOKE_RESOLUTION,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **call,
        **kwargs,
    ).images


def _rel_rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_runs_as_on_a_gpu(smoke, name):
    cfg = load_config(REPO / "recipes" / f"{name}.yaml")
    family = cfg.teacher.family
    out, stdout = smoke(name)

    # what --smoke ran instead, said; the GPU run's teacher dtype
    assert "smoke: a tiny random" in stdout and "bfloat16" in stdout
    report = json.loads((out / "export.json").read_text())
    assert report["teacher_dtype"] == "bfloat16" and "relative RMS" in report["check"]
    assert report["pipeline_rel_rms"] <= cfg.export.relative_tolerance
    saved = yaml.safe_load((out / "run.yaml").read_text())["config"]
    assert saved["train"]["mixed_precision"] == cfg.train.mixed_precision
    assert saved["student"] == cfg.student.model_dump(mode="json")
    assert saved["recipe"] == cfg.recipe.model_dump(mode="json")

    # every role trained, and the generator's weights moved
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    roles = {k.split("/")[0] for row in metrics for k in row if k.endswith("/loss")}
    assert metrics[-1]["step"] == 2 and len(roles) == (1 if cfg.recipe.name == "lcm" else 2)
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    trained = load_file(str(ckpt / "generator.safetensors"))
    teacher_dir = tiny_teacher_dir(family, SMOKE_RESOLUTION)
    if cfg.student.type == "lora":
        assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)
    else:
        # the student starts at the bf16 teacher's weights: compare with those
        start = {k: v.to(torch.bfloat16).float() for k, v in _weights(teacher_dir, family).items()}
        assert any(not torch.equal(v, start[k]) for k, v in trained.items())

    # plain diffusers: the stored class, scheduler and dtype; samples at every shipped count
    call = json.loads((out / "pipeline" / "distillkit.json").read_text())
    steps = call["num_inference_steps"]
    assert sorted(int(k) for k in call["calls"]) == sorted({1, steps})
    pipe = DiffusionPipeline.from_pretrained(out / "pipeline", torch_dtype=torch.bfloat16)
    assert type(pipe).__name__ == PIPELINES[family]
    assert type(pipe.scheduler).__name__ == SCHEDULER.get(family, "FlowMatchLCMScheduler")
    assert getattr(pipe, _denoiser(family)).dtype == torch.bfloat16
    samples = {int(k): _sample(pipe, c) for k, c in call["calls"].items()}
    for images in samples.values():
        assert images.shape == (1, SMOKE_RESOLUTION, SMOKE_RESOLUTION, 3)
        assert np.isfinite(images).all()
    if steps > 1:
        assert not np.allclose(samples[steps], samples[1])
    # a plain from_pretrained(dir), no torch_dtype: one dtype throughout (fp32), and it samples
    plain = DiffusionPipeline.from_pretrained(out / "pipeline")
    dtypes = {m.dtype for m in plain.components.values() if isinstance(m, torch.nn.Module)}
    assert dtypes == {torch.float32} and np.isfinite(_sample(plain, call["calls"]["1"])).all()
    card = (out / "pipeline" / "README.md").read_text()
    assert f"num_inference_steps={steps}" in card and cfg.recipe.name in card

    # LoRA students: the LoRA file on the teacher reproduces the merged export
    lora = out / "lora" / "pytorch_lora_weights.safetensors"
    assert lora.is_file() == (cfg.student.type == "lora")
    if lora.is_file():
        base = DiffusionPipeline.from_pretrained(teacher_dir, torch_dtype=torch.bfloat16)
        base.scheduler = pipe.scheduler
        before = _sample(base, call["calls"]["1"])
        base.load_lora_weights(out / "lora")
        after = _sample(base, call["calls"]["1"])
        assert not np.allclose(before, after)
        assert _rel_rms(after, samples[1]) <= cfg.export.relative_tolerance


@pytest.mark.parametrize("name", ["dmd2_sana", "lcm_lora_sd15"])
def test_one_student_ships_every_step_count_it_trained(smoke, name):
    """student.step_counts on SANA (whose few-step grids travel as sigmas) with DMD2 and on
    SD1.5 with LCM-LoRA (MLCM's segments): the export ships and checks 1, 2 and 4 steps, the
    card says so, and plain diffusers samples each."""
    out, _ = smoke(name, "student.step_counts=[1,2,4]")
    call = json.loads((out / "pipeline" / "distillkit.json").read_text())
    assert call["num_inference_steps"] == 4 and sorted(call["calls"]) == ["1", "2", "4"]
    assert json.loads((out / "export.json").read_text())["shipped_steps"] == [1, 2, 4]
    assert "One student for 1, 2 and 4 steps" in (out / "pipeline" / "README.md").read_text()
    pipe = DiffusionPipeline.from_pretrained(out / "pipeline", torch_dtype=torch.bfloat16)
    samples = {k: _sample(pipe, c) for k, c in call["calls"].items()}
    assert all(np.isfinite(v).all() for v in samples.values())
    assert not np.allclose(samples["1"], samples["2"])
    assert not np.allclose(samples["2"], samples["4"])


def test_apt_starts_from_another_runs_export(smoke):
    """init_from: the generator begins at the LCM run's exported UNet (kept there by lr 0),
    not at the teacher, while the discriminator still trains from the teacher's weights."""
    lcm, _ = smoke("lcm_sd15")
    out, _ = smoke("apt_sd15", f"recipe.init_from={lcm / 'pipeline'}", "recipe.lr.generator=0")
    start, got = _weights(lcm / "pipeline", "sd15"), _weights(out / "pipeline", "sd15")
    teacher = _weights(tiny_teacher_dir("sd15", SMOKE_RESOLUTION), "sd15")
    assert all(torch.equal(got[k], start[k]) for k in start)
    assert any(not torch.equal(start[k], teacher[k].to(start[k].dtype)) for k in start)
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    disc = load_file(str(ckpt / "discriminator.safetensors"))
    assert any(
        not torch.equal(disc[f"net.{k}"], teacher[k].to(disc[f"net.{k}"].dtype))
        for k in teacher
        if f"net.{k}" in disc
    )

"""A run whose teacher wears a user's LoRA (the real path, not --smoke's stand-in): the merged
pipeline is base + style + student, and the one LoRA file gives the same on the plain base."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from safetensors.torch import load_file

from distillkit.teachers.load import tiny_teacher_dir
from tests.helpers.lora_files import linear_layers, write_style_lora

REPO = Path(__file__).resolve().parents[2]
STYLE_ONLY = "time_embedding.linear_1"  # not among lcm_lora_sd15's student targets
SCALE = 0.8


def _unet_weights(pipe) -> dict[str, torch.Tensor]:
    return {k: v.detach().float() for k, v in pipe.unet.state_dict().items()}


def test_lora_student_of_a_styled_teacher(tmp_path):
    base_dir = tiny_teacher_dir("sd15", 32)
    plain = StableDiffusionPipeline.from_pretrained(base_dir)
    both = linear_layers(plain.unet, "attn1.to_q")[0]  # the style and the student adapt it
    style = tmp_path / "loras" / "style.safetensors"
    deltas = write_style_lora(plain.unet, style, [both, STYLE_ONLY], fmt="diffusers")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red digit\na blue digit\n")
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "distillkit.cli",
            "run",
            "recipes/lcm_lora_sd15.yaml",
            f"output_dir={out}",
            f"teacher.model_id={base_dir}",
            "teacher.revision=null",
            "teacher.resolution=32",
            "teacher.dtype=fp32",
            "train.mixed_precision=no",
            f"teacher.loras=[{{path: {style}, scale: {SCALE}}}]",
            "recipe.latents=teacher",
            f"data.prompts={prompts}",
            "data.images=null",
            "train.max_steps=2",
            "train.batch_size=1",
            "logging.progress_bar=false",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    # the LoRA file: the style's rank-2 factors and the trained student's, per layer
    tensors = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    up = tensors[f"unet.{both}.lora_B.weight"]
    assert up.shape[1] > 2 and up[:, 2:].abs().max() > 0  # student B starts at zero: trained
    assert tensors[f"unet.{STYLE_ONLY}.lora_B.weight"].shape[1] == 2

    exported = DiffusionPipeline.from_pretrained(out / "pipeline")
    merged, base = _unet_weights(exported), _unet_weights(plain)
    # where only the style acts, the export is exactly base + scale * style
    key = f"{STYLE_ONLY}.weight"
    torch.testing.assert_close(merged[key], base[key] + SCALE * deltas[STYLE_ONLY])
    # the one LoRA file on the plain base reproduces the merged export (base + style + speed)
    plain.load_lora_weights(out / "lora", weight_name="pytorch_lora_weights.safetensors")
    plain.fuse_lora()
    plain.unload_lora_weights()
    stacked = _unet_weights(plain)
    for name in merged:
        torch.testing.assert_close(stacked[name], merged[name], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(
        merged[f"{both}.weight"], base[f"{both}.weight"] + SCALE * deltas[both]
    )

    # plain diffusers samples it at the step counts it ships, with the shipped arguments
    calls = json.loads((out / "pipeline" / "distillkit.json").read_text())
    assert calls["teacher_loras"] == [{"lora": "style.safetensors", "scale": SCALE}]
    exported.set_progress_bar_config(disable=True)
    for steps, call in calls["calls"].items():
        image = exported("a red digit", output_type="pt", **call).images
        assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all(), steps
    card = (out / "pipeline" / "README.md").read_text()
    assert "`style.safetensors` at scale 0.8" in card and str(tmp_path) not in card

    # stacking as the card shows: the distilled LoRA and an unseen style as two adapters
    unseen = tmp_path / "loras" / "unseen.safetensors"
    unseen_deltas = write_style_lora(
        plain.unet, unseen, linear_layers(plain.unet, "attn2.to_v")[:2], fmt="kohya", seed=5
    )
    stacked_pipe = StableDiffusionPipeline.from_pretrained(base_dir)
    stacked_pipe.load_lora_weights(
        out / "lora", weight_name="pytorch_lora_weights.safetensors", adapter_name="speed"
    )
    stacked_pipe.load_lora_weights(unseen, adapter_name="style")
    stacked_pipe.set_adapters(["speed", "style"], adapter_weights=[1.0, 0.6])
    expected = StableDiffusionPipeline.from_pretrained(base_dir).unet
    with torch.no_grad():
        for name, module in expected.named_modules():
            change = 0
            if f"unet.{name}.lora_A.weight" in tensors:
                down = tensors[f"unet.{name}.lora_A.weight"].flatten(1)  # convs: kernels
                up = tensors[f"unet.{name}.lora_B.weight"].flatten(1)
                change = (up @ down).reshape(module.weight.shape)
            if name in unseen_deltas:
                change = change + 0.6 * unseen_deltas[name]
            if torch.is_tensor(change):
                module.weight += change
    gen = torch.Generator().manual_seed(0)
    width = expected.config.cross_attention_dim
    latents = torch.randn(1, 4, 4, 4, generator=gen)
    text = torch.randn(1, 8, width, generator=gen)
    t = torch.tensor([999])
    with torch.no_grad():
        got = stacked_pipe.unet(latents, t, text).sample
        want = expected(latents, t, text).sample
        speed_only = stacked_pipe.unet
        stacked_pipe.set_adapters(["speed"])
        without_style = speed_only(latents, t, text).sample
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - without_style).abs().max() > 1e-3  # the unseen style does act

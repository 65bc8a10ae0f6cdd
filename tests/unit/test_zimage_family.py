"""Z-Image: the adapter's conventions (reversed time, negated output, list inputs, unpadded
captions, guidance w = s + 1) against ZImagePipeline's own scheduler, prompt encoding and
sampling loop, and a DMD2 run through the real CLI on the tiny teacher."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

from distillkit.export.pipeline import VERIFY_PROMPT, _fixed_noise, pipeline_one_step
from distillkit.teachers.tiny import TinySpec, build_tiny_pipeline, save_tiny_teacher
from distillkit.teachers.zimage import ZImageAdapter, pipeline_guidance

PROMPTS = ["a handwritten digit two", "seven"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _calls(net, seen: list):
    """Record each transformer call's positional inputs and its output."""
    return net.register_forward_hook(
        lambda _m, args, _kw, out: seen.append((args, out)), with_kwargs=True
    )


def test_tiny_teacher_is_a_zimage_pipeline_that_plain_diffusers_reloads(tmp_path):
    spec = TinySpec("zimage")
    pipe = DiffusionPipeline.from_pretrained(save_tiny_teacher(spec, tmp_path / "t"))
    assert type(pipe).__name__ == "ZImagePipeline"
    assert type(pipe.text_encoder).__name__ == "Qwen3Model"
    built = build_tiny_pipeline(spec).transformer.state_dict()
    assert all(torch.equal(v, pipe.transformer.state_dict()[k]) for k, v in built.items())
    config = pipe.scheduler.config
    assert (config.shift, config.use_dynamic_shifting) == (6.0, False)
    tok = pipe.tokenizer  # the chat template survives the save
    text = tok.apply_chat_template(
        [{"role": "user", "content": "a handwritten digit seven"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == "<|im_start|>user\na handwritten digit seven<|im_end|>\n<|im_start|>assistant\n"
    assert tok.convert_ids_to_tokens(tok(text).input_ids)[6:10] == [
        "a",
        "Ġhandwritten",
        "Ġdigit",
        "Ġseven",
    ]
    with pytest.raises(ValueError, match="even"):
        TinySpec("zimage", sample_size=24)


def test_conditioning_is_the_pipelines_own_encoding(tiny_adapter):
    """Each row, unpadded by its mask, is ZImagePipeline.encode_prompt's sequence for that
    prompt; the negative is the encoded empty prompt; the caller's list is left alone (the
    pipeline rewrites the list it is given) and the cache is keyed by the prompts."""
    adapter = tiny_adapter("zimage")
    prompts = list(PROMPTS)
    cond = adapter.encode(prompts)
    assert prompts == PROMPTS and set(PROMPTS) <= set(adapter._cache)
    feats, mask = cond.cond["cap_feats"], cond.cond["cap_mask"]
    assert feats.shape[:2] == mask.shape == (2, 512) and mask.dtype == torch.bool
    for i, prompt in enumerate(PROMPTS):
        ref, neg = adapter.pipe.encode_prompt([prompt], device="cpu")
        assert int(mask[i].sum()) == len(ref[0])
        torch.testing.assert_close(feats[i][mask[i]], ref[0])
        torch.testing.assert_close(cond.uncond["cap_feats"][i][cond.uncond["cap_mask"][i]], neg[0])
    assert mask[0].sum() != mask[1].sum() and feats[~mask].abs().max() == 0


def test_one_denoiser_call_is_the_pipelines_transformer_call(tiny_adapter):
    """Same latents, prompt and timestep: the adapter hands the transformer exactly what
    ZImagePipeline does (frames, 1 - sigma in fp32, unpadded captions) and returns the negated
    output the pipeline passes its scheduler."""
    adapter = tiny_adapter("zimage")
    net, pipe = adapter.denoiser, adapter.pipe
    noise = _fixed_noise(adapter)
    seen: list = []
    hook = _calls(net, seen)
    with torch.no_grad():
        pipe(
            VERIFY_PROMPT,
            height=32,
            width=32,
            num_inference_steps=1,
            guidance_scale=0.0,
            latents=noise,
            output_type="latent",
        )
        t = pipe.scheduler.timesteps[:1]
        ours = adapter.forward(net, noise, t, adapter.encode([VERIFY_PROMPT]).cond)
    hook.remove()
    (theirs_in, theirs_out), (ours_in, _) = seen
    for a, b in zip(theirs_in[0] + theirs_in[2], ours_in[0] + ours_in[2]):  # frames, captions
        assert torch.equal(a, b)
    assert ours_in[1].dtype == torch.float32 and torch.equal(ours_in[1], theirs_in[1])
    assert torch.equal(ours_in[1], (1000 - t) / 1000)
    torch.testing.assert_close(ours, -torch.stack(theirs_out[0]).squeeze(2), rtol=0, atol=0)


def test_noising_target_and_timesteps_are_the_schedulers(tiny_adapter):
    """add_noise is the teacher scheduler's scale_noise at its own timesteps; the training
    shift is the scheduler's (6); an Euler step to sigma 0 along the target lands on x0."""
    adapter = tiny_adapter("zimage")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(adapter.pipe.scheduler.config)
    scheduler.set_timesteps(sigmas=[1.0, 0.7, 0.4, 0.1], mu=0.0)
    u = torch.tensor([1.0, 0.7, 0.4, 0.1])
    torch.testing.assert_close(adapter.schedule.shifted(u) * 1000, scheduler.timesteps)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, *adapter.latent_shape(), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    t = scheduler.timesteps
    x_t = adapter.add_noise(x0, eps, t)
    want = torch.cat(
        [scheduler.scale_noise(x0[i : i + 1], t[i : i + 1], eps[i : i + 1]) for i in range(4)]
    )
    torch.testing.assert_close(x_t, want)
    last = FlowMatchEulerDiscreteScheduler.from_config(adapter.pipe.scheduler.config)
    last.set_timesteps(sigmas=[0.4], mu=0.0)  # one step from shifted 0.4 to 0
    target = adapter.target(x0[:1], eps[:1], last.timesteps)
    x = adapter.add_noise(x0[:1], eps[:1], last.timesteps)
    torch.testing.assert_close(last.step(target, last.timesteps[0], x).prev_sample, x0[:1])


def test_guided_euler_sampling_is_the_teacher_pipelines(tiny_adapter):
    """The teacher's own 3-step Euler run at guidance_scale s = 1.5, rebuilt from the adapter's
    timesteps (its shift on the pipeline's default sigmas) and predict at w = s + 1: the
    pipeline's CFG is pos + s (pos - neg)."""
    adapter = tiny_adapter("zimage")
    pipe, net = adapter.pipe, adapter.denoiser
    noise = _fixed_noise(adapter)
    with torch.no_grad():
        theirs = pipe(
            VERIFY_PROMPT,
            height=32,
            width=32,
            num_inference_steps=3,
            guidance_scale=1.5,
            latents=noise,
            output_type="latent",
        ).images
        sigmas = [*adapter.schedule.shifted(torch.linspace(1.0, 1 / 3, 3)).tolist(), 0.0]
        x, cond = noise, adapter.encode([VERIFY_PROMPT])
        for sigma, following in itertools.pairwise(sigmas):
            v = adapter.predict(net, x, torch.tensor([sigma * 1000]), cond, guidance=2.5)
            x = x + (following - sigma) * v
        plain = adapter.predict(net, noise, torch.tensor([1000.0]), cond, guidance=1.5)
    torch.testing.assert_close(x, theirs, atol=2e-5, rtol=1e-4)
    assert pipeline_guidance(2.5) == 1.5 and pipeline_guidance(1.0) == 0.0
    assert not torch.allclose(plain, adapter.predict(net, noise, torch.tensor([1000.0]), cond))


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_few_step_sampling_is_the_exported_pipelines(tiny_adapter, steps):
    """adapter.generate at k steps equals the export pipeline (FlowMatchLCMScheduler, the
    shipped sigmas) at the same seed and steps. ZImagePipeline passes no generator to its
    scheduler's step, so the re-noising draws from the global RNG: seeded here, for both."""
    adapter = tiny_adapter("zimage")
    noise = _fixed_noise(adapter)
    pipe = adapter.pipeline_for_export(adapter.denoiser)
    pipe.set_progress_bar_config(disable=True)
    cond = adapter.encode([VERIFY_PROMPT])
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        ours = adapter.generate(adapter.denoiser, noise, cond, steps=steps)
        torch.manual_seed(7)
        theirs = pipe(
            VERIFY_PROMPT,
            height=32,
            width=32,
            guidance_scale=0.0,
            latents=noise,
            output_type="latent",
            num_inference_steps=steps,
            **adapter.sampling_call_kwargs(steps),
        ).images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pipe.scheduler.timesteps.float(), adapter.generator_timesteps(steps))
    if steps == 1:
        torch.testing.assert_close(ours, pipeline_one_step(pipe, adapter, noise))


def test_gan_features_are_the_image_grid_and_bad_sizes_are_refused(tiny_adapter):
    adapter = tiny_adapter("zimage")
    net = adapter.denoiser
    block, width = adapter.feature_module(net)
    assert width == net.config.dim and len(adapter.feature_blocks(net)) == len(net.layers)
    seen = []
    hook = block.register_forward_hook(lambda _m, _a, out: seen.append(out))
    with torch.no_grad():
        adapter.forward(
            net,
            torch.zeros(2, *adapter.latent_shape()),
            torch.tensor([900.0, 300.0]),
            adapter.encode(PROMPTS).cond,
        )
    hook.remove()
    feats = adapter.features_to_map(seen[0])
    assert feats.shape == (2, width, 2, 2)  # 32 px / VAE 8 / patch 2
    assert torch.equal(feats[:, :, 0, 1], seen[0][:, 1])  # image tokens first, row-major
    with pytest.raises(ValueError, match="multiple of 16"):
        ZImageAdapter(adapter.pipe, 40, torch.device("cpu"))


def _smoke(out: Path, *overrides: str) -> str:
    from accelerate.state import AcceleratorState

    from distillkit.cli import main

    args = [
        "run",
        str(REPO / "recipes" / "dmd2_zimage.yaml"),
        "--smoke",
        "--builtin-data",
        f"output_dir={out}",
        "logging.progress_bar=false",
        "logging.sample_every=0",
        "logging.report=false",
        *overrides,
    ]
    AcceleratorState._reset_state(reset_partial_state=True)
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(args)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert code == 0, stderr.getvalue()[-3000:]
    return stdout.getvalue()


def test_dmd2_smoke_trains_exports_and_plain_diffusers_samples_it(tmp_path):
    """DMD2 with a LoRA generator and the GAN head on the fake score (the shipped YAML's full
    student runs in test_shipped_recipes): both roles train, the export reloads with plain
    from_pretrained and samples at 1 step, and its LoRA file loads into ZImagePipeline."""
    out = tmp_path / "run"
    stdout = _smoke(
        out,
        "student.type=lora",
        "recipe.gan_generator_weight=5e-3",
        "recipe.gan_discriminator_weight=1e-2",
    )
    assert "smoke: a tiny random" in stdout and "bfloat16" in stdout  # the GPU run's dtype
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    roles = {k.split("/")[0] for row in metrics for k in row if k.endswith("/loss")}
    assert roles == {"generator", "fake_score"} and metrics[-1]["step"] == 2
    assert any("gan" in k for row in metrics for k in row)
    report = json.loads((out / "export.json").read_text())
    assert report["pipeline_rel_rms"] <= 0.02 and report["lora_rel_rms"] <= 0.02
    call = json.loads((out / "pipeline" / "distillkit.json").read_text())["calls"]["1"]
    assert call["guidance_scale"] == 0.0 and call["sigmas"] == [1.0]
    pipe = DiffusionPipeline.from_pretrained(out / "pipeline")
    assert type(pipe).__name__ == "ZImagePipeline"
    assert type(pipe.scheduler).__name__ == "FlowMatchLCMScheduler"
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        "a handwritten digit three",
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **call,
    ).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert "Z-Image" in (out / "pipeline" / "README.md").read_text()

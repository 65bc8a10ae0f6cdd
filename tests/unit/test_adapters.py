"""Each family's adapter: conditioning, parameterization round trips, guidance, generation."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline

from distillkit.export.pipeline import VERIFY_PROMPT, _fixed_noise, pipeline_one_step

FAMILIES = ("sd15", "sdxl", "sana", "sd3", "flux")
CFG_FAMILIES = FAMILIES[:-1]  # FLUX.1-dev reads guidance as an input (test_mmdit_families)


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_shapes_and_cache(family, tiny_adapter):
    adapter = tiny_adapter(family)
    cond = adapter.encode(["a cat", "a dog", "a cat"])
    hidden = cond.cond["encoder_hidden_states"]
    assert hidden.shape[0] == 3 and hidden.dtype == torch.float32
    torch.testing.assert_close(hidden[0], hidden[2])
    assert not torch.equal(hidden[0], hidden[1])
    assert cond.uncond["encoder_hidden_states"].shape == hidden.shape
    if family == "sdxl":
        assert cond.cond["added_cond_kwargs"]["time_ids"].shape == (3, 6)
    if family == "sana":
        assert cond.cond["encoder_attention_mask"].shape[:1] == (3,)
    # the cache answers repeated prompts with identical tensors
    again = adapter.encode(["a dog"]).cond["encoder_hidden_states"]
    torch.testing.assert_close(again[0], hidden[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_target_round_trip(family, tiny_adapter):
    """Feeding the exact training target as network output recovers x0 and eps."""
    adapter = tiny_adapter(family)
    gen = torch.Generator().manual_seed(0)
    shape = (4, *adapter.latent_shape())
    x0, eps = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    t = adapter.sample_t(4, gen, 0.05, 0.95)
    x_t = adapter.add_noise(x0, eps, t)
    out = adapter.target(x0, eps, t)
    torch.testing.assert_close(adapter.to_x0(out, x_t, t), x0, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(adapter.to_eps(out, x_t, t), eps, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("family", CFG_FAMILIES)
def test_guidance_is_linear_in_the_output(family, tiny_adapter):
    adapter = tiny_adapter(family)
    gen = torch.Generator().manual_seed(1)
    x_t = torch.randn((2, *adapter.latent_shape()), generator=gen)
    t = adapter.sample_t(2, gen, 0.2, 0.8)
    cond = adapter.encode(["a cat", "a dog"])
    net = adapter.denoiser
    with torch.no_grad():
        out_c = adapter.forward(net, x_t, t, cond.cond)
        out_u = adapter.forward(net, x_t, t, cond.uncond)
        guided = adapter.predict(net, x_t, t, cond, guidance=4.0)
        plain = adapter.predict(net, x_t, t, cond, guidance=1.0)
    torch.testing.assert_close(guided, out_u + 4.0 * (out_c - out_u), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(plain, out_c)
    assert not torch.allclose(out_c, out_u)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_step_generation_matches_the_pipeline(family, tiny_adapter):
    """adapter.generate(steps=1) is what the exported pipeline computes in one step."""
    adapter = tiny_adapter(family)
    timesteps = adapter.generator_timesteps(1)
    assert timesteps.tolist() == [adapter.schedule.t_max]
    assert len(adapter.generator_timesteps(4)) == 4
    noise = _fixed_noise(adapter)
    with torch.no_grad():
        ours = adapter.generate(adapter.denoiser, noise, adapter.encode([VERIFY_PROMPT]), steps=1)
    pipe = adapter.pipeline_for_export(adapter.denoiser)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipeline_one_step(pipe, adapter, noise)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert isinstance(pipe, DiffusionPipeline)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_start_timestep_reaches_the_exported_scheduler(family, tiny_adapter, tmp_path):
    """student.start_timestep moves the one-step timestep in training and in the saved export."""
    adapter = tiny_adapter(family)
    try:
        adapter.use_start_timestep(625)
        assert adapter.generator_timesteps(1).tolist() == [625.0]
        four = adapter.generator_timesteps(4).tolist()
        assert four[0] == 625.0 and four == sorted(four, reverse=True) and len(set(four)) == 4
        noise = _fixed_noise(adapter)
        with torch.no_grad():
            ours = adapter.generate(adapter.denoiser, noise, adapter.encode([VERIFY_PROMPT]), 1)
            at_top = adapter.consistency(
                adapter.denoiser, noise, torch.full((1,), 999.0), adapter.encode([VERIFY_PROMPT])
            )
        assert not torch.allclose(ours, at_top)
        adapter.pipeline_for_export(adapter.denoiser).save_pretrained(tmp_path)
        pipe = DiffusionPipeline.from_pretrained(tmp_path)  # plain diffusers, no distillkit
        pipe.scheduler.set_timesteps(1)
        assert pipe.scheduler.timesteps.tolist() == [625]
        pipe.set_progress_bar_config(disable=True)
        torch.testing.assert_close(ours, pipeline_one_step(pipe, adapter, noise), atol=1e-5, rtol=0)
    finally:
        adapter.start_timestep = None


def test_start_timestep_is_refused_where_the_scheduler_cannot_carry_it(tiny_adapter):
    from distillkit.errors import ConfigError

    with pytest.raises(ConfigError, match="student.start_timestep"):
        tiny_adapter("sana").use_start_timestep(700)
    with pytest.raises(ConfigError, match=r"student.start_timestep=100: .*500\.\.999"):
        tiny_adapter("sd15").use_start_timestep(100)
    assert tiny_adapter("sd15").start_timestep is None


@pytest.mark.parametrize("family", FAMILIES)
def test_vae_round_trip_shapes(family, tiny_adapter):
    adapter = tiny_adapter(family)
    images = torch.rand(2, 3, adapter.resolution, adapter.resolution) * 2 - 1
    latents = adapter.encode_images(images)
    assert latents.shape == (2, *adapter.latent_shape())
    decoded = adapter.decode_latents(latents)
    assert decoded.shape == images.shape and decoded.abs().max() <= 1


def test_resolution_must_divide_by_vae_factor():
    from distillkit.config import TeacherConfig
    from distillkit.errors import ConfigError
    from distillkit.teachers.load import load_teacher, tiny_teacher_dir

    local = str(tiny_teacher_dir("sd15", 32))
    cfg = TeacherConfig(model_id=local, family="sd15", resolution=36)
    with pytest.raises(ConfigError, match="divisible by the VAE"):
        load_teacher(cfg, torch.device("cpu"))


def test_sana_few_step_grids_are_real_few_step_grids(tiny_adapter, monkeypatch):
    """FlowMatchLCMScheduler's own 2-step grid is [1000, 9] (shift 3): a 1-step student in
    disguise. The adapter's: the trailing grid, shifted; with an LCM base grid, its points."""
    adapter = tiny_adapter("sana")
    assert adapter.schedule.shift == 3.0
    assert adapter.generator_timesteps(2).tolist() == [1000.0, 750.0]
    assert adapter.generator_timesteps(4).tolist() == [1000.0, 900.0, 750.0, 500.0]
    monkeypatch.setattr(adapter, "grid_steps", 10)  # LCM, skipping step 100
    grid = adapter.solver_timesteps(10).tolist()
    assert set(adapter.generator_timesteps(4).tolist()) <= set(grid) and grid[0] == 1000.0


def test_sana_sees_fp32_timesteps_in_bf16(tiny_adapter):
    """A bf16 transformer gets the fp32 timestep SanaPipeline passes: cast to bf16, 733.3 would
    become 732 (multiples of 4 in [512, 1024)) and the teacher would answer for another t."""
    adapter = tiny_adapter("sana", dtype="bf16")
    net = adapter.denoiser
    seen = []
    hook = net.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["timestep"]), with_kwargs=True
    )
    x = torch.zeros(1, *adapter.latent_shape())
    t = torch.tensor([733.3])
    with torch.no_grad():
        adapter.forward(net, x, t, adapter.encode(["a handwritten digit one"]).cond)
    hook.remove()
    assert seen[0].dtype == torch.float32
    assert float(seen[0]) == pytest.approx(733.3 * net.config.timestep_scale)

"""SD3 and FLUX adapters: what each network call sees (conditioning, timestep, guidance input,
packing), checked against the families' own pipelines and against known answers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from distillkit.errors import ConfigError
from distillkit.teachers.flux import FluxAdapter, dynamic_mu
from distillkit.teachers.tiny import TinySpec, build_tiny_pipeline


def _seen_kwargs(net, calls: list[dict]):
    return net.register_forward_pre_hook(
        lambda _m, args, kw: calls.append({"x": args[0] if args else None, **kw}),
        with_kwargs=True,
    )


# ----------------------------------------------------------------------------- SD3


def test_sd3_conditioning_is_the_pipelines_own(tiny_adapter):
    """Two CLIPs' pooled projections concatenated; CLIP states zero-padded to T5's width and
    stacked before T5's tokens (77 + 256); the empty prompt is encoded, not zeroed."""
    adapter = tiny_adapter("sd3")
    pipe = adapter.pipe
    cond = adapter.encode(["a handwritten digit two"])
    embeds, pooled = cond.cond["encoder_hidden_states"], cond.cond["pooled_projections"]
    clip_width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert pooled.shape == (1, clip_width)
    assert embeds.shape == (1, 77 + 256, pipe.text_encoder_3.config.d_model)
    assert embeds[0, :77, clip_width:].abs().max() == 0  # the zero padding
    assert cond.uncond["encoder_hidden_states"].abs().max() > 0
    ref = pipe.encode_prompt("a handwritten digit two", None, None)
    torch.testing.assert_close(embeds, ref[0])
    torch.testing.assert_close(pooled, ref[2])


def test_sd3_network_sees_fp32_sigma_times_1000_and_features_are_the_image_stream(
    tiny_adapter,
):
    adapter = tiny_adapter("sd3", dtype="bf16")
    net, calls = adapter.denoiser, []
    hook = _seen_kwargs(net, calls)
    x = torch.zeros(2, *adapter.latent_shape())
    with torch.no_grad():
        adapter.forward(net, x, torch.tensor([733.3, 12.5]), adapter.encode(["a", "b"]).cond)
    hook.remove()
    assert calls[0]["timestep"].dtype == torch.float32
    assert calls[0]["timestep"].tolist() == pytest.approx([733.3, 12.5])
    _, width = adapter.feature_module(net)
    text, image = torch.zeros(2, 7, width), torch.randn(2, 4, width)  # 2x2 patch grid
    feats = adapter.features_to_map((text, image))
    assert feats.shape == (2, width, 2, 2)
    assert torch.equal(feats[:, :, 0, 1], image[:, 1])  # token order is row-major


# ----------------------------------------------------------------------------- FLUX


def test_flux_shift_follows_the_resolution_as_the_pipeline_computes_mu():
    """Dynamic shifting: mu linear in the packed token count, 0.5 at 256 tokens (512 px) and
    1.15 at 4096 (1024 px); the training schedule's shift is exp(mu)."""
    pipe = build_tiny_pipeline(TinySpec("flux"))
    config = dict(pipe.scheduler.config)
    assert dynamic_mu(config, 256) == pytest.approx(0.5)
    assert dynamic_mu(config, 4096) == pytest.approx(1.15)
    for resolution, tokens in ((32, 4), (1024, 4096)):
        adapter = FluxAdapter(pipe, resolution, torch.device("cpu"))
        assert adapter.image_seq_len == tokens
        assert adapter.schedule.shift == pytest.approx(math.exp(dynamic_mu(config, tokens)))
    with pytest.raises(ValueError, match="multiple of 16"):
        FluxAdapter(pipe, 40, torch.device("cpu"))


def test_flux_few_step_grid_is_what_flux_pipeline_samples(tiny_adapter):
    """The exported pipeline computes mu itself from the latents it packs: its 4-step grid (the
    shipped sigmas) is the training grid."""
    adapter = tiny_adapter("flux")
    pipe = adapter.pipeline_for_export(adapter.denoiser)
    pipe.set_progress_bar_config(disable=True)
    pipe(
        "a handwritten digit four",
        height=adapter.resolution,
        width=adapter.resolution,
        num_inference_steps=4,
        output_type="latent",
        **adapter.sampling_call_kwargs(4),
    )
    want = adapter.generator_timesteps(4)
    assert len(set(want.tolist())) == 4 and want[0] == 1000.0
    torch.testing.assert_close(pipe.scheduler.timesteps.float(), want)


def test_flux_dev_guidance_is_an_input_not_two_passes(tiny_adapter):
    """embedded (dev's auto): a recipe's scale reaches the guidance input in one conditional
    pass; unguided calls (generator, fake score) read the card's default, as the export."""
    adapter = tiny_adapter("flux")
    assert adapter.guidance_mode == "embedded" and adapter.has_guidance_input
    net, calls = adapter.denoiser, []
    x = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([800.0, 300.0])
    cond = adapter.encode(["a handwritten digit one", "a handwritten digit nine"])
    hook = _seen_kwargs(net, calls)
    with torch.no_grad():
        guided = adapter.predict(net, x, t, cond, guidance=4.0)
        per_sample = adapter.predict(net, x, t, cond, guidance=torch.tensor([2.0, 5.0]))
        plain = adapter.predict(net, x, t, cond)
    hook.remove()
    assert len(calls) == 3 and all(c["x"].shape[0] == 2 for c in calls)  # never a CFG batch
    assert calls[0]["guidance"].tolist() == [4.0, 4.0]
    assert calls[1]["guidance"].tolist() == [2.0, 5.0]
    assert calls[2]["guidance"].tolist() == [adapter.embedded_guidance] * 2
    assert calls[0]["guidance"].dtype == torch.float32
    assert not torch.allclose(guided, plain)
    assert adapter.student_guidance_scale() == adapter.embedded_guidance == 3.5  # no card: 3.5
    assert not torch.allclose(per_sample, guided)


def test_flux_true_cfg_keeps_the_guidance_input_fixed(tiny_adapter, monkeypatch):
    adapter = tiny_adapter("flux")
    monkeypatch.setattr(adapter, "guidance_mode", "cfg")
    net = adapter.denoiser
    x = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([700.0, 200.0])
    cond = adapter.encode(["a handwritten digit one", "a handwritten digit nine"])
    with torch.no_grad():
        out_c = adapter.forward(net, x, t, cond.cond)
        out_u = adapter.forward(net, x, t, cond.uncond)
        guided = adapter.predict(net, x, t, cond, guidance=3.0)
    torch.testing.assert_close(guided, out_u + 3.0 * (out_c - out_u), atol=1e-4, rtol=1e-4)


def test_schnell_layout_has_no_guidance_input():
    pipe = build_tiny_pipeline(TinySpec("flux", guidance_embeds=False))
    adapter = FluxAdapter(pipe, 32, torch.device("cpu"))
    assert adapter.guidance_mode == "cfg" and adapter.student_guidance_scale() == 0.0
    with pytest.raises(ConfigError, match="teacher.guidance=embedded"):
        adapter.use_guidance("embedded")
    calls = []
    hook = _seen_kwargs(adapter.denoiser, calls)
    with torch.no_grad():
        adapter.forward(adapter.denoiser, torch.zeros(1, *adapter.latent_shape()),
                        torch.tensor([500.0]), adapter.encode(["a"]).cond)  # fmt: skip
    hook.remove()
    assert calls[0]["guidance"] is None


def test_embedded_guidance_is_refused_by_cfg_families(tiny_adapter):
    with pytest.raises(ConfigError, match="teacher.guidance=embedded: the sd3 family"):
        tiny_adapter("sd3").use_guidance("embedded")


def test_flux_packs_latents_and_rounds_the_timestep_like_its_pipeline(tiny_adapter):
    """bf16: FluxPipeline casts the timestep to the latents' dtype before dividing by 1000
    (733.3 -> 732, then 732 / 1000 in bf16 -> 0.73046875); latents go in 2x2-packed with
    (0, row, column) ids and come back."""
    adapter = tiny_adapter("flux", dtype="bf16")
    net, calls = adapter.denoiser, []
    noise = torch.randn(1, *adapter.latent_shape(), generator=torch.Generator().manual_seed(2))
    packed = adapter.pipeline_latents(noise)
    c, h, w = adapter.latent_shape()
    assert packed.shape == (1, (h // 2) * (w // 2), 4 * c)
    assert torch.equal(adapter.latents_from_pipeline(packed), noise)
    hook = _seen_kwargs(net, calls)
    with torch.no_grad():
        out = adapter.forward(net, noise, torch.tensor([733.3]), adapter.encode(["a"]).cond)
    hook.remove()
    seen = calls[0]
    assert seen["timestep"].dtype == torch.bfloat16 and float(seen["timestep"]) == 0.73046875
    assert seen["x"].shape == packed.shape
    assert seen["img_ids"][:, 0].abs().max() == 0 and seen["img_ids"][-1].tolist() == [0, 1, 1]
    assert out.shape == noise.shape


# ----------------------------------------------------------------------------- text length


def test_a_card_text_length_reaches_training_the_export_its_card_and_evaluation(tmp_path):
    """teacher.max_sequence_length=16: the run encodes 16 T5 tokens, not FLUX's 512; the export
    passes its reload check only if the pipeline is called with them too (FLUX has no text mask,
    so the padding tokens change its output), and distillkit.json, the card's snippet and
    evaluation all carry the length."""
    from diffusers import DiffusionPipeline

    from distillkit.config import TeacherConfig
    from distillkit.evaluation.generate import generate_images
    from distillkit.export import export_student
    from distillkit.export.card import CardInfo, export_sampling_kwargs, render_model_card
    from distillkit.students import trainable_copy
    from distillkit.teachers.load import load_teacher

    cfg = TeacherConfig(
        model_id="tiny", family="flux", resolution=32, dtype="fp32", max_sequence_length=16
    )
    adapter = load_teacher(cfg, torch.device("cpu"), smoke=True)
    prompt = "a handwritten digit two"
    cond = adapter.encode([prompt])
    assert cond.cond["encoder_hidden_states"].shape[1] == 16
    assert cond.uncond["encoder_hidden_states"].shape[1] == 16
    ref = adapter.pipe.encode_prompt(prompt, None, max_sequence_length=16)[0]
    torch.testing.assert_close(cond.cond["encoder_hidden_states"], ref)

    export_student(adapter, trainable_copy(adapter.denoiser, "full"), tmp_path, steps=2)
    pipeline_dir = tmp_path / "pipeline"
    meta = json.loads((pipeline_dir / "distillkit.json").read_text())
    assert meta["calls"]["1"]["max_sequence_length"] == 16
    assert meta["calls"]["2"]["max_sequence_length"] == 16
    assert export_sampling_kwargs(pipeline_dir, 4) == {"max_sequence_length": 16}  # not shipped
    info = CardInfo(
        teacher_id="tiny", teacher_revision=None, family="flux", pipeline_class="FluxPipeline",
        recipe="dmd2", student="full", num_inference_steps=1, guidance_scale=3.5,
        scheduler="FlowMatchEulerDiscreteScheduler", calls=meta["calls"],
    )  # fmt: skip
    assert "max_sequence_length=16" in render_model_card(info)

    pipe = DiffusionPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    lengths, real = [], pipe.encode_prompt

    def spy(*args, **kwargs):
        lengths.append(kwargs.get("max_sequence_length"))
        return real(*args, **kwargs)

    pipe.encode_prompt = spy
    ours = generate_images(pipe, [prompt], steps=1, guidance=3.5, seed=0)
    assert lengths == [16]
    default = generate_images(pipe, [prompt], steps=1, guidance=3.5, seed=0, sampling={})
    assert lengths[-1] == 512
    assert not torch.allclose(torch.as_tensor(ours), torch.as_tensor(default))


def test_a_text_length_is_refused_where_the_pipeline_takes_none():
    from distillkit.config import TeacherConfig
    from distillkit.teachers.load import load_teacher

    cfg = TeacherConfig(model_id="tiny", family="sd15", resolution=32, max_sequence_length=16)
    with pytest.raises(ConfigError, match=r"teacher.max_sequence_length=16: StableDiffusion"):
        load_teacher(cfg, torch.device("cpu"), smoke=True)

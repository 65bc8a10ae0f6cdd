"""Tiny teachers are real diffusers pipelines: they save, reload, generate and never drift."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from distillkit.teachers.tiny import FAMILIES, TinySpec, build_tiny_pipeline, save_tiny_teacher

CLASS_NAMES = {
    "sd15": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sana": "SanaPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}
PROMPT = "a handwritten digit seven"


def _denoiser(pipe: DiffusionPipeline) -> torch.nn.Module:
    return pipe.transformer if hasattr(pipe, "transformer") else pipe.unet


def _models(pipe: DiffusionPipeline) -> dict[str, torch.nn.Module]:
    return {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _call_kwargs(family: str, size: int) -> dict:
    extra = {"use_resolution_binning": False} if family == "sana" else {}
    return dict(
        num_inference_steps=2,
        height=size,
        width=size,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **extra,
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_save_reload_generate(family: str, tmp_path) -> None:
    spec = TinySpec(family)
    out = save_tiny_teacher(spec, tmp_path / family)
    assert out == tmp_path / family
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == CLASS_NAMES[family]
    built = build_tiny_pipeline(spec)
    for name, module in _models(built).items():
        _assert_same_weights(module, getattr(pipe, name))

    pipe.set_progress_bar_config(disable=True)
    images = pipe(PROMPT, **_call_kwargs(family, spec.sample_size)).images
    assert images.shape == (1, spec.sample_size, spec.sample_size, 3)
    assert np.isfinite(images).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_weights(family: str) -> None:
    a, b = build_tiny_pipeline(TinySpec(family)), build_tiny_pipeline(TinySpec(family))
    _assert_same_weights(_denoiser(a), _denoiser(b))
    for name, module in _models(a).items():
        _assert_same_weights(module, getattr(b, name))
    other = _denoiser(build_tiny_pipeline(TinySpec(family, seed=1))).state_dict()
    assert any(not torch.equal(v, other[k]) for k, v in _denoiser(a).state_dict().items())


def test_build_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_pipeline(TinySpec("sd15"))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"family": "sd35"},
        {"family": "flux", "sample_size": 24},  # latent 3: not 2x2-packable
        {"family": "sd15", "vae_downsample": 3},
        {"family": "sd15", "sample_size": 36},
    ],
)
def test_spec_rejects_bad_sizes(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        TinySpec(**kwargs)


def test_clip_tokenizers_give_word_tokens() -> None:
    pipe = build_tiny_pipeline(TinySpec("sdxl"))
    for tok in (pipe.tokenizer, pipe.tokenizer_2):
        tokens = tok.convert_ids_to_tokens(tok(PROMPT).input_ids)
        assert tokens[1:-1] == ["a</w>", "handwritten</w>", "digit</w>", "seven</w>"]
        assert tok.model_max_length == 77
    assert pipe.tokenizer_2.pad_token == "!"  # like the real SDXL tokenizer_2
    # CLIP pools at the eos id: the text configs must agree with the tokenizer.
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id


def test_gemma_tokenizer_bos_and_byte_fallback() -> None:
    tok = build_tiny_pipeline(TinySpec("sana")).tokenizer
    tokens = tok.convert_ids_to_tokens(tok(PROMPT + " café").input_ids)
    assert tokens[:5] == ["<bos>", "a", "▁handwritten", "▁digit", "▁seven"]
    assert "<0xC3>" in tokens and "<unk>" not in tokens


def test_sdxl_conditioning_dims() -> None:
    pipe = build_tiny_pipeline(TinySpec("sdxl"))
    cfg = pipe.unet.config
    proj = pipe.text_encoder_2.config.projection_dim
    assert cfg.addition_embed_type == "text_time"
    assert cfg.projection_class_embeddings_input_dim == 6 * cfg.addition_time_embed_dim + proj
    hidden = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert cfg.cross_attention_dim == hidden
    assert pipe.vae.config.scaling_factor == 0.13025
    assert pipe.config.force_zeros_for_empty_prompt is True


def test_scheduler_configs_match_real_teachers() -> None:
    sd = build_tiny_pipeline(TinySpec("sd15")).scheduler.config
    assert (sd.beta_start, sd.beta_end, sd.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert (sd.steps_offset, sd.set_alpha_to_one, sd.clip_sample) == (1, False, False)
    sana = build_tiny_pipeline(TinySpec("sana")).scheduler.config
    assert (sana.flow_shift, sana.prediction_type, sana.use_flow_sigmas) == (
        3.0,
        "flow_prediction",
        True,
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_vae_downsample_is_configurable(family: str) -> None:
    spec = TinySpec(family, sample_size=16, vae_downsample=2)
    pipe = build_tiny_pipeline(spec)
    assert pipe.vae_scale_factor == 2
    if family != "flux":  # FluxTransformer2DModel has no sample_size: its input is tokens
        assert _denoiser(pipe).config.sample_size == 8


def test_sana_default_binning_is_refused_at_tiny_size() -> None:
    pipe = build_tiny_pipeline(TinySpec("sana"))
    with pytest.raises(ValueError, match="Invalid sample size"):
        pipe(PROMPT, num_inference_steps=1, height=32, width=32, output_type="np")

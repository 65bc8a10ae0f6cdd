"""Tiny MMDiT teachers (SD3, FLUX): the real pipeline, transformer, VAE and text-encoder
classes at toy sizes, built offline under the same per-module seeds as :mod:`tiny`.

The text side keeps the published layout: SD3 has two CLIP encoders with projections (their
pooled outputs concatenated) and T5 (CLIP's hidden states zero-padded to T5's width and
stacked before T5's tokens); FLUX has one CLIP (pooled only) and T5. The VAEs carry the real
scaling and shift factors and, like the real ones, no quant convs.
"""

from __future__ import annotations

from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from distillkit.teachers.tiny import TinySpec, _seeded, _vae_kl
from distillkit.teachers.tiny_text import (
    clip_text_config,
    clip_tokenizer,
    t5_encoder,
    t5_tokenizer,
)

# scheduler_config.json of the published checkpoints
SD35_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_DEV_SCHEDULER = {
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
    "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096,
}  # fmt: skip
_NO_QUANT = {"use_quant_conv": False, "use_post_quant_conv": False}


def _vae_sd3(spec: TinySpec):
    return _vae_kl(spec, scaling_factor=1.5305, shift_factor=0.0609, **_NO_QUANT)


def _vae_flux(spec: TinySpec):
    return _vae_kl(spec, scaling_factor=0.3611, shift_factor=0.1159, **_NO_QUANT)


def _sd3_transformer(spec: TinySpec, joint_dim: int, pooled_dim: int) -> SD3Transformer2DModel:
    """SD3.5 Medium's layout in small: 2x2 patches, RMS qk-norm, dual attention in block 0."""
    inner = spec.dit_heads * spec.dit_head_dim
    return SD3Transformer2DModel(
        sample_size=spec.latent_size,
        patch_size=2,
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        num_layers=max(2, spec.dit_layers),  # the last block is context-pre-only
        attention_head_dim=spec.dit_head_dim,
        num_attention_heads=spec.dit_heads,
        joint_attention_dim=joint_dim,
        caption_projection_dim=inner,
        pooled_projection_dim=pooled_dim,
        pos_embed_max_size=spec.latent_size,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )


def _build_sd3(spec: TinySpec) -> StableDiffusion3Pipeline:
    words = spec.words
    tok, tok_3 = clip_tokenizer(words=words), t5_tokenizer(words)
    tok_2 = clip_tokenizer(pad_token="!", words=words)
    h1, h2, h3, layers = (
        spec.text_hidden,
        2 * spec.text_hidden,
        4 * spec.text_hidden,
        spec.text_layers,
    )
    cfg_1, cfg_2 = clip_text_config(tok, h1, layers), clip_text_config(tok_2, h2, layers, "gelu")
    return StableDiffusion3Pipeline(
        text_encoder=_seeded(spec.seed, 1, lambda: CLIPTextModelWithProjection(cfg_1)),
        text_encoder_2=_seeded(spec.seed, 4, lambda: CLIPTextModelWithProjection(cfg_2)),
        text_encoder_3=_seeded(spec.seed, 5, lambda: t5_encoder(tok_3, h3, layers)),
        transformer=_seeded(spec.seed, 2, lambda: _sd3_transformer(spec, h3, h1 + h2)),
        vae=_seeded(spec.seed, 3, lambda: _vae_sd3(spec)),
        tokenizer=tok,
        tokenizer_2=tok_2,
        tokenizer_3=tok_3,
        scheduler=FlowMatchEulerDiscreteScheduler(**SD35_SCHEDULER),
    )


def _flux_transformer(spec: TinySpec, joint_dim: int, pooled_dim: int) -> FluxTransformer2DModel:
    """FLUX.1's layout in small: 2x2-packed latents in, double- then single-stream blocks, 3-axis
    RoPE over (text, row, column) ids summing to the head width, the guidance input (dev)."""
    third = spec.dit_head_dim * 7 // 16 // 2 * 2  # even axes: FLUX.1 splits 128 as 16 / 56 / 56
    axes = (spec.dit_head_dim - 2 * third, third, third)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * spec.latent_channels,
        num_layers=spec.dit_layers,
        num_single_layers=spec.dit_layers,
        attention_head_dim=spec.dit_head_dim,
        num_attention_heads=spec.dit_heads,
        joint_attention_dim=joint_dim,
        pooled_projection_dim=pooled_dim,
        guidance_embeds=spec.guidance_embeds,
        axes_dims_rope=axes,
    )


def _build_flux(spec: TinySpec) -> FluxPipeline:
    tok, tok_2 = clip_tokenizer(words=spec.words), t5_tokenizer(spec.words)
    h1, h2, layers = spec.text_hidden, 4 * spec.text_hidden, spec.text_layers
    cfg_1 = clip_text_config(tok, h1, layers)
    return FluxPipeline(
        text_encoder=_seeded(spec.seed, 1, lambda: CLIPTextModel(cfg_1)),
        text_encoder_2=_seeded(spec.seed, 4, lambda: t5_encoder(tok_2, h2, layers)),
        transformer=_seeded(spec.seed, 2, lambda: _flux_transformer(spec, h2, h1)),
        vae=_seeded(spec.seed, 3, lambda: _vae_flux(spec)),
        tokenizer=tok,
        tokenizer_2=tok_2,
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER),
    )


BUILDERS = {"sd3": _build_sd3, "flux": _build_flux}

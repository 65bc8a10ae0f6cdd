"""Tiny Z-Image teacher: ZImagePipeline with its real classes at toy sizes, built offline under
the per-module seeds of :mod:`tiny` (text encoder 1, transformer 2, VAE 3).

The published layout in small: a Qwen3 text encoder whose second-to-last hidden states are the
caption features, the single-stream transformer (2x2 patches, noise and context refiners before
the joint layers, 3-axis RoPE summing to the head width, qk RMS norm), the FLUX.1 VAE's scaling
and shift, and a fixed-shift FlowMatchEulerDiscreteScheduler.
"""

from __future__ import annotations

from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

from distillkit.teachers.tiny import TinySpec, _seeded
from distillkit.teachers.tiny_mmdit import _vae_flux
from distillkit.teachers.tiny_text import qwen3_model, qwen_tokenizer

# scheduler/scheduler_config.json of Tongyi-MAI/Z-Image (the base model; Z-Image-Turbo's has
# shift 3.0), as a third-party copy of the Hub files gives it: not checked against the Hub here
Z_IMAGE_SCHEDULER = {"num_train_timesteps": 1000, "shift": 6.0, "use_dynamic_shifting": False}


def _transformer(spec: TinySpec, caption_dim: int) -> ZImageTransformer2DModel:
    """Z-Image's head split in small: 128 = 32 + 48 + 48 over (caption/frame, row, column)."""
    side = spec.dit_head_dim * 3 // 8 // 2 * 2  # even axes (RoPE rotates pairs)
    return ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=spec.latent_channels,
        dim=spec.dit_heads * spec.dit_head_dim,
        n_layers=spec.dit_layers,
        n_refiner_layers=1,
        n_heads=spec.dit_heads,
        n_kv_heads=spec.dit_heads,
        qk_norm=True,
        cap_feat_dim=caption_dim,
        axes_dims=[spec.dit_head_dim - 2 * side, side, side],
    )


def build_zimage(spec: TinySpec) -> ZImagePipeline:
    tok, hidden = qwen_tokenizer(spec.words), spec.text_hidden
    return ZImagePipeline(
        text_encoder=_seeded(spec.seed, 1, lambda: qwen3_model(tok, hidden, spec.text_layers)),
        tokenizer=tok,
        transformer=_seeded(spec.seed, 2, lambda: _transformer(spec, hidden)),
        vae=_seeded(spec.seed, 3, lambda: _vae_flux(spec)),
        scheduler=FlowMatchEulerDiscreteScheduler(**Z_IMAGE_SCHEDULER),
    )

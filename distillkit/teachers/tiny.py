"""Tiny, randomly initialised diffusers teachers of the real families, built offline.

Why: tests and ``--smoke`` runs must exercise the real diffusers classes (tokenizers, text
encoders, VAE, denoiser, scheduler config) without a Hub download or a GPU. Every module is
created under its own fixed seed, so one ``TinySpec`` always gives the same weights.

Calling the saved pipelines at small sizes:

- ``sd15`` / ``sdxl``: ``pipe("a cat", num_inference_steps=2, height=S, width=S)``; the
  default height/width are ``unet.config.sample_size * vae_scale_factor`` = ``spec.sample_size``.
- ``sana``: pass ``use_resolution_binning=False`` and an explicit ``height``/``width``. With
  binning on, SanaPipeline only accepts a transformer ``sample_size`` of 16/32/64/128 and snaps
  the size to its 512-4096 px tables; our ``sample_size`` is the latent size (like the real
  one), so a default call raises ``ValueError("Invalid sample size")`` instead of silently
  rendering 1024 px. The default ``complex_human_instruction`` (~900 tokens with our mostly
  character-level Gemma tokenizer) is prepended to every prompt; ``model_max_length`` and
  Gemma's ``max_position_embeddings`` (2048) cover it plus ``max_sequence_length=300``.
- ``zimage``: pass an explicit ``height``/``width`` (ZImagePipeline defaults to 1024 px; its
  transformer has no ``sample_size``); ``guidance_scale=s`` is CFG w = s + 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    SanaPipeline,
    SanaTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from distillkit.teachers.tiny_text import (
    clip_text_config,
    clip_tokenizer,
    gemma_model,
    gemma_tokenizer,
)

FAMILIES = ("sd15", "sdxl", "sana", "sd3", "flux")  # those with digits teachers (`teach`)
SMOKE_ONLY = ("zimage",)  # tiny teachers for --smoke and tests, no digits teacher yet
UNET_FAMILIES = ("sd15", "sdxl")
# 2x2 latent patches (SD3 and Z-Image patchify, FLUX packs)
PATCH_FAMILIES = ("sd3", "flux", "zimage")
M = TypeVar("M", bound=torch.nn.Module)

# Scheduler values of the real SD1.5 / SDXL checkpoints (scheduler_config.json).
_SD_SCHEDULER = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "steps_offset": 1,
    "set_alpha_to_one": False, "clip_sample": False, "timestep_spacing": "leading",
}  # fmt: skip


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the tiny architectures; defaults give a fast smoke teacher at 32-64 px."""

    family: str
    sample_size: int = 32  # image resolution in pixels
    vae_downsample: int = 8  # 8 like real SD; power of 2 >= 1 (for sana, the DC-AE compression)
    latent_channels: int = 4  # real DC-AE uses 32; 4 keeps the tiny one small
    block_out_channels: tuple[int, ...] = (32, 64)  # UNet widths (sd15, sdxl)
    text_hidden: int = 32  # text encoder width; sdxl's second encoder is twice as wide
    seed: int = 0
    layers_per_block: int = 1
    attention_head_dim: int = 8  # UNet heads per attention (diffusers' legacy name)
    text_layers: int = 2  # >= 2: SDXL reads hidden_states[-2]
    vae_channels: int = 16  # width of every VAE block
    addition_time_embed_dim: int = 8  # sdxl micro-conditioning (real: 256)
    dit_heads: int = 2  # transformer families (sana, sd3, flux, zimage)
    dit_head_dim: int = 8
    dit_layers: int = 1
    guidance_embeds: bool = True  # flux: FLUX.1-dev's guidance input (False: schnell's layout)
    # whole-word tokens beyond tiny_text.WORDS (compositional digits: colour and place words).
    # Out of the repr, so the older specs' cache keys stay; a spec that sets it keys it itself
    words: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        known = FAMILIES + SMOKE_ONLY
        if self.family not in known:
            raise ValueError(f"family must be one of {known}, got {self.family!r}")
        d = self.vae_downsample
        if d < 1 or d & (d - 1):
            raise ValueError(f"vae_downsample must be a power of 2 >= 1, got {d}")
        if self.sample_size % d:
            raise ValueError(f"sample_size {self.sample_size} not divisible by {d}")
        unet_factor = 2 ** (len(self.block_out_channels) - 1)
        if self.family in PATCH_FAMILIES and self.latent_size % 2:
            raise ValueError(f"latent size {self.latent_size} must be even (2x2 patches)")
        if self.family in UNET_FAMILIES and self.latent_size % unet_factor:
            raise ValueError(f"latent size {self.latent_size} not divisible by {unet_factor}")

    @property
    def latent_size(self) -> int:
        return self.sample_size // self.vae_downsample


def _seeded(seed: int, index: int, build: Callable[[], M]) -> M:
    """Build one module under its own seed, leaving the caller's global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + index)
        return build().eval()


def _sd15_scheduler() -> PNDMScheduler:
    return PNDMScheduler.from_config({**_SD_SCHEDULER, "skip_prk_steps": True})


def _sdxl_scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler.from_config({**_SD_SCHEDULER, "interpolation_type": "linear"})


def _sana_scheduler() -> DPMSolverMultistepScheduler:
    """SANA's flow-matching DPM-Solver++ (flow_shift 3, as the released 1024 px pipelines)."""
    return DPMSolverMultistepScheduler(
        flow_shift=3.0, prediction_type="flow_prediction", use_flow_sigmas=True
    )


def _unet(spec: TinySpec, sdxl: bool, cross_dim: int, pooled_dim: int = 0) -> UNet2DConditionModel:
    """SD1.5 layout: cross-attention in all but the last level; SDXL: in all but the first."""
    n = len(spec.block_out_channels)
    if sdxl:
        down = ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (n - 1)
        up = ["CrossAttnUpBlock2D"] * (n - 1) + ["UpBlock2D"]
        extra = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=spec.addition_time_embed_dim,
            # 6 micro-conditioning ids (original size, crop, target size) + pooled text
            projection_class_embeddings_input_dim=6 * spec.addition_time_embed_dim + pooled_dim,
            use_linear_projection=True,
        )
    else:
        down = ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"]
        up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1)
        extra = {}
    return UNet2DConditionModel(
        sample_size=spec.latent_size,
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        block_out_channels=spec.block_out_channels,
        layers_per_block=spec.layers_per_block,
        norm_num_groups=math.gcd(32, *spec.block_out_channels),
        cross_attention_dim=cross_dim,
        attention_head_dim=spec.attention_head_dim,
        **extra,
    )


def _vae_kl(spec: TinySpec, scaling_factor: float, **extra) -> AutoencoderKL:
    n = int(math.log2(spec.vae_downsample)) + 1  # each block but the last halves the size
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=(spec.vae_channels,) * n,
        layers_per_block=1,
        norm_num_groups=math.gcd(32, spec.vae_channels),
        latent_channels=spec.latent_channels,
        sample_size=spec.sample_size,
        scaling_factor=scaling_factor,
        **extra,
    )


def _build_sd15(spec: TinySpec) -> StableDiffusionPipeline:
    tok, h = clip_tokenizer(words=spec.words), spec.text_hidden
    text_cfg = clip_text_config(tok, h, spec.text_layers)
    return StableDiffusionPipeline(
        text_encoder=_seeded(spec.seed, 1, lambda: CLIPTextModel(text_cfg)),
        unet=_seeded(spec.seed, 2, lambda: _unet(spec, sdxl=False, cross_dim=h)),
        vae=_seeded(spec.seed, 3, lambda: _vae_kl(spec, scaling_factor=0.18215)),
        tokenizer=tok,
        scheduler=_sd15_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl(spec: TinySpec) -> StableDiffusionXLPipeline:
    tok = clip_tokenizer(words=spec.words)
    tok_2 = clip_tokenizer(pad_token="!", words=spec.words)  # real tokenizer_2 pads "!"
    h1, h2 = spec.text_hidden, 2 * spec.text_hidden
    layers = spec.text_layers
    cfg_1 = clip_text_config(tok, h1, layers)
    cfg_2 = clip_text_config(tok_2, h2, layers, act="gelu")
    return StableDiffusionXLPipeline(
        text_encoder=_seeded(spec.seed, 1, lambda: CLIPTextModel(cfg_1)),
        text_encoder_2=_seeded(spec.seed, 4, lambda: CLIPTextModelWithProjection(cfg_2)),
        unet=_seeded(spec.seed, 2, lambda: _unet(spec, True, cross_dim=h1 + h2, pooled_dim=h2)),
        vae=_seeded(spec.seed, 3, lambda: _vae_kl(spec, scaling_factor=0.13025)),
        tokenizer=tok,
        tokenizer_2=tok_2,
        scheduler=_sdxl_scheduler(),
        force_zeros_for_empty_prompt=True,
    )


def _sana_transformer(spec: TinySpec) -> SanaTransformer2DModel:
    return SanaTransformer2DModel(
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        num_attention_heads=spec.dit_heads,
        attention_head_dim=spec.dit_head_dim,
        num_layers=spec.dit_layers,
        num_cross_attention_heads=spec.dit_heads,
        cross_attention_head_dim=spec.dit_head_dim,
        cross_attention_dim=spec.dit_heads * spec.dit_head_dim,
        caption_channels=spec.text_hidden,
        sample_size=spec.latent_size,  # latent size, as in the real config (32 for 1024 px)
        patch_size=1,
    )


def _vae_dc(spec: TinySpec) -> AutoencoderDC:
    n = int(math.log2(spec.vae_downsample)) + 1
    width = math.lcm(spec.vae_channels, spec.latent_channels)  # shortcuts group channels
    return AutoencoderDC(
        latent_channels=spec.latent_channels,
        attention_head_dim=8,
        encoder_block_types="ResBlock",
        decoder_block_types="ResBlock",
        encoder_block_out_channels=(width,) * n,
        decoder_block_out_channels=(width,) * n,
        encoder_layers_per_block=(1,) * n,
        decoder_layers_per_block=(1,) * n,
        encoder_qkv_multiscales=((),) * n,
        decoder_qkv_multiscales=((),) * n,
        scaling_factor=0.41407,  # real SANA DC-AE f32c32
    )


def _build_sana(spec: TinySpec) -> SanaPipeline:
    tok, h = gemma_tokenizer(spec.words), spec.text_hidden
    return SanaPipeline(
        tokenizer=tok,
        text_encoder=_seeded(spec.seed, 1, lambda: gemma_model(tok, h, spec.text_layers)),
        transformer=_seeded(spec.seed, 2, lambda: _sana_transformer(spec)),
        vae=_seeded(spec.seed, 3, lambda: _vae_dc(spec)),
        scheduler=_sana_scheduler(),
    )


_BUILDERS = {"sd15": _build_sd15, "sdxl": _build_sdxl, "sana": _build_sana}


def build_tiny_pipeline(spec: TinySpec) -> DiffusionPipeline:
    """Build the family's diffusers pipeline with tiny random weights (same seed, same weights)."""
    if spec.family == "zimage":
        from distillkit.teachers.tiny_zimage import build_zimage  # builds on this module's parts

        return build_zimage(spec)
    if spec.family in PATCH_FAMILIES:
        from distillkit.teachers.tiny_mmdit import BUILDERS  # they build on this module's parts

        return BUILDERS[spec.family](spec)
    return _BUILDERS[spec.family](spec)


def save_tiny_teacher(spec: TinySpec, out_dir: Path) -> Path:
    """Write a tiny teacher that ``DiffusionPipeline.from_pretrained(out_dir)`` reloads."""
    out_dir = Path(out_dir)
    build_tiny_pipeline(spec).save_pretrained(out_dir, safe_serialization=True)
    return out_dir

"""Generate images from an exported diffusers pipeline directory, the way a user would.

Evaluation reads exported pipelines only (never training-time objects), so a score always
describes what `DiffusionPipeline.from_pretrained(dir)` gives. Family differences are handled
through generic call arguments found in the pipeline's `__call__` signature, not class names.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from distillkit.errors import ConfigError

# Denoiser components whose config.sample_size is the latent size (UNets, DiTs).
_DENOISERS = ("unet", "transformer")
_CARD_STEPS = re.compile(r"num_inference_steps=(\d+)")
_CARD_GUIDANCE = re.compile(r"guidance_scale=([0-9]+(?:\.[0-9]*)?)")


def load_pipeline(
    pipeline_dir: Path | str, *, device: str | torch.device | None = None
) -> DiffusionPipeline:
    """Plain `from_pretrained` (safetensors only), progress bar off, in eval mode."""
    path = Path(pipeline_dir)
    if not (path / "model_index.json").is_file():
        raise ConfigError(
            f"{path} is not a diffusers pipeline directory (no model_index.json); "
            "pass the `pipeline/` folder of an export or a dir written by save_pretrained"
        )
    try:
        pipe = DiffusionPipeline.from_pretrained(
            str(path), use_safetensors=True, torch_dtype=torch.float32
        )
    except (OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"could not load the pipeline in {path}: {first}") from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def default_resolution(pipe: DiffusionPipeline) -> int:
    """Pixel size the pipeline was built for: denoiser sample_size (latent) x VAE factor."""
    for name in _DENOISERS:
        net = getattr(pipe, name, None)
        size = getattr(getattr(net, "config", None), "sample_size", None)
        if size is not None:
            size = size[0] if isinstance(size, (list, tuple)) else size
            return int(size) * int(getattr(pipe, "vae_scale_factor", 1))
    raise ConfigError(
        f"{type(pipe).__name__} has no unet/transformer with a sample_size; pass a resolution"
    )


def call_kwargs(pipe: DiffusionPipeline, resolution: int) -> dict:
    """Size arguments every family accepts, plus switches only some pipelines have.

    SanaPipeline bins sizes to its 512-4096 px tables unless `use_resolution_binning=False`,
    and defaults to 1024 px, so height/width are always explicit.
    """
    params = inspect.signature(pipe.__call__).parameters
    kwargs: dict = {}
    if "height" in params and "width" in params:
        kwargs.update(height=resolution, width=resolution)
    if "use_resolution_binning" in params:
        kwargs["use_resolution_binning"] = False
    return kwargs


def export_call_defaults(pipeline_dir: Path | str) -> dict[str, float | int]:
    """Steps and guidance a distillkit export tells users to call it with (its README card).

    Returns {} for a folder without a distillkit card (e.g. a teacher): the caller must choose.
    """
    card = Path(pipeline_dir) / "README.md"
    if not card.is_file():
        return {}
    text = card.read_text(encoding="utf-8", errors="replace")
    if "distillkit" not in text:
        return {}
    out: dict[str, float | int] = {}
    if m := _CARD_STEPS.search(text):
        out["num_inference_steps"] = int(m.group(1))
    if m := _CARD_GUIDANCE.search(text):
        out["guidance_scale"] = float(m.group(1))
    return out


@torch.no_grad()
def generate_images(
    pipe: DiffusionPipeline,
    prompts: list[str],
    *,
    steps: int,
    guidance: float,
    seed: int,
    batch_size: int = 100,
    resolution: int | None = None,
) -> torch.Tensor:
    """(N, 3, H, W) float32 images in [-1, 1], one CPU generator per batch (seed + batch index).

    The generator (not pre-made latents) is passed so that stochastic multi-step schedulers
    (LCM re-noising) draw from it too: the same seed gives the same images on any device.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    resolution = resolution or default_resolution(pipe)
    extra = call_kwargs(pipe, resolution)
    out = []
    for index, start in enumerate(range(0, len(prompts), batch_size)):
        generator = torch.Generator("cpu").manual_seed(seed + index)
        result = pipe(
            prompt=list(prompts[start : start + batch_size]),
            num_inference_steps=steps,
            guidance_scale=float(guidance),
            generator=generator,
            output_type="pt",
            **extra,
        )
        images = result.images if hasattr(result, "images") else result[0]
        out.append(images.detach().float().cpu() * 2.0 - 1.0)
    if not out:
        return torch.empty(0, 3, resolution, resolution)
    return torch.cat(out).clamp(-1.0, 1.0)

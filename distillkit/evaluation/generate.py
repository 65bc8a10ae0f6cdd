"""Generate images from an exported diffusers pipeline directory, the way a user would.

Evaluation reads exported pipelines only (never training-time objects), so a score always
describes what `DiffusionPipeline.from_pretrained(dir)` gives. Family differences are handled
through generic call arguments found in the pipeline's `__call__` signature, not class names.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from distillkit.errors import ConfigError
from distillkit.export.card import export_resolution, export_sampling_kwargs

# Denoiser components whose config.sample_size is the latent size (UNets, DiTs).
_DENOISERS = ("unet", "transformer")


def load_pipeline(
    pipeline_dir: Path | str,
    *,
    device: str | torch.device | None = None,
    cache_text: bool = True,
) -> DiffusionPipeline:
    """Plain `from_pretrained` (safetensors only), progress bar off; text encodings memoized.

    Benchmarks repeat a few dozen prompts thousands of times: SanaPipeline's ~1,200-token
    instruction prefix made text encoding 99% of a tiny SANA's sampling time.
    """
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
    if cache_text:
        for name, module in pipe.components.items():
            if name.startswith("text_encoder") and isinstance(module, torch.nn.Module):
                memoize_rows(module)
    return pipe


def _is_tensors(value) -> bool:
    return isinstance(value, torch.Tensor) or (
        isinstance(value, tuple) and all(isinstance(v, torch.Tensor) for v in value)
    )


def _rows(value, index: slice):
    """One model-output field (a tensor or a tuple of tensors) sliced along the batch."""
    return value[index] if isinstance(value, torch.Tensor) else tuple(v[index] for v in value)


def _cat(values: list):
    if isinstance(values[0], torch.Tensor):
        return torch.cat(values)
    return tuple(torch.cat(parts) for parts in zip(*values))


def memoize_rows(encoder: torch.nn.Module, max_rows: int = 4096) -> None:
    """Cache ``encoder(input_ids, attention_mask=..., **flags)`` per batch row.

    An eval-mode text encoder maps each (padded) row independently, so rows already seen are
    reused and only new ones are encoded. Outputs keep their class; fields that are not tensors
    (e.g. a KV cache) are dropped. Any other call pattern goes straight to the encoder.
    """
    if hasattr(encoder, "_distillkit_rows"):
        return
    forward, store = encoder.forward, {}
    encoder._distillkit_rows = store

    def cached(*args, **kwargs):
        ids = args[0] if len(args) == 1 else kwargs.get("input_ids")
        mask = kwargs.get("attention_mask")
        extra = {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask")}
        plain = all(isinstance(v, bool | int | str | None) for v in extra.values())
        if (
            encoder.training
            or len(args) > 1
            or not isinstance(ids, torch.Tensor)
            or ids.ndim != 2
            or extra.get("return_dict") is False
            or not plain
        ):
            return forward(*args, **kwargs)
        flags = tuple(sorted(extra.items()))
        ids_np = ids.cpu().numpy()
        mask_np = None if mask is None else mask.cpu().numpy()
        keys = [
            (flags, ids_np[i].tobytes(), None if mask_np is None else mask_np[i].tobytes())
            for i in range(len(ids_np))
        ]
        if len(store) > max_rows:
            store.clear()
        todo: dict = {}
        for i, key in enumerate(keys):
            if key not in store and key not in todo:
                todo[key] = i
        if todo:
            index = torch.tensor(list(todo.values()), device=ids.device)
            out = forward(ids[index], attention_mask=None if mask is None else mask[index], **extra)
            fields = {n: v for n, v in out.items() if _is_tensors(v)}
            for j, key in enumerate(todo):
                store[key] = (type(out), {n: _rows(v, slice(j, j + 1)) for n, v in fields.items()})
        cls, first = store[keys[0]]
        return cls(**{n: _cat([store[k][1][n] for k in keys]) for n in first})

    encoder.forward = cached


def default_resolution(pipe: DiffusionPipeline) -> int:
    """Pixel size the pipeline was built for: denoiser sample_size (latent) x VAE factor; where
    the denoiser has none (FLUX), the resolution a distillkit export was trained at (its
    distillkit.json), else the pipeline's own default_sample_size x VAE factor."""
    factor = int(getattr(pipe, "vae_scale_factor", 1))
    for name in _DENOISERS:
        net = getattr(pipe, name, None)
        size = getattr(getattr(net, "config", None), "sample_size", None)
        if size is not None:
            size = size[0] if isinstance(size, (list, tuple)) else size
            return int(size) * factor
    trained = export_resolution(getattr(pipe, "name_or_path", None) or "")
    if trained:
        return trained
    if getattr(pipe, "default_sample_size", None):
        return int(pipe.default_sample_size) * factor
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
    sampling: dict | None = None,
) -> torch.Tensor:
    """(N, 3, H, W) float32 images in [-1, 1], one CPU generator per batch (seed + batch index).

    The generator (not pre-made latents) is passed so that stochastic multi-step schedulers
    (LCM re-noising) draw from it too: the same seed gives the same images on any device.
    ``sampling``: extra call arguments; by default those a distillkit export stores for
    ``steps`` (its distillkit.json), so few-step students sample the grid they learnt.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    resolution = resolution or default_resolution(pipe)
    if sampling is None:  # a distillkit export: its own grid at this step count (SANA sigmas)
        sampling = export_sampling_kwargs(getattr(pipe, "name_or_path", None) or "", steps)
    extra = {**call_kwargs(pipe, resolution), **sampling}
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

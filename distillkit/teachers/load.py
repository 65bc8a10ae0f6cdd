"""Load a teacher pipeline (Hub id, local directory, or a tiny same-family stand-in for --smoke)."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from distillkit.config import TeacherConfig
from distillkit.errors import ConfigError
from distillkit.registry import get_family, resolve_source
from distillkit.teachers.base import TeacherAdapter
from distillkit.teachers.loras import apply_teacher_loras

SMOKE_RESOLUTION = 32  # the tiny stand-in teachers run at 32 px: a whole --smoke in seconds
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cache_root() -> Path:
    root = os.environ.get("DISTILLKIT_CACHE") or Path.home() / ".cache" / "distillkit"
    return Path(root)


def checked_text_length(pipe: DiffusionPipeline, length: int | None) -> int | None:
    """teacher.max_sequence_length, refused where the pipeline has no such call argument."""
    takes = inspect.signature(type(pipe).__call__).parameters
    if length is not None and "max_sequence_length" not in takes:
        raise ConfigError(
            f"teacher.max_sequence_length={length}: {type(pipe).__name__} takes no "
            "max_sequence_length (its CLIP text encoders read a fixed 77 tokens); remove it"
        )
    return length


def resolve_dtype(name: str, device: torch.device, smoke: bool = False) -> torch.dtype:
    """``auto`` is bf16 on CUDA, and under ``--smoke`` on any device: a smoke run computes in the
    dtypes the GPU run will use (PyTorch runs bf16 and fp16 on a CPU, slowly). A real CPU run
    keeps fp32 for ``auto``; an explicit dtype is honoured everywhere."""
    if name == "auto":
        return torch.bfloat16 if (device.type == "cuda" or smoke) else torch.float32
    return DTYPES[name]


def tiny_teacher_dir(family: str, resolution: int) -> Path:
    """Build (once) and save a tiny random teacher of ``family``; reused across runs."""
    from distillkit.teachers.tiny import TinySpec, save_tiny_teacher

    spec = TinySpec(family=family, sample_size=resolution)
    key = hashlib.sha256(json.dumps(repr(spec)).encode()).hexdigest()[:12]
    out = cache_root() / "tiny" / f"{family}-{key}"
    if not (out / "model_index.json").is_file():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        save_tiny_teacher(spec, tmp)
        tmp.replace(out) if not out.exists() else None
    return out


def _from_pretrained(cfg: TeacherConfig, source: str, dtype: torch.dtype) -> DiffusionPipeline:
    source = resolve_source(source)  # e.g. "digits:sd15": our digits teachers, trained once
    local = Path(source).expanduser()
    looks_local = source.startswith((".", "/", "~")) or local.exists()
    if looks_local and not (local / "model_index.json").is_file():
        raise ConfigError(
            f"teacher.model_id: {source} is not a diffusers pipeline directory "
            "(no model_index.json); give a Hub id or a folder saved with save_pretrained"
        )
    # True: safetensors only. The opt-out means "allow pickle where that is all there is" (None),
    # not "pickle only", since transformers 5 writes text encoders as safetensors regardless.
    kwargs = {"torch_dtype": dtype, "use_safetensors": True if cfg.use_safetensors else None}
    if cfg.variant:
        kwargs["variant"] = cfg.variant
    if cfg.trust_remote_code:
        kwargs["trust_remote_code"] = True
    try:
        return DiffusionPipeline.from_pretrained(
            str(local) if looks_local else source, revision=cfg.revision, **kwargs
        )
    except OSError as err:
        text = str(err)
        if "safetensors" in text.lower() and cfg.use_safetensors:
            raise ConfigError(
                f"teacher.model_id: {source} has no safetensors weights. Pickle weights can run "
                "code when loaded; if you trust this source set teacher.use_safetensors=false"
            ) from None
        raise ConfigError(
            f"teacher.model_id: could not load {source!r}"
            f"{' at revision ' + cfg.revision if cfg.revision else ''}: {text.splitlines()[0]}"
            " (offline? check the id, the revision, and HF_HUB_OFFLINE / your network)"
        ) from None


def load_teacher(cfg: TeacherConfig, device: torch.device, smoke: bool = False) -> TeacherAdapter:
    """The adapter of ``cfg.family`` around the loaded pipeline (frozen, on ``device``)."""
    cfg.require()
    family = get_family(cfg.family)
    dtype = resolve_dtype(cfg.dtype, device, smoke)
    if smoke:
        resolution = SMOKE_RESOLUTION
        source = str(tiny_teacher_dir(cfg.family, resolution))
        pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=dtype)
    else:
        resolution, source = cfg.resolution, cfg.model_id
        pipe = _from_pretrained(cfg, cfg.model_id, dtype)
    if type(pipe).__name__ != family.pipeline_class:
        raise ConfigError(
            f"teacher.family={cfg.family!r} expects a {family.pipeline_class}, but "
            f"{cfg.model_id} is a {type(pipe).__name__}; fix teacher.family or teacher.model_id"
        )
    attr = family.denoiser_attr
    denoiser_class = type(getattr(pipe, attr))

    def reload_base() -> torch.nn.Module:
        """The denoiser as published (the run's own copy has the LoRAs fused in)."""
        kwargs = {} if smoke else {"revision": cfg.revision, "variant": cfg.variant}
        path = os.path.expanduser(resolve_source(source))
        return denoiser_class.from_pretrained(path, subfolder=attr, torch_dtype=dtype, **kwargs)

    loras = apply_teacher_loras(pipe, cfg, attr, reload_base, smoke)
    try:
        adapter = family(pipe, resolution, device)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    adapter.loras = loras
    adapter.default_guidance = cfg.default_guidance
    adapter.max_sequence_length = checked_text_length(pipe, cfg.max_sequence_length)
    adapter.use_guidance(cfg.guidance)
    return adapter

"""Real-size teachers with random weights: the published architectures as diffusers pipelines.

Why: no pretrained weights can be downloaded where distillkit is tested, yet memory, speed and
the export path only show their real behaviour at the real sizes (an 860M-parameter UNet, a
Gemma2-2B text encoder, sharded safetensors). The component configs are the shipped ones in
``teachers/configs/<card>/`` (the same files ``distillkit plan`` reads); tokenizers and
schedulers come from ``tiny.py`` (a small vocabulary indexes the real-size embedding tables).

Each network is built on its own under a fixed seed directly in the target dtype and device
(no fp32 copy: SANA's text encoder alone is 5 GiB in bf16), saved with its own
``save_pretrained`` as ``DiffusionPipeline.save_pretrained`` would call it, and freed before
the next one is built. ``model_index.json`` is written from the same pipeline assembled on the
meta device, so ``DiffusionPipeline.from_pretrained(out_dir)`` loads the result.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
from diffusers import (
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    SanaPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from torch import nn

from distillkit.errors import ConfigError
from distillkit.plan_arch import CONFIGS, instantiate, read_config
from distillkit.teachers.tiny import (
    _sana_scheduler,
    _sd15_scheduler,
    _sdxl_scheduler,
    _seeded,
)
from distillkit.teachers.tiny_mmdit import FLUX_DEV_SCHEDULER, SD35_SCHEDULER
from distillkit.teachers.tiny_text import clip_tokenizer, gemma_tokenizer, t5_tokenizer

CARDS = CONFIGS.parent  # teachers/<card>.yaml beside teachers/configs/<card>/
MARKER = "distillkit_realsize.json"  # written last: a directory without it is incomplete
# the seed index of each network (tiny.py's order, so the families share a convention)
SEED_INDEX = {"text_encoder": 1, "unet": 2, "transformer": 2, "vae": 3, "text_encoder_2": 4}
SEED_INDEX["text_encoder_3"] = 5
PIPELINES = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
PIPELINES.update(sana=SanaPipeline, sd3=StableDiffusion3Pipeline, flux=FluxPipeline)


def card_family(card: str) -> str:
    """``teachers/<card>.yaml``'s family (sd15 / sdxl / sana / sd3 / flux)."""
    path = CARDS / f"{card}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CARDS.glob("*.yaml"))
        raise ConfigError(f"realsize: no teacher card {path}; known cards: {known}")
    return yaml.safe_load(path.read_text())["family"]


def _extras(family: str) -> dict:
    """The pipeline's non-network components (tokenizers, scheduler, flags)."""
    if family == "sd15":
        return {
            "tokenizer": clip_tokenizer(),
            "scheduler": _sd15_scheduler(),
            "safety_checker": None,
            "feature_extractor": None,
            "requires_safety_checker": False,
        }
    if family == "sdxl":
        return {
            "tokenizer": clip_tokenizer(),
            "tokenizer_2": clip_tokenizer(pad_token="!"),  # the real tokenizer_2 pads with "!"
            "scheduler": _sdxl_scheduler(),
            "force_zeros_for_empty_prompt": True,
        }
    if family == "sd3":
        return {
            "tokenizer": clip_tokenizer(),
            "tokenizer_2": clip_tokenizer(pad_token="!"),
            "tokenizer_3": t5_tokenizer(),
            "scheduler": FlowMatchEulerDiscreteScheduler(**SD35_SCHEDULER),
        }
    if family == "flux":
        return {
            "tokenizer": clip_tokenizer(),
            "tokenizer_2": t5_tokenizer(),
            "scheduler": FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER),
        }
    return {"tokenizer": gemma_tokenizer(), "scheduler": _sana_scheduler()}


@contextlib.contextmanager
def _materialise_in(dtype: torch.dtype, device: torch.device | str) -> Iterator[None]:
    """New parameters are created in ``dtype`` on ``device`` (the constructors' own random
    init runs there: one copy, in the target dtype)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_component(
    folder: Path,
    name: str,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> nn.Module:
    """One network of ``folder/config.json`` with seeded random weights in ``dtype``."""
    cfg = read_config(folder)
    with _materialise_in(dtype, device):
        module = _seeded(seed, SEED_INDEX.get(name, 9), lambda: instantiate(cfg))
    if any(p.dtype != dtype for p in module.parameters() if p.is_floating_point()):
        module.to(dtype=dtype)  # only where a constructor forced a dtype of its own
    return module


def component_names(card: str, configs: Path = CONFIGS) -> list[str]:
    root = configs / card
    names = sorted(p.parent.name for p in root.glob("*/config.json"))
    if not names:
        raise ConfigError(f"realsize: {root} holds no <component>/config.json")
    return names


def realsize_pipeline(
    card: str,
    *,
    device: torch.device | str = "meta",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    configs: Path = CONFIGS,
) -> DiffusionPipeline:
    """The whole pipeline of ``card``; on the meta device (the default) it holds no memory and
    gives the pipeline's structure and configs: what ``model_index.json`` is written from."""
    family = card_family(card)
    nets = {
        name: build_component(configs / card / name, name, dtype=dtype, device=device, seed=seed)
        for name in component_names(card, configs)
    }
    return PIPELINES[family](**nets, **_extras(family))


def save_realsize_teacher(
    card: str,
    out_dir: Path,
    dtype: torch.dtype = torch.bfloat16,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    configs: Path = CONFIGS,
) -> Path:
    """Write the real-size random teacher of ``card`` (e.g. ``sd15``, ``sdxl_base``,
    ``sana_1600m_1024``) to ``out_dir``, one network in memory at a time. Reuses an existing
    complete directory built with the same settings."""
    out_dir = Path(out_dir)
    spec = {"card": card, "dtype": str(dtype).removeprefix("torch."), "seed": seed}
    if configs != CONFIGS:
        spec["configs"] = str(configs)
    marker = out_dir / MARKER
    if marker.is_file():
        done = json.loads(marker.read_text())
        if {k: done.get(k) for k in spec} == spec:
            return out_dir
        raise ConfigError(f"realsize: {out_dir} holds another build ({done}); remove it first")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"realsize: {out_dir} exists and is not a complete realsize build")
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.perf_counter()
    meta = realsize_pipeline(card, device="meta", dtype=dtype, seed=seed, configs=configs)
    seconds: dict[str, float] = {}
    for name, component in meta.components.items():
        if component is None:
            continue
        t0 = time.perf_counter()
        if isinstance(component, nn.Module):
            net = build_component(
                configs / card / name, name, dtype=dtype, device=device, seed=seed
            )
            net.save_pretrained(tmp / name, safe_serialization=True)
            del net
            gc.collect()
        else:  # tokenizers, scheduler
            component.save_pretrained(tmp / name)
        seconds[name] = round(time.perf_counter() - t0, 2)
    meta.save_config(tmp)  # model_index.json, as DiffusionPipeline.save_pretrained writes it
    done = {**spec, "family": card_family(card), "seconds": seconds}
    done["total_seconds"] = round(time.perf_counter() - started, 2)
    (tmp / MARKER).write_text(json.dumps(done, indent=1))
    if out_dir.exists():
        out_dir.rmdir()
    tmp.rename(out_dir)
    return out_dir

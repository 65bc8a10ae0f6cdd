"""Compositional digits teachers (`digits-compose:<family>`): the digits teachers' recipe on
64 px scenes of one or two coloured digits (distillkit.data.compose).

Same three stages as distillkit.benchmark.teachers (VAE, frozen text encoders after a short
contrastive pretraining, the plain diffusion loss through the family adapter), with scenes in
place of single digits; the denoiser draws fresh scenes from the training scans every step (no
fixed set to memorise). Cached by spec hash like the plain teachers.

The text pretraining holds one supervised-contrastive loss per attribute: same scene (the
paraphrases "A left of B" / "B right of A"), same layout, same digit and same colour in the
first and in the last slot. With the scene loss alone (the first teacher) the frozen encoder
separated scenes but the denoiser never learned which digit a prompt names: at 64 px on white single
scenes it stayed at chance after 1,000 steps, where the plain teacher's digit-label loss on the
same canvas reached 0.85 (digits_compose/text_vs_canvas.json, README "Compositional digits"). The
tokenizers also get the scene words whole (``SCENE_WORDS``). Spec v3 drops the batch centring
of those losses: centred, the six of them let the part every prompt shares grow until a swapped
digit word moved the token states 3 % of their scale, less than before pretraining
(digits_compose/text_token_spread.json). With v3, white-ink single scenes read the digit 0.98
after 1,000 denoiser steps; coloured ones learn it about three times slower (README).

Spec v4 adds the curriculum those curves chose: the denoiser sees single scenes in white ink
first (``white_steps``; white joins the VAE's scenes and the text pretraining), then coloured
singles (to ``single_steps``), then every layout. A digit's shape is learned once before four
inks split it: 500 + 500 such steps read a coloured single digit 0.60, where 1,000 coloured
ones read 0.20 (digits_compose/curve_sd15_v3_*.json).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from torch import Tensor

from distillkit.benchmark.teachers import (
    DIGITS_UNET,
    REPORT_FILE,
    TeacherSpec,
    build_untrained,
    denoise_loop,
    train_vae,
    vae_recon_error,
)
from distillkit.benchmark.text_pretrain import (
    pooled_outputs,
    supervised_contrastive,
    text_encoders,
)
from distillkit.data.compose import (
    COLOURS,
    SCENE_SIZE,
    SCENE_WORDS,
    TEMPLATES,
    WARMUP_INK,
    Scene,
    build_scenes,
    draw_scenes,
    render,
)
from distillkit.data.digits import load_digits_split
from distillkit.errors import ConfigError
from distillkit.export.pipeline import EXPORT_META, PROMPT_CALL_KWARGS
from distillkit.registry import get_family, register_source
from distillkit.teachers.base import TeacherAdapter
from distillkit.teachers.load import cache_root, checked_text_length
from distillkit.teachers.tiny import TinySpec

COMPOSE_VERSION = 4  # bump when this file changes what a spec produces


@dataclass(frozen=True)
class ComposeSpec:
    """A digits teacher spec plus what the scenes add; its hash names the cache entry."""

    base: TeacherSpec
    vae_scenes: int = 2048  # fixed rendered set the VAE trains on
    text_scenes: int = 32  # scenes per contrastive step (two paraphrases each)
    # curriculum, in denoiser steps: white-ink singles to ``white_steps``, white-ink scenes of
    # every layout to ``white_mixed_steps``, coloured singles to ``single_steps``, then every
    # layout in colour (all 0: every layout in colour from the start)
    white_steps: int = 0
    single_steps: int = 0
    white_mixed_steps: int = field(default=0, repr=False)  # keyed only where set (v4's keys)

    @property
    def family(self) -> str:
        return self.base.family

    def quick(self) -> ComposeSpec:
        """Seconds of training at 64 px: enough for tests to see the losses go down."""
        base = replace(self.base.quick(), vae_batch=8, batch_size=8)
        white, single = min(self.white_steps, 10), min(self.single_steps, 20)
        mixed = min(self.white_mixed_steps, 15)
        return replace(self, base=base, vae_scenes=64, white_steps=white, single_steps=single,
                       white_mixed_steps=mixed)  # fmt: skip

    def inks(self) -> tuple[str, ...]:
        """The colours the VAE's scenes and the text pretraining draw from."""
        white = self.white_steps or self.white_mixed_steps
        return (*COLOURS, WARMUP_INK) if white else tuple(COLOURS)

    def key(self) -> str:
        import hashlib

        text = f"compose-v{COMPOSE_VERSION}-{self!r}-words={self.base.arch.words}"
        if self.white_mixed_steps:
            text += f"-white_mixed_steps={self.white_mixed_steps}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def _arch(family: str) -> TinySpec:
    return TinySpec(family, **DIGITS_UNET, words=SCENE_WORDS)


def _spec(family: str) -> ComposeSpec:
    base = TeacherSpec(_arch(family), steps=4000, text_steps=80)
    return ComposeSpec(base, white_steps=500, single_steps=1500)


COMPOSE_SPECS: dict[str, ComposeSpec] = {"sd15": _spec("sd15"), "sdxl": _spec("sdxl")}


def get_compose_spec(family: str, quick: bool = False) -> ComposeSpec:
    if family not in COMPOSE_SPECS:
        raise ConfigError(
            f"compositional digits teachers exist for {', '.join(COMPOSE_SPECS)}, not {family!r}"
        )
    return COMPOSE_SPECS[family].quick() if quick else COMPOSE_SPECS[family]


def attribute_labels(scenes: list[Scene]) -> list[Tensor]:
    """One label per scene for each attribute: the whole scene, the layout, and the digit and
    the colour of the first and of the last slot in reading order (a single scene's only slot
    is both). Equal values share a label, so two draws of one scene are never negatives."""
    keys = (
        lambda s: (s.layout, s.slots),
        lambda s: s.layout,
        lambda s: s.slots[0][0],
        lambda s: s.slots[-1][0],
        lambda s: s.slots[0][1],
        lambda s: s.slots[-1][1],
    )
    out = []
    for key in keys:
        ids: dict = {}
        out.append(torch.tensor([ids.setdefault(key(s), len(ids)) for s in scenes]))
    return out


def pretrain_scene_text(adapter: TeacherAdapter, spec: ComposeSpec, centre: bool = False) -> dict:
    """Supervised-contrastive steps on every template of each scene, one loss per attribute
    (see :func:`attribute_labels`): each template of a scene is a positive of the others.
    Uncentred (``centre=True`` is spec v2's, for evaluation/compose_text_probe.py): see
    :func:`supervised_contrastive`."""
    base = spec.base
    encoders = text_encoders(adapter)
    params = [p for m in encoders for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=base.text_lr, weight_decay=0.0)
    for m in encoders:
        m.requires_grad_(True).train()
    losses = []
    for step in range(base.text_steps):
        scenes = draw_scenes(spec.text_scenes, seed=base.seed * 1000 + step, inks=spec.inks())
        per_scene = [len(TEMPLATES[s.layout]) for s in scenes]
        prompts = [
            replace(s, template=j).prompt() for s, n in zip(scenes, per_scene) for j in range(n)
        ]
        labels = [
            lab.repeat_interleave(torch.tensor(per_scene)) for lab in attribute_labels(scenes)
        ]
        cond, _ = adapter.encode_prompts(prompts)
        features = pooled_outputs(cond)
        loss = sum(supervised_contrastive(f, y, centre=centre) for f in features for y in labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    for m in encoders:
        m.requires_grad_(False).eval()
    return {"text_loss_first": losses[0], "text_loss_final": losses[-1]} if losses else {}


def train_compose_teacher(
    family: str,
    out_dir: Path,
    *,
    quick: bool = False,
    spec: ComposeSpec | None = None,
    on_eval: Callable[[DiffusionPipeline, int], None] | None = None,
    eval_every: int = 0,
    train_text: bool = False,
) -> dict:
    """Train the family's compositional teacher and save it as a diffusers pipeline.
    ``on_eval(pipe, step)`` sees the EMA weights every ``eval_every`` denoiser steps without
    changing what is trained (a learning curve: evaluation/compose_curve.py, which also passes
    an experiment's ``spec`` and ``train_text``; see :func:`denoise_loop`)."""
    spec = spec or get_compose_spec(family, quick)
    base, start = spec.base, time.perf_counter()
    split = load_digits_split()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(base.seed)
        gen = torch.Generator().manual_seed(base.seed)
        pipe = build_untrained(base, resolution=SCENE_SIZE)
        vae_images, _ = build_scenes(
            split, spec.vae_scenes, seed=base.seed, heldout=False, inks=spec.inks()
        )
        heldout, _ = build_scenes(split, 256, seed=base.seed + 1, heldout=True)
        report = train_vae(pipe.vae, vae_images, base, gen)
        report["vae_recon_mse"] = vae_recon_error(pipe.vae, heldout)
        adapter = get_family(family)(pipe, SCENE_SIZE, torch.device("cpu"))
        adapter.max_sequence_length = checked_text_length(pipe, base.max_sequence_length)
        report |= pretrain_scene_text(adapter, spec)
        draw = scene_sampler(
            adapter, split, base.seed, spec.single_steps, spec.white_steps, spec.white_mixed_steps
        )
        hook = (lambda step: on_eval(pipe, step)) if on_eval else None
        report |= denoise_loop(adapter, base, gen, draw, hook, eval_every, train_text)
    report |= {"family": family, "spec_key": spec.key(), "quick": quick}
    report |= {"train_seconds": round(time.perf_counter() - start, 1)}
    pipe.save_pretrained(out_dir, safe_serialization=True)
    (Path(out_dir) / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    meta = {"resolution": SCENE_SIZE, PROMPT_CALL_KWARGS: adapter.prompt_call_kwargs()}
    (Path(out_dir) / EXPORT_META).write_text(json.dumps(meta, indent=1) + "\n")
    return report


def scene_sampler(
    adapter: TeacherAdapter,
    split,
    seed: int,
    single_steps: int = 0,
    white_steps: int = 0,
    white_mixed_steps: int = 0,
):
    """``draw(n)``: n fresh training scenes (training scans only), as latents and prompts,
    one call per denoiser step; the spec's curriculum: single-digit scenes in ``WARMUP_INK``
    for the first ``white_steps`` calls, every layout in ``WARMUP_INK`` to
    ``white_mixed_steps``, single-digit scenes in the four colours to ``single_steps``, then
    every layout in colour."""
    by_digit = {d: (split.train_labels == d).nonzero().flatten().tolist() for d in range(10)}
    rng = random.Random(seed + 7)
    counter = iter(range(1 << 62))

    def singles(n: int, colours: list[str]) -> list[Scene]:
        pick = lambda: ((rng.randrange(10), rng.choice(colours)),)  # noqa: E731
        return [Scene("single", pick(), rng.randrange(2)) for _ in range(n)]

    def draw(n: int) -> tuple[Tensor, list[str]]:
        call = next(counter)
        if call < white_steps:
            scenes = singles(n, [WARMUP_INK])
        elif call < white_mixed_steps:
            scenes = draw_scenes(n, seed=seed * 7919 + call, inks=[WARMUP_INK])
        elif call < single_steps:
            scenes = singles(n, list(COLOURS))
        else:
            scenes = draw_scenes(n, seed=seed * 7919 + call)
        images = torch.stack(
            [
                render(s, [split.train_images[rng.choice(by_digit[d])] for d, _ in s.slots])
                for s in scenes
            ]
        )
        with torch.no_grad():
            latents = adapter.encode_images(images)
        return latents, [s.prompt() for s in scenes]

    return draw


@register_source("digits-compose:")
def compose_teacher_dir(family: str, *, quick: bool = False, **curve) -> Path:
    """The cached compositional teacher; trained on first use (temp dir, then renamed).
    ``curve``: :func:`train_compose_teacher`'s ``on_eval`` and ``eval_every``."""
    out = cache_root() / "digits-compose" / f"{family}-{get_compose_spec(family, quick).key()}"
    if (out / "model_index.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    train_compose_teacher(family, tmp, quick=quick, **curve)
    try:
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

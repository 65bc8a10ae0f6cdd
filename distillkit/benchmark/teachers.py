"""Digits teachers: small real-architecture diffusers pipelines trained on the UCI digits.

Why: the quality proof (every recipe x family on a laptop) needs teachers that actually draw the
prompted digit, in each family's own diffusers classes, so a student distilled from them can be
judged. Each family has one frozen :class:`TeacherSpec`; training is seeded, uses the family's
teacher adapter for noising/targets (the same parameterization DMD2 later assumes) and is cached
under ``cache_root()/digits/<family>-<spec hash>``. Text encoders stay random and frozen: their
embeddings already differ per prompt, and the pipeline's own ``encode_prompt`` stays valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline, DPMSolverMultistepScheduler
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from torch import Tensor

from distillkit.data.digits import (
    NUM_CLASSES,
    PROMPT_TEMPLATES,
    eval_prompts,
    load_digits_split,
    prompt_for,
)
from distillkit.registry import get_family
from distillkit.teachers.base import Conditioning, TeacherAdapter
from distillkit.teachers.load import cache_root
from distillkit.teachers.tiny import FAMILIES, TinySpec, build_tiny_pipeline

SPEC_VERSION = 1  # bump when training code changes what a spec produces
RESOLUTION = 32


@dataclass(frozen=True)
class TeacherSpec:
    """Everything that decides a digits teacher's weights (its hash names the cache entry)."""

    arch: TinySpec
    vae_steps: int = 1500
    vae_batch: int = 32
    vae_lr: float = 2e-3
    kl_weight: float = 1e-3  # per latent element, AutoencoderKL only
    steps: int = 6000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.999
    prompt_dropout: float = 0.1  # share of empty-prompt samples, for classifier-free guidance
    flow_shift: float | None = None  # SANA: replaces the scheduler's flow_shift (None keeps it)
    default_guidance: float = 3.0  # best guidance measured at 25 steps (teacher card value)
    text_steps: int = 100  # semantic pretraining of the (then frozen) text encoders
    text_lr: float = 3e-3
    seed: int = 0

    @property
    def family(self) -> str:
        return self.arch.family

    def quick(self) -> TeacherSpec:
        """A few seconds of training: enough for tests to see the losses go down."""
        return replace(self, vae_steps=40, steps=40, vae_batch=16, batch_size=16, warmup=5)

    def key(self) -> str:
        text = f"v{SPEC_VERSION}-{self!r}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]


SPECS: dict[str, TeacherSpec] = {
    "sd15": TeacherSpec(
        TinySpec("sd15", vae_downsample=4, block_out_channels=(64, 128), vae_channels=32)
    ),
    "sdxl": TeacherSpec(
        TinySpec("sdxl", vae_downsample=4, block_out_channels=(64, 128), vae_channels=32)
    ),
    "sana": TeacherSpec(
        TinySpec("sana", vae_downsample=4, vae_channels=32, sana_heads=4, sana_head_dim=16,
                 sana_layers=6, text_hidden=64),
        flow_shift=1.0,
    ),
}  # fmt: skip


def get_spec(family: str, quick: bool = False) -> TeacherSpec:
    if family not in SPECS:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return SPECS[family].quick() if quick else SPECS[family]


def _log(msg: str) -> None:
    print(f"[teach {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _vae_forward(vae, x: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(reconstruction, latent, KL per element); AutoencoderKL samples its posterior."""
    if isinstance(vae, AutoencoderKL):
        post = vae.encode(x).latent_dist
        z = post.sample(generator=gen)
        return vae.decode(z).sample, z, post.kl().mean() / z[0].numel()
    z = vae.encode(x).latent
    return vae.decode(z).sample, z, torch.zeros(())


def vae_recon_error(vae, images: Tensor) -> float:
    """Mean squared reconstruction error through the latent mode (what the pipeline decodes)."""
    with torch.no_grad():
        out = vae.encode(images)
        z = out.latent_dist.mode() if hasattr(out, "latent_dist") else out.latent
        return F.mse_loss(vae.decode(z).sample, images).item()


def train_vae(vae, images: Tensor, spec: TeacherSpec, gen: torch.Generator) -> dict:
    """Reconstruction (+ small KL) training, then scaling_factor so latents have unit std."""
    vae.requires_grad_(True).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=spec.vae_lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, min(50, spec.vae_steps // 10), spec.vae_steps)
    losses = []
    for step in range(spec.vae_steps):
        x = images[torch.randint(0, len(images), (spec.vae_batch,), generator=gen)]
        rec, _, kl = _vae_forward(vae, x, gen)
        loss = F.mse_loss(rec, x) + spec.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 250 == 0:
            _log(f"vae step {step}/{spec.vae_steps} loss {loss.item():.4f}")
    vae.requires_grad_(False).eval()
    with torch.no_grad():
        out = vae.encode(images)
        z = out.latent_dist.mode() if hasattr(out, "latent_dist") else out.latent
    scale = 1.0 / z.float().pow(2).mean().sqrt().item()  # RMS, so x_T ~ N(0, 1) matches
    vae.register_to_config(scaling_factor=scale)
    return {"vae_first_loss": losses[0], "vae_final_loss": _tail(losses), "scaling_factor": scale}


def _tail(losses: list[float], n: int = 50) -> float:
    tail = losses[-n:]
    return sum(tail) / len(tail)


def _mix(cond: Conditioning, drop: Tensor) -> dict:
    """Per-sample conditional kwargs, with the unconditional ones where ``drop`` is set."""

    def pick(c: Tensor, u: Tensor) -> Tensor:
        mask = drop.reshape(-1, *([1] * (c.ndim - 1)))
        return torch.where(mask, u, c)

    def walk(c, u):
        if isinstance(c, dict):
            return {k: walk(c[k], u[k]) for k in c}
        return pick(c, u) if isinstance(c, Tensor) else c

    return walk(cond.cond, cond.uncond)


def _text_encoders(adapter: TeacherAdapter) -> list[torch.nn.Module]:
    comps = adapter.pipe.components
    return [m for k, m in comps.items() if k.startswith("text_encoder") and m is not None]


def _pooled_outputs(cond: dict) -> list[Tensor]:
    """Every trainable text output as (N, D): token sequences averaged over valid tokens."""
    mask = cond.get("encoder_attention_mask")
    out = []
    for key, value in cond.items():
        if isinstance(value, dict):
            out += _pooled_outputs(value)
        elif isinstance(value, Tensor) and value.requires_grad and value.ndim == 3:
            w = torch.ones(value.shape[:2]) if mask is None else mask.float()
            out.append((value * w[..., None]).sum(1) / w.sum(1, keepdim=True))
        elif isinstance(value, Tensor) and value.requires_grad and key != "encoder_attention_mask":
            out.append(value)
    return out


def supervised_contrastive(features: Tensor, labels: Tensor, tau: float = 0.1) -> Tensor:
    """Khosla et al. 2020 on batch-centred features: same digit together, others apart."""
    z = F.normalize(features - features.mean(0), dim=1)
    logits = (z @ z.T / tau).masked_fill(torch.eye(len(z), dtype=torch.bool), float("-inf"))
    positive = (labels[:, None] == labels[None]) & ~torch.eye(len(z), dtype=torch.bool)
    log_prob = logits.log_softmax(dim=1).masked_fill(~positive, 0.0)
    return -(log_prob.sum(1) / positive.sum(1)).mean()


def pretrain_text(adapter: TeacherAdapter, spec: TeacherSpec) -> dict:
    """Give the random text encoders the one semantic skill real ones bring: the digit's name
    dominates the embedding, whatever the template. Without it the embeddings are template-
    dominated and the denoiser needs thousands of steps before it reads the prompt at all."""
    encoders = _text_encoders(adapter)
    params = [p for m in encoders for p in m.parameters()]
    for m in encoders:
        m.requires_grad_(True).train()
    prompts = [prompt_for(y, j) for y in range(NUM_CLASSES) for j in range(len(PROMPT_TEMPLATES))]
    labels = torch.arange(NUM_CLASSES).repeat_interleave(len(PROMPT_TEMPLATES))
    opt = torch.optim.AdamW(params, lr=spec.text_lr, weight_decay=0.0)
    losses = []
    for _ in range(spec.text_steps):
        cond, _ = adapter.encode_prompts(prompts)
        loss = sum(supervised_contrastive(f, labels) for f in _pooled_outputs(cond))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    for m in encoders:
        m.requires_grad_(False).eval()
    return {"text_first_loss": losses[0], "text_final_loss": losses[-1]} if losses else {}


def train_denoiser(adapter: TeacherAdapter, split, spec: TeacherSpec, gen) -> dict:
    """Standard diffusion loss in the adapter's own parameterization, with EMA weights."""
    net = adapter.denoiser
    latents = torch.cat([adapter.encode_images(b) for b in split.train_images.split(256)])
    labels = split.train_labels
    net.requires_grad_(True).train()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, spec.warmup, spec.steps)
    ema = EMAModel(params, decay=spec.ema_decay, use_ema_warmup=True, power=3 / 4)
    rng = random.Random(spec.seed)
    losses = []
    for step in range(spec.steps):
        idx = torch.randint(0, len(latents), (spec.batch_size,), generator=gen)
        prompts = [prompt_for(int(y), rng.randrange(len(PROMPT_TEMPLATES))) for y in labels[idx]]
        drop = torch.rand(spec.batch_size, generator=gen) < spec.prompt_dropout
        kwargs = _mix(adapter.encode(prompts), drop)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = adapter.sample_t(spec.batch_size, gen)
        out = adapter.forward(net, adapter.add_noise(x0, noise, t), t, kwargs)
        loss = F.mse_loss(out, adapter.target(x0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        losses.append(loss.item())
        if step % 250 == 0:
            _log(f"denoiser step {step}/{spec.steps} loss {_tail(losses):.4f}")
    ema.copy_to(params)
    net.requires_grad_(False).eval()
    return {"loss_first": _tail(losses[:50]), "loss_final": _tail(losses)}


def build_untrained(spec: TeacherSpec) -> DiffusionPipeline:
    pipe = build_tiny_pipeline(replace(spec.arch, sample_size=RESOLUTION))
    if spec.flow_shift is not None:
        config = {**pipe.scheduler.config, "flow_shift": spec.flow_shift}
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(config)
    return pipe


def train_digits_teacher(family: str, out_dir: Path, *, quick: bool = False) -> dict:
    """Train the family's digits teacher (VAE, then denoiser) and save it to ``out_dir``."""
    spec = get_spec(family, quick)
    start = time.perf_counter()
    split = load_digits_split()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        gen = torch.Generator().manual_seed(spec.seed)
        pipe = build_untrained(spec)
        report = train_vae(pipe.vae, split.train_images, spec, gen)
        vae_seconds = time.perf_counter() - start
        adapter = get_family(family)(pipe, RESOLUTION, torch.device("cpu"))
        report |= pretrain_text(adapter, spec)
        report |= train_denoiser(adapter, split, spec, gen)
    report |= {
        "family": family,
        "spec_key": spec.key(),
        "vae_seconds": round(vae_seconds, 1),
        "train_seconds": round(time.perf_counter() - start, 1),
        "vae_recon_mse": vae_recon_error(pipe.vae, split.heldout_images),
        "quick": quick,
    }
    pipe.save_pretrained(out_dir, safe_serialization=True)
    (Path(out_dir) / "distillkit_teacher.json").write_text(json.dumps(report, indent=2))
    return report


def digits_teacher_dir(family: str, *, quick: bool = False) -> Path:
    """The cached teacher directory; trains it (atomically: temp dir, then rename) if missing."""
    spec = get_spec(family, quick)
    out = cache_root() / "digits" / f"{family}{'-quick' if quick else ''}-{spec.key()}"
    if (out / "model_index.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    train_digits_teacher(family, tmp, quick=quick)
    try:
        tmp.rename(out)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _call_kwargs(adapter: TeacherAdapter) -> dict:
    return {"height": RESOLUTION, "width": RESOLUTION, **adapter.pipeline_call_kwargs()}


@torch.no_grad()
def sample_digits(
    adapter: TeacherAdapter, steps: int, guidance: float, per_class: int, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Images in [-1, 1] for ``eval_prompts(per_class)``; sample i always uses seed + i."""
    prompts = eval_prompts(per_class)
    images = []
    for start in range(0, len(prompts), 200):
        chunk = prompts[start : start + 200]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        out = adapter.pipe(
            [p for p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance,
            generator=gens, output_type="pt", **_call_kwargs(adapter),
        ).images  # fmt: skip
        images.append(out.float() * 2 - 1)
    return torch.cat(images), torch.tensor([y for _, y in prompts])

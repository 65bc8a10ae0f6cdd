"""Digits teachers: small real-architecture diffusers pipelines trained on the UCI digits.

Why: the quality proof (every recipe x family on a laptop) needs teachers that really draw the
prompted digit, in each family's own diffusers classes, so that distilled students can be
judged. Each family has one frozen :class:`TeacherSpec`. Training is seeded and goes in three
stages: the VAE learns to reconstruct digits; the random text encoders get a short semantic
pretraining (see :func:`pretrain_text`) and are frozen; the denoiser learns the diffusion loss
through the family's teacher adapter (``sample_t``/``add_noise``/``target``/``forward``), i.e. in
exactly the parameterization DMD2 later assumes. Results are cached under
``cache_root()/digits/<family>-<spec hash>`` and written atomically.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from torch import Tensor, nn

from distillkit.benchmark.text_pretrain import pretrain_text, text_encoders
from distillkit.data.digits import PROMPT_TEMPLATES, load_digits_split, prompt_for
from distillkit.errors import ConfigError
from distillkit.export.pipeline import EXPORT_META, PROMPT_CALL_KWARGS
from distillkit.registry import get_family, register_source
from distillkit.teachers.base import Conditioning, TeacherAdapter
from distillkit.teachers.load import cache_root, checked_text_length
from distillkit.teachers.tiny import TinySpec, build_tiny_pipeline

SPEC_VERSION = 1  # bump when the training code changes what a spec produces
RESOLUTION = 32
REPORT_FILE = "distillkit_teacher.json"


@dataclass(frozen=True)
class TeacherSpec:
    """Everything that decides a digits teacher's weights; its hash names the cache entry."""

    arch: TinySpec
    vae_steps: int = 400
    vae_batch: int = 32
    vae_lr: float = 2e-3
    kl_weight: float = 1e-3  # per latent element (AutoencoderKL only)
    text_steps: int = 60  # semantic pretraining of the text encoders, which then stay frozen
    text_lr: float = 3e-3
    text_templates: int = 4  # prompts per digit in each pretraining step (>= 2: positives)
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 200
    ema_decay: float = 0.999
    prompt_dropout: float = 0.1  # share of empty-prompt samples, for classifier-free guidance
    flow_shift: float | None = None  # replaces a flow scheduler's shift (None keeps the default)
    # networks with a guidance input (FLUX.1-dev): then distil CFG into it, as dev was made
    guidance_steps: int = 0
    guidance_range: tuple[float, float] = (1.0, 4.0)
    seed: int = 0
    # T5 tokens per prompt (teacher.max_sequence_length): digits prompts are under 10, and
    # SD3's 256 / FLUX's 512 padding tokens were ~95 % of an MMDiT's tokens on the CPU. Kept
    # out of the repr, and so out of the cache key, where unset (the older teachers' keys)
    max_sequence_length: int | None = field(default=None, repr=False)

    @property
    def family(self) -> str:
        return self.arch.family

    def quick(self) -> TeacherSpec:
        """A few seconds of training: enough for tests to see every loss go down."""
        return replace(
            self, vae_steps=40, vae_batch=16, text_steps=min(self.text_steps, 1), steps=40,
            batch_size=16, warmup=5, guidance_steps=min(self.guidance_steps, 20),
        )  # fmt: skip

    def key(self) -> str:
        text = f"v{SPEC_VERSION}-{self!r}"
        if self.max_sequence_length is not None:
            text += f"-max_sequence_length={self.max_sequence_length}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]


# 8x8x4 latents (VAE downsampling 4): the digits are 8x8 scans, so nothing is lost, and the
# denoisers stay cheap. Two attention heads: CPU attention with 4-dim heads costs more than the
# convolutions.
DIGITS_UNET = dict(
    vae_downsample=4, vae_channels=16, block_out_channels=(32, 64), attention_head_dim=2
)
SPECS: dict[str, TeacherSpec] = {
    "sd15": TeacherSpec(TinySpec("sd15", **DIGITS_UNET)),
    "sdxl": TeacherSpec(TinySpec("sdxl", **DIGITS_UNET)),
    "sana": TeacherSpec(
        TinySpec("sana", vae_downsample=4, vae_channels=16, dit_heads=2, dit_head_dim=32,
                 dit_layers=4),
        # SANA prepends a ~900-token instruction to every prompt: pretraining steps cost ~4 s
        text_steps=12, text_lr=1e-2, text_templates=2, flow_shift=1.0,
    ),
    # MMDiTs: 2x2 patches of the 8x8x4 latents (16 image tokens) beside 77 + 16 (SD3: CLIP and
    # T5) / 16 (FLUX: T5) text tokens; FLUX keeps its resolution-dependent shift (exp(mu) = 1.58
    # at 16 tokens)
    "sd3": TeacherSpec(
        TinySpec("sd3", vae_downsample=4, vae_channels=16, dit_heads=2, dit_head_dim=32,
                 dit_layers=4),
        flow_shift=1.0, max_sequence_length=16,
    ),
    "flux": TeacherSpec(
        TinySpec("flux", vae_downsample=4, vae_channels=16, dit_heads=2, dit_head_dim=32,
                 dit_layers=2),
        guidance_steps=500, max_sequence_length=16,
    ),
}  # fmt: skip


def get_spec(family: str, quick: bool = False) -> TeacherSpec:
    if family not in SPECS:
        raise ConfigError(f"digits teachers exist for {', '.join(SPECS)}, not {family!r}")
    return SPECS[family].quick() if quick else SPECS[family]


def _log(msg: str) -> None:
    print(f"[teach {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _window(losses: list[float], last: bool) -> float:
    """Mean of the first / last quarter (at most 50 steps): single steps are too noisy."""
    n = max(1, min(50, len(losses) // 4))
    part = losses[-n:] if last else losses[:n]
    return sum(part) / len(part)


def _latents(vae: nn.Module, images: Tensor) -> Tensor:
    out = vae.encode(images)
    return out.latent_dist.mode() if hasattr(out, "latent_dist") else out.latent


@torch.no_grad()
def vae_recon_error(vae: nn.Module, images: Tensor) -> float:
    """Mean squared reconstruction error through the latent mode (what the pipeline decodes)."""
    return F.mse_loss(vae.decode(_latents(vae, images)).sample, images).item()


def train_vae(vae: nn.Module, images: Tensor, spec: TeacherSpec, gen: torch.Generator) -> dict:
    """Reconstruction (+ small KL) training, then ``scaling_factor`` so latents have unit RMS."""
    vae.requires_grad_(True).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=spec.vae_lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, spec.vae_steps // 10, spec.vae_steps)
    losses = []
    for step in range(spec.vae_steps):
        x = images[torch.randint(0, len(images), (spec.vae_batch,), generator=gen)]
        if isinstance(vae, AutoencoderKL):
            post = vae.encode(x).latent_dist
            z = post.sample(generator=gen)
            kl = post.kl().mean() / z[0].numel()
        else:
            z, kl = vae.encode(x).latent, torch.zeros(())
        loss = F.mse_loss(vae.decode(z).sample, x) + spec.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0:
            _log(f"vae {step}/{spec.vae_steps} loss {loss.item():.4f}")
    vae.requires_grad_(False).eval()
    with torch.no_grad():
        rms = torch.cat([_latents(vae, b) for b in images.split(256)]).pow(2).mean().sqrt()
    vae.register_to_config(scaling_factor=1.0 / rms.item())  # x_T ~ N(0, I) matches the data
    return {"vae_loss_first": _window(losses, False), "vae_loss_final": _window(losses, True)}


def _mix(cond: Conditioning, drop: Tensor) -> dict:
    """Per-sample conditional network kwargs, the unconditional ones where ``drop`` is set."""

    def walk(c, u):
        if isinstance(c, dict):
            return {k: walk(c[k], u[k]) for k in c}
        if not isinstance(c, Tensor):
            return c
        return torch.where(drop.reshape(-1, *([1] * (c.ndim - 1))), u, c)

    return walk(cond.cond, cond.uncond)


def train_denoiser(adapter: TeacherAdapter, split, spec: TeacherSpec, gen) -> dict:
    """The plain diffusion loss on the digits' training split (see :func:`denoise_loop`)."""
    latents = torch.cat([adapter.encode_images(b) for b in split.train_images.split(256)])
    labels = split.train_labels
    rng = random.Random(spec.seed)

    def draw(n: int) -> tuple[Tensor, list[str]]:
        idx = torch.randint(0, len(latents), (n,), generator=gen)
        prompts = [prompt_for(int(y), rng.randrange(len(PROMPT_TEMPLATES))) for y in labels[idx]]
        return latents[idx], prompts

    return denoise_loop(adapter, spec, gen, draw)


def denoise_loop(
    adapter: TeacherAdapter,
    spec: TeacherSpec,
    gen,
    draw,
    on_eval: Callable[[int], None] | None = None,
    eval_every: int = 0,
    train_text: bool = False,
) -> dict:
    """The plain diffusion loss in the adapter's own parameterization, with EMA weights;
    ``draw(n)`` gives a batch of clean latents and their prompts. ``on_eval(step)``, every
    ``eval_every`` steps, sees the EMA weights in the network (a learning curve for teacher
    experiments); it runs under a forked RNG, so the trained weights do not depend on it.
    ``train_text`` trains the text encoders with the denoiser (uncached prompts, EMA on both):
    an experiment (compose_curve.py ``--train-text``); no teacher spec uses it."""
    net = adapter.denoiser
    net.requires_grad_(True).train()
    params = [p for p in net.parameters() if p.requires_grad]
    encoders = text_encoders(adapter) if train_text else []
    for m in encoders:
        m.requires_grad_(True).train()
        params += list(m.parameters())
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, spec.warmup, spec.steps)
    ema = EMAModel(params, decay=spec.ema_decay, use_ema_warmup=True, power=3 / 4)
    losses = []
    for step in range(spec.steps):
        x0, prompts = draw(spec.batch_size)
        drop = torch.rand(spec.batch_size, generator=gen) < spec.prompt_dropout
        if train_text:  # through the encoders' autograd graph, never the embedding cache
            cond = Conditioning(*adapter.encode_prompts(prompts))
        else:
            cond = adapter.encode(prompts)
        kwargs = _mix(cond, drop)
        t = adapter.sample_t(spec.batch_size, gen)
        noise = torch.randn(x0.shape, generator=gen)
        out = adapter.forward(net, adapter.add_noise(x0, noise, t), t, kwargs)
        loss = F.mse_loss(out, adapter.target(x0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        losses.append(loss.item())
        if step % 100 == 0:
            _log(f"denoiser {step}/{spec.steps} loss {_window(losses, True):.4f}")
        if on_eval is not None and eval_every and (step + 1) % eval_every == 0:
            ema.store(params)
            ema.copy_to(params)
            for m in (net, *encoders):
                m.eval()
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                on_eval(step + 1)
            if encoders:  # the hook cached the EMA encoders' embeddings
                adapter.forget_embeddings()
            ema.restore(params)
            for m in (net, *encoders):
                m.train()
    ema.copy_to(params)
    for m in (net, *encoders):
        m.requires_grad_(False).eval()
    return {"loss_first": _window(losses, False), "loss_final": _window(losses, True)}


def distil_guidance(adapter: TeacherAdapter, split, spec: TeacherSpec, gen) -> dict:
    """FLUX.1-dev's guidance distillation in small: the trained network (its guidance input
    held at the default throughout :func:`train_denoiser`) becomes the frozen CFG teacher, and
    the network learns to answer u + g (c - u) for the input g ~ U(guidance_range) in one
    pass. Without it the input means nothing and FluxPipeline's ``guidance_scale`` would feed
    the network values it never saw."""
    net = adapter.denoiser
    base = copy.deepcopy(net).requires_grad_(False).eval()
    latents = torch.cat([adapter.encode_images(b) for b in split.train_images.split(256)])
    labels = split.train_labels
    net.requires_grad_(True).train()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr / 4, weight_decay=0.0)
    rng, (lo, hi), losses = random.Random(spec.seed + 1), spec.guidance_range, []
    for step in range(spec.guidance_steps):
        idx = torch.randint(0, len(latents), (spec.batch_size,), generator=gen)
        prompts = [prompt_for(int(y), rng.randrange(len(PROMPT_TEMPLATES))) for y in labels[idx]]
        cond = adapter.encode(prompts)
        x0, t = latents[idx], adapter.sample_t(spec.batch_size, gen)
        x_t = adapter.add_noise(x0, torch.randn(x0.shape, generator=gen), t)
        g = lo + (hi - lo) * torch.rand(spec.batch_size, generator=gen)
        with torch.no_grad():
            c, u = (
                adapter.forward(base, x_t, t, cond.cond),
                adapter.forward(base, x_t, t, cond.uncond),
            )
            target = u + g.reshape(-1, 1, 1, 1) * (c - u)
        loss = F.mse_loss(adapter.predict(net, x_t, t, cond, guidance=g), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0:
            _log(f"guidance {step}/{spec.guidance_steps} loss {_window(losses, True):.4f}")
    net.requires_grad_(False).eval()
    return {
        "guidance_loss_first": _window(losses, False),
        "guidance_loss_final": _window(losses, True),
    }


def build_untrained(spec: TeacherSpec, resolution: int = RESOLUTION) -> DiffusionPipeline:
    """The family's tiny pipeline (32 px) with the spec's sizes and seed (random weights)."""
    pipe = build_tiny_pipeline(replace(spec.arch, sample_size=resolution))
    if spec.flow_shift is not None:  # SANA's DPM-Solver calls it flow_shift, FlowMatch* shift
        key = "flow_shift" if "flow_shift" in pipe.scheduler.config else "shift"
        config = {**pipe.scheduler.config, key: spec.flow_shift}
        pipe.scheduler = type(pipe.scheduler).from_config(config)
    return pipe


def train_digits_teacher(family: str, out_dir: Path, *, quick: bool = False) -> dict:
    """Train the family's digits teacher and save it as a diffusers pipeline in ``out_dir``."""
    spec = get_spec(family, quick)
    start = time.perf_counter()
    split = load_digits_split()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        gen = torch.Generator().manual_seed(spec.seed)
        pipe = build_untrained(spec)
        report = {"vae_recon_mse_untrained": vae_recon_error(pipe.vae, split.heldout_images)}
        report |= train_vae(pipe.vae, split.train_images, spec, gen)
        report["vae_recon_mse"] = vae_recon_error(pipe.vae, split.heldout_images)
        report["vae_seconds"] = round(time.perf_counter() - start, 1)
        adapter = get_family(family)(pipe, RESOLUTION, torch.device("cpu"))
        adapter.max_sequence_length = checked_text_length(pipe, spec.max_sequence_length)
        report |= pretrain_text(
            adapter, spec.text_steps, spec.text_lr, spec.text_templates, spec.seed
        )
        report |= train_denoiser(adapter, split, spec, gen)
        if spec.guidance_steps and getattr(adapter, "has_guidance_input", False):
            report |= distil_guidance(adapter, split, spec, gen)
    report |= {
        "family": family,
        "spec_key": spec.key(),
        "quick": quick,
        "train_seconds": round(time.perf_counter() - start, 1),
        "torch_threads": torch.get_num_threads(),
    }
    pipe.save_pretrained(out_dir, safe_serialization=True)
    (Path(out_dir) / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    # how to call it, as an export says: the resolution (FluxPipeline's own default is 1024 px)
    # and what every call repeats (the text length it was trained at)
    meta = {"resolution": RESOLUTION, PROMPT_CALL_KWARGS: adapter.prompt_call_kwargs()}
    (Path(out_dir) / EXPORT_META).write_text(json.dumps(meta, indent=1) + "\n")
    _log(f"saved {family} teacher to {out_dir}: {report}")
    return report


@register_source("digits:")
def digits_teacher_dir(family: str, *, quick: bool = False) -> Path:
    """The cached teacher directory; trains it if missing (into a temp dir, then renamed)."""
    out = cache_root() / "digits" / f"{family}-{get_spec(family, quick).key()}"
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

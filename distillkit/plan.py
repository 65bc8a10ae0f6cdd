"""`distillkit plan RECIPE.yaml`: predicted peak memory per device, and the levers that fit it.

Why: a DMD2 SDXL run that does not fit is found out after the teacher has downloaded and the
first step has run. The plan counts every byte the loop will hold, from the teacher's published
architecture on the meta device (no weights), and tries each lever on the same config.
Calibration (CPU, real-size SD1.5 UNet) and validation: evaluation/results/perf.json.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

from distillkit.errors import ConfigError
from distillkit.plan_arch import (
    DENOISERS,
    build_meta,
    component_dirs,
    count_params,
    n_params,
    trace_activations,
)

GIB = 2**30
# Peak activation memory = saved-for-backward bytes x K + C (backward transients: activation
# gradients, attention kernels' scratch). Fitted on the CPU to a real-size SD1.5 UNet at 16^2
# and 32^2 latents (LoRA, fp32): see evaluation/results/perf.json "activation_calibration".
ACT_K, ACT_K_CKPT, ACT_C = 1.5, 4.5, 0.22 * GIB
BF16_ACT = 0.6  # saved bytes under bf16 autocast / fp32 (norms stay fp32); CPU-measured
CUDA_OVERHEAD = 1.0 * GIB  # CUDA context, cuBLAS/cuDNN workspaces, allocator slack
# On a CPU the process's whole RSS is what must fit, and before any weight is loaded Python with
# torch, diffusers, transformers, accelerate and peft imported as `distillkit run` imports them
# holds about 1.2 GiB (torch's shared libraries alone ~0.45 GiB of file-backed pages, which RSS
# counts like the memory-mapped teacher weights). Measured: 1.21 GiB over a tiny-teacher run's
# steps, 1.14-1.21 GiB in real-size SD1.5 runs when their first step starts. Without this row
# the CPU plan was 24 % (LCM-LoRA) and 32 % (DMD2 LoRA) under those runs' peak RSS
# (evaluation/results/realsize.json). bench_perf measures growth from an imported process and
# leaves it out.
CPU_RUNTIME = 1.2 * GIB
CPU_RUNTIME_ROW = "CPU process runtime (Python, torch, diffusers, transformers)"
STATE_BYTES = {"adamw": 8.0, "adamw8bit": 2.0}
SHARDED = {"none": (), "fsdp": ("w", "g", "o"), "zero3": ("w", "g", "o"), "zero2": ("g", "o")}


@dataclass
class Role:
    name: str
    kind: str  # full | lora | frozen
    base: int  # denoiser parameters in this role's own copy (0 with a shared base)
    trainable: int
    head: int = 0  # GAN head parameters (trained with the role)
    lora: tuple | None = None  # (rank, alpha, target modules) of a LoRA role
    forwards: int = 1  # network passes one update keeps activations of
    through: tuple[str, ...] = ()  # frozen networks its loss back-propagates through


@dataclass
class Plan:
    rows: list[tuple[str, float]] = field(default_factory=list)  # (label, bytes)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(b for _, b in self.rows)


def _denoiser_dir(dirs):
    return dirs[next(d for d in DENOISERS if d in dirs)]


@functools.lru_cache(maxsize=16)
def _lora_params(folder, rank: int, alpha: float, targets: tuple) -> int:
    from distillkit.config import LoraConfigSection
    from distillkit.students import lora_config

    net = build_meta(folder)
    net.add_adapter(lora_config(LoraConfigSection(rank=rank, alpha=alpha, target_modules=targets)))
    return sum(p.numel() for n, p in net.named_parameters() if "lora_" in n)


def _head_params(folder, width: int) -> int:
    """One GAN head's parameters on the denoiser's widest features (APT's shallower taps are
    narrower: an upper bound there)."""
    from distillkit.recipes.gan import DiscriminatorHead

    c = json.loads((folder / "config.json").read_text())
    channels = (c.get("block_out_channels") or [None])[-1]
    channels = channels or c["num_attention_heads"] * c["attention_head_dim"]
    return n_params(DiscriminatorHead(channels, width))


def _roles(cfg, dirs, denoiser_params: int) -> list[Role]:
    """The recipe's networks as the recipe declares them (``Recipe.footprint``): nothing here
    guesses from config field names, so a new recipe is planned as it is built."""
    from distillkit.registry import get_recipe

    folder = _denoiser_dir(dirs)
    roles = []
    for fp in get_recipe(cfg.recipe.name).footprint(cfg):
        if fp.kind == "frozen":
            roles.append(Role(fp.name, "frozen", denoiser_params, 0))
            continue
        lora = None
        if fp.kind == "lora":
            lora = (fp.lora.rank, fp.lora.alpha, tuple(fp.lora.target_modules))
            trainable = _lora_params(folder, *lora)
        else:
            trainable = denoiser_params
        base = 0 if fp.shared_base else denoiser_params
        head = fp.heads * _head_params(folder, fp.head_width)
        roles.append(
            Role(fp.name, fp.kind, base, trainable, head, lora, fp.forwards, fp.backprop_through)
        )
    return roles


@functools.lru_cache(maxsize=64)
def _trace(folder, lora: tuple | None, latent: int, input_grad: bool) -> tuple[int, int]:
    """(saved, checkpointed) bytes per sample; ``lora``: (rank, alpha, targets) or None."""
    net = build_meta(folder)
    if lora is not None or input_grad:
        net.requires_grad_(False)
    if lora is not None:
        from distillkit.config import LoraConfigSection
        from distillkit.students import lora_config

        section = LoraConfigSection(rank=lora[0], alpha=lora[1], target_modules=list(lora[2]))
        net.add_adapter(lora_config(section))
    tr = trace_activations(net, 1, latent, input_grad)
    return tr.saved, tr.checkpointed


def _activations(cfg, dirs, roles: list[Role], latent: int, batch: int) -> float:
    """Saved bytes of the worst update: the role's own passes (``forwards`` of them: a GAN
    discriminator step runs its network on fake and real), plus an input-gradient pass through
    each frozen network its loss back-propagates through (DMD2's GAN term, SiD's scores, APT)."""
    ckpt = cfg.train.gradient_checkpointing
    folder = dirs[next(d for d in DENOISERS if d in dirs)]
    pick = 1 if ckpt else 0
    through = _trace(folder, None, latent, True)[pick] if any(r.through for r in roles) else 0
    phases = [
        _trace(folder, r.lora, latent, False)[pick] * r.forwards + through * len(r.through)
        for r in roles
        if r.kind != "frozen"
    ]
    saved = max(phases) * batch
    if cfg.train.mixed_precision != "no":
        saved *= BF16_ACT
    return saved * (ACT_K_CKPT if ckpt else ACT_K) + ACT_C


def plan_memory(cfg, *, device: str = "cuda", sharding: str = "none", gpus: int = 1) -> Plan:
    """Peak bytes per device for ``cfg`` (a RunConfig), row by row."""
    dirs = component_dirs(cfg.teacher)
    name = next(d for d in DENOISERS if d in dirs)
    p_den = count_params(dirs[name])
    cuda = device == "cuda"
    wide = cfg.teacher.dtype == "fp32" or (cfg.teacher.dtype == "auto" and not cuda)
    t_bytes = 4 if wide else 2
    plan = Plan()
    frozen = {k: count_params(v) for k, v in dirs.items() if k != name}
    # with an encoding cache the text encoders leave the GPU (TeacherAdapter.use_precomputed);
    # the VAE stays counted whole (its decoder stays; the encoder is the smaller half)
    offload = cuda and bool(cfg.data.cache_dir)
    offloaded = {k: v for k, v in frozen.items() if offload and k.startswith("text_encoder")}
    on_device = {name: p_den, **{k: v for k, v in frozen.items() if k not in offloaded}}
    parts = ", ".join(f"{k} {v / 1e6:.0f}M" for k, v in on_device.items())
    teacher = sum(on_device.values())
    plan.rows.append((f"teacher, frozen ({t_bytes * 8}-bit): {parts}", teacher * t_bytes))
    if offloaded:
        parts = ", ".join(f"{k} {v / 1e6:.0f}M" for k, v in offloaded.items())
        plan.rows.append((f"on the CPU (data.cache_dir): {parts}", 0))
    roles = _roles(cfg, dirs, p_den)
    n = max(gpus, 1)
    split = {k: (n if k in SHARDED[sharding] else 1) for k in "wgo"}
    for r in roles:
        what = {"full": "full fp32 copy", "lora": "LoRA", "frozen": "frozen fp32 copy"}[r.kind]
        if r.kind == "lora":
            what += " on the shared base" if r.base == 0 else " + base copy in the teacher's dtype"
        if r.kind == "lora":
            weights = r.base * t_bytes + (r.trainable + r.head) * 4
        else:
            weights = (r.base + r.head) * 4
        plan.rows.append((f"{r.name} weights ({what})", weights / split["w"]))
    trained = sum(r.trainable + r.head for r in roles)
    largest = max((r.trainable + r.head for r in roles), default=0)
    plan.rows.append(
        ("gradients (fp32, one role's at a time: freed after its step)", largest * 4 / split["g"])
    )
    opt = cfg.train.optimizer
    plan.rows.append(
        (
            f"optimizer states ({opt}: {STATE_BYTES[opt]:g} B/param)",
            trained * STATE_BYTES[opt] / split["o"],
        )
    )
    if cfg.train.ema.decay > 0:
        gen = next(r for r in roles if r.name == "generator")
        plan.rows.append(("generator EMA (fp32)", gen.trainable * 4 / split["w"]))
    if cfg.train.mixed_precision != "no":
        most = max(r.trainable + r.head for r in roles)
        plan.rows.append(
            ("autocast bf16 copies of the trained role's weights", most * 2 / split["w"])
        )
    latent = _latent_size(cfg, dirs, name)
    acts = _activations(cfg, dirs, roles, latent, cfg.train.batch_size)
    ck = "on" if cfg.train.gradient_checkpointing else "off"
    plan.rows.append(
        (f"activations (batch {cfg.train.batch_size}, {latent}x{latent} latents, ckpt {ck})", acts)
    )
    if cuda:
        plan.rows.append(("CUDA context and allocator slack", CUDA_OVERHEAD))
    else:
        plan.rows.append((CPU_RUNTIME_ROW, CPU_RUNTIME))
    return plan


def _latent_size(cfg, dirs, denoiser: str) -> int:
    vae = json.loads((dirs["vae"] / "config.json").read_text()) if "vae" in dirs else {}
    factor = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
    if vae.get("_class_name") == "AutoencoderDC":
        factor = 2 ** (len(vae["encoder_block_out_channels"]) - 1)
    return int(cfg.teacher.resolution) // factor


# ----------------------------------------------------------------------------- levers and CLI


def _with(cfg, **changes):
    """A copy of ``cfg`` with dotted-path changes (no re-validation: plans only read it)."""
    out = cfg.model_copy(deep=True)
    for path, value in changes.items():
        node, *rest = path.split("__")
        target = getattr(out, node)
        for part in rest[:-1]:
            target = getattr(target, part)
        setattr(target, rest[-1], value)
    return out


def lever_configs(cfg, sharding: str) -> list[tuple[str, object, str, int]]:
    """(label, config, sharding, gpus) for each lever not yet on, then all of them together."""
    allowed = getattr(cfg.recipe, "students", ("lora", "full"))
    lora = {"student__type": "lora"}
    if hasattr(cfg.recipe, "fake_score"):
        lora["recipe__fake_score"] = "lora"
    out, everything = [], {}
    if "lora" in allowed and cfg.student.type != "lora":
        settings = ", ".join(f"{k.replace('__', '.')}={v}" for k, v in lora.items())
        out.append((f"LoRA student ({settings})", lora))
    if "lora" in allowed and not cfg.student.shared_base:
        shared = {**lora, "student__shared_base": True}
        out.append(("adapter-shared base (student.shared_base=true)", shared))
        everything.update(shared)
    if not cfg.train.gradient_checkpointing:
        out.append(("gradient checkpointing", {"train__gradient_checkpointing": True}))
        everything["train__gradient_checkpointing"] = True
    if cfg.train.mixed_precision == "no":
        out.append(("bf16 mixed precision", {"train__mixed_precision": "bf16"}))
        everything["train__mixed_precision"] = "bf16"
    if cfg.train.optimizer == "adamw":
        out.append(("8-bit AdamW (train.optimizer=adamw8bit)", {"train__optimizer": "adamw8bit"}))
        everything["train__optimizer"] = "adamw8bit"
    if not cfg.data.cache_dir:
        cache = {"data__cache_dir": "encodings"}
        out.append(("text encoders off the GPU (data.cache_dir=DIR)", cache))
        everything.update(cache)
    rows = [(label, _with(cfg, **ch), sharding, 1) for label, ch in out]
    if sharding == "none":
        rows.append(("FSDP over 8 GPUs (recipes/accelerate/fsdp_*.yaml)", cfg, "fsdp", 8))
    if len(everything) > 1:
        rows.append(("all of the above (one GPU)", _with(cfg, **everything), sharding, 1))
    return rows


def parse_memory(text: str) -> float:
    """'80GB' / '80' / '24GiB' / '512MB' -> bytes (GB read as GiB, as GPU sizes are quoted)."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = {"g": GIB, "m": 2**20, "t": 2**40}.get(t[-1:])
    try:
        value = float(t[:-1]) * scale if scale else float(t) * GIB
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ConfigError(
            f"--gpu-memory {text!r}: give a positive size such as 80GB, 24GiB, 512MB or 80"
        )
    return value


def format_plan(plan: Plan, budget: float) -> str:
    width = max(len(label) for label, _ in plan.rows) + 2
    lines = [f"{'component':<{width}}{'GiB':>8}"]
    lines += [f"{label:<{width}}{b / GIB:>8.2f}" for label, b in plan.rows]
    verdict = "fits" if plan.total <= budget else "does NOT fit"
    lines.append(f"{'peak per device':<{width}}{plan.total / GIB:>8.2f}")
    lines.append(f"{verdict} in {budget / GIB:.0f} GiB")
    return "\n".join(lines)

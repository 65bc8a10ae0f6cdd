"""Real-size denoiser architectures on the meta device: parameter counts and activation bytes.

Why: `distillkit plan` must answer "does this fit?" before anything is downloaded. The shipped
teachers' component configs live in ``teachers/configs/<card>/<component>/config.json`` (or are
read from a local pipeline directory); models are built on the meta device (no memory, no
weights), and one meta forward with saved-tensor hooks measures exactly what autograd keeps for
the backward pass at the configured batch and resolution.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distillkit.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "teachers" / "configs"
DENOISERS = ("unet", "transformer")
# what diffusers' enable_gradient_checkpointing recomputes (also the FSDP wrap units)
CHECKPOINT_UNITS = (
    "ResnetBlock2D", "BasicTransformerBlock", "SanaTransformerBlock", "JointTransformerBlock",
    "FluxTransformerBlock", "FluxSingleTransformerBlock",
)  # fmt: skip
SANA_TEXT_TOKENS = 300  # SanaPipeline's max_sequence_length
CLIP_TOKENS = 77
SD3_T5_TOKENS = 256  # StableDiffusion3Pipeline's max_sequence_length (after 77 CLIP tokens)
FLUX_T5_TOKENS = 512  # FluxPipeline's (FLUX.1-dev's) max_sequence_length


def component_dirs(teacher_cfg) -> dict[str, Path]:
    """component -> folder holding its config.json: a local pipeline dir, else the card's."""
    local = Path(str(teacher_cfg.model_id or "")).expanduser()
    if (local / "model_index.json").is_file():
        root = local
    elif teacher_cfg.card and (CONFIGS / Path(teacher_cfg.card).stem).is_dir():
        root = CONFIGS / Path(teacher_cfg.card).stem
    else:
        raise ConfigError(
            f"plan: no architecture configs for teacher {teacher_cfg.model_id!r}; give a local "
            f"pipeline directory as teacher.model_id or a card with {CONFIGS}/<card>/"
        )
    found = {p.parent.name: p.parent for p in sorted(root.glob("*/config.json"))}
    if not any(d in found for d in DENOISERS):
        raise ConfigError(f"plan: {root} has no unet/ or transformer/ config.json")
    return found


@functools.lru_cache(maxsize=32)
def count_params(folder: Path) -> int:
    """Parameters of ``folder``'s model (cached: plans try many levers on one architecture)."""
    return n_params(build_meta(folder))


def build_meta(folder: Path) -> nn.Module:
    """The module of ``folder/config.json`` with meta tensors (diffusers or transformers class)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        module = instantiate(read_config(folder))
    # init_empty_weights re-creates parameters as they register, which unties transformers'
    # tied embeddings (T5's shared / embed_tokens): tie them again or they count twice
    if hasattr(module, "tie_weights"):
        module.tie_weights()
    return module


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def instantiate(cfg: dict) -> nn.Module:
    """The diffusers (``_class_name``) or transformers (``architectures``) model of a config,
    built where the caller's device / dtype / empty-weights context puts it."""
    import diffusers
    import transformers

    if "_class_name" in cfg:
        return getattr(diffusers, cfg["_class_name"]).from_config(cfg)
    arch = cfg["architectures"][0]
    extra = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures")}
    config = transformers.AutoConfig.for_model(cfg["model_type"], **extra)
    return getattr(transformers, arch)(config)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class _FlashLikeAttention(torch.autograd.Function):
    """SDPA as GPU flash / memory-efficient kernels keep it: q, k, v, out and a row statistic,
    never the L x L matrix (the meta device would otherwise fall back to the math kernel)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - never run: plans trace forwards only
        raise NotImplementedError


def _sdpa(*args, **kwargs):
    q, k, v = [*args[:3], *(kwargs.get(n) for n in ("query", "key", "value")[len(args[:3]) :])]
    return _FlashLikeAttention.apply(q, k, v)


def denoiser_inputs(
    net: nn.Module, batch: int, latent: int, input_grad: bool = False
) -> tuple[tuple, dict]:
    """Meta inputs of the family's forward at ``batch`` x ``latent``^2 latents."""
    c = net.config
    x = torch.empty(batch, c.in_channels, latent, latent, device="meta")
    x.requires_grad_(input_grad)
    t = torch.full((batch,), 500.0, device="meta")
    kind = type(net).__name__
    if kind == "SD3Transformer2DModel":
        text = torch.empty(batch, CLIP_TOKENS + SD3_T5_TOKENS, c.joint_attention_dim, device="meta")
        pooled = torch.empty(batch, c.pooled_projection_dim, device="meta")
        return (x,), {"timestep": t, "encoder_hidden_states": text, "pooled_projections": pooled}
    if kind == "FluxTransformer2DModel":
        tokens = (latent // 2) ** 2
        packed = torch.empty(batch, tokens, c.in_channels, device="meta")
        packed.requires_grad_(input_grad)
        kwargs = {
            "timestep": t / 1000,
            "encoder_hidden_states": torch.empty(
                batch, FLUX_T5_TOKENS, c.joint_attention_dim, device="meta"
            ),
            "pooled_projections": torch.empty(batch, c.pooled_projection_dim, device="meta"),
            "img_ids": torch.zeros(tokens, 3, device="meta"),
            "txt_ids": torch.zeros(FLUX_T5_TOKENS, 3, device="meta"),
            "guidance": torch.full((batch,), 3.5, device="meta") if c.guidance_embeds else None,
        }
        return (packed,), kwargs
    if kind == "SanaTransformer2DModel":
        text = torch.empty(batch, SANA_TEXT_TOKENS, c.caption_channels, device="meta")
        mask = torch.ones(batch, SANA_TEXT_TOKENS, device="meta")
        return (x,), {"timestep": t, "encoder_hidden_states": text, "encoder_attention_mask": mask}
    kwargs = {"encoder_hidden_states": torch.empty(batch, CLIP_TOKENS, c.cross_attention_dim)}
    kwargs["encoder_hidden_states"] = kwargs["encoder_hidden_states"].to("meta")
    if c.addition_embed_type == "text_time":
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.empty(batch, pooled, device="meta"),
            "time_ids": torch.empty(batch, 6, device="meta"),
        }
    return (x, t), kwargs


@dataclass
class ActivationTrace:
    saved: int  # bytes autograd keeps for the backward (no checkpointing)
    checkpointed: int  # the same with every CHECKPOINT_UNIT recomputed in the backward


def trace_activations(
    net: nn.Module, batch: int, latent: int, input_grad: bool = False
) -> ActivationTrace:
    """Bytes saved for the backward by one forward of ``net`` (its requires_grad flags as set;
    ``input_grad``: the gradient flows back to the noisy input, e.g. a GAN generator loss).

    With checkpointing, a unit keeps only its inputs, plus the largest unit's own activations
    while it is recomputed.
    """
    net.to("meta")  # buffers too (built real, e.g. SD3's 384^2 position table): one device
    params = {id(p) for p in net.parameters()}
    units = [m for m in net.modules() if type(m).__name__ in CHECKPOINT_UNITS]
    stack: list[int] = []
    outside: dict[int, int] = {}
    per_unit: dict[int, dict[int, int]] = {}
    unit_inputs: dict[int, int] = {}

    def pack(t: torch.Tensor):
        base = t._base if t._base is not None else t
        if id(base) not in params and id(t) not in params:
            target = per_unit.setdefault(stack[0], {}) if stack else outside
            target[id(base)] = base.nbytes
        return t

    def pre(module, args, kwargs):
        if not stack:
            for a in (*args, *kwargs.values()):
                if isinstance(a, torch.Tensor) and a.is_floating_point():
                    unit_inputs[id(a)] = a.nbytes
        stack.append(id(module))

    def post(module, args, out):
        stack.pop()

    hooks = [u.register_forward_pre_hook(pre, with_kwargs=True) for u in units]
    hooks += [u.register_forward_hook(post) for u in units]
    args, kwargs = denoiser_inputs(net, batch, latent, input_grad)
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _sdpa
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            net(*args, return_dict=False, **kwargs)
    finally:
        F.scaled_dot_product_attention = original
        for h in hooks:
            h.remove()
    inside = {k: v for unit in per_unit.values() for k, v in unit.items()}
    full = sum({**outside, **inside}.values())
    largest = max((sum(u.values()) for u in per_unit.values()), default=0)
    kept = {**outside, **unit_inputs}
    return ActivationTrace(saved=full, checkpointed=sum(kept.values()) + largest)

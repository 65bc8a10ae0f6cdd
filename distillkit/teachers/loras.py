"""The user's style or character LoRAs on the teacher (``teacher.loras``).

Each is loaded through the family pipeline's own ``load_lora_weights`` (so diffusers reads the
diffusers, peft and kohya key formats it knows, with the file's alphas), weighted with
``set_adapters`` and fused into the denoiser for the whole run: every recipe, every student
type and the shared-base mode then see one teacher, base + style, with no LoRA cost per call.

Before fusing, each LoRA's factors are kept (CPU, fp32, strength folded into B). The export
needs them: its LoRA file must give base + style + speed on the *plain* base pipeline, which is
one LoRA whose rank stacks the style's factors and the student's per layer (exact, no refit).

Only denoiser LoRAs: a file with text-encoder weights is refused, since the encoders' outputs
are cached and the LoRA file would then need encoder layers too (not built yet).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import DiffusionPipeline
from peft import LoraConfig
from torch import Tensor, nn

from distillkit.errors import ConfigError

if TYPE_CHECKING:
    from distillkit.config import TeacherConfig, TeacherLora

ADAPTER_PREFIX = "teacher_lora_"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
SMOKE_RANK = 4

Factors = dict[str, tuple[Tensor, Tensor]]  # module name -> (A, B with the scaling folded in)


@dataclass
class TeacherLoras:
    """What the export needs of the fused LoRAs (the card reads teacher.loras itself)."""

    factors: Factors
    reload_base: Callable[[], nn.Module]  # the teacher's denoiser as published, without LoRAs
    notes: list[str] = field(default_factory=list)  # what --smoke substituted


def adapter_name(index: int, spec: TeacherLora) -> str:
    return ADAPTER_PREFIX + (spec.name or str(index))


def layer_factors(net: nn.Module, adapters: list[str]) -> Factors:
    """Per peft LoRA layer of ``net``: the named adapters' factors stacked along the rank, with
    each adapter's scaling (alpha / r times its set_adapters weight) folded into B, so that
    ``B @ A`` is the layer's whole weight change. Conv LoRAs stack the same way (A's output
    channels, B's input channels)."""
    from peft.tuners.lora import LoraLayer

    out: Factors = {}
    for name, layer in net.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        present = [a for a in adapters if a in layer.lora_A]
        for a in present:
            if a in layer.lora_magnitude_vector or layer.lora_bias.get(a, False):
                raise ConfigError(
                    f"{a.removeprefix(ADAPTER_PREFIX)}: DoRA and LoRA-bias adapters cannot be "
                    "stacked into the exported LoRA file; use a plain LoRA"
                )
        if present:
            downs = [layer.lora_A[a].weight.detach().float() for a in present]
            ups = [layer.lora_B[a].weight.detach().float() * layer.scaling[a] for a in present]
            out[name] = (torch.cat(downs, 0).cpu(), torch.cat(ups, 1).cpu())
    return out


def stack(*parts: Factors) -> Factors:
    """Several weight changes as one LoRA: per layer, the ranks side by side."""
    out: Factors = {}
    for factors in parts:
        for name, (down, up) in factors.items():
            if name in out:
                d, u = out[name]
                down, up = torch.cat([d, down.to(d.device)], 0), torch.cat([u, up.to(u.device)], 1)
            out[name] = (down, up)
    return out


def lora_file_state(factors: Factors) -> tuple[dict[str, Tensor], dict]:
    """peft-format tensors and the adapter metadata for ``factors``: every layer at scale 1
    (alpha = its rank), the most common rank as ``r`` and the others in the patterns."""
    ranks = {name: int(down.shape[0]) for name, (down, _) in factors.items()}
    common = Counter(ranks.values()).most_common(1)[0][0]
    others = {name: r for name, r in sorted(ranks.items()) if r != common}
    config = LoraConfig(
        r=common,
        lora_alpha=common,
        rank_pattern=others,
        alpha_pattern=dict(others),
        target_modules=sorted(factors),
    )
    metadata = {
        key: sorted(value) if isinstance(value, set) else value
        for key, value in config.to_dict().items()
    }
    tensors = {}
    for name, (down, up) in sorted(factors.items()):
        tensors[f"{name}.lora_A.weight"] = down.contiguous()
        tensors[f"{name}.lora_B.weight"] = up.contiguous()
    return tensors, metadata


def _source(spec: TeacherLora, index: int) -> str:
    local = Path(spec.path).expanduser()
    looks_local = spec.path.startswith((".", "/", "~")) or local.exists()
    if looks_local and not local.exists():
        raise ConfigError(
            f"teacher.loras[{index}].path: {spec.path} does not exist; give a .safetensors "
            "file, a folder holding one (with weight_name), or a Hub repo id"
        )
    return str(local) if looks_local else spec.path


def check_file(spec: TeacherLora, index: int) -> str:
    """--smoke cannot put a LoRA for the real network on the tiny teacher; it still opens the
    file, so a wrong path or a pickle file fails the preflight. Returns what it found."""
    from safetensors import safe_open

    source = Path(_source(spec, index))
    if not source.exists():
        return f"{spec.path} is a Hub id: not opened (offline preflight)"
    file = source / spec.weight_name if spec.weight_name else source
    if file.is_dir():
        found = sorted(file.glob("*.safetensors"))
        if len(found) != 1:
            raise ConfigError(
                f"teacher.loras[{index}]: {file} holds {len(found)} .safetensors files; "
                "name one with weight_name"
            )
        file = found[0]
    try:
        with safe_open(str(file), framework="pt") as f:
            count = len(list(f.keys()))
    except Exception as err:  # safetensors raises its own error types for a foreign file
        raise ConfigError(
            f"teacher.loras[{index}].path: {file} is not a readable safetensors file ({err})"
        ) from None
    return f"{file} opened ({count} tensors)"


def random_lora_state(denoiser: nn.Module, prefix: str, seed: int) -> dict[str, Tensor]:
    """A small random LoRA for ``denoiser``'s attention projections, keyed as a diffusers LoRA
    file is (``<prefix>.<module>.lora_A.weight``): --smoke's stand-in for a user's LoRA, which
    only fits the real network."""
    import copy

    from peft.utils import get_peft_model_state_dict

    probe = copy.deepcopy(denoiser)
    probe.add_adapter(
        LoraConfig(r=SMOKE_RANK, lora_alpha=SMOKE_RANK, target_modules=["to_q", "to_v"]),
        adapter_name="probe",
    )
    gen = torch.Generator().manual_seed(seed)
    state = get_peft_model_state_dict(probe, adapter_name="probe")
    return {
        f"{prefix}.{k}": 0.05 * torch.randn(v.shape, generator=gen).to(v.dtype)
        for k, v in state.items()
    }


def apply_teacher_loras(
    pipe: DiffusionPipeline,
    cfg: TeacherConfig,
    denoiser_attr: str,
    reload_base: Callable[[], nn.Module],
    smoke: bool = False,
) -> TeacherLoras | None:
    """Load, weight, record and fuse ``cfg.loras`` on ``pipe``'s denoiser."""
    if not cfg.loras:
        return None
    denoiser = getattr(pipe, denoiser_attr)
    names, notes = [], []
    for index, spec in enumerate(cfg.loras):
        name = adapter_name(index, spec)
        if smoke:
            found = check_file(spec, index)
            source: str | dict = random_lora_state(denoiser, denoiser_attr, seed=index)
            notes.append(
                f"smoke: teacher.loras[{index}]: {found}; the tiny teacher wears a random "
                f"rank-{SMOKE_RANK} LoRA at scale {spec.scale} instead"
            )
            kwargs = {}
        else:
            source = _source(spec, index)
            kwargs = {"use_safetensors": cfg.use_safetensors}
            if spec.weight_name:
                kwargs["weight_name"] = spec.weight_name
        try:
            pipe.load_lora_weights(source, adapter_name=name, **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if "safetensors" in reason and cfg.use_safetensors:
                reason += (
                    " (pickle LoRA files are not loaded: convert it to safetensors, or set "
                    "teacher.use_safetensors=false if you trust its source)"
                )
            raise ConfigError(
                f"teacher.loras[{index}]: {type(pipe).__name__}.load_lora_weights could not "
                f"load {spec.path}: {reason}"
            ) from None
        for attr in TEXT_ENCODERS:
            encoder = getattr(pipe, attr, None)
            if name in (getattr(encoder, "peft_config", None) or {}):
                raise ConfigError(
                    f"teacher.loras[{index}]: {spec.path} has {attr} weights; only LoRAs of the "
                    f"{denoiser_attr} can be distilled for now (strip the text-encoder keys)"
                )
        if name not in (getattr(denoiser, "peft_config", None) or {}):
            raise ConfigError(
                f"teacher.loras[{index}]: {spec.path} holds no weights for this teacher's "
                f"{type(denoiser).__name__}; is it a LoRA for another model family?"
            )
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[spec.scale for spec in cfg.loras])
    factors = layer_factors(denoiser, names)
    pipe.fuse_lora(components=[denoiser_attr], lora_scale=1.0, adapter_names=names)
    pipe.unload_lora_weights()  # the fused weights stay; the LoRA layers go
    denoiser.requires_grad_(False)
    return TeacherLoras(factors, reload_base, notes)

"""Trainable networks initialised from the teacher's denoiser: LoRA adapters or a full copy."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig
from torch import nn

if TYPE_CHECKING:
    from distillkit.config import LoraConfigSection

ADAPTER = "default"


def lora_config(section: LoraConfigSection) -> LoraConfig:
    return LoraConfig(
        r=section.rank,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=list(section.target_modules),
    )


def trainable_copy(
    denoiser: nn.Module,
    kind: str,
    lora: LoraConfigSection | None = None,
    gradient_checkpointing: bool = False,
) -> nn.Module:
    """A copy of ``denoiser`` in fp32 whose trainable part is LoRA (peft) or every weight.

    fp32 master weights keep small updates from vanishing; mixed precision happens in autocast.
    """
    net = copy.deepcopy(denoiser).to(torch.float32)
    net.requires_grad_(False)
    if kind == "lora":
        assert lora is not None
        try:
            net.add_adapter(lora_config(lora), adapter_name=ADAPTER)
        except ValueError as err:
            raise ValueError(
                f"student.lora.target_modules={lora.target_modules} matched nothing usable in "
                f"{type(net).__name__}: {err}"
            ) from None
    elif kind == "full":
        net.requires_grad_(True)
    else:
        raise ValueError(f"unknown student type {kind!r}")
    if gradient_checkpointing:
        net.enable_gradient_checkpointing()
    net.train()
    return net


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def is_lora(net: nn.Module) -> bool:
    return bool(getattr(net, "peft_config", None))


def merged_copy(net: nn.Module) -> nn.Module:
    """A plain diffusers model with LoRA folded into the base weights (for the pipeline export)."""
    merged = copy.deepcopy(net)
    if is_lora(merged):
        merged.fuse_lora(adapter_names=[ADAPTER])
        merged.unload_lora()
    merged.requires_grad_(False)
    return merged.eval()

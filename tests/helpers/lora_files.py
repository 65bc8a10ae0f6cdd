"""Style LoRA files with known weights, for teacher.loras tests: the diffusers (peft keys) and
kohya (lora_down / lora_up / alpha) formats, both as users download them."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn


def linear_layers(net: nn.Module, suffix: str) -> list[str]:
    return [n for n, m in net.named_modules() if n.endswith(suffix) and isinstance(m, nn.Linear)]


def write_style_lora(
    net: nn.Module,
    path: Path,
    modules: list[str],
    *,
    fmt: str,
    rank: int = 2,
    alpha: float = 1.0,
    prefix: str = "unet",
    seed: int = 0,
    std: float = 0.3,
) -> dict[str, Tensor]:
    """Write a LoRA for ``modules`` of ``net`` and return each module's weight change at scale
    1 (``alpha / rank * B @ A``; the diffusers format has no alpha, which means scale 1)."""
    gen = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for name in modules:
        weight = dict(net.named_modules())[name].weight
        down = std * torch.randn(rank, weight.shape[1], generator=gen)
        up = std * torch.randn(weight.shape[0], rank, generator=gen)
        if fmt == "kohya":
            key = f"lora_{prefix}_" + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.lora_up.weight"] = up
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
            deltas[name] = alpha / rank * up @ down
        elif fmt == "diffusers":
            tensors[f"{prefix}.{name}.lora_A.weight"] = down
            tensors[f"{prefix}.{name}.lora_B.weight"] = up
            deltas[name] = up @ down
        else:
            raise ValueError(fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return deltas

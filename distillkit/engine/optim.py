"""Optimisers for the trainable roles: AdamW, or bitsandbytes' 8-bit AdamW to save memory.

Why: AdamW keeps two fp32 moments per trained parameter (8 bytes); 8-bit AdamW keeps them in
one byte each with block-wise scales (about 2 bytes), which is what lets a full SDXL student and
its fake score fit on fewer GPUs. bitsandbytes' 8-bit kernels need CUDA, so asking for them
anywhere else fails at start-up with the field's name instead of after the teacher has loaded.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from distillkit.errors import ConfigError

if TYPE_CHECKING:
    from distillkit.config import TrainConfig

# bytes of optimiser state per trained parameter (used by `distillkit plan` too)
STATE_BYTES = {"adamw": 8.0, "adamw8bit": 2.0}


def bitsandbytes_importable() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def check_optimizer(train_cfg: TrainConfig) -> None:
    """Refuse train.optimizer=adamw8bit where it cannot run (called before any weights load)."""
    if train_cfg.optimizer != "adamw8bit":
        return
    if not bitsandbytes_importable():
        raise ConfigError(
            "train.optimizer=adamw8bit needs bitsandbytes: pip install bitsandbytes "
            "(or use train.optimizer=adamw)"
        )
    if not torch.cuda.is_available():
        raise ConfigError(
            "train.optimizer=adamw8bit needs a CUDA device (bitsandbytes' 8-bit kernels); "
            "on this machine use train.optimizer=adamw"
        )


def build_optimizer(
    params: Iterable[torch.nn.Parameter], train_cfg: TrainConfig, lr: float
) -> torch.optim.Optimizer:
    """The optimiser ``train.optimizer`` names, with the run's betas and weight decay."""
    kwargs = {
        "lr": lr,
        "betas": (train_cfg.adam_beta1, train_cfg.adam_beta2),
        "weight_decay": train_cfg.weight_decay,
    }
    params = list(params)
    if train_cfg.optimizer == "adamw8bit":
        check_optimizer(train_cfg)
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)

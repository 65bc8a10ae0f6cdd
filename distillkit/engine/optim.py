"""Optimisers for the trainable roles: AdamW, or bitsandbytes' 8-bit AdamW to save memory.

Why: AdamW keeps two fp32 moments per trained parameter (8 bytes); 8-bit AdamW keeps them in
one byte each with block-wise scales (about 2 bytes), which is what lets a full SDXL student and
its fake score fit on fewer GPUs. bitsandbytes' 8-bit kernels need CUDA, so asking for them
anywhere else fails at start-up with the field's name instead of after the teacher has loaded.

torch's AdamW is built fused where the parameters' device has the kernel (CPU and CUDA do): one
kernel per dtype group instead of a dozen foreach passes, and, the reason it matters here, the
fused step reads ``optimizer.found_inf`` and skips itself on the device when that flag is 1, so
the loop's NaN guard needs no host sync (see ``takes_found_inf`` and engine/loop.py).
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
    return torch.optim.AdamW(params, fused=fused_supported(params) or None, **kwargs)


FUSED_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def fused_supported(params: list[torch.Tensor]) -> bool:
    """torch ships fused Adam(W) kernels for floating-point parameters on these devices."""
    return bool(params) and all(
        p.is_floating_point() and p.device.type in FUSED_DEVICES for p in params
    )


def inner_optimizer(opt) -> torch.optim.Optimizer:
    """The torch optimiser inside accelerate's AcceleratedOptimizer wrapper(s)."""
    from accelerate.optimizer import AcceleratedOptimizer

    while isinstance(opt, AcceleratedOptimizer):
        opt = opt.optimizer
    return opt


def takes_found_inf(opt) -> bool:
    """Whether ``opt.step()`` can be vetoed on the device through the ``found_inf`` attribute.

    Only torch's fused Adam/AdamW does it exactly (torch/optim/adam.py ``_fused_adam``: the kernel
    returns early when found_inf == 1, then the step counters are decremented again). Not:
    bitsandbytes' 8-bit AdamW (never reads the attribute), non-fused torch Adam (asserts that it is
    None), or any optimiser under accelerate's fp16 GradScaler (``scaler.step`` sets and owns
    grad_scale / found_inf itself). A checkpoint written by a non-fused optimiser also restores
    ``fused=None`` into the param groups, so this is asked at every step.
    """
    if getattr(opt, "scaler", None) is not None:
        return False
    inner = inner_optimizer(opt)
    return isinstance(inner, torch.optim.Adam) and all(
        g.get("fused") and not g.get("differentiable") for g in inner.param_groups
    )


# accelerate clips these itself (sharded gradients, DeepSpeed's engine, XLA): never folded
_OWN_CLIPPING = ("FSDP", "DEEPSPEED", "XLA", "MEGATRON_LM")


def folds_clipping(accelerator, opt) -> bool:
    """Whether gradient clipping can ride on the fused AdamW step as its ``grad_scale``.

    Why: clipping multiplies every gradient in place, one more read and write of all of them per
    update, memory-bound work as large as a third of the optimiser step itself. Fused Adam(W)
    divides each gradient by ``grad_scale`` as it reads it (the AMP unscale hook), so passing the
    clip divisor there gives the same update without that pass. Only where accelerate's own
    clip would be plain torch clipping of whole local gradients (DDP has all-reduced them already)
    and no GradScaler owns ``grad_scale``.
    """
    return accelerator.distributed_type.name not in _OWN_CLIPPING and takes_found_inf(opt)


def clip_divisor(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """1 / torch's clip coefficient: gradients / this == clip_grad_norm_'s clipped gradients."""
    return ((total_norm + 1e-6) / max_norm).clamp_min(1.0)


def guarded_step(opt, grad_norm, bad, *, folded: bool, max_norm: float):
    """One optimiser step under the NaN veto; returns ``(bad, applied)`` or None when skipped.

    ``bad`` is the step's 0-dim device flag so far (None: no role has updated yet); a
    non-finite ``grad_norm`` raises it, and it vetoes this and every later update of the step.
    Optimisers that take ``found_inf`` skip exactly on the device (``applied`` = 1 - bad, no
    sync); ``folded`` passes the clip divisor as ``grad_scale``. The rest (bitsandbytes' 8-bit
    AdamW, non-fused torch optimisers, fp16's GradScaler, which owns found_inf) sync once here:
    None when the gradient was not finite, else ``(bad, None)``.
    """
    if isinstance(grad_norm, torch.Tensor) and takes_found_inf(opt):
        nonfinite = (~torch.isfinite(grad_norm.detach())).float()
        bad = nonfinite if bad is None else torch.maximum(bad, nonfinite)
        inner = inner_optimizer(opt)
        inner.found_inf = bad
        if folded:  # the step divides the gradients by the clip divisor as it reads them
            inner.grad_scale = clip_divisor(grad_norm.detach(), max_norm)
        try:
            opt.step()
        finally:
            inner.found_inf = inner.grad_scale = None
        return bad, 1.0 - bad
    if grad_norm is not None and not torch.isfinite(torch.as_tensor(grad_norm)):
        return None
    opt.step()
    return bad, None

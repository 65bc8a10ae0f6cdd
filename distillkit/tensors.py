"""Tensor helpers with no distillkit dependencies, shared by recipes and the loop."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


@torch.no_grad()
def masked_lerp_(targets: Iterable[Tensor], sources: Iterable[Tensor], weight, ok=None) -> None:
    """target <- target + weight * ok * (source - target), in place and without a host sync.

    A vetoed step (``ok`` = 0) has weight 0 and leaves the target bit-identical: the optimiser
    skipped the same step, so the source holds the previous, finite weights. One fused
    ``_foreach_lerp_`` pass instead of lerp + where + copy per tensor: 4.4x less time on a
    140M-parameter EMA here (0.65 s -> 0.15 s). Non-finite weights that an *applied* update
    produced do reach the target; the loop's finite check before every checkpoint catches them.
    """
    from torch.distributed.tensor import DTensor

    if ok is not None:
        weight = weight * ok if isinstance(weight, Tensor) else ok * weight
    plain_targets, plain_sources = [], []
    for target, source in zip(targets, sources):
        if isinstance(source, DTensor) and not isinstance(target, DTensor):
            source = source.full_tensor()  # FSDP role -> whole target (LCM's): a collective
        source = source.detach().to(target.dtype)
        if isinstance(target, DTensor):  # sharded EMA shadows: DTensor ops, one at a time
            w = weight.to(target.dtype) if isinstance(weight, Tensor) else weight
            target.lerp_(source, w)
        else:
            plain_targets.append(target)
            plain_sources.append(source)
    if not plain_targets:
        return
    if not isinstance(weight, Tensor):
        torch._foreach_lerp_(plain_targets, plain_sources, float(weight))
        return
    by_dtype = {t.dtype: weight.to(device=t.device, dtype=t.dtype) for t in plain_targets}
    torch._foreach_lerp_(plain_targets, plain_sources, [by_dtype[t.dtype] for t in plain_targets])

"""FSDP-aware state: gather a sharded role's full weights, load full weights back into shards.

Under FSDP (accelerate's FSDP2) every trainable role's parameters are DTensor shards, so
anything that needs whole tensors (the per-role checkpoint files, the export, the EMA copy used
for the export) first gathers them with a collective that *every* rank must enter; rank 0 then
writes. Without FSDP these helpers read the local module and involve no communication.

``DISTILLKIT_FSDP_ON_CPU=1`` is a test-only switch: accelerate 1.15 never selects FSDP on a CPU
(``AcceleratorState.__init__`` sets ``DistributedType.FSDP`` only for GPU-like multi-device types,
so ``ACCELERATE_USE_FSDP=true`` with ``ACCELERATE_USE_CPU=1`` silently runs DDP). With the switch,
``make_accelerator`` builds accelerate's FSDP plugin from the usual ``FSDP_*`` environment and
sets the two fields accelerate itself sets on a GPU (``AcceleratorState.distributed_type`` and
``PartialState``'s copy), so the real FSDP2 code paths (``fully_shard``, DTensor parameters,
``save_fsdp_model`` / ``load_fsdp_model`` through torch.distributed.checkpoint, sharded optimiser
states) run on gloo. It is how tests/integration/test_fsdp.py runs FSDP without GPUs.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

CPU_FSDP_ENV = "DISTILLKIT_FSDP_ON_CPU"


def make_accelerator(mixed_precision: str, collective_timeout_s: float = 600) -> Accelerator:
    """``collective_timeout_s``: how long a rank waits in a collective for the others (a dead
    or hung peer) before it fails, through accelerate's InitProcessGroupKwargs."""
    from accelerate.utils import InitProcessGroupKwargs

    handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=collective_timeout_s))]
    if os.environ.get(CPU_FSDP_ENV) != "1":
        accelerator = Accelerator(mixed_precision=mixed_precision, kwargs_handlers=handlers)
        _check_world(accelerator)
        return accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # FSDP_VERSION, FSDP_AUTO_WRAP_POLICY, ... from env
    accelerator = Accelerator(
        mixed_precision=mixed_precision, cpu=True, fsdp_plugin=plugin, kwargs_handlers=handlers
    )
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        raise RuntimeError(f"{CPU_FSDP_ENV}=1 needs a multi-process CPU launch (torchrun)")
    # what AcceleratorState.__init__ does for FSDP on GPUs (state.py: distributed_type = FSDP,
    # fsdp_plugin = plugin, then PartialState._shared_state["distributed_type"] = ...)
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return accelerator


def _check_world(accelerator: Accelerator) -> None:
    """A launcher started N processes but accelerate set up one each (on a machine without
    GPUs a GPU/FSDP launch config does this): N independent runs would race on one output
    directory. Stop with the fix instead."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and accelerator.num_processes == 1:
        from distillkit.errors import ConfigError

        raise ConfigError(
            f"launched {world} processes, but accelerate found no device for a distributed run "
            f"(distributed type {accelerator.distributed_type.value}); on a machine without "
            "GPUs set ACCELERATE_USE_CPU=1 in the environment (DDP over gloo; accelerate does "
            "not run FSDP on a CPU)"
        )


def is_sharded(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def _local(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)  # DDP wraps; FSDP2 does not


def trainable_names(module: nn.Module) -> list[str]:
    return [name for name, p in _local(module).named_parameters() if p.requires_grad]


def gather_trainable(accelerator, module: nn.Module) -> dict[str, torch.Tensor] | None:
    """The role's trainable tensors, whole, on the CPU. Collective under FSDP: call it on every
    rank; only the main process gets the tensors (None elsewhere)."""
    names = set(trainable_names(module))
    if is_sharded(accelerator):
        state = accelerator.get_state_dict(module)  # full_state_dict + cpu_offload: rank 0 only
    else:
        state = _local(module).state_dict()
    if not accelerator.is_main_process:
        return None
    return {k: v.detach().cpu().contiguous() for k, v in state.items() if k in names}


def gather_full(accelerator, module: nn.Module) -> dict[str, torch.Tensor] | None:
    """Every tensor of the role (frozen base included), whole, on the main process only.
    Collective under FSDP."""
    if is_sharded(accelerator):
        state = accelerator.get_state_dict(module)
    else:
        state = _local(module).state_dict()
    return state if accelerator.is_main_process else None


def gather_tensors(accelerator, tensors: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """Whole copies of (possibly DTensor-sharded) tensors such as EMA shadows, main process
    only. Collective when any is a DTensor: call on every rank, same order."""
    from torch.distributed.tensor import DTensor

    full = [t.full_tensor() if isinstance(t, DTensor) else t for t in tensors]
    if not accelerator.is_main_process:
        return None
    return [t.detach().cpu().clone() for t in full]


def load_trainable_state(accelerator, module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load whole trainable tensors (read on every rank) into the role, sharded or not."""
    if is_sharded(accelerator):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )

        # full tensors in, each rank keeps its shard; strict=False: the frozen base is not here
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(module, dict(tensors), options=options)  # it rewrites the dict
        return
    _local(module).load_state_dict(tensors, strict=False)

"""Test-only introspection of multi-process runs: what each rank ended with and what it saw.

Why: callbacks run on the main process only, so they cannot show that ranks agree. With
``DISTILLKIT_DUMP_RANK_WEIGHTS=DIR`` every rank writes ``DIR/rank{i}.safetensors`` (its final
trainable weights per role) and ``DIR/rank{i}.json`` (the prompts of each of its micro-batches).
Unset, it costs nothing and writes nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

if TYPE_CHECKING:
    from distillkit.engine.loop import Trainer

ENV = "DISTILLKIT_DUMP_RANK_WEIGHTS"


def dump_rank_state(trainer: Trainer) -> Path | None:
    """Write this rank's trainable weights and per-step prompts when ``ENV`` names a directory."""
    target = os.environ.get(ENV)
    if not target:
        return None
    out = Path(target)
    out.mkdir(parents=True, exist_ok=True)
    acc = trainer.accelerator
    rank = acc.process_index
    tensors = {}
    for role, module in trainer.recipe.roles.items():
        for name, p in acc.unwrap_model(module).named_parameters():
            if p.requires_grad:
                # FSDP: whole tensors (a collective, same order on every rank)
                whole = p.full_tensor() if isinstance(p, DTensor) else p
                tensors[f"{role}.{name}"] = whole.detach().float().cpu().contiguous()
    save_file(tensors, str(out / f"rank{rank}.safetensors"))
    # micro_batches is the pure (step, rank) -> samples function the loop itself trained on
    steps = range(trainer.cfg.train.max_steps)
    prompts = {str(s): [list(mb[0]) for mb in trainer.micro_batches(s)] for s in steps}
    record = {"rank": rank, "num_processes": acc.num_processes, "prompts": prompts}
    (out / f"rank{rank}.json").write_text(json.dumps(record, indent=1))
    return out

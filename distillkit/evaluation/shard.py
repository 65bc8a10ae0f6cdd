"""Prompt-set evaluation on several processes (`accelerate launch`, `torchrun`): fixed batches
dealt round-robin to the ranks, metric inputs gathered back in sample order.

Why fixed batches: batch k always holds samples [k*B, (k+1)*B) and is seeded seed + k, whatever
the world size, so every image, and every Inception feature and CLIP score computed on that
batch, is the one a single process makes; only the rank that makes it changes. The ranks then
gather the per-sample features and scores with accelerate (`pad_across_processes` + `gather`),
so FID, precision / recall and CLIP score see the same inputs as a 1-process run.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from distillkit.errors import ConfigError

SHARDING = (
    "batch k (samples k*batch_size..., seed + k) generated on rank k mod world_size; Inception "
    "features and CLIP scores gathered in sample order (accelerate), scored on rank 0"
)


@dataclass(frozen=True)
class Shard:
    """This process's place among the evaluating ranks (one process: rank 0 of 1)."""

    rank: int
    world: int
    device: torch.device

    @classmethod
    def current(cls) -> Shard:
        """From accelerate's process state (set up by `accelerate launch` / `torchrun`; with
        ACCELERATE_USE_CPU=1 the ranks run on the CPU over gloo)."""
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env

        state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != state.num_processes:  # each rank would score everything and write
            raise ConfigError(
                f"launched on {launched} processes but accelerate set up {state.num_processes}: "
                "without GPUs set ACCELERATE_USE_CPU=1 (or `accelerate launch --cpu`)"
            )
        return cls(state.process_index, state.num_processes, torch.device(state.device))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def batches(self, samples: int, batch_size: int) -> list[int]:
        """Indices of the fixed batches this rank generates."""
        return list(range(self.rank, math.ceil(samples / batch_size), self.world))

    def gather_rows(self, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Every rank's ``rows`` (one per sample, ``index`` its sample number), in sample order,
        on the CPU; ranks with fewer (or no) samples are padded for the collective, then
        trimmed."""
        if self.world > 1:
            from accelerate.utils import gather, pad_across_processes

            rows = gather(pad_across_processes(rows.to(self.device), dim=0)).cpu()
            index = gather(pad_across_processes(index.to(self.device), dim=0, pad_index=-1))
            index = index.cpu()
            rows, index = rows[index >= 0], index[index >= 0]
        order = index.argsort()
        if not torch.equal(index[order], torch.arange(len(index))):
            raise RuntimeError(f"gathered samples {index[order].tolist()[:8]}... are not 0..n-1")
        return rows[order]

    def gather_objects(self, items: list[Any]) -> list[Any]:
        """Every rank's picklable ``items``, concatenated (a few grid images, not features)."""
        if self.world == 1:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)

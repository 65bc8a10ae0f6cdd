"""The FSDP-aware state helpers without processes: who gathers, what is kept, what is loaded.

The real sharded path (DTensor parameters on two gloo processes) is tests/integration/test_fsdp.py.
"""

from __future__ import annotations

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import save_file
from torch import nn

from distillkit.engine.sharding import _check_world, gather_trainable, load_trainable_state
from distillkit.engine.state import load_trainable
from distillkit.errors import ConfigError, DistillkitError


class FakeAccelerator:
    def __init__(self, sharded: bool, main: bool) -> None:
        self.distributed_type = DistributedType.FSDP if sharded else DistributedType.MULTI_CPU
        self.is_main_process = main
        self.calls = 0

    def get_state_dict(self, module):  # accelerate's FSDP2 gather: whole on rank 0 only
        self.calls += 1
        return module.state_dict() if self.is_main_process else {}


def half_frozen() -> nn.Module:
    net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    net[0].requires_grad_(False)
    return net


@pytest.mark.parametrize("main", [True, False])
def test_sharded_gather_is_entered_on_every_rank(main):
    acc, net = FakeAccelerator(sharded=True, main=main), half_frozen()
    got = gather_trainable(acc, net)
    assert acc.calls == 1  # a collective: non-main ranks must call it too
    if main:
        assert set(got) == {"1.weight", "1.bias"}  # trainable only, frozen base left out
    else:
        assert got is None


def test_unsharded_gather_unwraps_ddp_and_needs_no_collective():
    acc, net = FakeAccelerator(sharded=False, main=True), half_frozen()
    wrapper = nn.Module()
    wrapper.module = net  # what DDP looks like
    got = gather_trainable(acc, wrapper)
    assert acc.calls == 0
    assert set(got) == {"1.weight", "1.bias"}
    assert torch.equal(got["1.weight"], net[1].weight)


def test_load_trainable_checks_names_then_uses_the_loader(tmp_path):
    net = half_frozen()
    path = tmp_path / "role.safetensors"
    save_file({"1.weight": torch.ones(1, 3), "1.bias": torch.ones(1)}, str(path))
    seen = {}
    load_trainable(net, path, loader=lambda module, tensors: seen.update(tensors))
    assert set(seen) == {"1.weight", "1.bias"}
    load_trainable_state(FakeAccelerator(sharded=False, main=True), net, seen)
    assert torch.equal(net[1].weight, torch.ones(1, 3))

    save_file({"1.weight": torch.ones(1, 3)}, str(path))
    with pytest.raises(DistillkitError, match="missing"):
        load_trainable(net, path)
    save_file(
        {"1.weight": torch.ones(1, 3), "1.bias": torch.ones(1), "x": torch.ones(1)}, str(path)
    )
    with pytest.raises(DistillkitError, match="lacks"):
        load_trainable(net, path)


def test_a_multi_process_launch_that_accelerate_runs_as_single_processes_stops(monkeypatch):
    class Single:
        num_processes = 1
        distributed_type = DistributedType.NO

    monkeypatch.setenv("WORLD_SIZE", "2")  # e.g. an FSDP/GPU launch config on a CPU machine
    with pytest.raises(ConfigError, match="ACCELERATE_USE_CPU=1"):
        _check_world(Single())
    monkeypatch.setenv("WORLD_SIZE", "1")
    _check_world(Single())


def test_structural_choices_follow_the_shared_stream_when_the_loop_gives_one():
    from distillkit.engine.loop import SHARED_STREAM, step_generator
    from distillkit.recipes.base import Batch

    def batch(rank: int, shared: bool) -> Batch:
        own = step_generator(0, 5, 0, rank, 0)  # the loop's per-rank stream
        b = Batch(["a"], None, None, own)
        if shared:
            b.shared = step_generator(0, 5, 0, SHARED_STREAM, 0)
        return b

    # FSDP: every rank stops backward simulation at the same step (same number of gathers)
    assert len({batch(rank, shared=True).choice(1000) for rank in range(4)}) == 1
    # DDP / one process: the per-rank stream, as before
    assert len({batch(rank, shared=False).choice(1000) for rank in range(4)}) > 1

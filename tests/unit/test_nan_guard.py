"""The NaN guard without host syncs: a NaN-gradient step leaves the weights, the optimiser's
moments and step counters, the EMA and LCM's EMA target bit-identical; the hot path never reads
a tensor on the host between logging intervals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distillkit.engine.nanguard import GuardedEMA, NonfiniteTracker
from distillkit.engine.optim import inner_optimizer, takes_found_inf
from distillkit.tensors import masked_lerp_

REPO = Path(__file__).resolve().parents[2]
RECIPES = ("dmd2", "sid", "swiftbrush", "lcm", "apt")


def _trainer(tmp_path, recipe: str, *overrides: str):
    from accelerate import Accelerator

    from distillkit.config import load_config
    from distillkit.engine.loop import Trainer

    cfg = load_config(
        REPO / "recipes" / f"{recipe}_sd15.yaml",
        # batch 1 x 2 micro-batches: the accumulation path without sid_sd15's 128 rounds
        [
            f"output_dir={tmp_path / 'run'}",
            "logging.progress_bar=false",
            "train.batch_size=1",
            "train.grad_accumulation=2",
            *overrides,
        ],
    )
    (tmp_path / "run").mkdir()
    return Trainer(cfg, Accelerator(mixed_precision="no"), smoke=True, builtin_data=True)


def _snapshot(trainer) -> dict[str, torch.Tensor]:
    out = {}
    for role, params in trainer.params.items():
        for i, p in enumerate(params):
            out[f"{role}.param{i}"] = p.detach().clone()
        opt = inner_optimizer(trainer.optimizers[role])
        for i, p in enumerate(params):
            for key, value in opt.state.get(p, {}).items():
                out[f"{role}.state{i}.{key}"] = value.detach().clone()
    if trainer.ema is not None:
        for i, s in enumerate(trainer.ema.shadow_params):
            out[f"ema{i}"] = s.detach().clone()
    for name, module in trainer.recipe.state_modules().items():
        for key, value in module.state_dict().items():
            out[f"{name}.{key}"] = value.detach().clone()
    return out


def _bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_default_adamw_is_fused_and_takes_found_inf():
    from distillkit.config import TrainConfig
    from distillkit.engine.optim import build_optimizer

    opt = build_optimizer([torch.nn.Parameter(torch.zeros(3))], TrainConfig(), lr=1e-3)
    assert opt.param_groups[0]["fused"] and takes_found_inf(opt)
    opt.param_groups[0]["fused"] = None  # e.g. restored from a non-fused optimiser's checkpoint
    assert not takes_found_inf(opt)


def test_fused_adamw_found_inf_skips_exactly():
    """What the loop relies on, straight from torch: found_inf=1 leaves everything as it was."""
    p = torch.nn.Parameter(torch.randn(5))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    p.grad = torch.randn(5)
    opt.step()
    before = (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
    p.grad = torch.full((5,), float("nan"))
    opt.found_inf = torch.ones(())
    opt.step()
    assert torch.equal(p.detach(), before[0])
    assert all(torch.equal(opt.state[p][k], v) for k, v in before[1].items())
    opt.found_inf = torch.zeros(())
    p.grad = torch.randn(5)
    opt.step()
    assert not torch.equal(p.detach(), before[0]) and int(opt.state[p]["step"]) == 2


def test_guarded_ema_matches_diffusers_and_skips_exactly():
    from diffusers.training_utils import EMAModel

    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(2))]
    ours, ref = GuardedEMA(params, decay=0.9), EMAModel(params, decay=0.9)
    for k in range(5):
        with torch.no_grad():
            for p in params:
                p.add_(0.1 * (k + 1))
        ours.step(params)
        ref.step(params)
    for a, b in zip(ours.shadow_params, ref.shadow_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    before = [s.clone() for s in ours.shadow_params]
    with torch.no_grad():
        params[0].add_(1.0)  # a skipped step must not move the EMA whatever the weights hold
    ours.step_masked(params, torch.zeros(()))
    assert all(torch.equal(a, b) for a, b in zip(ours.shadow_params, before))
    assert ours.state_dict()["optimization_step"] == ref.optimization_step == 5


def test_masked_lerp_and_tracker():
    target, source = (
        [torch.zeros(3), torch.ones(2)],
        [torch.tensor([1.0, -4.0, 2.0]), -torch.ones(2)],
    )
    masked_lerp_(target, source, torch.tensor(0.5), torch.zeros(()))
    assert torch.equal(target[0], torch.zeros(3)) and torch.equal(target[1], torch.ones(2))
    masked_lerp_(target, source, torch.tensor(0.5), torch.ones(()))
    assert torch.equal(target[0], torch.tensor([0.5, -2.0, 1.0]))
    assert torch.equal(target[1], torch.zeros(2))
    half = [torch.zeros(2, dtype=torch.float16)]
    masked_lerp_(half, [torch.ones(2)], 0.25, torch.ones(()))  # float weight, cast source
    assert torch.equal(half[0], torch.full((2,), 0.25, dtype=torch.float16))
    tracker = NonfiniteTracker(torch.device("cpu"))
    for step, bad in enumerate([0, 1, 1, 0, 1, 1, 1]):
        tracker.record(step, torch.tensor(float(bad)))
    seen = tracker.read()
    assert (seen.count, seen.longest_run, seen.first, seen.last) == (5, 3, 1, 6)
    assert seen.where.startswith("steps 1-6")
    tracker.reset(keep_run=True)
    tracker.record(7, torch.tensor(1.0))
    assert tracker.read().longest_run == 4  # a run carried across a logging interval


@pytest.mark.parametrize("recipe", ["dmd2", "lcm"])
def test_nan_step_leaves_weights_moments_and_ema_bit_identical(tmp_path, monkeypatch, recipe):
    extra = ["train.ema.decay=0.9"]
    if recipe == "dmd2":
        extra.append("recipe.fake_updates_per_generator=1")  # both roles every step
    else:
        extra.append("student.type=full")  # full LCM has an EMA target (after_update)
    trainer = _trainer(tmp_path, recipe, *extra)
    assert all(takes_found_inf(opt) for opt in trainer.optimizers.values())
    assert trainer.train_step(0) is not None
    before = _snapshot(trainer)
    monkeypatch.setenv("DISTILLKIT_FAULT", "nan-step-1")
    logs = trainer.train_step(1)
    assert logs is not None and float(logs["_applied"]) == 0.0
    assert not _bit_identical(before, _snapshot(trainer))
    seen = trainer.nonfinite.read()
    assert (seen.count, seen.first, seen.last) == (1, 1, 1)
    monkeypatch.delenv("DISTILLKIT_FAULT")
    trainer.train_step(2)
    changed = _bit_identical(before, _snapshot(trainer))
    assert any(k.startswith(f"{trainer.recipe.generator_role}.param") for k in changed)
    assert any(k.startswith("ema") for k in changed)
    # the NaN step is left out of the logged averages
    values = trainer._reduce([logs, logs, trainer.train_step(3)], trainer.accelerator)
    assert values and all(v == v for v in values.values())


class HostSync(AssertionError):
    pass


@pytest.mark.parametrize("recipe", RECIPES)
def test_hot_path_has_no_host_sync(tmp_path, monkeypatch, recipe):
    """Between logging intervals train_step never reads a tensor back: .item(), bool(), float(),
    int(), .cpu(), .tolist() and .numpy() raise inside it (a NaN step included)."""
    extra = ["train.ema.decay=0.9"]
    if recipe in ("dmd2", "sid", "swiftbrush"):
        extra.append("student.type=full")
    trainer = _trainer(tmp_path, recipe, *extra)
    trainer.train_step(0)  # first step: lazy optimiser state, caches

    def boom(name):
        def raise_(*args, **kwargs):
            raise HostSync(f"host sync in the hot path: Tensor.{name}")

        return raise_

    names = ("item", "__bool__", "__float__", "__int__", "cpu", "tolist", "numpy")
    with monkeypatch.context() as patch:
        for name in names:
            patch.setattr(torch.Tensor, name, boom(name))
        for step in (1, 2, 3):
            if step == 2:
                patch.setenv("DISTILLKIT_FAULT", "nan-step-2")
            logs = trainer.train_step(step)
            patch.delenv("DISTILLKIT_FAULT", raising=False)
            assert logs is not None
    seen = trainer.nonfinite.read()  # the logging interval: now it may sync
    assert (seen.count, seen.first, seen.last) == (1, 2, 2)


def _bad(policy, step: int) -> None:
    policy.tracker.record(step, torch.ones(()))


def _good(policy, step: int) -> None:
    policy.tracker.record(step, torch.zeros(()))


def test_nan_policy_skip_counts_consecutive_bad_updates_across_checks() -> None:
    from distillkit.engine.nanguard import NanPolicy
    from distillkit.errors import TrainingDiverged

    policy = NanPolicy("skip", max_failures=3, lr_factor=0.5, device=torch.device("cpu"))
    assert policy.check(0) is None
    _bad(policy, 1)
    _bad(policy, 2)
    decision = policy.check(2)
    assert decision.action == "skip" and "steps 1-2" in decision.where
    _good(policy, 3)  # a good update ends the run: two more bad ones are still allowed
    _bad(policy, 4)
    _bad(policy, 5)
    assert policy.check(5).action == "skip"
    _bad(policy, 6)  # third in a row (5 was carried over): stop, with the skip-policy remedy
    with pytest.raises(TrainingDiverged, match="3 consecutive") as err:
        policy.check(6)
    assert "set train.nan_policy=rollback" in str(err.value)


def test_nan_policy_rollback_stops_after_repeated_rollbacks_without_progress() -> None:
    from distillkit.engine.nanguard import NanPolicy
    from distillkit.errors import TrainingDiverged

    policy = NanPolicy("rollback", max_failures=2, lr_factor=0.5, device=torch.device("cpu"))
    _bad(policy, 3)
    assert policy.check(3).action == "rollback"
    _good(policy, 2)
    assert policy.check(2) is None  # replaying the steps before the failure is no progress
    assert policy.rollbacks == 1
    _good(policy, 4)
    assert policy.check(4) is None and policy.rollbacks == 0  # got past step 3: count cleared
    _bad(policy, 5)
    assert policy.check(5).action == "rollback"
    _bad(policy, 5)
    with pytest.raises(TrainingDiverged, match="2 consecutive rollbacks") as err:
        policy.check(5)
    message = str(err.value)
    assert "nan_policy=rollback" not in message and "lr x0.5" in message  # right for its policy


def test_nan_policy_stop_raises_at_the_first_bad_update() -> None:
    from distillkit.engine.nanguard import NanPolicy
    from distillkit.errors import TrainingDiverged

    policy = NanPolicy("stop", max_failures=10, lr_factor=0.5, device=torch.device("cpu"))
    _good(policy, 0)
    assert policy.check(0) is None
    _bad(policy, 1)
    with pytest.raises(TrainingDiverged, match="step 1: a loss or gradient became NaN"):
        policy.check(1)

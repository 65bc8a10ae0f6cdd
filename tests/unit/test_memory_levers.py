"""Memory levers change memory, not the training: gradient checkpointing reaches every trained
denoiser and gives the same step; bf16 autocast runs on a CPU and stays close to fp32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate's state is a process-wide singleton fixed by the first Accelerator: these tests
    switch mixed precision, so each starts (and leaves) it unset."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _trainer(tmp_path: Path, recipe: str, name: str, *overrides: str):
    from accelerate import Accelerator

    from distillkit.config import load_config
    from distillkit.engine.loop import Trainer

    cfg = load_config(
        REPO / "recipes" / f"{recipe}.yaml",
        [f"output_dir={tmp_path / name}", "logging.progress_bar=false", *overrides],
    )
    (tmp_path / name).mkdir()
    return Trainer(
        cfg, Accelerator(mixed_precision=cfg.train.mixed_precision), smoke=True, builtin_data=True
    )


def _checkpointing(module: torch.nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in module.modules())


def _steps(trainer, n: int = 2) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in trainer.train_step(s).items()} for s in range(n)]


@pytest.mark.parametrize(
    ("recipe", "extra"),
    [("dmd2_sd15", ["recipe.fake_updates_per_generator=1"]), ("lcm_sd15", [])],
)
def test_gradient_checkpointing_reaches_every_trained_denoiser_and_keeps_the_step(
    tmp_path, recipe, extra
):
    fp32 = ["train.mixed_precision=no", *extra]  # checkpointing recomputes: exact in fp32
    plain = _trainer(tmp_path, recipe, "plain", "train.gradient_checkpointing=false", *fp32)
    ckpt = _trainer(tmp_path, recipe, "ckpt", "train.gradient_checkpointing=true", *fp32)
    assert ckpt.recipe.roles and not any(_checkpointing(m) for m in plain.recipe.roles.values())
    assert all(_checkpointing(m) for m in ckpt.recipe.roles.values())
    for a, b in zip(_steps(plain), _steps(ckpt)):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def test_bf16_autocast_trains_on_cpu_close_to_fp32(tmp_path):
    from accelerate.state import AcceleratorState

    common = ["recipe.fake_updates_per_generator=1"]
    fp32 = _trainer(tmp_path, "dmd2_sd15", "fp32", "train.mixed_precision=no", *common)
    assert fp32.accelerator.mixed_precision == "no"
    reference = _steps(fp32)
    del fp32
    AcceleratorState._reset_state(reset_partial_state=True)  # one precision per process state
    bf16 = _trainer(tmp_path, "dmd2_sd15", "bf16", "train.mixed_precision=bf16", *common)
    assert bf16.accelerator.mixed_precision == "bf16"
    before = [p.detach().clone() for p in bf16.params["generator"]]
    for a, b in zip(reference, _steps(bf16)):
        for key in ("generator/loss", "fake_score/loss"):
            assert torch.isfinite(torch.tensor(b[key]))
            assert b[key] == pytest.approx(a[key], rel=0.1), key
            assert b[key] != a[key]  # autocast did run in bf16
    assert all(p.dtype == torch.float32 for p in bf16.params["generator"])  # fp32 master weights
    assert any(not torch.equal(x, p) for x, p in zip(before, bf16.params["generator"]))

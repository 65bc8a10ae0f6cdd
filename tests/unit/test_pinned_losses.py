"""Pinned-loss regression: the logged losses of each recipe's first three loop steps on the tiny
SD1.5 teacher (fp32, batch 2), pinned. A silent change of a recipe's math, its timestep draws,
its update order or the loop around it moves these numbers; a deliberate change re-pins them
(run this file with ``DISTILLKIT_PRINT_PINNED=1`` and paste what it prints).

Every trainable tensor is first perturbed by a seeded 5 % of its spread, so the fake score (a
copy of the teacher, its LoRA at zero) differs from the teacher: unperturbed, SiD's and
SwiftBrush's generator losses are differences of near-equal networks, and 1 versus 2 threads
moved them by 3 %. Perturbed, 1 versus 2 threads differ by at most 1e-5 relative (9e-4 on
SwiftBrush's 1e-8 first generator loss, which the absolute tolerance covers).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
STEPS = 3
REL, ABS = 5e-3, 1e-7

PINNED = {
    "dmd2": [
        {
            "generator/loss": 0.00173486,
            "generator/dm": 0.00106706,
            "generator/gan": 0.667792,
            "fake_score/loss": 0.944393,
            "fake_score/denoise": 0.929631,
            "fake_score/disc": 1.47621,
        },
        {"fake_score/loss": 1.14374, "fake_score/denoise": 1.12992, "fake_score/disc": 1.38252},
        {"fake_score/loss": 1.1189, "fake_score/denoise": 1.1042, "fake_score/disc": 1.46954},
    ],
    "sid": [
        {
            "fake_score/loss": 0.981948,
            "fake_score/denoise": 0.981948,
            "generator/loss": -0.136059,
            "generator/sid": -0.136059,
        },
        {
            "fake_score/loss": 1.16895,
            "fake_score/denoise": 1.16895,
            "generator/loss": -0.0567846,
            "generator/sid": -0.0567846,
        },
        {
            "fake_score/loss": 1.11934,
            "fake_score/denoise": 1.11934,
            "generator/loss": 0.0406866,
            "generator/sid": 0.0406866,
        },
    ],
    "swiftbrush": [
        {
            "generator/loss": 1.27839e-08,
            "generator/vsd": 1.27839e-08,
            "fake_score/loss": 0.199069,
            "fake_score/denoise": 0.199069,
        },
        {
            "generator/loss": 5.3751e-05,
            "generator/vsd": 5.3751e-05,
            "fake_score/loss": 0.622457,
            "fake_score/denoise": 0.622457,
        },
        {
            "generator/loss": 1.62683e-06,
            "generator/vsd": 1.62683e-06,
            "fake_score/loss": 0.446911,
            "fake_score/denoise": 0.446911,
        },
    ],
    "lcm": [
        {"generator/loss": 0.128169, "generator/consistency": 0.128169, "generator/omega": 8.70052},
        {
            "generator/loss": 0.0978165,
            "generator/consistency": 0.0978165,
            "generator/omega": 12.4487,
        },
        {"generator/loss": 0.138578, "generator/consistency": 0.138578, "generator/omega": 10.943},
    ],
    "apt": [
        {
            "generator/loss": 0.700368,
            "generator/adv": 0.700368,
            "discriminator/loss": 1.43998,
            "discriminator/adv": 1.43992,
            "discriminator/real_logit": -0.0958778,
            "discriminator/r1": 5.52165e-07,
        },
        {
            "generator/loss": 0.737374,
            "generator/adv": 0.737374,
            "discriminator/loss": 1.36562,
            "discriminator/adv": 1.3627,
            "discriminator/real_logit": -0.0410874,
            "discriminator/r1": 2.91685e-05,
        },
        {
            "generator/loss": 0.665769,
            "generator/adv": 0.665769,
            "discriminator/loss": 1.43494,
            "discriminator/adv": 1.43491,
            "discriminator/real_logit": -0.0628188,
            "discriminator/r1": 3.20022e-07,
        },
    ],
}


def _first_losses(recipe: str, tmp_path: Path) -> list[dict[str, float]]:
    from accelerate import Accelerator

    from distillkit.config import load_config
    from distillkit.engine.loop import Trainer

    overrides = [
        f"output_dir={tmp_path / 'run'}",
        "logging.progress_bar=false",
        "train.batch_size=2",
        "train.grad_accumulation=1",
        "teacher.dtype=fp32",
        "train.mixed_precision=no",
    ]
    cfg = load_config(REPO / "recipes" / f"{recipe}_sd15.yaml", overrides)
    (tmp_path / "run").mkdir()
    trainer = Trainer(cfg, Accelerator(mixed_precision="no"), smoke=True, builtin_data=True)
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for params in trainer.params.values():
            for p in params:
                spread = float(p.std()) if p.numel() > 1 else 0.0
                p.add_(0.05 * (spread or 0.02) * torch.randn(p.shape, generator=noise))
    rows = []
    for step in range(STEPS):
        logs = trainer.train_step(step)
        assert logs is not None, f"{recipe}: step {step} was skipped as non-finite"
        rows.append(
            {
                key: float(value)
                for key, value in logs.items()
                if not key.startswith("_") and not key.endswith("grad_norm")
            }
        )
    return rows


@pytest.mark.parametrize("recipe", sorted(PINNED))
def test_first_losses_are_pinned(recipe: str, tmp_path: Path) -> None:
    got = _first_losses(recipe, tmp_path)
    if os.environ.get("DISTILLKIT_PRINT_PINNED"):
        print(f'"{recipe}": {[{k: float(f"{v:.6g}") for k, v in row.items()} for row in got]},')
    assert [sorted(row) for row in got] == [sorted(row) for row in PINNED[recipe]], (
        f"{recipe}: the logged keys per step changed (which roles run when)"
    )
    for step, (row, pinned) in enumerate(zip(got, PINNED[recipe])):
        for key, value in pinned.items():
            assert row[key] == pytest.approx(value, rel=REL, abs=ABS), (
                f"{recipe} step {step} {key}: {row[key]:.6g}, pinned {value:.6g}"
            )

"""The sample-grid callback's collapse guard on a tiny teacher: a collapsed generator (the same
image whatever the noise) must trigger the warning, a healthy one must not; the run report
records it. The callback is driven through its hooks with a minimal trainer stand-in."""

from __future__ import annotations

import contextlib
import json
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from distillkit.config import LoggingConfig
from distillkit.engine.report import write_report
from distillkit.engine.samples import SampleCallback, diversity_stats


class ConstantX0(nn.Module):
    """Predicts the same clean latent for every input: the output of a collapsed generator,
    expressed in the teacher's own parameterization (eps for SD1.5)."""

    def __init__(self, teacher) -> None:
        super().__init__()
        self.teacher = (teacher,)
        self.scale = nn.Parameter(torch.ones(()))  # gives the adapter a dtype to read
        self.x0 = torch.randn(
            (1, *teacher.latent_shape()), generator=torch.Generator().manual_seed(3)
        )

    def forward(self, x_t, t, return_dict=False, **kwargs):
        teacher = self.teacher[0]
        alpha, sigma = teacher.alpha_sigma(t)
        shape = (-1, *([1] * (x_t.ndim - 1)))
        x0 = self.x0.expand_as(x_t) * self.scale
        eps = (x_t - alpha.reshape(shape) * x0) / sigma.reshape(shape)
        return (teacher.target(x0, eps, t),)


def _trainer(teacher, net: nn.Module, out: Path, cfg: LoggingConfig):
    accelerator = types.SimpleNamespace(
        unwrap_model=lambda m: m, autocast=contextlib.nullcontext, print=print
    )
    run_cfg = types.SimpleNamespace(train=types.SimpleNamespace(max_steps=4), logging=cfg)
    recipe = types.SimpleNamespace(generator_net=lambda: net, export_steps=1)
    return types.SimpleNamespace(
        teacher=teacher, recipe=recipe, accelerator=accelerator, output_dir=out, cfg=run_cfg
    )


@pytest.fixture(scope="module")
def sd15(tiny_adapter):
    return tiny_adapter("sd15")


def _run(teacher, net, out: Path) -> tuple[SampleCallback, dict]:
    cfg = LoggingConfig(sample_every=2, sample_per_prompt=2, collapse_teacher_steps=4)
    callback = SampleCallback(cfg, teacher_guidance=3.0)
    trainer = _trainer(teacher, net, out, cfg)
    callback.on_train_start(trainer)
    values: dict[str, float] = {}
    callback.on_log(trainer, 1, values)  # not due: nothing sampled
    assert not values and not (out / "samples" / "step-000001.png").exists()
    callback.on_log(trainer, 2, values)
    return callback, values


def test_collapsed_generator_triggers_the_warning(sd15, tmp_path: Path, capsys) -> None:
    callback, values = _run(sd15, ConstantX0(sd15), tmp_path)
    assert values["collapse/diversity_ratio"] < 1e-3
    assert callback.warnings and "possible mode collapse" in capsys.readouterr().err
    assert (tmp_path / "samples" / "step-000002.png").is_file()
    assert (tmp_path / "samples" / "teacher.png").is_file()
    record = json.loads((tmp_path / "samples" / "diversity.jsonl").read_text())
    assert record["step"] == 2 and "warning" in record
    report = write_report(tmp_path, {"recipe": {"name": "dmd2"}, "teacher": {"family": "sd15"}})
    text = report.read_text()
    assert "**warning**" in text and "possible mode collapse" in text
    assert "samples/step-000002.png" in text


def test_healthy_generator_does_not_warn(sd15, tmp_path: Path, capsys) -> None:
    callback, values = _run(sd15, sd15.denoiser, tmp_path)
    assert values["collapse/diversity_ratio"] > 0.3 and values["collapse/detail_ratio"] > 0.3
    assert not callback.warnings and "collapse" not in capsys.readouterr().err
    report = write_report(tmp_path, {"recipe": {"name": "dmd2"}, "teacher": {"family": "sd15"}})
    assert "No collapse warning." in report.read_text()


def test_sampling_leaves_rng_and_train_mode_alone(sd15, tmp_path: Path) -> None:
    net = ConstantX0(sd15).train()
    cfg = LoggingConfig(sample_every=1, sample_per_prompt=1, collapse_teacher_steps=2)
    callback = SampleCallback(cfg)
    trainer = _trainer(sd15, net, tmp_path, cfg)
    callback.on_train_start(trainer)
    state = torch.random.get_rng_state()
    callback.on_step_end(trainer, 1)  # off the logging grid: ratios wait for the next log
    assert torch.equal(state, torch.random.get_rng_state()) and net.training
    values: dict[str, float] = {}
    callback.on_log(trainer, 1, values)
    assert "collapse/diversity_ratio" in values


def test_diversity_stats_known_answers() -> None:
    same = torch.full((3, 3, 4, 4), 0.5)
    assert diversity_stats(same) == {"pairwise": 0.0, "detail": 0.0}
    two = torch.stack([torch.zeros(3, 2, 2), torch.ones(3, 2, 2)])
    assert diversity_stats(two)["pairwise"] == pytest.approx(1.0)  # RMS pixel distance

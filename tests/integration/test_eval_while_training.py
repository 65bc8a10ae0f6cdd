"""logging.eval_every and export.select: best through the real CLI on a tiny SD1.5 teacher."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from distillkit.cli import main
from distillkit.config import load_config
from distillkit.data.digits import load_digits_split
from distillkit.engine import evaluate
from distillkit.engine.evaluate import BEST_DIR, BEST_META, BEST_WEIGHTS, EVAL_LOG, EvalCallback
from distillkit.engine.nanguard import GuardedEMA
from distillkit.errors import ConfigError
from distillkit.evaluation import digits_eval
from distillkit.evaluation.judge import train_judge

REPO = Path(__file__).resolve().parents[2]
# scripted fd per evaluation: the best is the second one (step 4), not the last
SCRIPTED_FD = {2: 5.0, 4: 1.0, 6: 3.0}
EVAL_CLIP = ["logging.eval_every=10", "logging.eval_metrics=[clip]"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run starts from a fresh process's accelerate state (bf16 autocast here,
    whatever an earlier test in this worker set up), and leaves none behind."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _run_args(out: Path, *extra: str) -> list[str]:
    return [
        "run",
        str(REPO / "recipes" / "dmd2_sd15.yaml"),
        "--smoke",
        f"output_dir={out}",
        "data.prompts=digits",
        "student.type=full",
        "recipe.fake_updates_per_generator=1",  # the generator moves every step
        "train.max_steps=6",
        "train.checkpoint_every=2",
        "train.checkpoints_keep=3",
        "logging.sample_every=0",
        "logging.eval_every=2",
        "logging.eval_per_class=2",
        "logging.progress_bar=false",
        *extra,
    ]


def _one_epoch_judge(judge_cache=None):
    split = load_digits_split(seed=0)
    return train_judge(split, seed=0, epochs=1), split


def _unet_state(pipeline_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors"))


def test_best_evaluated_generator_is_exported(tmp_path, monkeypatch, capsys) -> None:
    """Evaluations at steps 2, 4, 6 score the live generator; the export and a re-export hold
    the step-4 weights (the best by fd), not the last ones."""
    real_score = EvalCallback.score
    seen: list[int] = []

    def scripted(self, images):
        scores = real_score(self, images)  # the real judges still run on the real samples
        assert len(images) == 20 and images.shape[1] == 3
        step = self.last_step
        seen.append(step)
        return {**scores, "fd": SCRIPTED_FD[step]}

    monkeypatch.setattr(EvalCallback, "score", scripted)
    monkeypatch.setattr(digits_eval, "load_judge", _one_epoch_judge)  # wiring, not quality
    out = tmp_path / "run"
    stale = out / BEST_DIR  # a crashed attempt's best (no checkpoint): not this run's
    stale.mkdir(parents=True)
    (stale / BEST_META).write_text(json.dumps({"step": 9, "select_by": "fd", "score": 0.0}))
    assert main(_run_args(out, "export.select=best")) == 0
    assert seen == [2, 4, 6]
    rows = [json.loads(line) for line in (out / EVAL_LOG).read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert [r.get("best", False) for r in rows] == [True, True, False]
    assert {"accuracy", "px_accuracy", "px_fd", "diversity"} <= set(rows[0])
    assert [r["sample_steps"] for r in rows] == [1, 1, 1]  # the export's one step
    assert 0.0 <= rows[0]["accuracy"] <= 1.0 and rows[0]["px_fd"] > 0
    best = json.loads((out / BEST_DIR / BEST_META).read_text())
    assert best["step"] == 4 and best["select_by"] == "fd" and best["score"] == 1.0
    assert "exporting the best evaluated generator: step 4" in capsys.readouterr().out

    exported = _unet_state(out / "pipeline")
    at4 = load_file(str(out / "checkpoints" / "step-0000004" / "generator.safetensors"))
    at6 = load_file(str(out / "checkpoints" / "step-0000006" / "generator.safetensors"))
    saved = load_file(str(out / BEST_DIR / BEST_WEIGHTS))
    assert set(saved) == set(at4) and all(torch.equal(saved[k], at4[k]) for k in at4)
    changed = [k for k in at4 if not torch.equal(at4[k], at6[k])]
    assert changed, "steps 4 and 6 should differ"
    for key in changed[:5]:
        name = key.removeprefix("unet.")
        assert name in exported, key
        assert torch.equal(exported[name], at4[key].to(exported[name].dtype)), key

    for path in (out / "pipeline").rglob("*"):
        if path.is_file():
            path.unlink()
    assert main(["export", str(out)]) == 0
    again = _unet_state(out / "pipeline")
    assert all(torch.equal(again[k], exported[k]) for k in exported)

    report = (out / "report.md").read_text()
    assert "## Evaluation" in report and "Best by fd: step 4" in report
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/px_fd" in r for r in records)


def test_exported_weights_swap_in_the_ema_and_put_training_back() -> None:
    """With train.ema.use_for_export the evaluation scores the EMA shadows, and training
    resumes from its own weights afterwards."""
    net = nn.Linear(3, 2)
    ema = GuardedEMA(list(net.parameters()), decay=0.9)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    live = [p.detach().clone() for p in net.parameters()]
    shadows = [s.detach().clone() for s in ema.shadow_params]

    class Trainer:
        class accelerator:
            @staticmethod
            def unwrap_model(module):
                return module

        class recipe:
            @staticmethod
            def generator_net():
                return net

    trainer = Trainer()
    trainer.ema = ema
    trainer.cfg = load_config(REPO / "recipes" / "dmd2_sd15.yaml", ["train.ema.decay=0.9"])
    with evaluate.exported_weights(trainer) as inside:
        assert all(torch.equal(p, s) for p, s in zip(inside.parameters(), shadows))
    assert all(torch.equal(p, v) for p, v in zip(net.parameters(), live))
    trainer.cfg.train.ema.use_for_export = False
    with evaluate.exported_weights(trainer) as inside:
        assert all(torch.equal(p, v) for p, v in zip(inside.parameters(), live))


def test_direction_and_missing_best(tmp_path) -> None:
    assert evaluate.is_better(1.0, 2.0, "fd") and not evaluate.is_better(2.0, 1.0, "px_fd")
    assert evaluate.is_better(0.9, 0.8, "accuracy") and not evaluate.is_better(0.8, 0.8, "fd")
    assert evaluate.is_better(30.0, None, "clip_score")
    with pytest.raises(ConfigError, match="best.json is missing"):
        evaluate.load_best_into(nn.Linear(2, 2), tmp_path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["export.select=best"], "export.select: best needs evaluations"),
        (["logging.eval_every=10"], "for a run distilling a digits teacher"),
        (
            [*EVAL_CLIP, "logging.eval_select_by=clip_score"],
            "set logging.eval_clip_weights",
        ),
        (
            [*EVAL_CLIP, "logging.eval_clip_weights=w"],
            "add 'digits' to logging.eval_metrics",  # the default select_by, fd, is a digits score
        ),
    ],
)
def test_eval_config_refusals(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "recipes" / "dmd2_sd15.yaml", overrides)


def test_best_survives_resume(tmp_path, monkeypatch) -> None:
    """A resumed run ranks against the best so far: step 6 scored again (3.0) does not replace
    step 4's 1.0, and the export after the resume is still step 4's generator."""
    real_score = EvalCallback.score
    monkeypatch.setattr(
        EvalCallback,
        "score",
        lambda self, x: {**real_score(self, x), "fd": SCRIPTED_FD[self.last_step]},
    )
    monkeypatch.setattr(digits_eval, "load_judge", _one_epoch_judge)
    out = tmp_path / "run"
    assert main(_run_args(out, "export.select=best")) == 0
    for name in ("pipeline", "lora", "checkpoints/step-0000006"):
        shutil.rmtree(out / name, ignore_errors=True)
    (out / "checkpoints" / "latest").unlink(missing_ok=True)
    assert main([*_run_args(out, "export.select=best"), "--resume"]) == 0
    rows = [json.loads(line) for line in (out / EVAL_LOG).read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 6] and "best" not in rows[-1]
    assert json.loads((out / BEST_DIR / BEST_META).read_text())["step"] == 4
    at4 = load_file(str(out / "checkpoints" / "step-0000004" / "generator.safetensors"))
    exported = _unet_state(out / "pipeline")
    shared = {k: v for k, v in at4.items() if k.removeprefix("unet.") in exported}
    assert shared and all(
        torch.equal(
            exported[k.removeprefix("unet.")], v.to(exported[k.removeprefix("unet.")].dtype)
        )
        for k, v in shared.items()
    )

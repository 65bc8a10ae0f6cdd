"""SwiftBrush with the v2 clamped CLIP loss through the real CLI: a --smoke run on the tiny SD1.5
teacher with a random-weight open_clip model from a file logs the `clip` term inside the
generator loss; a missing weight file is a user error (exit code 2) naming the field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "recipes/swiftbrush_sd15.yaml"
CLIP_MODEL = "ViT-S-32-alt"  # what the clip_weights fixture (conftest.py) builds


def _run(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "distillkit.cli", "run", str(CONFIG), "--smoke", "--builtin-data"]
    argv += [f"output_dir={out}", "logging.sample_every=0", "logging.report=false", *overrides]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=REPO)


def test_smoke_run_logs_the_clip_term_in_the_generator_loss(tmp_path, clip_weights):
    out = tmp_path / "run"
    weight = 0.5
    proc = _run(
        out,
        f"recipe.clip_model={CLIP_MODEL}",
        f"recipe.clip_weights={clip_weights}",
        f"recipe.clip_weight={weight}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "generator/clip" in r]
    assert steps and steps[-1]["step"] == 2
    for row in steps:
        assert 0 < row["generator/clip"] <= 2
        expected = row["generator/vsd"] + weight * row["generator/clip"]
        assert row["generator/loss"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert (out / "pipeline" / "model_index.json").is_file()


def test_missing_clip_weights_exit_2_naming_the_field(tmp_path):
    missing = tmp_path / "absent.safetensors"
    proc = _run(
        tmp_path / "run", f"recipe.clip_model={CLIP_MODEL}", f"recipe.clip_weights={missing}"
    )
    assert proc.returncode == 2
    assert "recipe.clip_weights" in proc.stderr and "absent.safetensors" in proc.stderr
    assert "Traceback" not in proc.stderr

"""`distillkit eval --prompts` on two CPU processes equals the one-process run.

The real CLI on the tiny SD1.5-like teacher (as student at 1 step and teacher at 2 steps), with
random-weight Inception and CLIP files, once as a plain process and once under
``python -m torch.distributed.run --nproc_per_node 2`` (ACCELERATE_USE_CPU=1: accelerate's
MULTI_CPU over gloo). 5 samples in batches of 2 split unevenly (rank 0: batches 0 and 2, the
last one short; rank 1: batch 1), so padding, trimming and reordering are exercised.

Why the tolerance: batches are fixed (batch k = samples 2k, 2k+1, seed + k) whatever the world
size, so each rank runs the same kernels on the same inputs as the single process, and with one
thread per process the grids come out byte-identical and the scores equal to the last bit
(observed). The score check still allows 1e-6 relative: a BLAS may pick another code path for
differently aligned buffers, and a FID from 5 samples (a rank-4 covariance) amplifies last-bit
noise; 1e-6 is far below any difference a real change would make.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distillkit.evaluation.fid import WEIGHTS_FILE
from distillkit.teachers.load import tiny_teacher_dir
from tests.helpers.metric_weights import random_clip_weights, random_inception_weights

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["a red fox", "a lighthouse at dusk", "two cats", "a bowl of ramen", "a snowy train"]
ENV = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp_eval")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    ref = root / "real"
    ref.mkdir()
    for i in range(4):
        pixels = np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(ref / f"{i}.png")
    return {
        "root": root,
        "prompts": root / "prompts.txt",
        "ref": ref,
        "pipe": tiny_teacher_dir("sd15", 32),
        "fid": random_inception_weights(root / WEIGHTS_FILE),
        "clip": random_clip_weights(root / "clip.safetensors"),
    }


def _run(inputs: dict[str, Path], name: str, world: int) -> tuple[Path, str]:
    """One `distillkit eval` into its own folder, on a copy of the pipeline (--card writes)."""
    out = inputs["root"] / name
    out.mkdir()
    pipe = shutil.copytree(inputs["pipe"], out / "pipeline")
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    cmd = [sys.executable, *(launch if world > 1 else []), "-m", "distillkit.cli", "eval"]
    cmd += [str(pipe), "--prompts", str(inputs["prompts"]), "--metrics", "fid,clip,prc"]
    cmd += ["--steps", "1", "--guidance", "0", "--batch-size", "2", "--seed", "3"]
    cmd += ["--teacher", str(inputs["pipe"]), "--teacher-steps", "2", "--teacher-guidance", "2"]
    cmd += ["--fid-weights", str(inputs["fid"]), "--fid-reference", str(inputs["ref"])]
    cmd += ["--clip-model", "ViT-B-32", "--clip-weights", str(inputs["clip"])]
    cmd += ["--out", str(out / "scores.json"), "--grid", str(out / "grid.png"), "--card"]
    env = {**os.environ, **ENV}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc.stdout


@pytest.fixture(scope="module")
def both(inputs) -> dict[int, tuple[Path, str]]:
    return {1: _run(inputs, "one", 1), 2: _run(inputs, "two", 2)}


def test_two_processes_score_exactly_what_one_process_scores(both) -> None:
    (one, _), (two, _) = both[1], both[2]
    a, b = (json.loads((d / "scores.json").read_text()) for d in (one, two))
    assert [r["label"] for r in b["runs"]] == ["student", "teacher"]
    for row_a, row_b in zip(a["runs"], b["runs"], strict=True):
        assert row_b["n"] == row_a["n"] == len(PROMPTS)
        for key in ("fid", "clip_score", "clip_score_std", "precision", "recall"):
            assert row_b[key] == pytest.approx(row_a[key], rel=1e-6, abs=1e-12), key
    assert a["runs"][0]["fid"] != a["runs"][1]["fid"]  # student and teacher really differ
    for grid in ("grid.png", "grid_teacher.png"):  # the same images, pixel for pixel
        assert (one / grid).read_bytes() == (two / grid).read_bytes(), grid


def test_the_protocol_records_the_world_size_and_the_seeds(both) -> None:
    a, b = (json.loads((d / "scores.json").read_text())["protocol"] for d, _ in both.values())
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert b["batch_seeds"] == a["batch_seeds"] == [3, 4, 5]
    assert "rank k mod world_size" in b["sharding"]
    same = {k: v for k, v in a.items() if k not in ("world_size", "pipeline_dir")}
    assert same == {k: b[k] for k in same}


def test_rank_zero_alone_reports_and_writes(both) -> None:
    two, stdout = both[2]
    assert stdout.count("| student | 1 | 0 | 5 |") == 1 and "2 processes" in stdout
    assert stdout.count("wrote ") == 2  # the JSON and the card, once each
    written = sorted(p.name for p in two.iterdir() if p.is_file())
    assert written == ["grid.png", "grid_teacher.png", "scores.json"]
    card = (two / "pipeline" / "README.md").read_text()
    assert card.count("## Evaluation") == 1 and card.count("*Protocol:*") == 1

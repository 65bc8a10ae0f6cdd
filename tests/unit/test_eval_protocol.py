"""`distillkit eval --protocol coco`: captions, seeds, teacher beside student, recorded protocol.

Runs the real CLI on the tiny SD1.5-like teacher (as both "student" at 1 step and "teacher" at
2 steps with guidance) with random-weight Inception and CLIP files, and checks that the result
file carries what decides its numbers: prompt hashes, samples, seeds, resolution, resize,
metric implementations and weight hashes. Bad input exits 2 naming the file, no traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from threadpoolctl import threadpool_limits

from distillkit.cli import main
from distillkit.errors import ConfigError
from distillkit.evaluation.fid import RESIZE, WEIGHTS_FILE, file_sha256
from distillkit.evaluation.protocols import read_captions, select_prompts
from distillkit.teachers.load import tiny_teacher_dir
from tests.helpers.metric_weights import random_clip_weights, random_inception_weights

CAPTIONS = ["a red fox", "a lighthouse at dusk", "two cats on a sofa", "a bowl of ramen"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("coco")
    notes = [{"id": 10 - i, "image_id": i, "caption": f" {c} "} for i, c in enumerate(CAPTIONS)]
    notes.append({"id": 99, "image_id": 9, "caption": "a train in the snow"})
    captions = root / "captions_val2014.json"
    captions.write_text(json.dumps({"images": [], "annotations": notes}))
    ref = root / "val2014"
    ref.mkdir()
    for i in range(4):
        pixels = np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(ref / f"{i}.png")
    return {
        "captions": captions,
        "ref": ref,
        "pipe": tiny_teacher_dir("sd15", 32),
        "fid": random_inception_weights(root / WEIGHTS_FILE),
        "clip": random_clip_weights(root / "clip.safetensors"),
    }


def test_coco_captions_are_read_by_annotation_id_and_drawn_with_the_seed(inputs) -> None:
    captions = read_captions(inputs["captions"], "caption")
    assert captions == [*CAPTIONS[::-1], "a train in the snow"]
    chosen, rule = select_prompts(captions, 4, seed=0)
    assert len(set(chosen)) == 4 and "default_rng(0)" in rule
    assert select_prompts(captions, 4, seed=0) == (chosen, rule)
    assert select_prompts(captions, 4, seed=1)[0] != chosen
    assert select_prompts(captions, None, seed=0)[0] == captions
    with pytest.raises(ConfigError, match="holds only 5 prompts"):
        select_prompts(captions, 6, seed=0)
    bad = inputs["captions"].with_name("bad.json")
    bad.write_text('{"images": []}')
    with pytest.raises(ConfigError, match="not a COCO captions file"):
        read_captions(bad, "caption")


def test_coco_protocol_scores_student_and_teacher_side_by_side(inputs, tmp_path, capsys) -> None:
    out = tmp_path / "coco.json"
    argv = ["eval", str(inputs["pipe"]), "--protocol", "coco", "--prompts", str(inputs["captions"])]
    argv += ["--samples", "4", "--steps", "1", "--guidance", "0", "--batch-size", "2"]
    argv += ["--teacher", str(inputs["pipe"]), "--teacher-steps", "2", "--teacher-guidance", "3"]
    argv += ["--fid-weights", str(inputs["fid"]), "--fid-reference", str(inputs["ref"])]
    argv += ["--clip-model", "ViT-B-32", "--clip-weights", str(inputs["clip"]), "--out", str(out)]
    argv += ["--fid-save-reference", str(tmp_path / "val2014.npz")]
    with threadpool_limits(1):
        assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| run | steps | guidance | samples | FID | CLIP | prec | recall |" in table
    assert "| student | 1 | 0 | 4 |" in table and "| teacher | 2 | 3 | 4 |" in table
    scores = json.loads(out.read_text())
    student, teacher = scores["runs"]
    for row in (student, teacher):
        assert row["n"] == 4 and row["fid"] > 0 and 0 <= row["clip_score"] <= 100
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
    assert (student["steps"], teacher["steps"], teacher["guidance"]) == (1, 2, 3.0)
    assert student["fid"] != teacher["fid"] and scores["fid"] == student["fid"]
    p = scores["protocol"]
    assert p["name"] == "coco" and p["samples"] == 4 and p["resolution"] == 32
    assert p["seed"] == 0 and p["batch_seeds"] == [0, 1]
    prompts = p["prompt_file"]
    assert prompts["file_sha256"] == hashlib.sha256(inputs["captions"].read_bytes()).hexdigest()
    assert prompts["count"] == 4 and prompts["column"] == "caption"
    chosen, _ = select_prompts(read_captions(inputs["captions"], "caption"), 4, seed=0)
    listed = hashlib.sha256(json.dumps(chosen, ensure_ascii=False).encode()).hexdigest()
    assert prompts["prompts_sha256"] == listed
    assert p["fid"]["resize"] == RESIZE and p["fid"]["reference_samples"] == 4
    assert p["fid"]["weights"]["sha256"] == file_sha256(inputs["fid"])
    assert "torchmetrics" in p["fid"]["implementation"]
    assert "torch-fidelity" in p["precision_recall"]["implementation"]
    assert p["clip"]["weights_sha256"] == file_sha256(inputs["clip"])
    assert {"torch", "torchmetrics", "torch-fidelity"} <= set(p["software"])
    with np.load(tmp_path / "val2014.npz") as ref:  # the real statistics, reusable next time
        assert int(ref["n"]) == 4 and ref["features"].shape == (4, 2048)
        assert ref["mu"].shape == (2048,) and ref["sigma"].shape == (2048, 2048)


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--prompts", "/nonexistent/captions_val2014.json"], "/nonexistent/captions_val2014.json"),
        ([], "--prompts CAPTIONS"),
        (
            ["--prompts", "CAPTIONS", "--fid-weights", "/nonexistent/inc.pth"],
            "/nonexistent/inc.pth",
        ),
        (["--prompts", "CAPTIONS", "--samples", "50"], "holds only 5 prompts"),
        (["--prompts", "CAPTIONS", "--teacher", "/nonexistent/teacher"], "/nonexistent/teacher"),
        (["--prompts", "CAPTIONS", "--teacher", "PIPE"], "--teacher-steps"),
    ],
)
def test_bad_coco_input_exits_2_naming_it(inputs, capsys, extra, named) -> None:
    extra = [str(inputs["captions"]) if e == "CAPTIONS" else e for e in extra]
    extra = [str(inputs["pipe"]) if e == "PIPE" else e for e in extra]
    argv = ["eval", str(inputs["pipe"]), "--protocol", "coco", "--steps", "1", "--guidance", "0"]
    argv += ["--fid-reference", str(inputs["ref"]), "--samples", "4", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err


def test_missing_captions_file_exits_2_from_the_installed_command(inputs, tmp_path) -> None:
    missing = tmp_path / "captions_val2014.json"
    cmd = [sys.executable, "-m", "distillkit.cli", "eval", str(inputs["pipe"])]
    cmd += ["--protocol", "coco", "--prompts", str(missing), "--steps", "1", "--guidance", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ, timeout=300)
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr

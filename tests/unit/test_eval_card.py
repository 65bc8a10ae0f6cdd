"""`distillkit eval --prompts ... --card`: the model card's evaluation section from the result.

The real CLI on a copy of the tiny SD1.5-like pipeline (student at 1 step, teacher at 2) with
random-weight Inception and CLIP: the card's table holds the JSON's numbers and one protocol line
with the prompt file and weight hashes; a second run replaces the section instead of adding
one; a distillkit card keeps its other sections; `distillkit push` keeps the section.
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
import yaml
from PIL import Image

from distillkit.cli import main
from distillkit.config import load_config
from distillkit.errors import ConfigError
from distillkit.evaluation.fid import WEIGHTS_FILE, file_sha256
from distillkit.export.card import CardInfo, render_model_card
from distillkit.export.eval_card import evaluation_section, replace_section, write_eval_card
from distillkit.export.push import refresh_card
from distillkit.teachers.load import tiny_teacher_dir
from tests.helpers.metric_weights import random_clip_weights, random_inception_weights

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("card")
    (root / "prompts.txt").write_text("a red fox\na lighthouse at dusk\n")
    ref = root / "real"
    ref.mkdir()
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(ref / f"{i}.png")
    return {
        "root": root,
        "prompts": root / "prompts.txt",
        "ref": ref,
        "teacher": tiny_teacher_dir("sd15", 32),
        "fid": random_inception_weights(root / WEIGHTS_FILE),
        "clip": random_clip_weights(root / "clip.safetensors"),
    }


def _eval(inputs: dict[str, Path], pipe: Path, out: Path, seed: int) -> tuple[dict, str]:
    """The installed command in a subprocess, one thread (several times faster here than
    in-process under pytest)."""
    argv = ["eval", str(pipe), "--prompts", str(inputs["prompts"]), "--card", "--out", str(out)]
    argv += ["--steps", "1", "--guidance", "0", "--images-per-prompt", "2", "--seed", str(seed)]
    argv += ["--teacher", str(inputs["teacher"]), "--teacher-steps", "2"]
    argv += ["--teacher-guidance", "2", "--fid-weights", str(inputs["fid"])]
    argv += ["--fid-reference", str(inputs["ref"]), "--clip-model", "ViT-B-32"]
    argv += ["--clip-weights", str(inputs["clip"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "distillkit.cli", *argv]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


def _row(run: dict) -> str:
    cells = [run["label"], run["steps"], f"{run['guidance']:g}", run["n"]]
    cells += [f"{run['fid']:.3f}", f"{run['clip_score']:.3f}"]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def test_card_holds_the_json_and_a_rerun_replaces_the_section(inputs, tmp_path) -> None:
    pipe = Path(shutil.copytree(inputs["teacher"], tmp_path / "pipeline"))
    first, stdout = _eval(inputs, pipe, tmp_path / "first.json", seed=0)
    card = (pipe / "README.md").read_text()
    assert "| run | steps | guidance | samples | FID | CLIP |" in card
    for run in first["runs"]:
        assert _row(run) in card
    assert [r["label"] for r in first["runs"]] == ["student", "teacher"]
    [line] = [x for x in card.splitlines() if x.startswith("*Protocol:*")]
    prompts_sha = first["protocol"]["prompt_file"]["file_sha256"]
    for said in (
        "4 samples (2 prompts x 2) from `prompts.txt`",
        f"sha256 `{prompts_sha[:12]}`",
        "seed 0 (batch k of 16: seed + k)",
        "32 px",
        "torchmetrics FrechetInceptionDistance",
        "TF1-compatible bilinear to 299x299",
        f"Inception weights sha256 `{file_sha256(inputs['fid'])[:12]}`",
        "3 reference images",
        "CLIP score: open_clip ViT-B-32, 100 * max(cos, 0)",
        f"weights sha256 `{file_sha256(inputs['clip'])[:12]}`.",
    ):
        assert said in line, said
    assert "first.json" in card and "README.md (## Evaluation)" in stdout

    second, _ = _eval(inputs, pipe, tmp_path / "second.json", seed=7)
    again = (pipe / "README.md").read_text()
    assert again.count("## Evaluation") == 1 and again.count("*Protocol:*") == 1
    assert _row(second["runs"][0]) in again and _row(first["runs"][0]) not in again
    assert "seed 7" in again and "second.json" in again and "first.json" not in again
    assert again.startswith(f"# {pipe.name}\n")  # the minimal card for a pipeline without one


def _results() -> dict:
    protocol = {"samples": 8, "seed": 0, "batch_size": 4, "resolution": 64, "name": "coco"}
    runs = [{"label": "student", "steps": 1, "guidance": 0.0, "n": 8, "fid": 21.25}]
    return {"fid": 21.25, "n": 8, "runs": runs, "protocol": protocol}


def _distillkit_card(tmp_path: Path) -> str:
    info = CardInfo(
        teacher_id="org/teacher", teacher_revision=None, family="sd15",
        pipeline_class="StableDiffusionPipeline", recipe="dmd2", student="lora",
        num_inference_steps=1, guidance_scale=0.0, scheduler="LCMScheduler",
        license="mit", eval_results=[{"eval": "eval", "fd": 9.5}],
    )  # fmt: skip
    return render_model_card(info)


def test_a_distillkit_card_keeps_its_other_sections(tmp_path: Path) -> None:
    card = _distillkit_card(tmp_path)
    assert "| eval | fd |" in card and "## Licence" in card
    new = replace_section(card, evaluation_section(_results(), "coco.json"))
    assert "| eval | fd |" not in new and "| student | 1 | 0 | 8 | 21.250 |" in new
    assert new.count("## Evaluation") == 1
    assert new.index("## Evaluation") < new.index("## Licence")
    assert new.split("## Evaluation")[0] == card.split("## Evaluation")[0]
    assert new.split("## Licence")[1] == card.split("## Licence")[1]
    assert "*Protocol:* protocol `coco`; 8 samples; seed 0 (batch k of 4: seed + k); 64 px." in new
    assert replace_section(new, evaluation_section(_results(), "coco.json")) == new
    plain = card.replace(card[card.index("## Evaluation") : card.index("## Licence")], "")
    inserted = replace_section(plain, evaluation_section(_results(), "coco.json"))
    assert inserted.index("## Evaluation") < inserted.index("## Licence")


def test_push_keeps_the_section_eval_wrote(tmp_path: Path) -> None:
    out = tmp_path / "run"
    (out / "pipeline").mkdir(parents=True)
    cfg = load_config(REPO / "recipes" / "dmd2_sd15.yaml").model_dump(mode="json")
    (out / "run.yaml").write_text(yaml.safe_dump({"smoke": True, "config": cfg}))
    (out / "eval.json").write_text(json.dumps({"fd": 9.5, "n": 8, "protocol": {"steps": 1}}))
    write_eval_card(out / "pipeline", _results(), "coco.json")
    assert refresh_card(out, "me/x")
    card = (out / "pipeline" / "README.md").read_text()
    assert 'from_pretrained("me/x"' in card  # rebuilt from run.yaml
    assert card.count("## Evaluation") == 1 and "| student | 1 | 0 | 8 | 21.250 |" in card
    assert "| eval | steps | fd | samples |" not in card


def test_card_without_prompts_or_from_a_foreign_json_is_a_config_error(inputs, capsys) -> None:
    argv = ["eval", str(inputs["teacher"]), "--card", "--steps", "1", "--guidance", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--card" in err and "--prompts" in err and "Traceback" not in err
    with pytest.raises(
        ConfigError, match="--card: digits.json is not a `distillkit eval --prompts`"
    ):
        evaluation_section({"accuracy": 0.9, "protocol": {}}, "digits.json")

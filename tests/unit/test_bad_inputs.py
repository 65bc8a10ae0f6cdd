"""Bad runs (not just bad YAML): each exits 2 with one message naming the field or file and
the fix, prints no traceback, and leaves an existing output directory untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from distillkit.cli import main
from distillkit.teachers.load import SMOKE_RESOLUTION, tiny_teacher_dir

RECIPE = """
output_dir: {out}
teacher: {{model_id: {teacher}, family: {family}, resolution: {resolution}}}
recipe: {{name: dmd2, gan_discriminator_weight: {disc}}}
data: {{prompts: {prompts}, images: {images}}}
train: {{max_steps: 1}}
"""


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def workspace(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 40), "white").save(images / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier result")
    return {
        "tmp": tmp_path,
        "out": out,
        "teacher": str(tiny_teacher_dir("sd15", SMOKE_RESOLUTION)),
        "family": "sd15",
        "resolution": SMOKE_RESOLUTION,
        "prompts": str(prompts),
        "images": "null",
        "disc": 0,
    }


def _run(ws, capsys, overrides=(), smoke=False, **fields):
    values = {**ws, **fields}
    path = ws["tmp"] / "run.yaml"
    path.write_text(RECIPE.format(**values))
    before = _snapshot(ws["out"])
    code = main(["run", str(path), *(["--smoke"] if smoke else []), *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("error: ")
    assert _snapshot(ws["out"]) == before, "the output directory was changed"
    return err


def test_missing_local_teacher(workspace, capsys):
    err = _run(workspace, capsys, teacher=str(workspace["tmp"] / "no-such-teacher"))
    assert "teacher.model_id" in err and "model_index.json" in err


def test_unreachable_hub_id(workspace, capsys):
    err = _run(workspace, capsys, teacher="someone/not-a-real-model-xyz")
    assert "teacher.model_id" in err and "offline" in err


def test_family_mismatch(workspace, capsys):
    err = _run(workspace, capsys, family="sdxl")
    assert "teacher.family" in err and "StableDiffusionPipeline" in err


def test_resolution_vae_cannot_divide(workspace, capsys):
    err = _run(workspace, capsys, resolution=36)
    assert "teacher.resolution=36" in err and "multiple of 8" in err


def test_empty_prompt_file(workspace, capsys):
    Path(workspace["prompts"]).write_text("\n\n")
    err = _run(workspace, capsys)
    assert "data.prompts" in err and "no prompts" in err


def test_prompt_file_wrong_kind(workspace, capsys):
    other = workspace["tmp"] / "prompts.parquet"
    other.write_bytes(b"PAR1")
    err = _run(workspace, capsys, prompts=str(other))
    assert "data.prompts" in err and ".txt, .jsonl or .csv" in err


def test_missing_prompt_column(workspace, capsys):
    jsonl = workspace["tmp"] / "prompts.jsonl"
    jsonl.write_text('{"caption": "a cat"}\n')
    err = _run(workspace, capsys, prompts=str(jsonl))
    assert "data.prompt_column" in err


def test_unreadable_image(workspace, capsys):
    bad = Path(workspace["tmp"]) / "images" / "broken.png"
    bad.write_bytes(b"not really a png")
    err = _run(workspace, capsys, images=str(bad.parent), disc=0.01)
    assert "broken.png" in err and "not a readable image" in err


def test_gan_without_images(workspace, capsys):
    err = _run(workspace, capsys, disc=0.01)
    assert "data.images" in err


def test_output_path_is_a_file(workspace, capsys):
    target = workspace["tmp"] / "a-file"
    target.write_text("x")
    err = _run(workspace, capsys, out=str(target))
    assert "output_dir" in err and "is a file" in err


def test_output_path_not_writable(workspace, capsys):
    err = _run(workspace, capsys, out="/dev/null/run")
    assert "output_dir" in err and "cannot write" in err


def test_xformers_without_cuda(workspace, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    err = _run(workspace, capsys, overrides=["train.attention=xformers"])
    assert "train.attention=xformers" in err and "sdpa" in err


def test_fp16_without_cuda(workspace, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    err = _run(workspace, capsys, overrides=["train.mixed_precision=fp16"])
    assert "train.mixed_precision=fp16" in err


def test_existing_run_without_resume(workspace, capsys):
    ckpt = workspace["out"] / "checkpoints" / "step-0000001"
    ckpt.mkdir(parents=True)
    (ckpt / "manifest.json").write_text("{}")
    err = _run(workspace, capsys)
    assert "--resume" in err


def test_push_without_token(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    pipeline = tmp_path / "run" / "pipeline"
    pipeline.mkdir(parents=True)
    (pipeline / "model_index.json").write_text("{}")
    code = main(["push", str(tmp_path / "run"), "--repo-id", "me/model"])
    err = capsys.readouterr().err
    assert code == 2 and "HF_TOKEN" in err and "Traceback" not in err


def test_export_of_a_non_run_dir(tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 2
    assert "run.yaml" in capsys.readouterr().err


def test_unsafe_yaml_is_never_executed(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f'teacher: !!python/object/apply:os.system ["touch {marker}"]\n')
    assert main(["validate", str(path)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert not marker.exists()


def test_resume_with_a_different_config(workspace, capsys):
    """--resume must not splice a run trained under another recipe onto this one."""
    import yaml

    from distillkit.config import load_config
    from distillkit.engine.guards import check_resume_config

    ckpt = workspace["out"] / "checkpoints" / "step-0000001"
    ckpt.mkdir(parents=True)
    (ckpt / "manifest.json").write_text("{}")
    recipe = workspace["tmp"] / "run.yaml"
    recipe.write_text(RECIPE.format(**workspace))
    cfg = load_config(recipe, [])
    saved = cfg.model_dump(mode="json")
    saved["train"]["max_steps"] = 500  # longer or shorter is a resumable change
    (workspace["out"] / "run.yaml").write_text(yaml.safe_dump({"smoke": False, "config": saved}))
    check_resume_config(workspace["out"], cfg, smoke=False)
    saved["train"]["seed"] = 7
    (workspace["out"] / "run.yaml").write_text(yaml.safe_dump({"smoke": False, "config": saved}))
    err = _run(workspace, capsys, overrides=["--resume"])
    assert "holds checkpoints of a different run" in err and "train.seed: 7 -> 0" in err


def test_lora_targets_that_match_nothing(workspace, capsys):
    overrides = ["student.type=lora", "student.lora.target_modules=[no_such_layer]"]
    err = _run(workspace, capsys, overrides=overrides)
    assert "student.lora.target_modules=['no_such_layer']" in err and "to_q" in err


def test_cache_dir_that_is_a_file(workspace, capsys):
    target = workspace["tmp"] / "cache-file"
    target.write_text("x")
    err = _run(workspace, capsys, overrides=[f"data.cache_dir={target}"])
    assert "data.cache_dir" in err and "is a file" in err


def test_fresh_run_over_an_earlier_export(workspace, capsys):
    (workspace["out"] / "pipeline").mkdir()
    (workspace["out"] / "pipeline" / "model_index.json").write_text("{}")
    err = _run(workspace, capsys)
    assert "output_dir" in err and "pipeline/" in err


def test_builtin_data_without_smoke(workspace, capsys):
    err = _run(workspace, capsys, overrides=["--builtin-data"])
    assert "--builtin-data only applies to --smoke" in err


def test_smoke_with_missing_prompts(workspace, capsys):
    err = _run(workspace, capsys, smoke=True, prompts=str(workspace["tmp"] / "none.txt"))
    assert "data.prompts" in err and "none.txt" in err and "--builtin-data" in err


def test_bad_metadata_jsonl(workspace, capsys):
    folder = Path(workspace["tmp"]) / "images"
    (folder / "metadata.jsonl").write_text("{broken\n")
    err = _run(workspace, capsys, images=str(folder), disc=0.01)
    assert "metadata.jsonl line 1" in err


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["plan", "recipes/dmd2_sdxl.yaml", "--gpu-memory", "80XB"], "--gpu-memory '80XB'"),
        (["plan", "recipes/dmd2_sdxl.yaml", "--gpu-memory", "-8GB"], "--gpu-memory"),
        (["plan", "recipes/dmd2_sdxl.yaml", "--gpus", "0"], "--gpus"),
        (["eval", "no/such/pipeline"], "does not exist"),
        (["eval", ".", "--steps", "x"], "--steps"),
        (["eval", ".", "--per-class", "0"], "--per-class"),
        (["eval", "."], "has no model_index.json"),
        (["teach", "digits", "--family", "sd4"], "--family"),
        (["ls", "extra"], "unrecognized"),
        (["run"], "config"),
    ],
)
def test_bad_command_lines(argv, named, capsys):
    """Usage errors (argparse's exit 2) and bad values read by a command (ConfigError)."""
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse reports usage errors by exiting
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2 and named in err and "Traceback" not in err

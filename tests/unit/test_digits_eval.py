"""Digits evaluation of exported pipelines: generation, scoring, grids, CLI and the harness."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from distillkit.cli.eval import add_parser as add_eval_parser
from distillkit.cli.eval import cmd_eval
from distillkit.errors import ConfigError
from distillkit.evaluation.digits_eval import METRIC_KEYS, evaluate_digits
from distillkit.evaluation.generate import generate_images, load_pipeline
from distillkit.export.card import export_call_defaults
from distillkit.images import save_grid
from distillkit.teachers.tiny import FAMILIES, TinySpec, save_tiny_teacher

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a handwritten digit one", "a handwritten digit two", "seven written by hand"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """On a shared 2-core box OpenMP spin-waiting made tiny convs ~80x slower; 1 thread is fast."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {f: save_tiny_teacher(TinySpec(family=f, sample_size=32), root / f) for f in FAMILIES}


@pytest.fixture(scope="module")
def judge_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("judge")


def test_generate_images_deterministic(tiny_dirs: dict[str, Path]) -> None:
    pipe = load_pipeline(tiny_dirs["sdxl"])
    kwargs = dict(steps=2, guidance=3.0, batch_size=2)
    a = generate_images(pipe, PROMPTS, seed=0, **kwargs)
    b = generate_images(pipe, PROMPTS, seed=0, **kwargs)
    c = generate_images(pipe, PROMPTS, seed=1, **kwargs)
    assert a.shape == (3, 3, 32, 32) and a.dtype == torch.float32
    assert a.min() >= -1 and a.max() <= 1 and a.std() > 0
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3
    # the second batch is seeded with seed + 1: batch 1 of seed 0 == batch 0 of seed 1
    d = generate_images(pipe, PROMPTS[2:], seed=1, **kwargs)
    assert torch.allclose(a[2:], d, atol=1e-5)
    big = generate_images(pipe, PROMPTS[:1], seed=0, steps=1, guidance=0.0, resolution=64)
    assert big.shape == (1, 3, 64, 64)


@pytest.mark.parametrize("family", ["sdxl", "sana"])
def test_text_encoder_memo_is_exact(family: str, tiny_dirs: dict[str, Path]) -> None:
    cached = load_pipeline(tiny_dirs[family])
    plain = load_pipeline(tiny_dirs[family], cache_text=False)
    prompts = [*PROMPTS, PROMPTS[0]]
    kwargs = dict(steps=1, guidance=2.0, seed=3, batch_size=3)
    a, b = generate_images(cached, prompts, **kwargs), generate_images(plain, prompts, **kwargs)
    assert torch.allclose(a, b, atol=1e-5)  # BLAS may round differently per batch size
    # 3 distinct prompts (+ SANA's encoded empty negative; SDXL zeroes it instead)
    assert len(cached.text_encoder._distillkit_rows) == {"sdxl": 3, "sana": 4}[family]


def test_load_pipeline_rejects_other_dirs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=str(tmp_path)):
        load_pipeline(tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_evaluate_digits_each_family(
    family: str, tiny_dirs: dict[str, Path], judge_cache: Path
) -> None:
    # FLUX's transformer has no sample_size and a bare teacher dir no distillkit.json: the
    # default would be FluxPipeline's 1024 px
    size = {"resolution": 32} if family == "flux" else {}
    scores = evaluate_digits(
        tiny_dirs[family], steps=2, guidance=2.0, per_class=2, judge_cache=judge_cache, **size
    )
    assert set(METRIC_KEYS) <= set(scores)
    assert all(math.isfinite(scores[k]) for k in METRIC_KEYS)
    assert scores["n"] == 20 and 0 <= scores["accuracy"] <= 1 and scores["fd"] >= 0
    p = scores["protocol"]
    assert (p["steps"], p["guidance"], p["resolution"], p["samples"]) == (2, 2.0, 32, 20)
    assert p["judge_version"] >= 1 and p["split_seed"] == 0 and p["batch_seeds"] == [0]
    assert p["pipeline_dir"] == str(tiny_dirs[family])


def test_save_grid_rows_are_classes(tmp_path: Path) -> None:
    images = torch.linspace(-1, 1, 20)[:, None, None, None].expand(20, 3, 16, 12)
    labels = [i % 10 for i in range(20)]  # eval_prompts order: classes interleaved
    path = save_grid(images, tmp_path / "grid.png", labels=labels, pad=2)
    grid = Image.open(path)
    assert grid.size == (8 * 12 + 9 * 2, 10 * 16 + 11 * 2)
    # row 3, column 1 is the second image of class 3 (index 13); column 2 is empty (black)
    value = round((images[13, 0, 0, 0].item() + 1) * 127.5)
    assert grid.getpixel((2 + 1 * 14 + 5, 2 + 3 * 18 + 5)) == (value,) * 3
    assert grid.getpixel((2 + 2 * 14 + 5, 2 + 3 * 18 + 5)) == (0, 0, 0)
    assert Image.open(save_grid(images, tmp_path / "g2.png", rows=2, cols=3)).size == (44, 38)


def _eval_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="distillkit")
    add_eval_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["eval", *argv])


def test_cmd_eval_writes_json_and_grid(
    tiny_dirs: dict[str, Path], judge_cache: Path, tmp_path: Path, capsys
) -> None:
    out, grid = tmp_path / "r" / "scores.json", tmp_path / "grid.png"
    argv = [str(tiny_dirs["sd15"]), "--steps", "1", "--guidance", "0", "--per-class", "2"]
    argv += ["--out", str(out), "--grid", str(grid), "--judge-cache", str(judge_cache)]
    from distillkit import cli

    choices = next(a for a in cli.build_parser()._actions if a.dest == "command").choices
    if "eval" in choices:  # wired into the real CLI
        assert cli.main(["eval", *argv]) == 0
    else:
        args = _eval_args(argv)
        assert args.func is cmd_eval and args.func(args) == 0
    saved = json.loads(out.read_text())
    assert set(METRIC_KEYS) <= set(saved) and saved["protocol"]["steps"] == 1
    assert "accuracy" in capsys.readouterr().out
    assert Image.open(grid).size == (8 * 32 + 18, 10 * 32 + 22)


def test_cmd_eval_needs_guidance_or_card(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--guidance"):
        cmd_eval(_eval_args([str(tiny_dirs["sd15"]), "--steps", "1"]))
    meta = tmp_path / "distillkit.json"
    meta.write_text('{"num_inference_steps": 2, "guidance_scale": 0.0, "recipe": "dmd2"}')
    assert export_call_defaults(tmp_path) == {"num_inference_steps": 2, "guidance_scale": 0.0}
    assert export_call_defaults(tiny_dirs["sd15"]) == {}


RECIPE = """\
teacher: {model_id: tiny, family: sdxl, resolution: 32}
student: {type: lora, lora: {rank: 4}}
recipe: {name: dmd2, generator_steps: 2}
data: {prompts: digits}
logging: {progress_bar: false}
"""


def test_bench_quality_quick(
    tiny_dirs: dict[str, Path], judge_cache: Path, tmp_path: Path, monkeypatch
) -> None:
    """The harness end to end on one family: a --smoke recipe run and a given 'fake' student."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # what the script sets; restored after
    script = ROOT / "evaluation" / "bench_quality.py"
    spec = importlib.util.spec_from_file_location("bench_quality", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "dmd2_sdxl.yaml").write_text(RECIPE)
    (tmp_path / "recipes" / "dmd2_sd15.yaml").write_text(RECIPE)  # other family: not run
    out = tmp_path / "results"
    argv = ["--quick", "--families", "sdxl", "--out-dir", str(out), "--judge-cache"]
    argv += [str(judge_cache), "--recipes-dir", str(tmp_path / "recipes")]
    argv += [
        "--runs-dir",
        str(tmp_path / "runs"),
        "--student-pipeline",
        f"fake={tiny_dirs['sdxl']}",
    ]
    assert bench.main(argv) == 0
    results = json.loads((out / "digits.json").read_text())
    assert {"machine", "commit", "command", "protocol", "teachers", "students"} <= set(results)
    assert set(results["teachers"]["sdxl"]) == {"1", "2", "4", "25"}
    assert {"accuracy", "fd", "diversity"} <= set(results["teachers"]["sdxl"]["25"])
    rows = [(s["recipe"], s["family"], s["steps"]) for s in results["students"]]
    assert rows == [("dmd2", "sdxl", 1), ("dmd2", "sdxl", 2), ("fake", "sdxl", 1)]
    dmd2, fake = results["students"][0], results["students"][2]
    assert dmd2["train_seconds"] > 0 and dmd2["guidance"] == 0.0 and "goal_pass" in dmd2
    assert fake["train_seconds"] is None and fake["config"] is None
    for key in ("accuracy", "fd", "diversity", "train_seconds", "config", "goal_pass"):
        assert key in fake
    for row in (fake, results["teachers"]["sdxl"]["25"]):  # both judges score every row
        assert {"accuracy", "fd", "per_class"} <= set(row["pixel"]) and len(row["per_class"]) == 10
    assert results["protocol"]["goal_judges"] == ["cnn", "pixel"]
    assert "| fake | sdxl | 1 |" in (out / "digits.md").read_text()
    names = {p.name for p in (out / "grids").iterdir()}
    grids = ["teacher25", "teacher1", "dmd2_student1", "fake_student1", "combined"]
    assert {f"sdxl_{g}.png" for g in grids} <= names
    # --merge: per-family result dirs (run side by side) become one digits.json with their grids
    other = tmp_path / "other"
    (other / "grids").mkdir(parents=True)
    part = {**results, "teachers": {"sd15": results["teachers"]["sdxl"]}}
    part["teacher_guidance_sweep"] = {"sd15": results["teacher_guidance_sweep"]["sdxl"]}
    part["students"] = [{**s, "family": "sd15"} for s in results["students"][:1]]
    (other / "digits.json").write_text(json.dumps(part))
    (other / "grids" / "sd15_teacher25.png").write_bytes(b"png")
    merged_dir = tmp_path / "merged"
    assert bench.main(["--merge", str(out), str(other), "--out-dir", str(merged_dir)]) == 0
    merged = json.loads((merged_dir / "digits.json").read_text())
    assert list(merged["teachers"]) == ["sdxl", "sd15"]
    assert [s["family"] for s in merged["students"]] == ["sdxl"] * 3 + ["sd15"]
    assert (
        "--merge" in merged["command"] and (merged_dir / "grids" / "sd15_teacher25.png").is_file()
    )
    assert "| dmd2 | sd15 | 1 |" in (merged_dir / "digits.md").read_text()

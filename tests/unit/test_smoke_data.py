"""--smoke checks the user's data instead of hiding it: configured data is read through the real
run's loaders (a bounded sample), missing data is an error naming the field and path unless
--builtin-data asks for the built-in set, and whatever smoke read instead of the whole is said."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from distillkit.cli import main
from distillkit.config import DataConfig, DatasetSource
from distillkit.data.sources import SMOKE_PROMPTS, SMOKE_SAMPLE, load_train_data
from distillkit.errors import ConfigError


@pytest.fixture
def data(tmp_path: Path) -> dict[str, Path]:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(SMOKE_SAMPLE + 36)))
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (24, 24), (80 * i, 0, 0)).save(folder / f"{i}.png")
    rows = [{"file_name": f"{i}.png", "text": f"caption {i}"} for i in range(3)]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"prompts": prompts, "images": folder, "root": tmp_path}


def test_smoke_reads_a_bounded_sample_of_the_configured_data(data) -> None:
    cfg = DataConfig(prompts=str(data["prompts"]), images=str(data["images"]))
    full = load_train_data(cfg, 16, smoke=False, need_images=True)
    smoke = load_train_data(cfg, 16, smoke=True, need_images=True)
    assert len(full.prompts) == SMOKE_SAMPLE + 36 and full.substituted is None
    assert smoke.prompts == full.prompts[:SMOKE_SAMPLE]  # the user's prompts, not built-in ones
    assert smoke.captions == ["caption 0", "caption 1", "caption 2"]
    assert smoke.images.shape == (3, 3, 16, 16)
    assert f"{SMOKE_SAMPLE} prompts, 3 images" in smoke.substituted


def test_smoke_bounds_datasets_sources_too(data) -> None:
    jsonl = data["root"] / "p.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"p{i}"}) + "\n" for i in range(100)))
    cfg = DataConfig(prompts_dataset=DatasetSource(path=str(jsonl)))
    assert len(load_train_data(cfg, 16, smoke=True, need_images=False).prompts) == SMOKE_SAMPLE
    assert len(load_train_data(cfg, 16, smoke=False, need_images=False).prompts) == 100


@pytest.mark.parametrize("field", ["prompts", "images"])
def test_smoke_refuses_missing_data_naming_field_and_path(data, field) -> None:
    missing = data["root"] / f"no-such-{field}"
    paths = {"prompts": str(data["prompts"]), "images": str(data["images"]), field: str(missing)}
    with pytest.raises(ConfigError) as err:
        load_train_data(DataConfig(**paths), 16, smoke=True, need_images=True)
    text = str(err.value)
    assert f"data.{field}" in text and str(missing) in text and "--builtin-data" in text


def test_builtin_data_is_used_only_when_asked_and_said(data) -> None:
    cfg = DataConfig(prompts=str(data["root"] / "absent.txt"))
    got = load_train_data(cfg, 16, smoke=True, need_images=False, builtin=True)
    assert got.prompts == SMOKE_PROMPTS
    assert "built-in prompts instead of data.prompts=" in got.substituted
    assert str(data["root"] / "absent.txt") in got.substituted


def test_bad_metadata_line_is_a_config_error(data) -> None:
    (data["images"] / "metadata.jsonl").write_text('{"file_name": "0.png"}\nnot json\n')
    with pytest.raises(ConfigError, match="metadata.jsonl line 2"):
        load_train_data(DataConfig(images=str(data["images"])), 16, smoke=False, need_images=True)


def test_cli_builtin_data_needs_smoke(tmp_path, capsys) -> None:
    code = main(["run", "recipes/dmd2_sd15.yaml", "--builtin-data", f"output_dir={tmp_path}/o"])
    err = capsys.readouterr().err
    assert code == 2 and "--builtin-data only applies to --smoke" in err
    assert not (tmp_path / "o").exists()


def test_cli_smoke_without_data_exits_2_before_loading_a_teacher(tmp_path, capsys) -> None:
    """The shipped YAML names data/laion_prompts.txt, which this checkout does not have."""
    out = tmp_path / "o"
    code = main(["run", "recipes/sid_sd15.yaml", "--smoke", f"output_dir={out}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "data.prompts" in err and "data/aesthetics_6_plus.txt" in err
    assert "--builtin-data" in err

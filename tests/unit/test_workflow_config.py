"""Config sections of the Hub-native workflow: hub, data sources, sample grids; which callbacks
a config turns on."""

from __future__ import annotations

from pathlib import Path

import pytest

from distillkit.cli import main
from distillkit.config import load_config
from distillkit.engine.callbacks import HubPushCallback, default_callbacks
from distillkit.engine.report import ReportCallback
from distillkit.engine.samples import SampleCallback
from distillkit.errors import ConfigError

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "dmd2_sd15.yaml"


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["hub.push=true"], "hub.repo_id is required"),
        (["hub.push=true", "hub.repo_id=me/x", "export.enabled=false"], "export.enabled"),
        (["hub.repo_id=not a repo"], "hub.repo_id"),
        (["data.prompts_dataset.colum=text", "data.prompts_dataset.path=x"], "colum"),
        (["data.images_dataset.limit=0", "data.images_dataset.path=x"], "limit"),
        (["logging.sample_every=-1"], "logging.sample_every"),
    ],
)
def test_invalid_workflow_config_exits_2_naming_the_field(capsys, overrides, named) -> None:
    argv = ["validate", str(RECIPE)]
    for item in overrides:
        argv += ["--set", item]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err


def test_callbacks_follow_the_config() -> None:
    cfg = load_config(RECIPE, ["hub.push=true", "hub.repo_id=me/x"])
    kinds = [type(c) for c in default_callbacks(cfg)]
    assert kinds == [SampleCallback, ReportCallback, HubPushCallback]  # push after the report
    off = load_config(RECIPE, ["logging.sample_every=0", "logging.report=false"])
    assert default_callbacks(off) == []
    with pytest.raises(ConfigError, match=r"hub\.repo_id"):
        load_config(RECIPE, ["hub.push=true", "hub.repo_id=null"])


def test_dataset_sources_parse() -> None:
    cfg = load_config(
        RECIPE,
        [
            "data.prompts_dataset.path=org/prompts",
            "data.prompts_dataset.split=validation",
            "data.images_dataset.path=./pairs.parquet",
            "data.images_dataset.image_column=jpg",
            "data.cache_dir=/tmp/cache",
        ],
    )
    assert (
        cfg.data.prompts_dataset.split == "validation" and cfg.data.prompts_dataset.column == "text"
    )
    assert cfg.data.images_dataset.image_column == "jpg" and cfg.data.cache_dir == "/tmp/cache"

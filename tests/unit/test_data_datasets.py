"""Prompts and image-text pairs through `datasets`, errors naming the field, and the
text-embedding / VAE-latent cache (reused on a second call, equal to fresh encodings)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distillkit.config import DataConfig, DatasetSource, TeacherConfig
from distillkit.data.cache import TeacherKey, load_cache, precompute_cache
from distillkit.data.hf_datasets import dataset_images, dataset_prompts
from distillkit.data.sources import TrainData, load_train_data
from distillkit.errors import ConfigError


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path: Path, monkeypatch) -> None:
    """`datasets` writes Arrow caches: keep them out of the user's ~/.cache. Offline for real:
    it may have been imported (reading HF_HUB_OFFLINE) before conftest set the variable."""
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _png(path: Path, w: int, h: int, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps({"caption": f"prompt {i}"}) + "\n" for i in range(5)))
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (w, h) in enumerate([(40, 24), (24, 40), (16, 16)]):
        _png(folder / f"{i}.png", w, h, i)
    rows = [{"file_name": f"{i}.png", "text": f"caption {i}"} for i in range(3)]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"jsonl": jsonl, "folder": folder, "root": tmp_path}


def test_prompts_from_jsonl_parquet_and_saved_dataset(files: dict[str, Path]) -> None:
    import datasets

    src = DatasetSource(path=str(files["jsonl"]), column="caption")
    assert dataset_prompts(src) == [f"prompt {i}" for i in range(5)]
    ds = datasets.Dataset.from_dict({"text": ["a", " ", "b", "c"]})
    parquet = files["root"] / "p.parquet"
    ds.to_parquet(str(parquet))
    assert dataset_prompts(DatasetSource(path=str(parquet), limit=3)) == ["a", "b"]
    saved = files["root"] / "saved"
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(saved))
    assert dataset_prompts(DatasetSource(path=str(saved), split="validation")) == ["a", "b", "c"]


def test_images_from_imagefolder_and_parquet_are_resized(files: dict[str, Path]) -> None:
    import datasets

    images, captions = dataset_images(DatasetSource(path=str(files["folder"])), 32)
    assert images.shape == (3, 3, 32, 32) and captions == [f"caption {i}" for i in range(3)]
    assert images.min() >= -1 and images.max() <= 1
    raw = [(files["folder"] / f"{i}.png").read_bytes() for i in range(3)]
    parquet = files["root"] / "pairs.parquet"
    datasets.Dataset.from_dict({"jpg": raw, "txt": ["x", "y", "z"]}).to_parquet(str(parquet))
    src = DatasetSource(path=str(parquet), image_column="jpg", column="txt")
    from_parquet, caps = dataset_images(src, 32)
    assert torch.equal(from_parquet, images) and caps == ["x", "y", "z"]


def test_train_data_from_datasets(files: dict[str, Path]) -> None:
    cfg = DataConfig(
        prompts_dataset={"path": str(files["jsonl"]), "column": "caption"},
        images_dataset={"path": str(files["folder"])},
    )
    data = load_train_data(cfg, 16, smoke=False, need_images=True)
    assert data.prompts[0] == "prompt 0" and data.images.shape == (3, 3, 16, 16)
    assert data.captions == [f"caption {i}" for i in range(3)]


@pytest.mark.parametrize("route", ["images", "images_dataset"])
def test_captions_are_the_prompts_when_data_prompts_is_unset(files: dict[str, Path], route):
    """One rule for both image routes: without data.prompts, the captions are the prompts (LCM
    trains on the images' captions); uncaptioned images name the fields to set."""
    folder = str(files["folder"])
    cfg = (
        DataConfig(images=folder)
        if route == "images"
        else DataConfig(images_dataset={"path": folder})
    )
    data = load_train_data(cfg, 16, smoke=False, need_images=True)
    assert data.prompts == data.captions == [f"caption {i}" for i in range(3)]
    (files["folder"] / "metadata.jsonl").unlink()
    if route == "images":
        with pytest.raises(ConfigError, match=r"data\.prompts is not set .* no captions"):
            load_train_data(DataConfig(images=folder), 16, smoke=False, need_images=True)


@pytest.mark.parametrize(
    ("source", "field"),
    [
        ({"column": "nope"}, "data.prompts_dataset.column"),
        ({"split": "test"}, "data.prompts_dataset.split"),
        ({"path": "MISSING"}, "data.prompts_dataset.path"),
        ({"path": "CORRUPT"}, "data.prompts_dataset.path"),
        ({"path": "org/not-cached-dataset"}, "data.prompts_dataset.path"),
    ],
)
def test_errors_name_the_field(files: dict[str, Path], source: dict, field: str) -> None:
    corrupt = files["root"] / "bad.parquet"
    corrupt.write_bytes(b"not a parquet file")
    paths = {"MISSING": str(files["root"] / "missing.jsonl"), "CORRUPT": str(corrupt)}
    source = {"path": str(files["jsonl"]), "column": "caption", **source}
    source["path"] = paths.get(source["path"], source["path"])
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_train_data(DataConfig(prompts_dataset=source), 16, smoke=False, need_images=False)


def test_unreadable_image_row_names_the_column(files: dict[str, Path]) -> None:
    import datasets

    parquet = files["root"] / "broken.parquet"
    datasets.Dataset.from_dict({"image": [b"\x00junk"], "text": ["t"]}).to_parquet(str(parquet))
    with pytest.raises(ConfigError, match=r"data\.images_dataset\.image_column: row 0"):
        dataset_images(DatasetSource(path=str(parquet)), 16)


# ----------------------------------------------------------------------------- cache


def _flat(tree: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for k, v in tree.items():
        out |= _flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + k: v}
    return out


def test_cache_is_reused_and_equals_fresh_encodings(tiny_adapter, tmp_path: Path, monkeypatch):
    teacher = tiny_adapter("sdxl")  # nested conditioning (added_cond_kwargs)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    data = TrainData(["a fox", "a horse", "a fox"], images, ["a lighthouse", "a fox", "ramen"])
    key = TeacherKey.from_config(TeacherConfig(model_id="x", family="sdxl"), smoke=True)
    cache = precompute_cache(teacher, data, tmp_path, key, batch_size=2)
    assert cache.texts == ["a fox", "a horse", "a lighthouse", "ramen"]
    assert cache.path.parent.name == key.digest() and (cache.path / "meta.json").is_file()

    def no_encoding(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(teacher, "encode_prompts", no_encoding)
    monkeypatch.setattr(teacher, "encode_images", no_encoding)
    again = precompute_cache(teacher, data, tmp_path, key)
    assert again.path == cache.path
    assert load_cache(tmp_path, key, data) is not None  # found without a teacher
    monkeypatch.undo()

    prompts = ["ramen", "a fox", "a horse"]
    fresh, cached = teacher.encode(prompts), again.encode(prompts)
    for part in ("cond", "uncond"):
        a, b = _flat(getattr(fresh, part)), _flat(getattr(cached, part))
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name].cpu(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        again.latents, teacher.encode_images(images).cpu(), atol=1e-5, rtol=0
    )
    with pytest.raises(KeyError, match="not in the cache"):
        again.encode(["never seen"])

    changed = TrainData(["a fox"], images, data.captions)
    other = TeacherKey("x", "abc", "sdxl", 32)
    assert load_cache(tmp_path, key, changed) is None and load_cache(tmp_path, other, data) is None
    shorter = TeacherKey(key.model_id, key.revision, key.family, key.resolution, 16)
    assert shorter.digest() != key.digest() and load_cache(tmp_path, shorter, data) is None

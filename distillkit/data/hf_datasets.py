"""Prompts and image-text pairs through 🤗 `datasets`: local files/folders or Hub datasets.

Why: real prompt sets and image-caption sets ship as parquet shards, imagefolders or Hub
datasets, not as one .txt file. Every failure names the config field to fix (`path`, `split`,
`column`), because `datasets` errors name its internals instead.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image, UnidentifiedImageError

from distillkit.config import DataConfig, DatasetSource
from distillkit.errors import ConfigError

if TYPE_CHECKING:
    from datasets import Dataset

    from distillkit.data.sources import TrainData

# file suffix -> `datasets` packaged builder
BUILDERS = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".txt": "text",
    ".arrow": "arrow",
}


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def open_dataset(src: DatasetSource, field: str, limit: int | None = None) -> Dataset:
    """One split of ``src`` as a `datasets.Dataset` (its first ``src.limit`` / ``limit`` rows);
    ConfigError names ``field``.path/.split."""
    import datasets

    local = Path(src.path).expanduser()
    try:
        if local.is_dir() and (local / "dataset_dict.json").is_file():
            ds = datasets.load_from_disk(str(local))[src.split]
        elif local.is_dir() and (local / "state.json").is_file():
            ds = datasets.load_from_disk(str(local))
        elif local.is_file():
            builder = BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise ConfigError(
                    f"{field}.path: {local} is not a data file `datasets` reads "
                    f"({', '.join(sorted(BUILDERS))}); give a folder for images"
                )
            ds = datasets.load_dataset(builder, data_files=str(local), split=src.split)
        elif local.is_dir() or src.path.startswith((".", "/", "~")):
            if not local.is_dir():
                raise ConfigError(f"{field}.path: {local} does not exist")
            ds = datasets.load_dataset(str(local), split=src.split)
        else:
            ds = datasets.load_dataset(src.path, src.name, split=src.split, revision=src.revision)
    except ConfigError:
        raise
    except KeyError:
        raise ConfigError(f"{field}.split: {src.path} has no split {src.split!r}") from None
    except ValueError as err:
        where = "split" if "split" in str(err).lower() else "path"
        raise ConfigError(f"{field}.{where}: {src.path}: {_first_line(err)}") from None
    except Exception as err:  # datasets raises many kinds: not found, offline, corrupt files
        raise ConfigError(
            f"{field}.path: could not read {src.path!r} ({type(err).__name__}: "
            f"{_first_line(err)}); a local file/folder or a Hub dataset (cached when offline)"
        ) from None
    bounds = [n for n in (src.limit, limit) if n is not None]
    if bounds:
        ds = ds.select(range(min(*bounds, len(ds))))
    if len(ds) == 0:
        raise ConfigError(f"{field}.path: {src.path} split {src.split!r} has no rows")
    return ds


def _column(ds: Dataset, name: str, field: str) -> list[Any]:
    if name not in ds.column_names:
        raise ConfigError(
            f"{field}: no column {name!r} in the dataset (columns: {ds.column_names})"
        )
    return ds[name]


def dataset_prompts(
    src: DatasetSource, field: str = "data.prompts_dataset", limit: int | None = None
) -> list[str]:
    """Non-empty prompt strings from ``src.column``."""
    values = _column(open_dataset(src, field, limit), src.column, f"{field}.column")
    prompts = [str(v).strip() for v in values if v is not None and str(v).strip()]
    if not prompts:
        raise ConfigError(f"{field}.column: column {src.column!r} of {src.path} is empty")
    return prompts


def _to_pil(value: Any, field: str, row: int) -> Image.Image:
    """Image features decode to PIL; plain parquet may hold bytes, {bytes, path} or paths."""
    try:
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, bytes | bytearray):
            return Image.open(io.BytesIO(value)).convert("RGB")
        if isinstance(value, str):
            with Image.open(value) as img:
                return img.convert("RGB")
    except (UnidentifiedImageError, OSError):
        pass
    raise ConfigError(f"{field}: row {row} is not a readable image ({type(value).__name__})")


def dataset_images(
    src: DatasetSource,
    resolution: int,
    field: str = "data.images_dataset",
    limit: int | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """Images resized (short side) and centre-cropped to ``resolution``, in [-1, 1]; captions."""
    from distillkit.data.sources import to_tensor

    ds = open_dataset(src, field, limit)
    images = _column(ds, src.image_column, f"{field}.image_column")
    captions = _column(ds, src.column, f"{field}.column") if src.column in ds.column_names else []
    tensors = [
        to_tensor(_to_pil(v, f"{field}.image_column", i), resolution) for i, v in enumerate(images)
    ]
    texts = [str(c or "") for c in captions] or [""] * len(tensors)
    return torch.stack(tensors), texts


def load_dataset_sources(
    cfg: DataConfig, resolution: int, need_images: bool, limit: int | None = None
) -> TrainData | None:
    """TrainData when a `datasets` source is configured (file options fill the other half);
    at most ``limit`` rows of each source."""
    from distillkit.data.sources import TrainData, read_image_folder, read_prompts

    use_prompts = cfg.prompts_dataset is not None
    use_images = need_images and cfg.images_dataset is not None
    if not (use_prompts or use_images):
        return None
    images = captions = None
    if use_images:
        assert cfg.images_dataset is not None
        images, captions = dataset_images(cfg.images_dataset, resolution, limit=limit)
    elif need_images and cfg.images is not None:
        images, captions = read_image_folder(Path(cfg.images), resolution, limit)
    if use_prompts:
        assert cfg.prompts_dataset is not None
        prompts = dataset_prompts(cfg.prompts_dataset, limit=limit)
    elif cfg.prompts is not None:
        prompts = read_prompts(Path(cfg.prompts), cfg.prompt_column, limit)
    elif captions and any(captions):
        prompts = [c for c in captions if c]
    else:
        raise ConfigError("data.prompts_dataset (or data.prompts) is needed: no prompts given")
    if need_images and images is None:
        raise ConfigError(
            "data.images_dataset (or data.images) is required by this recipe (real images)"
        )
    if images is None:
        return TrainData(prompts)
    assert captions is not None
    return TrainData(prompts, images, [c or prompts[0] for c in captions])

"""Training data: prompts (always) and real image-caption pairs (for GAN terms), in memory.

Batches are a pure function of (seed, step, micro-batch, rank), so a resumed run sees exactly
the samples the uninterrupted run would have seen, and ranks never share a sample.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from distillkit.config import DataConfig
from distillkit.errors import ConfigError

SMOKE_PROMPTS = [
    "a photo of a red fox in the snow",
    "an astronaut riding a horse, oil painting",
    "a bowl of ramen, studio lighting",
    "a lighthouse at dusk, watercolor",
]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
SMOKE_SAMPLE = 64  # rows of each configured source --smoke reads: every loader runs, briefly


@dataclass
class TrainData:
    prompts: list[str]
    images: torch.Tensor | None = None  # (N, 3, H, W) in [-1, 1]
    captions: list[str] | None = None
    # (N, C, h, w): the images' VAE latents, once an encoding cache (data.cache_dir) holds them
    latents: torch.Tensor | None = None
    substituted: str | None = None  # what --smoke read instead of all the configured data

    def _order(self, n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
        if not shuffle:
            return np.arange(n)
        return np.random.default_rng([seed, epoch]).permutation(n)

    def _take(self, n: int, start: int, size: int, seed: int, shuffle: bool) -> list[int]:
        out = []
        for position in range(start, start + size):
            epoch, offset = divmod(position, n)
            out.append(int(self._order(n, seed, epoch, shuffle)[offset]))
        return out

    def batch(self, slot: int, size: int, seed: int, shuffle: bool = True):
        """Samples for global slot ``slot`` (= step * accum * world + micro * world + rank):
        (prompts, images, captions, latents of those images or None)."""
        start = slot * size
        prompts = [
            self.prompts[i] for i in self._take(len(self.prompts), start, size, seed, shuffle)
        ]
        if self.images is None:
            return prompts, None, None, None
        idx = self._take(len(self.images), start, size, seed + 1, shuffle)
        latents = None if self.latents is None else self.latents[idx]
        return prompts, self.images[idx], [self.captions[i] for i in idx], latents


def read_prompts(path: Path, column: str, limit: int | None = None) -> list[str]:
    if not path.is_file():
        raise ConfigError(f"data.prompts: {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            prompts = [line.strip() for line in path.read_text().splitlines()]
        elif suffix == ".jsonl":
            prompts = [
                str(json.loads(line)[column])
                for line in path.read_text().splitlines()
                if line.strip()
            ]
        elif suffix == ".csv":
            with open(path, newline="") as handle:
                prompts = [str(row[column]) for row in csv.DictReader(handle)]
        else:
            raise ConfigError(f"data.prompts: {path} must be .txt, .jsonl or .csv")
    except (KeyError, json.JSONDecodeError) as err:
        raise ConfigError(
            f"data.prompts: {path} has no usable {column!r} column ({err}); set data.prompt_column"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"data.prompts: {path} is not UTF-8 text") from None
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ConfigError(f"data.prompts: {path} contains no prompts")
    return prompts[:limit]


def _caption_for(path: Path, metadata: dict[str, str]) -> str:
    if path.name in metadata:
        return metadata[path.name]
    side = path.with_suffix(".txt")
    return side.read_text().strip() if side.is_file() else ""


def read_metadata(meta_file: Path) -> dict[str, str]:
    """An imagefolder's metadata.jsonl: file name -> caption (``text``)."""
    metadata: dict[str, str] = {}
    for number, line in enumerate(meta_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            metadata[Path(row["file_name"]).name] = str(row.get("text", ""))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ConfigError(
                f"data.images: {meta_file} line {number} is not a JSON object with a "
                '"file_name" (and "text") field'
            ) from None
    return metadata


def read_image_folder(
    folder: Path, resolution: int, limit: int | None = None
) -> tuple[torch.Tensor, list[str]]:
    """An imagefolder: images plus captions from metadata.jsonl (file_name, text) or .txt files;
    the first ``limit`` images by name when given."""
    if not folder.is_dir():
        raise ConfigError(f"data.images: {folder} is not a directory")
    meta_file = folder / "metadata.jsonl"
    metadata = read_metadata(meta_file) if meta_file.is_file() else {}
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise ConfigError(f"data.images: {folder} contains no images ({sorted(IMAGE_SUFFIXES)})")
    images, captions = [], []
    for path in files:
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
        except (UnidentifiedImageError, OSError):
            raise ConfigError(f"data.images: {path} is not a readable image") from None
        images.append(to_tensor(rgb, resolution))
        captions.append(_caption_for(path, metadata))
    return torch.stack(images), captions


def to_tensor(img: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the short side to ``resolution``, centre-crop, scale to [-1, 1]."""
    w, h = img.size
    scale = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))))
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)
    return arr / 127.5 - 1.0


COMPOSE_SOURCE = "digits-compose"
COMPOSE_TRAIN_SCENES = 4096  # a fixed set, like the plain digits' training split


def digits_source(cfg: DataConfig) -> str | None:
    """``digits`` (or ``digits:<style>``, the restyled digits of the teacher-LoRA benchmark, or
    ``digits-compose``, the compositional scenes) in data.prompts or data.images, or None. An
    unknown style names the field."""
    from distillkit.data.digits import STYLES

    for name in ("images", "prompts"):
        value = getattr(cfg, name)
        if value in ("digits", COMPOSE_SOURCE) or (value or "").startswith("digits:"):
            style = value.partition(":")[2]
            if style and style not in STYLES:
                raise ConfigError(f"data.{name}={value}: the digits styles are {', '.join(STYLES)}")
            return value
    return None


def digits_data(resolution: int, seed: int = 0, source: str = "digits") -> TrainData:
    """The training split of sklearn's digits, with a prompt template per image; restyled for
    ``digits:<style>``; for ``digits-compose``, a fixed set of scenes from the training scans
    (the compose teachers' held-out scans and scenes stay out)."""
    from distillkit.data.digits import PROMPT_TEMPLATES, load_digits_split, prompt_for, restyle

    split = load_digits_split(seed=seed)
    if source == COMPOSE_SOURCE:
        return _compose_data(split, resolution, seed)
    images = split.train_images
    if source.partition(":")[2]:
        images = restyle(images, source.partition(":")[2])
    if images.shape[-1] != resolution:
        images = F.interpolate(images, size=resolution, mode="bilinear", align_corners=False)
    captions = [
        prompt_for(int(label), i % len(PROMPT_TEMPLATES))
        for i, label in enumerate(split.train_labels)
    ]
    return TrainData(prompts=captions, images=images, captions=captions)


def _compose_data(split, resolution: int, seed: int) -> TrainData:
    from distillkit.data.compose import build_scenes

    images, scenes = build_scenes(split, COMPOSE_TRAIN_SCENES, seed=seed + 100, heldout=False)
    if images.shape[-1] != resolution:
        images = F.interpolate(images, size=resolution, mode="bilinear", align_corners=False)
    captions = [scene.prompt() for scene in scenes]
    return TrainData(prompts=captions, images=images, captions=captions)


def builtin_data(cfg: DataConfig, resolution: int, need_images: bool) -> TrainData:
    """``--smoke --builtin-data``: built-in prompts (and digits images), saying what they
    replace."""
    if source := digits_source(cfg):
        return digits_data(resolution, source=source)
    data = digits_data(resolution) if need_images else TrainData(list(SMOKE_PROMPTS))
    replaced = [
        f"data.{name}={value}"
        for name in ("prompts", "prompts_dataset", "images", "images_dataset")
        if (value := getattr(cfg, name)) is not None and (need_images or name.startswith("prompts"))
    ]
    what = "digits images and captions" if need_images else "prompts"
    instead = ", ".join(replaced) if replaced else "no data configured"
    data.substituted = f"built-in {what} instead of {instead} (--builtin-data)"
    return data


def load_train_data(
    cfg: DataConfig, resolution: int, smoke: bool, need_images: bool, builtin: bool = False
) -> TrainData:
    """The configured data through the loaders of the real run; ``--smoke`` reads at most
    SMOKE_SAMPLE rows of each source, so a preflight fails where the real run would."""
    if builtin:
        return builtin_data(cfg, resolution, need_images)
    if source := digits_source(cfg):
        return digits_data(resolution, source=source)
    limit = SMOKE_SAMPLE if smoke else None
    try:
        data = _configured_data(cfg, resolution, need_images, limit)
    except ConfigError as err:
        if not smoke:
            raise
        raise ConfigError(
            f"{err}\n--smoke reads the configured data to check it; to preflight without it, "
            "add --builtin-data (built-in prompts and digits images)"
        ) from None
    if smoke:
        images = "" if data.images is None else f", {len(data.images)} images"
        data.substituted = (
            f"a bounded sample of the configured data: {len(data.prompts)} prompts{images} "
            f"(at most {SMOKE_SAMPLE} rows per source)"
        )
    return data


def _configured_data(
    cfg: DataConfig, resolution: int, need_images: bool, limit: int | None
) -> TrainData:
    from distillkit.data.hf_datasets import load_dataset_sources

    from_datasets = load_dataset_sources(cfg, resolution, need_images, limit)
    if from_datasets is not None:
        return from_datasets
    # prompts: data.prompts, else (recipes that train on image-caption pairs) the captions of
    # data.images, the rule the data.images_dataset route follows too
    prompts = (
        None if cfg.prompts is None else read_prompts(Path(cfg.prompts), cfg.prompt_column, limit)
    )
    if not need_images:
        if prompts is None:
            raise ConfigError("data.prompts is not set: give a .txt / .jsonl / .csv prompt file")
        return TrainData(prompts)
    if cfg.images is None:
        raise ConfigError("data.images is required by this recipe (real images for its GAN term)")
    images, captions = read_image_folder(Path(cfg.images), resolution, limit)
    if prompts is None:
        prompts = [c for c in captions if c]
        if not prompts:
            raise ConfigError(
                f"data.prompts is not set and the images in {cfg.images} have no captions "
                "(metadata.jsonl or .txt files): give data.prompts or caption the images"
            )
    return TrainData(prompts, images, [c or prompts[0] for c in captions])

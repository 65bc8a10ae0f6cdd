"""Precomputed text embeddings and VAE latents, keyed by teacher identity and data content.

Why: a run re-encodes the same prompts and images every epoch with frozen encoders that take
GPU memory (SDXL's two text encoders, SANA's Gemma). Encoding once and reading safetensors lets
a run free the encoders. The key covers everything that changes the numbers: teacher model id,
revision, family and resolution, and a hash of the prompts, captions and image pixels.

Layout: ``<cache_dir>/<teacher digest>/<data hash>/{text,latents}.safetensors + meta.json``,
written to a temporary folder and renamed, so a crash never leaves a half cache behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from distillkit.teachers.base import Conditioning, TeacherAdapter, tree_cat

if TYPE_CHECKING:
    from distillkit.config import TeacherConfig
    from distillkit.data.sources import TrainData

CACHE_VERSION = 1


@dataclass(frozen=True)
class TeacherKey:
    """What decides the encoders' outputs (a local teacher without revision: its path)."""

    model_id: str
    revision: str | None
    family: str
    resolution: int
    max_sequence_length: int | None = None  # the card's text length changes every embedding

    def digest(self) -> str:
        fields = asdict(self)
        if fields["max_sequence_length"] is None:  # unset: the digest caches already carry
            del fields["max_sequence_length"]
        text = json.dumps({"v": CACHE_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @classmethod
    def from_config(cls, cfg: TeacherConfig, smoke: bool = False) -> TeacherKey:
        """The key of the teacher a run loads (``--smoke``: the cached tiny teacher)."""
        from distillkit.teachers.load import SMOKE_RESOLUTION, tiny_teacher_dir

        if smoke:
            assert cfg.family is not None
            tiny = tiny_teacher_dir(cfg.family, SMOKE_RESOLUTION).name
            return cls(f"tiny:{tiny}", None, cfg.family, SMOKE_RESOLUTION, cfg.max_sequence_length)
        cfg.require()
        return cls(
            str(cfg.model_id),
            cfg.revision,
            str(cfg.family),
            int(cfg.resolution or 0),
            cfg.max_sequence_length,
        )


def data_hash(data: TrainData) -> str:
    """sha256 of prompts, captions and the (already resized) image pixels."""
    h = hashlib.sha256(json.dumps([data.prompts, data.captions]).encode())
    if data.images is not None:
        pixels = np.ascontiguousarray(data.images.detach().float().cpu().numpy())
        h.update(str(pixels.shape).encode())
        h.update(pixels.tobytes())
    return h.hexdigest()[:16]


def texts_of(data: TrainData) -> list[str]:
    """Every text a run encodes: prompts and image captions, unique, in first-seen order."""
    return list(dict.fromkeys([*data.prompts, *(data.captions or [])]))


def _flatten(tree: dict[str, Any], prefix: str, out: dict[str, torch.Tensor]) -> None:
    for key, value in tree.items():
        if isinstance(value, dict):
            _flatten(value, f"{prefix}{key}/", out)
        elif isinstance(value, torch.Tensor):
            out[prefix + key] = value.detach().cpu().contiguous()
        else:
            raise TypeError(f"cannot cache non-tensor conditioning {prefix + key!r}")


def _unflatten(flat: dict[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        if not key.startswith(prefix):
            continue
        *parents, leaf = key[len(prefix) :].split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _map(tree: dict[str, Any], fn) -> dict[str, Any]:
    return {k: _map(v, fn) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def _check_shared(uncond: dict[str, Any]) -> None:
    """The cache stores one unconditional row; that needs every row to be the same."""
    flat: dict[str, torch.Tensor] = {}
    _flatten(uncond, "", flat)
    for name, t in flat.items():
        if not torch.allclose(t, t[:1].expand_as(t), atol=1e-6):
            raise ValueError(f"unconditional {name!r} differs per prompt: cannot share one row")


@dataclass
class CachedEncodings:
    """Loaded cache: ``encode`` is a drop-in for ``TeacherAdapter.encode`` on known texts."""

    path: Path
    texts: list[str]
    cond: dict[str, Any]  # tree of (len(texts), ...) tensors
    uncond: dict[str, Any]  # tree of (1, ...) tensors: the empty prompt is the same for all
    latents: torch.Tensor | None  # (N, C, h, w), row i = data.images[i]

    def __post_init__(self) -> None:
        self._rows = {text: i for i, text in enumerate(self.texts)}

    def encode(self, prompts: list[str]) -> Conditioning:
        missing = [p for p in prompts if p not in self._rows]
        if missing:
            raise KeyError(f"{len(missing)} prompt(s) not in the cache {self.path}: {missing[:3]}")
        index = torch.tensor([self._rows[p] for p in prompts])
        zeros = torch.zeros(len(prompts), dtype=torch.long)
        return Conditioning(
            _map(self.cond, lambda t: t[index]), _map(self.uncond, lambda t: t[zeros])
        )

    def to(self, device: torch.device | str) -> CachedEncodings:
        """Move every tensor once (e.g. to the GPU) instead of per batch."""
        self.cond = _map(self.cond, lambda t: t.to(device))
        self.uncond = _map(self.uncond, lambda t: t.to(device))
        self.latents = None if self.latents is None else self.latents.to(device)
        return self


def cache_path(cache_dir: Path | str, key: TeacherKey, data: TrainData) -> Path:
    return Path(cache_dir) / key.digest() / data_hash(data)


def load_cache(cache_dir: Path | str, key: TeacherKey, data: TrainData) -> CachedEncodings | None:
    """The cache for (key, data) if complete, else None; needs no teacher in memory."""
    path = cache_path(cache_dir, key, data)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        return None
    meta = json.loads(meta_file.read_text())
    if meta.get("version") != CACHE_VERSION:
        return None
    flat = load_file(str(path / "text.safetensors"))
    latents = None
    if meta["latents"]:
        latents = load_file(str(path / "latents.safetensors"))["latents"]
    return CachedEncodings(
        path, meta["texts"], _unflatten(flat, "cond/"), _unflatten(flat, "uncond/"), latents
    )


@torch.no_grad()
def precompute_cache(
    teacher: TeacherAdapter,
    data: TrainData,
    cache_dir: Path | str,
    key: TeacherKey,
    *,
    batch_size: int = 32,
) -> CachedEncodings:
    """Encode every prompt/caption and VAE-encode every image once; reuse an existing cache."""
    found = load_cache(cache_dir, key, data)
    if found is not None:
        return found
    texts = texts_of(data)
    conds, unconds = [], []
    for start in range(0, len(texts), batch_size):
        with torch.autocast(teacher.device.type, enabled=False):
            cond, uncond = teacher.encode_prompts(texts[start : start + batch_size])
        conds.append(cond)
        _check_shared(uncond)
        unconds.append(_map(uncond, lambda t: t[:1]))
    flat: dict[str, torch.Tensor] = {}
    _flatten(tree_cat(conds), "cond/", flat)
    _flatten(unconds[0], "uncond/", flat)
    latents = None
    if data.images is not None:
        latents = torch.cat(
            [
                teacher.encode_images(data.images[i : i + batch_size]).cpu()
                for i in range(0, len(data.images), batch_size)
            ]
        )
    final = cache_path(cache_dir, key, data)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(flat, str(tmp / "text.safetensors"))
    if latents is not None:
        save_file({"latents": latents.contiguous()}, str(tmp / "latents.safetensors"))
    meta = {
        "version": CACHE_VERSION,
        "teacher": asdict(key),
        "data_hash": final.name,
        "texts": texts,
        "latents": latents is not None,
    }
    (tmp / "meta.json").write_text(json.dumps(meta))
    if final.exists():  # another process finished first: theirs is as good as ours
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, final)
    result = load_cache(cache_dir, key, data)
    assert result is not None
    return result

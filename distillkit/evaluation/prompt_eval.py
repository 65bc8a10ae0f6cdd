"""`distillkit eval PIPELINE_DIR --prompts FILE --metrics fid,clip,prc`: text-to-image scores.

The general path next to the digits benchmark: generate from exported pipelines with a prompt
file and fixed seeds, then FID and precision / recall (torchmetrics / torch-fidelity, see
`fid.py`) and CLIP score (open_clip). The student and, with `compare`, its teacher at its own
steps are scored on the same prompts, seeds and real statistics, one row each. Metric models
and references load before any image is generated, so a missing weight file fails in a second,
not after an hour of sampling. Images stream batch by batch into the metrics (30K samples at
1024 px do not fit in memory). The JSON records the protocol that decides the numbers.
Under `accelerate launch` / `torchrun` the ranks share the fixed batches and rank 0 scores
(`shard.py`): the numbers equal a 1-process run's.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from distillkit.errors import ConfigError
from distillkit.evaluation.shard import SHARDING, Shard
from distillkit.images import save_grid

METRICS = ("fid", "clip", "prc")
GRID_MAX = 64


@dataclass(frozen=True)
class Run:
    """One pipeline to score: a label for the table and how it is called."""

    label: str
    pipeline_dir: Path | str
    steps: int
    guidance: float


def parse_metrics(text: str) -> list[str]:
    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise ConfigError(f"--metrics: unknown {unknown or text!r}; choose from {list(METRICS)}")
    return list(dict.fromkeys(names))


def _versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "diffusers", "torchmetrics", "torch-fidelity", "open_clip_torch"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def _grid_path(grid: Path | str, index: int, label: str) -> Path:
    path = Path(grid)
    return path if index == 0 else path.with_name(f"{path.stem}_{label}{path.suffix}")


def _score(
    pipe, run: Run, prompts: list[str], fid, clip, metrics, *, seed, batch_size, resolution, shard
) -> tuple[dict[str, Any], torch.Tensor] | None:
    """This rank's fixed batches (batch k seeded seed + k) into features and CLIP scores, gathered
    in sample order; on the main rank (row, grid images), elsewhere None."""
    from distillkit.evaluation.fid import precision_recall, to_uint8
    from distillkit.evaluation.generate import generate_images

    feats, clips, index, shown = [], [], [], []
    for k in shard.batches(len(prompts), batch_size):
        start = k * batch_size
        chunk = prompts[start : start + batch_size]
        images = generate_images(
            pipe,
            chunk,
            steps=run.steps,
            guidance=run.guidance,
            seed=seed + k,
            batch_size=batch_size,
            resolution=resolution,
        )
        index.append(torch.arange(start, start + len(chunk)))
        if fid is not None:
            feats.append(fid.extract(images))
        if clip is not None:
            clips.append(torch.from_numpy(clip.scores(images, chunk, batch_size=batch_size)))
        if start < GRID_MAX:
            shown.append((start, to_uint8(images[: GRID_MAX - start])))
    where = torch.cat(index) if index else torch.empty(0, dtype=torch.long)
    features = per_image = None
    if fid is not None:
        mine = torch.cat(feats) if feats else torch.empty(0, 2048)
        features = shard.gather_rows(mine, where)
    if clip is not None:
        mine = torch.cat(clips) if clips else torch.empty(0, dtype=torch.float64)
        per_image = shard.gather_rows(mine, where)
    shown = sorted(shard.gather_objects(shown), key=lambda item: item[0])
    if not shard.main:
        return None
    row: dict[str, Any] = {
        "label": run.label,
        "pipeline_dir": str(run.pipeline_dir),
        "pipeline_class": type(pipe).__name__,
        "scheduler": type(pipe.scheduler).__name__,
        "steps": run.steps,
        "guidance": float(run.guidance),
        "n": len(prompts),
    }
    if features is not None:
        fid.set_generated(list(features.split(batch_size)))
    if "fid" in metrics:
        row["fid"] = fid.compute()
    if "prc" in metrics:
        row.update(precision_recall(fid.feature_array(False), fid.feature_array(True)))
    if per_image is not None:
        row["clip_score"] = float(per_image.mean())
        row["clip_score_std"] = float(per_image.std(unbiased=False))
    return row, torch.cat([images for _, images in shown]).float() / 127.5 - 1


def evaluate_prompts(
    pipeline_dir: Path | str,
    prompts: list[str],
    *,
    metrics: list[str],
    steps: int,
    guidance: float,
    seed: int = 0,
    images_per_prompt: int = 1,
    batch_size: int = 16,
    fid_weights: str | None = None,
    fid_reference: str | None = None,
    clip_model: str | None = None,
    clip_weights: str | None = None,
    grid: Path | str | None = None,
    compare: Sequence[Run] = (),
    label: str = "student",
    protocol_name: str | None = None,
    prompts_info: dict[str, Any] | None = None,
    save_reference: Path | str | None = None,
) -> dict[str, Any] | None:
    """Scores of ``pipeline_dir`` (top level) and of every run (``runs``) plus the protocol.

    Under several processes each rank generates its share (see `shard.py`); the main rank alone
    scores, writes grids and returns the result, the others return None.
    """
    from distillkit.clip import DEFAULT_MODEL, load_clip
    from distillkit.evaluation.fid import FID, file_sha256
    from distillkit.evaluation.generate import default_resolution, load_pipeline

    shard = Shard.current()
    device = shard.device
    fid = clip = None
    if "fid" in metrics or "prc" in metrics:
        if not fid_reference:
            raise ConfigError("--fid-reference: FID needs real images (a folder) or an .npz")
        fid = FID(fid_weights, device, keep_features="prc" in metrics)
    if "clip" in metrics:
        clip = load_clip(clip_model or DEFAULT_MODEL, clip_weights, device)
    pipe = load_pipeline(pipeline_dir, device=device)
    resolution = default_resolution(pipe)
    if fid is not None:
        assert fid_reference is not None
        fid.load_reference(fid_reference, resolution, batch_size)
        if (
            save_reference is not None and shard.main
        ):  # reuse for the next run: COCO's 40K images read once
            fid.save_reference(save_reference)
        if "prc" in metrics and fid.feature_array(True).shape[0] == 0:
            raise ConfigError(
                f"--fid-reference: precision/recall needs reference features; {fid_reference} "
                "holds only mu/sigma: give the image folder (or an .npz with 'features')"
            )
    expanded = [p for p in prompts for _ in range(images_per_prompt)]
    runs = [Run(label, pipeline_dir, steps, guidance), *compare]
    rows = []
    for index, run in enumerate(runs):
        pipe = pipe if index == 0 else load_pipeline(run.pipeline_dir, device=device)
        scored = _score(
            pipe, run, expanded, fid, clip, metrics,
            seed=seed, batch_size=batch_size, resolution=resolution, shard=shard,
        )  # fmt: skip
        pipe = None
        if scored is None:  # not the main rank: its share is gathered there
            continue
        row, shown = scored
        rows.append(row)
        if grid is not None:
            cols = images_per_prompt if 1 < images_per_prompt <= 8 else 8
            rows_n = max(1, min(8, math.ceil(len(shown) / cols)))
            save_grid(shown, _grid_path(grid, index, run.label), rows=rows_n, cols=cols)
    if not shard.main:
        return None
    n = len(expanded)
    protocol: dict[str, Any] = {
        "name": protocol_name,
        "pipeline_dir": str(pipeline_dir),
        "pipeline_class": rows[0]["pipeline_class"],
        "scheduler": rows[0]["scheduler"],
        "steps": steps,
        "guidance": float(guidance),
        "resolution": resolution,
        "prompts": len(prompts),
        "prompt_file": prompts_info,
        "images_per_prompt": images_per_prompt,
        "samples": n,
        "seed": seed,
        "batch_size": batch_size,
        "batch_seeds": [seed + i for i in range(math.ceil(n / batch_size))],
        "generation": "one CPU torch.Generator per batch, seed + batch index; every run alike",
        "world_size": shard.world,
        "sharding": SHARDING,
        "software": _versions(),
    }
    if fid is not None:
        protocol["fid"] = {
            **fid.protocol(),
            "samples": n,
            "note": "FID is biased upward below ~10k samples; compare equal sample counts",
        }
    if "prc" in metrics:
        protocol["precision_recall"] = {
            "implementation": "torch-fidelity prc_features_to_metric (Kynkäänniemi et al. 2019)",
            "neighbours": 3,
            "features": "the FID Inception pool3 above (the paper's own uses VGG-16)",
        }
    if clip is not None:
        assert clip_weights is not None
        protocol["clip"] = {
            **clip.protocol(),
            "weights_sha256": file_sha256(Path(clip_weights).expanduser()),
        }
        protocol["clip"]["samples"] = n
    main = {k: v for k, v in rows[0].items() if k in ("fid", "precision", "recall", "n")}
    main.update({k: v for k, v in rows[0].items() if k.startswith("clip_score")})
    return {**main, "runs": rows, "protocol": protocol}

"""`distillkit eval PIPELINE_DIR --prompts FILE --metrics fid,clip`: standard text-to-image scores.

The general path next to the digits benchmark: generate from an exported pipeline with a prompt
file and fixed seeds, then FID (Inception, against a reference folder or .npz) and CLIP score.
Metric models and references are checked before any image is generated, so a missing weight
file fails in a second, not after an hour of sampling. The JSON records the full protocol.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from distillkit.errors import ConfigError
from distillkit.images import save_grid

METRICS = ("fid", "clip")


def parse_metrics(text: str) -> list[str]:
    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise ConfigError(f"--metrics: unknown {unknown or text!r}; choose from {list(METRICS)}")
    return list(dict.fromkeys(names))


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
) -> dict[str, Any]:
    """Scores plus a `protocol` dict; metric weights/references load before generation."""
    import torch

    from distillkit.clip import DEFAULT_MODEL, load_clip
    from distillkit.evaluation.fid import inception_features, load_inception, reference_stats
    from distillkit.evaluation.generate import default_resolution, generate_images, load_pipeline
    from distillkit.evaluation.metrics import feature_stats, frechet_distance

    device = "cuda" if torch.cuda.is_available() else "cpu"
    inception = clip = None
    if "fid" in metrics:
        if not fid_reference:
            raise ConfigError("--fid-reference: FID needs real images (a folder) or an .npz")
        inception = load_inception(fid_weights, device)
    if "clip" in metrics:
        clip = load_clip(clip_model or DEFAULT_MODEL, clip_weights, device)
    pipe = load_pipeline(pipeline_dir)
    resolution = default_resolution(pipe)
    ref = None
    if inception is not None:
        assert fid_reference is not None
        ref = reference_stats(fid_reference, inception, resolution)
    expanded = [p for p in prompts for _ in range(images_per_prompt)]
    images = generate_images(
        pipe,
        expanded,
        steps=steps,
        guidance=guidance,
        seed=seed,
        batch_size=batch_size,
        resolution=resolution,
    )
    n = len(images)
    scores: dict[str, Any] = {"n": n}
    protocol: dict[str, Any] = {
        "pipeline_dir": str(pipeline_dir),
        "pipeline_class": type(pipe).__name__,
        "scheduler": type(pipe.scheduler).__name__,
        "steps": steps,
        "guidance": float(guidance),
        "resolution": resolution,
        "prompts": len(prompts),
        "images_per_prompt": images_per_prompt,
        "samples": n,
        "seed": seed,
        "batch_size": batch_size,
        "batch_seeds": [seed + i for i in range(math.ceil(n / batch_size))],
    }
    if inception is not None and ref is not None:
        mu, sigma, ref_n = ref
        feats = inception_features(inception, images)
        scores["fid"] = frechet_distance(*feature_stats(feats), mu, sigma)
        protocol["fid"] = {
            **inception.protocol(),
            "reference": str(fid_reference),
            "reference_samples": ref_n,
            "samples": n,
            "note": "FID is biased upward below ~10k samples; compare equal sample counts",
        }
    if clip is not None:
        per_image = clip.scores(images, expanded, batch_size=batch_size)
        scores["clip_score"] = float(per_image.mean())
        scores["clip_score_std"] = float(per_image.std())
        protocol["clip"] = {**clip.protocol(), "samples": n}
    if grid is not None:
        cols = images_per_prompt if 1 < images_per_prompt <= 8 else 8
        save_grid(images, grid, rows=max(1, min(8, math.ceil(n / cols))), cols=cols)
    scores["protocol"] = protocol
    return scores

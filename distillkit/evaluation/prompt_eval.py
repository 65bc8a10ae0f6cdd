"""`distillkit eval PIPELINE_DIR --prompts FILE --metrics fid,clip`: standard text-to-image scores.

The general path next to the digits benchmark: generate from an exported pipeline with a prompt
file and fixed seeds, then FID (Inception, against a reference folder or .npz) and CLIP score.
Metric models and references are checked before any image is generated, so a missing weight
file fails in a second, not after an hour of sampling. The JSON records the full protocol.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from distillkit.errors import ConfigError
from distillkit.images import save_grid

METRICS = ("fid", "clip")


def add_prompt_eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prompt-set evaluation (--prompts)")
    g.add_argument("--prompts", default=None, metavar="FILE", help=".txt / .jsonl / .csv")
    g.add_argument("--prompt-column", default="text", help="column of a .jsonl / .csv file")
    g.add_argument("--metrics", default="fid,clip", help="comma-separated: fid, clip")
    g.add_argument("--images-per-prompt", type=int, default=1)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--fid-weights", default=None, metavar="PATH", help="Inception v3 weights")
    g.add_argument("--fid-reference", default=None, metavar="DIR_OR_NPZ", help="real images")
    g.add_argument("--clip-model", default=None, help="open_clip architecture (ViT-L-14)")
    g.add_argument("--clip-weights", default=None, metavar="PATH", help="open_clip weights")


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


def cmd_prompt_eval(args: argparse.Namespace) -> int:
    from distillkit.data.sources import read_prompts
    from distillkit.evaluation.generate import export_call_defaults

    metrics = parse_metrics(args.metrics)
    try:
        prompts = read_prompts(Path(args.prompts), args.prompt_column)
    except ConfigError as err:  # its messages name the run config's fields; here: our flags
        text = str(err).replace("data.prompt_column", "--prompt-column")
        raise ConfigError(text.replace("data.prompts", "--prompts")) from None
    card = export_call_defaults(args.pipeline_dir)
    steps = args.steps if args.steps is not None else card.get("num_inference_steps")
    guidance = args.guidance if args.guidance is not None else card.get("guidance_scale")
    if steps is None or guidance is None:
        raise ConfigError(
            f"{args.pipeline_dir} has no distillkit card saying how to call it: pass --steps "
            "and --guidance"
        )
    for flag, value in (
        ("--images-per-prompt", args.images_per_prompt),
        ("--batch-size", args.batch_size),
    ):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    scores = evaluate_prompts(
        args.pipeline_dir,
        prompts,
        metrics=metrics,
        steps=int(steps),
        guidance=float(guidance),
        seed=args.seed,
        images_per_prompt=args.images_per_prompt,
        batch_size=args.batch_size,
        fid_weights=args.fid_weights,
        fid_reference=args.fid_reference,
        clip_model=args.clip_model,
        clip_weights=args.clip_weights,
        grid=args.grid,
    )
    shown = "  ".join(f"{k}={scores[k]:.4g}" for k in ("fid", "clip_score") if k in scores)
    print(f"{args.pipeline_dir}: {scores['n']} samples, steps={steps}  {shown}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(scores, indent=1) + "\n")
        print(f"wrote {out}")
    return 0
